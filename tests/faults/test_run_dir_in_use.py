"""Two writers of one run directory: a second run started there while one writes it (the same command
twice, a --resume while the run or a rank of it still goes on) is refused with one line, and the
running one goes on as if alone."""
import json
import signal
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, wait_for_checkpoint

pytestmark = pytest.mark.slow


def test_a_second_run_in_a_directory_being_written_is_refused_and_the_first_goes_on(fake_cifar10, tmp_path, run):
    # The same command started twice, or a --resume while the run still goes on: two writers of one
    # last.pt and metric log. The second is refused before it reads or writes anything; the first,
    # stopped afterwards, saves and logs as if alone.
    log_dir = tmp_path / "run"
    args = ["stage1_train.py", f"data.root={fake_cifar10}", f"log_dir={log_dir}", "data.imbalance_factor=10",
            "train.epochs=1000", "train.batch_size=32", "train.num_threads=1"]
    first = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    wait_for_checkpoint(log_dir, first, timeout=60)
    second = run(*args, "--resume", check=False)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"{log_dir} is in use: another process is writing a run there" in second.stderr.splitlines()[-1]
    assert first.poll() is None, first.stderr.read()[-2000:]
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 128 + signal.SIGTERM
    saved = torch.load(log_dir / "last.pt", weights_only=True)
    epochs = [json.loads(line)["epoch"] for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, saved["epoch"] + 1)) and saved["epoch"] >= 1
