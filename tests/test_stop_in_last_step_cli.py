"""A SIGTERM in an epoch's last step, then --resume: the resumed run has no step left of that epoch, and its
metric lines (lr included) and weights are an uninterrupted run's, in both stages, in real processes."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def _lines(run_dir) -> list[dict]:
    """The metric lines, wall times dropped (as tests/faults/kill_resume.py compares them)."""
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_seconds")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _stop_then_resume(run, args: list[str], run_dir, at: int) -> dict:
    """Run `args` with a SIGTERM at its `at`-th stop check (tests/stop_in_step.py), then --resume it; the
    checkpoint the stop saved."""
    proc = run("-m", "tests.stop_in_step", str(at), *args, check=False)
    assert proc.returncode == 143 and "stopped by SIGTERM" in proc.stderr, proc.stderr[-2000:]
    saved = torch.load(run_dir / "last.pt", weights_only=False)
    run(*args, "--resume")
    return saved


def _same_weights(a, b, part: str) -> bool:
    x, y = (torch.load(d / "last.pt", weights_only=True)[part] for d in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_stage1_stopped_in_an_epoch_s_last_step_resumes_to_the_uninterrupted_metric_lines(fake_cifar10, tmp_path,
                                                                                          run):
    # 238 training images in one batch: one step per epoch, whose lr falls each epoch (cosine, no warm-up).
    def args(log_dir):
        return ["stage1_train.py", f"data.root={fake_cifar10}", f"log_dir={log_dir}", "data.imbalance_factor=10",
                "train.epochs=3", "train.batch_size=512", "train.lr=0.05", "train.warmup=0", "train.num_threads=1",
                "eval.batch_size=256", "data.val_per_class=2"]

    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run(*args(full))
    saved = _stop_then_resume(run, args(stopped), stopped, at=3)  # checks: step 1, epoch 1, step 2 (epoch 2's last)
    assert (saved["epoch"], saved["step"], saved["epoch_step"]) == (1, 2, 1)
    assert _lines(stopped) == _lines(full)
    assert [line["lr"] for line in _lines(full)] == pytest.approx([0.05, 0.0375, 0.0125])
    assert _same_weights(full, stopped, "model")


def test_stage2_stopped_in_an_epoch_s_last_step_resumes_to_the_uninterrupted_metric_lines(fake_cifar10, stage1_run,
                                                                                          tmp_path, run):
    # 238 training images in batches of 128: two steps per epoch, two epochs.
    def args(log_dir):
        return ["stage2_classifier.py", f"data.root={fake_cifar10}", f"log_dir={log_dir}",
                f"stage1.checkpoint={stage1_run / 'last.pt'}", "stage2.method=balms", "stage2.cache_views=1",
                "train.iterations=4", "train.batch_size=128", "train.warmup=0", "train.num_threads=1",
                "eval.batch_size=256", "meta_sampler.meta_batch_size=16"]

    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run(*args(full))
    saved = _stop_then_resume(run, args(stopped), stopped, at=2)  # checks: step 1, step 2 (epoch 1's last)
    assert (saved["epoch"], saved["step"], saved["epoch_step"]) == (0, 2, 2)
    assert _lines(stopped) == _lines(full) and len(_lines(full)) == 2
    assert _same_weights(full, stopped, "head") and _same_weights(full, stopped, "meta_sampler")
