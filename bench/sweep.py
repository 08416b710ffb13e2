"""Test accuracy against the imbalance factor: end-to-end methods trained on long-tailed CIFAR at each
imbalance factor and profile, all on the short CPU schedule of bench/methods_table.py.

    python bench/sweep.py                       # ce and balanced_softmax; IF 1 10 50 100 200; exp and step; cifar10
    python bench/sweep.py --datasets cifar10 cifar100 --methods ce balanced_softmax ldam_drw data.root=/data

A method is a config of the --configs folder (as for bench/methods_table.py: its loss, head, sampler, LDAM's
deferred re-weighting), as in the Balanced Softmax paper's comparison with softmax cross-entropy as the
imbalance grows. Every run gets short_schedule's overrides, then the key=value overrides given here, then
its dataset, profile and imbalance factor. Each run has its
own directory under --out (<dataset>_<profile>_if<IF>_<method>); a run whose directory holds
test_metrics.json is not rerun, so an interrupted sweep continues where it stopped. Imbalance factor 1
is the same balanced training set under every profile: it is trained once, under the first profile. Writes
<out>/sweep.json (one record per run), <out>/table.md and <out>/sweep.png (top-1 against the imbalance
factor, one panel per dataset).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: training machines have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compare_runs import pct  # noqa: E402
from bench.methods_table import (VAL_PER_CLASS, method_config, method_configs, parse_with_overrides,  # noqa: E402
                                 train_and_test)
from bench.report_figures import MARKERS, legend_below, log_axis, save  # noqa: E402
from config.program import OneLineParser, run_program, user_errors  # noqa: E402
from config.schema import Config  # noqa: E402

GROUPS = ("top1", "many", "medium", "few")
LINESTYLES = ("-", "--", ":", "-.")  # one per profile


def plan(args: argparse.Namespace) -> list[tuple[dict, Config]]:
    """Every run's record keys and config, all loaded before any run trains, so that a bad value stops the
    sweep at once rather than hours in."""
    paths = {q.stem: q for q in method_configs(args.configs, args.methods)}
    runs = []
    for dataset in args.datasets:
        for profile in args.profiles:
            for factor in args.imbalance_factors:
                shape = args.profiles[0] if factor == 1 else profile  # IF 1 is one balanced set: one run serves all
                for method in args.methods:
                    name = f"{dataset}_{shape}_if{factor:g}_{method}"
                    point = [f"data.dataset={dataset}", f"data.profile={shape}", f"data.imbalance_factor={factor!r}",
                             f"name={name}", f"log_dir={args.out / name}"]
                    cfg = method_config(paths[method], args.iterations, args.out, args.overrides + point)
                    runs.append(({"dataset": dataset, "profile": profile, "imbalance_factor": factor,
                                  "method": method}, cfg))
    return runs


def table(records: list[dict], caption: str) -> str:
    lines = [caption, "", "| dataset | profile | IF | method | top-1 | many | medium | few |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['dataset']} | {r['profile']} | {r['imbalance_factor']:g} | {r['method']} | "
              + " | ".join(pct(r[k]) for k in GROUPS) + " |" for r in records]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    """Top-1 against the imbalance factor (log axis): a colour per method, a line style per profile."""
    datasets, methods, profiles = ([*dict.fromkeys(r[k] for r in records)] for k in ("dataset", "method", "profile"))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for i, method in enumerate(methods):
            for j, profile in enumerate(profiles):
                points = sorted((r["imbalance_factor"], 100 * r["top1"]) for r in records
                                if (r["dataset"], r["method"], r["profile"]) == (dataset, method, profile))
                ax.plot(*zip(*points), color=f"C{i % 10}", ls=LINESTYLES[j % len(LINESTYLES)],
                        marker=MARKERS[i % len(MARKERS)], label=f"{method}, {profile}")
        ax.set_xscale("log")
        log_axis(ax.xaxis, np.array([r["imbalance_factor"] for r in records]))
        ax.set(title=dataset, xlabel="imbalance factor $n_{max} / n_{min}$ (log scale)", ylabel="test top-1 (%)")
        ax.grid(alpha=0.3)
    legend_below(fig, *axes[0][0].get_legend_handles_labels())
    save(fig, path)


def sweep(args: argparse.Namespace) -> None:
    with user_errors():
        runs = plan(args)
        records = [{**keys, **{k: train_and_test(cfg)[k] for k in GROUPS}} for keys, cfg in runs]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sweep.json").write_text(json.dumps(records, indent=1))
        t = runs[0][1].train
        caption = (f"{args.configs}/<method>.yaml: {args.iterations} iterations at batch {t.batch_size} "
                   f"(best on {VAL_PER_CLASS}/class val); test accuracy in %")
        text = table(records, caption)
        (args.out / "table.md").write_text(text)
        plot(records, args.out / "sweep.png")
    print(text + f"written to {args.out}/sweep.json, table.md and sweep.png")


def main() -> None:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["cifar10"], choices=["cifar10", "cifar100"])
    p.add_argument("--profiles", nargs="+", default=["exp", "step"], choices=["exp", "step"])
    p.add_argument("--imbalance-factors", nargs="+", type=float, default=[1, 10, 50, 100, 200],
                   help="n_max / n_min of the training set (1 = balanced)")
    p.add_argument("--methods", nargs="+", default=["ce", "balanced_softmax"],
                   help="method configs (file stems) of --configs")
    p.add_argument("--iterations", type=int, default=800, help="training steps per run at the schedule's batch")
    p.add_argument("--configs", type=Path, default=Path("config/cifar10_lt/methods_if100_exp"),
                   help="folder of method configs")
    p.add_argument("--out", type=Path, default=Path("logs/sweep"), help="parent of the run directories")
    p.add_argument("overrides", nargs="*", help="more key=value overrides for every run (e.g. data.root=...)")
    args = parse_with_overrides(p, sys.argv[1:])
    if args.iterations < 1:  # 0 would mean the configs' 200 epochs
        p.error("--iterations must be at least 1")
    try:
        method_configs(args.configs, args.methods)
    except ValueError as e:
        p.error(str(e))
    run_program(lambda: sweep(args))


if __name__ == "__main__":
    main()
