"""train.save_every_s in both stages, as real processes: last.pt is written after every epoch by
default, and with an interval only once that much time has passed, and after the last epoch;
train.log marks each epoch whose end wrote it. (The timing itself: tests/engine/test_run.py.)"""
import re

import pytest
import torch

from tests.conftest import TINY_STAGE1

pytestmark = pytest.mark.slow

EPOCH_LINE = re.compile(r" epoch (\d+)/(\d+) .*")


def written_epochs(run_dir) -> tuple[list[int], int]:
    """(the epochs whose train.log line says last.pt was written, the number of epochs logged)."""
    lines = [m for m in map(EPOCH_LINE.search, (run_dir / "train.log").read_text().splitlines()) if m]
    return [int(m[1]) for m in lines if m[0].endswith("(last.pt written)")], len(lines)


def test_stage1_writes_last_pt_every_epoch_by_default_and_only_at_the_end_with_an_hour_between_writes(
        fake_cifar10, stage1_run, tmp_path, run):
    assert written_epochs(stage1_run) == ([1, 2, 3], 3)  # the shared run, train.save_every_s at its default
    run_dir = tmp_path / "run"
    run("stage1_train.py", f"data.root={fake_cifar10}", f"log_dir={run_dir}", *TINY_STAGE1, "train.save_every_s=3600")
    assert written_epochs(run_dir) == ([3], 3)
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 3


def test_stage2_writes_last_pt_only_after_its_last_epoch_with_an_hour_between_writes(fake_cifar10, stage1_run,
                                                                                      tmp_path, run):
    run_dir = tmp_path / "run"
    run("stage2_classifier.py", f"data.root={fake_cifar10}", f"log_dir={run_dir}",
        f"stage1.checkpoint={stage1_run / 'last.pt'}", "train.iterations=24", "train.batch_size=32", "train.warmup=0",
        "train.num_threads=1", "stage2.cache_views=1", "eval.batch_size=64", "train.save_every_s=3600")
    written, epochs = written_epochs(run_dir)
    assert epochs >= 2 and written == [epochs]
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == epochs
