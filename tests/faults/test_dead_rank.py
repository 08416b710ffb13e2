"""A rank of a torchrun job SIGKILLed mid-run: the job ends (no hang) naming the rank, and --resume
continues from the last checkpoint to the end with one metric line per epoch."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from tests.test_distributed_cli import DETERMINISTIC, REPO, _rank_pid, _run, torchrun

pytestmark = pytest.mark.slow


def test_a_killed_rank_ends_the_job_naming_it_and_resume_continues(fake_cifar10, tmp_path):
    log_dir = tmp_path / "run"
    args = (f"data.root={fake_cifar10}", *DETERMINISTIC, "train.epochs=12", f"log_dir={log_dir}")
    job = subprocess.Popen(torchrun(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (log_dir / "last.pt").exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    victim = _rank_pid(job.pid, 1)
    assert victim is not None and job.poll() is None, "the job ended before a rank could be killed"
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    output, _ = job.communicate(timeout=90)
    assert job.returncode != 0 and time.time() - killed_at < 60
    assert "rank      : 1" in output or "rank: 1" in output, output[-2000:]
    saved = torch.load(log_dir / "last.pt", weights_only=True)["epoch"]
    assert saved < 12
    _run(torchrun(*args, "--resume"))
    assert torch.load(log_dir / "last.pt", weights_only=True)["epoch"] == 12
    epochs = [json.loads(l)["epoch"] for l in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 13))
