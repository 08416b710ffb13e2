"""SIGKILL a run at random moments, --resume it, and check that it ends bit-identical to a run that
was never interrupted: same weights, optimiser and sampler states, same step, same metric lines.

    python tests/faults/kill_resume.py --points 10            # the long version: 10 kills per stage
    python tests/faults/kill_resume.py --stage 2 --points 3 --seed 7

CI runs two kill points per stage (tests/faults/test_kill_resume.py). Each point starts the run
afresh in its own directory, kills it after a random delay drawn between half the time the
reference run took to its first checkpoint and its end (so a kill lands late in start-up,
mid-epoch, inside a checkpoint write, or after the end; while no kill has landed yet, a run that
ended first is started again with 0.6 of the delay), then resumes it with the same command plus
--resume. Stage 2 runs BALMS (meta-sampler, live features) on the backbone of a tiny stage-1 run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
# Small enough for seconds per run, long enough (several epochs and checkpoints) to be hit mid-way.
STAGE1 = ("data.imbalance_factor=10", "train.epochs=4", "train.batch_size=32", "train.lr=0.05", "train.warmup=1",
          "train.num_threads=1", "eval.batch_size=64", "data.val_per_class=2", "train.mixup_alpha=0.2")
STAGE2 = ("stage2.method=balms", "stage2.cache_views=0", "train.iterations=60", "train.batch_size=32",
          "train.warmup=0", "train.num_threads=1", "eval.batch_size=64", "meta_sampler.meta_batch_size=16")
STATES = ("model", "optimizer", "scheduler", "head", "meta_sampler", "meta_sampler_optimizer")


def command(stage: int, data_root: Path, run_dir: Path, stage1_ckpt: Path | None = None) -> list[str]:
    if stage == 1:
        return [sys.executable, "stage1_train.py", f"data.root={data_root}", f"log_dir={run_dir}", *STAGE1]
    return [sys.executable, "stage2_classifier.py", f"data.root={data_root}", f"log_dir={run_dir}",
            f"stage1.checkpoint={stage1_ckpt}", *STAGE2]


def run_to_end(args: list[str]) -> None:
    """Run a command to its end; it must succeed."""
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")


def timed_run(args: list[str], run_dir: Path) -> tuple[float, float]:
    """Run a command to its end (it must succeed): (its wall time, when its first last.pt appeared), in s."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (run_dir / "last.pt").exists() and proc.poll() is None:
        time.sleep(0.005)
    first = time.perf_counter() - start
    stderr = proc.communicate(timeout=600)[1]
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{stderr[-3000:]}")
    return time.perf_counter() - start, first


def kill_after(args: list[str], delay: float) -> bool:
    """Start `args`, SIGKILL it `delay` seconds later; whether it was still running then."""
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def metric_lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall times, which differ between any two runs."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if not k.endswith("_seconds")} for line in lines]


def differences(reference: Path, resumed: Path) -> list[str]:
    """Where the resumed run's last.pt and metric log differ from the reference run's (empty: identical)."""
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (reference, resumed))
    found = [f"{key}: {a[key]} vs {b[key]}" for key in ("epoch", "step") if a[key] != b[key]]
    for part in (p for p in STATES if p in a):
        if part not in b:
            found.append(f"{part}: missing")
            continue
        flat_a, flat_b = _tensors(a[part]), _tensors(b[part])
        found += [f"{part}.{k}" for k in flat_a if k not in flat_b or not torch.equal(flat_a[k], flat_b[k])]
    if metric_lines(reference) != metric_lines(resumed):
        found.append("metrics.jsonl")
    found += [f"left behind: {p.name}" for p in resumed.glob(".*.tmp")]  # a killed checkpoint write's
    return found


def _tensors(state: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor (numbers as 0-d tensors) of a nested state dict, by its dotted path."""
    if isinstance(state, dict):
        return {k: v for key, sub in state.items() for k, v in _tensors(sub, f"{prefix}{key}.").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, sub in enumerate(state) for k, v in _tensors(sub, f"{prefix}{i}.").items()}
    if isinstance(state, torch.Tensor):
        return {prefix[:-1]: state}
    return {prefix[:-1]: torch.tensor(state)} if isinstance(state, (int, float, bool)) else {}


def kill_points(stage: int, points: int, seed: int, workdir: Path, data_root: Path,
                stage1_ckpt: Path | None = None) -> list[dict]:
    """`points` kill-and-resume trials of `stage`; one dict per trial (delay, killed, differences)."""
    reference = workdir / f"stage{stage}_reference"
    duration, first_checkpoint = timed_run(command(stage, data_root, reference, stage1_ckpt), reference)
    rng = np.random.default_rng([seed, stage])
    trials = []
    # Most kills land while it trains (start-up, which loads torch and the data, is half the wall time).
    for i, delay in enumerate(sorted(rng.uniform(first_checkpoint / 2, duration, points))):
        for attempt in range(4):
            run_dir = workdir / f"stage{stage}_kill{i}_{attempt}"
            args = command(stage, data_root, run_dir, stage1_ckpt)
            killed = kill_after(args, float(delay))
            # A kill after the end is a trial too, but one kill at least must land: a run faster than the
            # reference (timed while the machine was busier) can end before every delay drawn.
            if killed or any(t["killed"] for t in trials):
                break
            delay *= 0.6
        had_checkpoint = (run_dir / "last.pt").exists()
        run_to_end([*args, "--resume"])
        trials.append({"delay_s": round(float(delay), 2), "killed": killed, "had_last_pt": had_checkpoint,
                       "differences": differences(reference, run_dir)})
    return trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=(1, 2), action="append", help="default: both")
    parser.add_argument("--points", type=int, default=10, help="kills per stage")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill delays")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.conftest import write_fake_cifar10

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = write_fake_cifar10(work / "data", train_per_class=60, test_per_class=10)
        stage1_ckpt = work / "stage1_reference" / "last.pt"
        failed = 0
        for stage in args.stage or (1, 2):
            if stage == 2 and not stage1_ckpt.exists():
                run_to_end(command(1, root, stage1_ckpt.parent))
            for trial in kill_points(stage, args.points, args.seed, work, root, stage1_ckpt):
                failed += bool(trial["differences"])
                print(f"stage {stage}", json.dumps(trial), flush=True)
    print(f"{failed} of the resumed runs differ from the uninterrupted one")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    os.chdir(REPO)
    main()
