"""Two machines without a shared disk, played by two torchrun agents on this one (torchrun's static
rendezvous: --nnodes 2 --node_rank 0|1 --master_addr/--master_port), each given a folder of its own as
its disk: log_dir (and stage 2's stage1.checkpoint) name a folder only node 0 has. Rank 0 writes the run
directory and reads what it holds (the checkpoint to resume, to test, stage 1's for stage 2) for every
rank, so node 1 never needs a copy; a rank that read its own folder would start over while rank 0
resumed."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, wait_for_checkpoint
from tests.test_distributed_cli import DETERMINISTIC, _rank_pid, _run, torchrun

pytestmark = pytest.mark.slow

EPOCHS = 4


def _free_port() -> int:
    """A free port below the kernel's ephemeral range: a port the kernel handed out (bind to port 0) could be
    handed to another test's process in the seconds before torchrun binds it; this one, only by a pick like it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    while True:
        port = rng.randrange(1024, max(low, 1025))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def _node(node_rank: int, port: int, script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
            "--master_addr=127.0.0.1", f"--master_port={port}", "--nproc_per_node=1", script, *args]


def _two_nodes(script: str, args0: list[str], args1: list[str]) -> None:
    """Both nodes' commands to their end; each must succeed."""
    port = _free_port()
    nodes = [subprocess.Popen(_node(r, port, script, *a), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r, a in ((0, args0), (1, args1))]
    outputs = [n.communicate(timeout=150)[0] for n in nodes]
    for n, out in zip(nodes, outputs):
        assert n.returncode == 0, out[-3000:]


def _stage1(data_root: Path, log_dir: Path) -> list[str]:
    return [f"data.root={data_root}", *DETERMINISTIC, f"train.epochs={EPOCHS}", f"log_dir={log_dir}"]


def _kill_node_1_after_the_first_checkpoint(data_root: Path, disk0: Path, disk1: Path) -> int:
    """Start both nodes, SIGKILL node 1 (its worker, then its agent: the machine is gone) once rank 0
    has written last.pt; return the epoch saved."""
    port = _free_port()
    node0 = subprocess.Popen(_node(0, port, "stage1_train.py", *_stage1(data_root, disk0 / "run")), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node1 = subprocess.Popen(_node(1, port, "stage1_train.py", *_stage1(data_root, disk1 / "run")), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(disk0 / "run", node0)
    worker = _rank_pid(node1.pid, 1)
    assert worker is not None and node0.poll() is None, "the job ended before node 1 could be stopped"
    os.kill(worker, signal.SIGKILL)
    node1.kill()
    node1.wait()
    assert node0.wait(timeout=120) != 0  # node 0's job fails: its peer is gone
    return torch.load(disk0 / "run" / "last.pt", weights_only=True)["epoch"]


def test_two_machines_without_a_shared_disk_resume_test_and_run_stage_2(fake_cifar10, tmp_path):
    disk0, disk1, single = tmp_path / "node0", tmp_path / "node1", tmp_path / "single"
    for d in (disk0, disk1):
        d.mkdir()
    # The reference: the same two ranks on one machine, uninterrupted.
    _run(torchrun(*_stage1(fake_cifar10, single)))
    saved = _kill_node_1_after_the_first_checkpoint(fake_cifar10, disk0, disk1)
    assert saved < EPOCHS
    # --resume on both machines: node 1 has no run directory; rank 0 sends it last.pt.
    _two_nodes("stage1_train.py", [*_stage1(fake_cifar10, disk0 / "run"), "--resume"],
               [*_stage1(fake_cifar10, disk1 / "run"), "--resume"])
    run = disk0 / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, EPOCHS + 1))
    assert [r["loss"] for r in lines] == [r["loss"] for r in reference]  # as if never stopped
    wa, wb = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (run, single))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert list(disk1.iterdir()) == []  # node 1 wrote nothing

    # --test: rank 0 picks the run's checkpoint (best.pt) and sends it; the table is one process's.
    test_args = [f"data.root={fake_cifar10}", "train.device=cpu", "train.num_threads=1", "--test"]
    _two_nodes("stage1_train.py", [*test_args, f"log_dir={run}"], [*test_args, f"log_dir={disk1 / 'run'}"])
    _run([sys.executable, "stage1_train.py", *test_args, f"log_dir={single}", "--ckpt", str(run / "best.pt")])
    ta, tb = (json.loads((d / name).read_text()) for d, name in ((run, "test_metrics.json"),
                                                                  (single, "test_metrics_run_best.json")))
    assert ta["checkpoint"] == str(run / "best.pt")
    assert ta["confusion_matrix"] == tb["confusion_matrix"] and sum(map(sum, ta["confusion_matrix"])) == 100

    # Stage 2 from that run: node 1's stage1.checkpoint names its own disk, which has none.
    stage2 = [f"data.root={fake_cifar10}", "stage2.method=balanced_softmax", "stage2.cache_views=1",
              "train.iterations=6", "train.batch_size=32", "train.warmup=0", "train.num_threads=1", "train.device=cpu",
              "eval.batch_size=64"]
    _two_nodes("stage2_classifier.py", [*stage2, f"stage1.checkpoint={run / 'last.pt'}", f"log_dir={disk0 / 's2'}"],
               [*stage2, f"stage1.checkpoint={disk1 / 'run' / 'last.pt'}", f"log_dir={disk1 / 's2'}"])
    assert torch.load(disk0 / "s2" / "last.pt", weights_only=True)["step"] == 6
    assert list(disk1.iterdir()) == []
