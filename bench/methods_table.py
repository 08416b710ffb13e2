"""Every end-to-end method of one config folder on the same short CPU schedule, side by side.

    python bench/methods_table.py                                   # config/cifar10_lt/methods_if100_exp
    python bench/methods_table.py --configs config/cifar10_lt/methods_if100_step --iterations 800

Each config keeps its method (loss, sampler, mixup, post-hoc adjustment) and gets the same
short schedule: `--iterations` steps at batch 128, lr 0.1, 5 % linear warm-up then cosine,
20 validation images per class held out (best.pt is picked on them, never on test). LDAM's
deferred re-weighting starts at 80 % of the run, as at epoch 160 of 200 in its paper.
Runs are resumable: a method whose run directory already holds test_metrics.json is not rerun.
Prints a Markdown table of test top-1 / many / medium / few (in %) and writes it to
<out>/table.md; each run's metrics.jsonl has the seconds of each epoch.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compare_runs import pct  # noqa: E402
from config.cli import OneLineParser, test  # noqa: E402
from config.load import load_config  # noqa: E402
from data.build import build_long_tail  # noqa: E402
from data.loader import steps_per_epoch  # noqa: E402
from data.samplers import build_sampler  # noqa: E402
from stage1_train import main as stage1_main  # noqa: E402

VAL_PER_CLASS = 20


def short_schedule(path: Path, iterations: int, out: Path, overrides: Sequence[str] = ()) -> list[str]:
    """Overrides that put one method's config on the shared short schedule. `overrides` are the run's
    other ones (data.root, a sweep's dataset and imbalance factor): LDAM's deferred re-weighting starts
    at 80 % of the epochs of the training set the run will really have."""
    cfg = load_config(path, list(overrides))
    schedule = [f"train.iterations={iterations}", "train.batch_size=128", "train.lr=0.1", "train.schedule=cosine",
                f"train.warmup={max(1, iterations // 20)}", f"data.val_per_class={VAL_PER_CLASS}",
                f"log_dir={out / path.stem}"]
    if cfg.loss.drw_epoch is not None:
        d = cfg.data
        data = build_long_tail(d.dataset, d.root, d.download, d.imbalance_factor, d.profile, d.subset_seed,
                               VAL_PER_CLASS)
        n = build_sampler(d.sampler, data.train_labels, len(data.class_counts)).num_samples
        epochs = math.ceil(iterations / steps_per_epoch(n, 128))
        schedule.append(f"loss.drw_epoch={int(0.8 * epochs)}")
    return schedule


def method_configs(folder: str | Path, names: list[str] | None) -> list[Path]:
    """The method configs (YAML files) of `folder` named `names` (file stems; None: all), in name order;
    ValueError naming the valid ones for a name with no file."""
    paths = sorted(Path(folder).glob("*.yaml"))
    unknown = sorted(set(names or []) - {q.stem for q in paths})
    if unknown:
        raise ValueError(f"no config {', '.join(unknown)} in {folder}; choose from {', '.join(q.stem for q in paths)}")
    return [q for q in paths if names is None or q.stem in names]


def parse_with_overrides(p: argparse.ArgumentParser, words: list[str]) -> argparse.Namespace:
    """Parse the options; key=value words are overrides wherever they stand (a list option such as
    --methods ce ... would otherwise swallow them)."""
    args = p.parse_args([w for w in words if w.startswith("-") or "=" not in w])
    args.overrides = [w for w in words if not w.startswith("-") and "=" in w]
    return args


def main() -> None:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="config/cifar10_lt/methods_if100_exp", help="folder of method configs")
    p.add_argument("--iterations", type=int, default=400, help="training steps per method at batch 128")
    p.add_argument("--methods", nargs="*", help="config names (file stems) to run; default: all in the folder")
    p.add_argument("--out", default="logs/methods_table", help="parent of the per-method run directories")
    p.add_argument("overrides", nargs="*", help="more key=value overrides for every run (e.g. data.root=...)")
    args = parse_with_overrides(p, sys.argv[1:])
    try:
        paths = method_configs(args.configs, args.methods or None)
    except ValueError as e:
        p.error(str(e))
    out = Path(args.out) / Path(args.configs).name
    rows = []
    for path in paths:
        run_dir = out / path.stem
        metrics_path = run_dir / "test_metrics.json"
        if not metrics_path.is_file():
            schedule = short_schedule(path, args.iterations, out, args.overrides)
            cfg = load_config(path, schedule + args.overrides, stage="stage1")
            stage1_main(cfg, resume=True)  # writes the time of each epoch to metrics.jsonl
            test(cfg, run_dir / "best.pt")
        m = json.loads(metrics_path.read_text())
        rows.append((path.stem, m))

    lines = [f"{args.configs}: {args.iterations} iterations at batch 128 (best on {VAL_PER_CLASS}/class val)", "",
             "| method | top-1 | many | medium | few |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {pct(m['top1'])} | {pct(m['many'])} | {pct(m['medium'])} | {pct(m['few'])} |"
              for name, m in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
