"""A Markdown report with figures comparing runs: test table, per-class accuracy against the training
count, confusion matrices, BALMS sampling probabilities and training curves.

    python -m bench.report logs/cifar10_lt_if100_demo_stage1 logs/cifar10_lt_if100_demo_stage2_* --out logs/report

The first run is the baseline. Each run directory needs config.yaml, metrics.jsonl and
test_metrics.json (written by --test). Writes <out>/report.md and, beside it, the PNG figures it
links. Runs of other datasets or class counts may share a report: each figure reads each run's own
class counts and names.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compare_runs import parse_json, pct, read_metrics, read_text, row_name  # noqa: E402
from bench.report_figures import Run, plot_confusion, plot_curves, plot_per_class, plot_sampling  # noqa: E402
from config.program import OneLineParser, run_program  # noqa: E402
from engine.metrics import DENSE_CONFUSION_MAX  # noqa: E402

TEST_KEYS = ("top1", "many", "medium", "few", "per_class", "train_class_counts", "confusion_matrix", "class_names")


def read_epochs(path: Path) -> list[dict]:
    """The per-epoch records of metrics.jsonl; a resumed run's repeated epoch keeps its last record.
    Records without an epoch (tau-normalisation's tau search) are not epochs."""
    by_epoch = {}
    for i, line in enumerate(read_text(path).splitlines(), 1):
        record = parse_json(line, f"{path} line {i}") if line.strip() else {}
        if isinstance(record, dict) and "epoch" in record:
            by_epoch[record["epoch"]] = record
    return [by_epoch[k] for k in sorted(by_epoch)]


def check_test(path: Path, m: dict, epochs: list[dict]) -> None:
    cm = m["confusion_matrix"]  # nested lists, or above DENSE_CONFUSION_MAX classes its nonzero cells
    sizes = {len(m[k]) for k in ("per_class", "train_class_counts", "class_names")}
    sizes.add(cm["num_classes"] if isinstance(cm, dict) else len(cm))
    sizes |= {len(e["sample_probs"]) for e in epochs if e.get("sample_probs")}
    if len(sizes) != 1:
        sys.exit(f"error: {path} and its metrics.jsonl disagree on the number of classes; rerun --test for that run")


def read_config(path: Path) -> dict:
    try:
        cfg = yaml.safe_load(read_text(path))
    except yaml.YAMLError:
        cfg = None
    if not isinstance(cfg, dict):
        sys.exit(f"error: {path} is not a YAML mapping; it is the run's resolved config: restore it")
    return cfg


def load_run(path: Path) -> Run:
    """A run directory's test and training records; for a directory that holds only a --test of another run's
    checkpoint (`--test --ckpt` in a log_dir of its own), the training records are that run's."""
    if not path.is_dir():
        sys.exit(f"error: {path} is not a directory; pass run directories (logs/<run>) that --test has been run on")
    test_path = path / "test_metrics.json"
    test = read_metrics(test_path, TEST_KEYS) if test_path.is_file() else None
    source = path
    if not (path / "config.yaml").is_file() and test is not None:
        source = Path(test.get("checkpoint") or path).parent
    for name in ("config.yaml", "metrics.jsonl"):
        if not (source / name).is_file():
            sys.exit(f"error: {source} has no {name}: not a run directory of stage1_train.py or stage2_classifier.py")
    cfg = read_config(source / "config.yaml")
    stage2 = isinstance(cfg.get("stage2"), dict)
    if test is None:
        script = "stage2_classifier.py" if stage2 else "stage1_train.py"
        sys.exit(f"error: {path} has no test_metrics.json; run `python {script} --cfg {path}/config.yaml "
                 f"log_dir={path} --test` first")
    epochs = read_epochs(source / "metrics.jsonl")
    check_test(test_path, test, epochs)
    imbalance = (cfg.get("data") or {}).get("imbalance_factor")
    return Run(row_name(path, test), method_name(cfg), "-" if imbalance is None else f"{imbalance:g}",
               test, epochs)


def method_name(cfg: dict) -> str:
    """What a run's saved config trains: stage 2's method, or stage 1's loss with its mixup and sampler."""
    if isinstance(cfg.get("stage2"), dict):
        return f"stage 2: {cfg['stage2'].get('method')}"
    train, data = cfg.get("train") or {}, cfg.get("data") or {}
    extras = (["mixup"] if train.get("mixup_alpha") else []) + (
        [f"{data['sampler']} sampling"] if (data.get("sampler") or "instance") != "instance" else [])
    return " + ".join([f"stage 1: {(cfg.get('loss') or {}).get('name')}", *extras])


def best_index(runs: list[Run]) -> int:
    """The run with the highest test top-1; the earliest of equals, so a tie keeps the baseline."""
    top1 = [-1.0 if r.test["top1"] is None else r.test["top1"] for r in runs]
    return top1.index(max(top1))


def results_table(runs: list[Run]) -> str:
    lines = ["| run | method | IF | top-1 | many | medium | few |", "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.name} | {r.method} | {r.imbalance} | " + " | ".join(pct(r.test[k]) for k in TEST_KEYS[:4]) + " |"
              for r in runs]
    return "\n".join(lines)


def confusion_section(runs: list[Run], out: Path) -> list[str]:
    best = best_index(runs)
    md = ["## Confusion matrices", ""]
    for role, i in [("baseline", 0)] + ([("best", best)] if best else []):
        if len(runs[i].counts) > DENSE_CONFUSION_MAX:  # a pixel per cell would still be unreadable
            md += [f"The {role} run `{runs[i].name}` has {len(runs[i].counts)} classes: no confusion matrix figure "
                   f"above {DENSE_CONFUSION_MAX} (test_metrics.json holds its nonzero cells).", ""]
            continue
        plot_confusion(runs[i], f"{role} run", out / f"confusion_{role}.png")
        md += [f"![confusion matrix of the {role} run](confusion_{role}.png)", "",
               f"Row-normalised test confusion matrix of the {role} run `{runs[i].name}`: row = true class (with its "
               f"training images), column = predicted class; the diagonal is each class's accuracy.", ""]
    return md


def sampling_section(runs: list[Run], out: Path) -> list[str]:
    md = []
    for i, run in enumerate(runs, 1):
        if any(e.get("sample_probs") for e in run.epochs):
            plot_sampling(run, out / f"sampling_{i}.png")
            md += [f"![BALMS sampling probabilities of {run.name}](sampling_{i}.png)", "",
                   f"`{run.name}`: each class's sampling probability after the first and the last epoch against its "
                   f"share of the training set (left), and their ratio over the epochs (right; above 1 = "
                   f"over-sampled).", ""]
    return ["## BALMS sampling probabilities", "", *md] if md else []


def write_report(runs: list[Run], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plot_per_class(runs, out / "per_class.png")
    no_loss = plot_curves(runs, out / "curves.png")
    md = ["# Run report", "", f"{len(runs)} runs; baseline (the first given): `{runs[0].name}`; best test top-1: "
          f"`{runs[best_index(runs)].name}`.", "", "## Test results", "", results_table(runs), "",
          "Test accuracy in %: top-1 and the mean per-class accuracy of the many- (> 100 training images), "
          "medium- (20-100) and few-shot (< 20) classes; - where a run has no class in that group.", "",
          "## Per-class accuracy", "", "![per-class test accuracy against training images](per_class.png)", "",
          "Each point is one class: its test accuracy against its number of training images (log scale; a class "
          "with none is drawn left of 1, at the tick 0), one line per run.", "", *confusion_section(runs, out),
          *sampling_section(runs, out),
          "## Training curves", "", "![training loss and validation top-1 per epoch](curves.png)", "",
          "Training loss (left) and validation top-1 (right, where the run logs it) per epoch, one line per run"
          + (f"; {', '.join(f'`{n}`' for n in no_loss)} logs no training loss." if no_loss else "."), ""]
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"


def main() -> None:
    p = OneLineParser(prog="python -m bench.report", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories; the first is the baseline")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md and its figures")
    args = p.parse_args()

    def command() -> None:  # a run that is not one, or an --out that cannot be written: one line, exit 2
        runs = [load_run(path) for path in args.runs]
        try:
            print(f"written to {write_report(runs, args.out)}")
        except OSError as e:
            sys.exit(f"error: cannot write the report to {args.out}: {e.strerror or e}; choose another --out")
    run_program(command)


if __name__ == "__main__":
    main()
