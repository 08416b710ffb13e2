"""The figures of bench/report.py: per-class accuracy, confusion matrices, BALMS sampling probabilities
and training curves, drawn headless (Agg) from the runs it has read."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: training machines have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from bench.compare_runs import pct  # noqa: E402
from engine.metrics import dense_confusion  # noqa: E402

NAMED_AXES = 20  # a figure names the classes on its axes up to this many classes
ANNOTATED = 12  # a confusion matrix prints each cell's % up to this many classes (the cells get too small)
MARKERS = "osD^v<>ph*"
DPI = 110


@dataclass
class Run:
    name: str  # the run directory's name
    method: str  # "stage 1: ce", "stage 2: balms"
    imbalance: str  # data.imbalance_factor as written in the table
    test: dict  # test_metrics.json
    epochs: list[dict]  # metrics.jsonl records that carry an epoch, one per epoch, in order

    @property
    def counts(self) -> np.ndarray:
        return np.array(self.test["train_class_counts"], dtype=float)


def floats(values: list) -> np.ndarray:
    """JSON numbers as floats, null (a non-finite number, an empty shot group) as nan."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def log_axis(axis: matplotlib.axis.Axis, values: np.ndarray) -> None:
    """Label a log-scale axis in plain numbers (no 10^k): at the values themselves when there are
    few (class counts, imbalance factors), else at 1, 2, 5, 10, 20, 50, ..."""
    distinct = np.unique(values[np.isfinite(values)])
    axis.set_major_locator(FixedLocator(distinct) if len(distinct) <= 10 else LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def epoch_ticks() -> MaxNLocator:
    return MaxNLocator(integer=True, min_n_ticks=1)  # whole epochs, even when a run has only one


def legend_below(fig: plt.Figure, handles: list, labels: list[str]) -> None:
    """One legend under the axes, never over the data (savefig's tight box takes it in)."""
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2 if len(labels) > 3 else 1,
               frameon=False)


def save(fig: plt.Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def plot_per_class(runs: list[Run], path: Path) -> None:
    """Each class's test accuracy against its training images, on a log axis: a class with none (a split list's)
    is drawn at 0.5, labelled 0, where the log axis would leave it out."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, run in enumerate(runs):
        order = np.argsort(-run.counts, kind="stable")
        ax.plot(np.maximum(run.counts[order], 0.5), 100 * floats(run.test["per_class"])[order], color=f"C{i % 10}",
                marker=MARKERS[i % len(MARKERS)], markersize=6 if len(run.counts) <= NAMED_AXES else 3, alpha=0.8,
                label=run.name)
    ax.set_xscale("log")
    log_axis(ax.xaxis, np.maximum(np.concatenate([r.counts for r in runs]), 0.5))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: "0" if v == 0.5 else f"{v:g}"))
    ax.set(xlabel="training images of the class (log scale)", ylabel="test accuracy of the class (%)", ylim=(-3, 103))
    ax.grid(alpha=0.3)
    legend_below(fig, *ax.get_legend_handles_labels())
    save(fig, path)


def plot_confusion(run: Run, role: str, path: Path) -> None:
    cm = dense_confusion(run.test["confusion_matrix"]).numpy().astype(float)
    totals = cm.sum(axis=1, keepdims=True)
    share = 100 * np.divide(cm, totals, out=np.full_like(cm, np.nan), where=totals > 0)  # % of each true class
    c = len(cm)
    side = min(11.0, 3.0 + 0.5 * c)
    fig, ax = plt.subplots(figsize=(side + 1.8, side))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="% of the true class's test images")
    if c <= NAMED_AXES:
        names = run.test["class_names"]
        ax.set_xticks(range(c), names, rotation=45, ha="right")
        ax.set_yticks(range(c), [f"{n} ({k:g})" for n, k in zip(names, run.counts)])
    if c <= ANNOTATED:
        for (t, p), v in np.ndenumerate(share):
            if not np.isnan(v):
                ax.text(p, t, f"{v:.0f}", ha="center", va="center", fontsize=8, color="white" if v > 55 else "black")
    ax.set(xlabel="predicted class", ylabel="true class (training images)" if c <= NAMED_AXES else "true class",
           title=f"{role}: {run.name}\ntest top-1 {pct(run.test['top1'])} %")
    save(fig, path)


def plot_sampling(run: Run, path: Path) -> None:
    """BALMS's per-class sampling probabilities (metrics.jsonl's sample_probs, one list per epoch)."""
    rows = [e for e in run.epochs if e.get("sample_probs")]
    epochs = [e["epoch"] for e in rows]
    probs = np.array([floats(e["sample_probs"]) for e in rows])  # (epochs, classes)
    order = np.argsort(-run.counts, kind="stable")  # most to fewest training images
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    sampling_against_frequency(left, run, order, epochs, probs)
    sampling_over_epochs(right, run, order, epochs, probs)
    fig.suptitle(f"BALMS meta-sampler of {run.name}")
    save(fig, path)


def sampling_against_frequency(ax: plt.Axes, run: Run, order: np.ndarray, epochs: list, probs: np.ndarray) -> None:
    """Each class's share of the training set, and its sampling probability after the first and the last epoch."""
    freq, c = run.counts / run.counts.sum(), len(order)
    x, marked = np.arange(c), c <= NAMED_AXES  # markers would hide the lines of more classes
    ax.plot(x, probs[0][order], marker="s" if marked else None, color="C0",
            label=f"sampling probability, epoch {epochs[0]}")
    if len(epochs) > 1:
        ax.plot(x, probs[-1][order], marker="^" if marked else None, color="C3",
                label=f"sampling probability, epoch {epochs[-1]}")
    ax.plot(x, freq[order], "k--", marker="o" if marked else None, markersize=4, zorder=3,
            label="class frequency $n_c / \\sum n$")
    ax.axhline(1 / c, color="grey", ls=":", label="uniform $1/C$")
    ax.set_yscale("log")
    log_axis(ax.yaxis, np.concatenate([freq, probs[0], probs[-1]]))
    ax.set(ylabel="probability (log scale)", title="per class, most to fewest training images")
    if marked:
        names = run.test["class_names"]
        ax.set_xticks(x, [f"{names[k]} ({run.counts[k]:g})" for k in order], rotation=45, ha="right")
    else:
        ax.set_xlabel("class rank by training images (0 = most)")
    ax.legend(fontsize=8, loc="lower left")


def sampling_over_epochs(ax: plt.Axes, run: Run, order: np.ndarray, epochs: list, probs: np.ndarray) -> None:
    """Each class's sampling probability / its class frequency over the epochs: above 1 = over-sampled."""
    freq, c = run.counts / run.counts.sum(), len(order)
    legend = c <= 10  # one tab10 colour per class, named in a legend; more classes shade from head to tail
    colors = plt.get_cmap("tab10" if legend else "viridis")(np.arange(c) if legend else np.linspace(0, 1, c))
    dots = len(epochs) == 1 or (legend and len(epochs) <= 30)  # a lone epoch needs a dot; 100 classes blur
    for rank, k in enumerate(order):
        ax.plot(epochs, probs[:, k] / freq[k], color=colors[rank], marker="o" if dots else None,
                markersize=3, label=f"{run.test['class_names'][k]} ({run.counts[k]:g})")
    ax.axhline(1, color="k", ls="--", lw=0.8)
    ax.xaxis.set_major_locator(epoch_ticks())
    ax.set(xlabel="epoch", ylabel="sampling probability / class frequency",
           title="over- (> 1) or under-sampling (< 1) of each class")
    if legend:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        shade = plt.cm.ScalarMappable(plt.Normalize(0, c - 1), "viridis")
        ax.figure.colorbar(shade, ax=ax, label="class rank by training images (0 = most)")


def plot_curves(runs: list[Run], path: Path) -> list[str]:
    """Training loss and (when logged) validation top-1 per epoch; returns the runs with no loss to plot."""
    with_val = any("val_top1" in e for r in runs for e in r.epochs)
    fig, axes = plt.subplots(1, 2 if with_val else 1, figsize=(13 if with_val else 7, 4.5), squeeze=False)
    loss_ax, val_ax = axes[0][0], axes[0][-1]
    losses = []
    for i, run in enumerate(runs):
        style = {"color": f"C{i % 10}", "label": run.name, "markersize": 4,
                 "marker": MARKERS[i % len(MARKERS)] if len(run.epochs) <= 30 else None}
        trained = [e for e in run.epochs if "loss" in e]
        losses.append(floats([e["loss"] for e in trained]))
        loss_ax.plot([e["epoch"] for e in trained], losses[-1], **style)  # an empty line keeps the run in the legend
        if with_val:
            validated = [e for e in run.epochs if "val_top1" in e]
            val_ax.plot([e["epoch"] for e in validated], 100 * floats([e["val_top1"] for e in validated]), **style)
    finite = np.concatenate(losses)[np.isfinite(np.concatenate(losses))]
    if len(finite) and finite.min() > 0 and finite.max() > 30 * finite.min():
        loss_ax.set_yscale("log")  # a diverged run would flatten every other curve on a linear axis
    loss_ax.set(xlabel="epoch", ylabel="training loss (epoch mean)")
    if with_val:
        val_ax.set(xlabel="epoch", ylabel="validation top-1 (%)")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(epoch_ticks())
    legend_below(fig, *loss_ax.get_legend_handles_labels())
    save(fig, path)
    return [r.name for r, loss in zip(runs, losses) if not len(loss)]
