"""A rank of a torchrun job SIGKILLed mid-run: the job ends (no hang) naming the rank, and --resume
continues from the last checkpoint to the end with one metric line per epoch; stage 1, and stage 2's
BALMS (head, meta-sampler and its optimiser restored on both ranks)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import wait_for_checkpoint
from tests.test_distributed_cli import DETERMINISTIC, REPO, _rank_pid, _run

pytestmark = pytest.mark.slow


def _args(stage: int, data_root, stage1_run, log_dir) -> list[str]:
    if stage == 1:
        return ["stage1_train.py", f"data.root={data_root}", *DETERMINISTIC, "train.epochs=12", f"log_dir={log_dir}"]
    return ["stage2_classifier.py", f"data.root={data_root}", f"stage1.checkpoint={stage1_run / 'last.pt'}",
            "stage2.method=balms", "train.epochs=12", "train.batch_size=32", "train.warmup=0", "train.num_threads=1",
            "train.device=cpu", "meta_sampler.meta_batch_size=16", "eval.batch_size=32", f"log_dir={log_dir}"]


@pytest.mark.parametrize("stage", [1, 2])
def test_a_killed_rank_ends_the_job_naming_it_and_resume_continues(fake_cifar10, stage1_run, tmp_path, stage):
    log_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *_args(stage, fake_cifar10, stage1_run, log_dir)]
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(log_dir, job)
    victim = _rank_pid(job.pid, 1)
    assert victim is not None and job.poll() is None, "the job ended before a rank could be killed"
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    output, _ = job.communicate(timeout=90)
    assert job.returncode != 0 and time.time() - killed_at < 60
    assert "rank      : 1" in output or "rank: 1" in output, output[-2000:]
    saved = torch.load(log_dir / "last.pt", weights_only=True)["epoch"]
    assert saved < 12
    _run([*cmd, "--resume"])
    assert torch.load(log_dir / "last.pt", weights_only=True)["epoch"] == 12
    epochs = [json.loads(line)["epoch"] for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 13))
