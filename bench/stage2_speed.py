"""Stage-2 wall time, naive (backbone every batch) vs cached feature views, same iterations.

    python bench/stage2_speed.py --stage1 logs/cifar10_lt_if100_demo_stage1/best.pt [--iterations 1000]
    python bench/stage2_speed.py --stage1 ... --live-bn eval --methods balms --seeds 0 1

Runs each method twice on the real CIFAR-10-LT of the stage-1 run, once with
stage2.cache_views=0 (the BALMS code's path: the frozen backbone runs on every batch and, for
BALMS, on every meta batch) and once with cached views, then evaluates both on the test split.
Prints wall times, the naive / cached ratio and the test top-1 of each, all from this one run.
With several --seeds each seed runs both paths, and the last line of each method compares the
mean top-1 of the paths (one seed's top-1 moves by about 0.3 points by itself). Overrides go to
both runs; --live-bn eval (stage2.live_bn, which the naive run alone reads: the cached views are
computed in eval mode) keeps the naive path's BatchNorm on stage 1's statistics, so that it differs
from the cached run only in drawing fresh augmentations.
The default of 1000 iterations (half the BALMS schedule) keeps the naive runs under an hour on
two CPU cores; the cache costs the same at any length, so the ratio only grows with iterations.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.methods_table import parse_with_overrides  # noqa: E402
from config.cli import test  # noqa: E402
from config.program import OneLineParser, run_program, user_errors  # noqa: E402
from config.load import load_config  # noqa: E402
from config.stage2 import check_method  # noqa: E402
from config.schema import CHOICES, Stage2Config  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from stage2_classifier import main as stage2_main  # noqa: E402


def stage2_config(stage1: str, method: str, views: int, iterations: int, seed: int, out: Path, extra: list[str],
                  live_bn: str):
    # The training set and the model come from the stage-1 checkpoint.
    overrides = [f"stage1.checkpoint={stage1}", f"stage2.method={method}", f"stage2.cache_views={views}",
                 f"train.iterations={iterations}", "train.batch_size=512", "train.lr=0.05", "train.warmup=0",
                 f"train.seed={seed}", f"log_dir={out / f'{method}_views{views}_seed{seed}'}",
                 *([f"stage2.live_bn={live_bn}"] if views == 0 else []), *extra]
    cfg = load_config(None, overrides, stage="stage2")
    check_method(cfg)  # the method's name and the keys it reads
    return cfg


def run(cfg) -> tuple[float, float]:
    start = time.perf_counter()
    stage2_main(cfg)
    seconds = time.perf_counter() - start
    # Test the last checkpoint of both paths: best-on-val selection would add noise to the comparison.
    top1 = test(cfg, Path(cfg.run_dir) / "last.pt")["top1"]
    return seconds, top1


def main() -> None:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage1", required=True, help="stage-1 checkpoint (its data config is reused)")
    p.add_argument("--iterations", type=int, default=1000,
                   help="stage-2 iterations at batch 512 (the BALMS schedule: 2000)")
    p.add_argument("--views", type=int, default=Stage2Config.cache_views, help="cached views")
    p.add_argument("--methods", nargs="+", default=["balanced_softmax", "balms"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="train.seed of each pair of runs")
    p.add_argument("--live-bn", choices=CHOICES["stage2.live_bn"], default=Stage2Config.live_bn,
                   help="stage2.live_bn of the naive runs: eval keeps stage 1's BatchNorm statistics, as the cache "
                   "does")
    p.usage = f"{p.format_usage().removeprefix('usage: ').strip()} [key=value ...]"
    p.epilog = "key=value words, anywhere on the line, are overrides for every run"
    args = parse_with_overrides(p, sys.argv[1:])
    if args.iterations < 1:  # 0 would mean the config's epochs
        p.error("--iterations must be at least 1")
    if args.views < 1:  # 0 would compare the backbone on every batch with itself
        p.error("--views must be at least 1")
    if any(o.startswith("stage2.live_bn=") for o in args.overrides):  # the cached runs would refuse it
        p.error("stage2.live_bn is read by the naive runs only: pass --live-bn instead")
    run_program(lambda: compare(args))


def row(method: str, seed: str, ns: float, cs: float, nt: float, ct: float) -> str:
    return (f"{method:<18} {seed:>4} {ns:>9.1f} {cs:>9.1f} {ns / cs:>6.1f}x {100 * nt:>10.2f}% {100 * ct:>11.2f}% "
            f"{100 * abs(nt - ct):>6.2f}")


def compare(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp, user_errors():  # a missing checkpoint, a bad override: one line
        # Every run's config first: a bad method name or override is refused before any run takes minutes.
        cfgs = {(method, seed, views): stage2_config(args.stage1, method, views, args.iterations, seed, Path(tmp),
                                                     args.overrides, args.live_bn)
                for method in args.methods for seed in args.seeds for views in (0, args.views)}
        load_checkpoint(args.stage1, mmap=True)  # a missing or broken file: its one line before the table's header
        print(f"stage 2, {args.iterations} iterations at batch 512, cached = {args.views} views\n"
              f"{'method':<18} {'seed':>4} {'naive s':>9} {'cached s':>9} {'ratio':>7} {'naive top1':>11} "
              f"{'cached top1':>12} {'gap':>6}", flush=True)
        for method in args.methods:
            mine = []
            for seed in args.seeds:  # each row as soon as its two runs end
                mine.append((*run(cfgs[method, seed, 0]), *run(cfgs[method, seed, args.views])))
                naive_s, naive_top1, cached_s, cached_top1 = mine[-1]
                print(row(method, f"{seed}", naive_s, cached_s, naive_top1, cached_top1), flush=True)
            if len(args.seeds) > 1:
                ns, nt, cs, ct = (sum(r[i] for r in mine) / len(mine) for i in range(4))
                print(row(method, "mean", ns, cs, nt, ct), flush=True)


if __name__ == "__main__":
    main()
