"""Every end-to-end method of one config folder on the same short CPU schedule, side by side.

    python bench/methods_table.py                                   # config/cifar10_lt/methods_if100_exp
    python bench/methods_table.py --configs config/cifar10_lt/methods_if100_step --iterations 800

Each config keeps its method (loss, sampler, mixup, post-hoc adjustment) and gets the same
short schedule: `--iterations` steps at batch 128, lr 0.1, 5 % linear warm-up then cosine,
20 validation images per class held out (best.pt is picked on them, never on test). LDAM's
deferred re-weighting starts at 80 % of the run's epochs (counted with the key=value overrides, e.g.
train.batch_size=512), as at epoch 160 of 200 in its paper.
Runs are resumable: a method whose run directory already holds test_metrics.json is not rerun.
Prints a Markdown table of test top-1 / many / medium / few (in %) and writes it to
<out>/<the configs folder's name>/table.md, beside the runs; each run's metrics.jsonl has the seconds of each epoch.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compare_runs import pct, read_metrics  # noqa: E402
from config.cli import test  # noqa: E402
from config.program import OneLineParser, nothing_left_of_a_refused_run, run_program, user_errors  # noqa: E402
from config.load import load_config  # noqa: E402
from config.saved import run_changes  # noqa: E402
from config.schema import Config  # noqa: E402
from data.build_files import build_training_set  # noqa: E402
from data.loader import steps_per_epoch  # noqa: E402
from data.samplers import build_sampler  # noqa: E402
from engine.schedule import total_steps  # noqa: E402
from stage1_train import main as stage1_main  # noqa: E402

VAL_PER_CLASS = 20


def short_schedule(path: Path, iterations: int, out: Path, overrides: Sequence[str] = ()) -> list[str]:
    """Overrides that put one method's config on the shared short schedule. `overrides` are the run's
    other ones, applied after these (data.root, train.batch_size, a sweep's dataset and imbalance factor):
    LDAM's deferred re-weighting starts at 80 % of the epochs the run will really have, with them."""
    schedule = [f"train.iterations={iterations}", "train.batch_size=128", "train.lr=0.1", "train.schedule=cosine",
                f"train.warmup={max(1, iterations // 20)}", f"data.val_per_class={VAL_PER_CLASS}",
                f"log_dir={out / path.stem}"]
    cfg = load_config(path, schedule + list(overrides), stage="stage1")
    if cfg.loss.drw_epoch is not None:
        schedule.append(f"loss.drw_epoch={int(0.8 * run_epochs(cfg))}")
    return schedule


def run_epochs(cfg: Config) -> int:
    """Epochs of a stage-1 run of `cfg` in one process (train.iterations rounded up to whole epochs)."""
    d, t = cfg.data, cfg.train
    data = build_training_set(d.dataset, d.root, d.list_dir, d.download, d.imbalance_factor, d.profile, d.subset_seed,
                              d.val_per_class, d.image_size, subset_draw=d.subset_draw, flip=d.flip)
    params = {"total_epochs": 1} if d.sampler == "progressive" else {}  # its epoch is every image for any T
    try:
        n = build_sampler(d.sampler, data.train_labels, len(data.class_counts), **params).num_samples
    except ValueError as e:
        sys.exit(f"config error: data.sampler={d.sampler}: {e}")
    epoch_len = steps_per_epoch(n, t.batch_size)
    return math.ceil(total_steps(epoch_len, t.epochs, t.iterations) / epoch_len)


def method_config(path: Path, iterations: int, out: Path, overrides: Sequence[str] = ()) -> Config:
    """The stage-1 config of one method's run: its YAML, the short schedule, then `overrides`."""
    return load_config(path, short_schedule(path, iterations, out, overrides) + list(overrides), stage="stage1")


def train_and_test(cfg: Config) -> dict:
    """The run's test metrics: read when its directory has them (from a run of this config: another one's are
    refused), else trained (resuming a killed run) and tested."""
    run_dir = Path(cfg.run_dir)
    path = run_dir / "test_metrics.json"
    if path.is_file() and (run_dir / "config.yaml").is_file():
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        diff = run_changes(saved, cfg, "stage1")
        if diff:
            sys.exit(f"error: {run_dir} holds the tested run of other settings ({', '.join(diff)} differ): its "
                     f"figures are not this table's; give --out another folder, or delete the run to train it again")
    if not path.is_file():
        with nothing_left_of_a_refused_run(run_dir), user_errors():  # as the entry scripts: no stray folder
            # a killed run continues; a new one is not announced as a --resume of nothing
            stage1_main(cfg, resume=any((run_dir / name).exists() for name in ("last.pt", "best.pt")))
            test(cfg, run_dir / "best.pt")
    return read_metrics(path)


@contextmanager
def no_empty_folders_left(folder: Path) -> Iterator[None]:
    """On a user error (SystemExit with a message), `folder` and those of its parents that did not exist
    before are removed if they are empty (nothing_left_of_a_refused_run removes a refused run's own)."""
    created = [q for q in [folder, *folder.parents] if not q.exists()]  # deepest first
    try:
        yield
    except SystemExit as e:
        if isinstance(e.code, str):
            for q in created:
                with suppress(OSError):  # not empty: another run's directory is there
                    q.rmdir()
        raise


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


def methods_table(args: argparse.Namespace, paths: list[Path]) -> None:
    out = Path(args.out) / Path(args.configs).name
    with no_empty_folders_left(out), user_errors():
        runs = [(path.stem, method_config(path, args.iterations, out, args.overrides)) for path in paths]  # all first
        rows = [(name, train_and_test(cfg)) for name, cfg in runs]  # writes each epoch's time to metrics.jsonl
        batch = runs[0][1].train.batch_size
        lines = [f"{args.configs}: {args.iterations} iterations at batch {batch} (best on {VAL_PER_CLASS}/class val)",
                 "", "| method | top-1 | many | medium | few |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {pct(m['top1'])} | {pct(m['many'])} | {pct(m['medium'])} | {pct(m['few'])} |"
                  for name, m in rows]
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="config/cifar10_lt/methods_if100_exp", help="folder of method configs")
    p.add_argument("--iterations", type=int, default=400, help="training steps per method at batch 128")
    p.add_argument("--methods", nargs="*", help="config names (file stems) to run; default: all in the folder")
    p.add_argument("--out", default="logs/methods_table", help="parent of the per-method run directories")
    p.add_argument("overrides", nargs="*", help="more key=value overrides for every run (e.g. data.root=...)")
    args = parse_with_overrides(p, sys.argv[1:])
    if args.iterations < 1:  # 0 would mean the configs' 200 epochs
        p.error("--iterations must be at least 1")
    try:
        paths = method_configs(args.configs, args.methods or None)
    except ValueError as e:
        p.error(str(e))
    if not paths:
        p.error(f"no method configs (*.yaml) in {args.configs}")
    run_program(lambda: methods_table(args, paths))


if __name__ == "__main__":
    main()
