"""A full disk and numbers that blow up, in real processes: one line and exit status 2, the last
good checkpoint kept (never a NaN one, as last.pt or best.pt), metrics.jsonl still strict JSON; a feature cache
larger than memory refused before it is computed."""
import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

from tests.conftest import wait_for_checkpoint
from tests.faults.kill_resume import REPO, STAGE1, STAGE2, command, run_to_end

pytestmark = pytest.mark.slow


def _finish(args: list[str], preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=preexec)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(f in line for f in fragments), line
    return line


def _strict_json_lines(path) -> list[dict]:
    def refuse(token):
        raise ValueError(f"{path} holds the non-JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _finite_checkpoint(path) -> dict:
    ckpt = torch.load(path, weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()), path
    return ckpt


def _first_checkpoint_then_kill(args: list[str], run_dir) -> None:
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(run_dir, proc)  # polls every 5 ms: a busy loop here took a core from the run
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"


def test_a_file_size_limit_mid_run_keeps_the_last_checkpoint_and_resume_finishes(fake_cifar10, tmp_path):
    run_dir = tmp_path / "run"
    args = command(1, fake_cifar10, run_dir)
    _first_checkpoint_then_kill(args, run_dir)
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    limit = (run_dir / "last.pt").stat().st_size // 2  # no checkpoint fits any more

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    line = _assert_one_line_error(_finish([*args, "--resume"], small_files), f"error: {run_dir}/",
                                  ".pt: File too large", "--resume")
    assert "is kept" in line
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == saved["step"]
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert "File too large" in (run_dir / "train.log").read_text()  # the error is in the run's log too
    run_to_end([*args, "--resume"])
    assert _finite_checkpoint(run_dir / "last.pt")["epoch"] == 4


def _mount_tmpfs(path, megabytes: int) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_is_one_line_and_keeps_the_checkpoints_already_written(fake_cifar10, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, 9):  # two ResNet-32 checkpoints (3.8 MB each) fit, a third does not
        pytest.skip("needs root to mount a small tmpfs (the file-size-limit test covers the same path)")
    try:
        run_dir = disk / "run"
        proc = _finish(command(1, fake_cifar10, run_dir))
        _assert_one_line_error(proc, "No space left on device", "free space on that disk", "--resume")
        ckpt = _finite_checkpoint(run_dir / "last.pt")
        assert ckpt["epoch"] >= 1 and len(_strict_json_lines(run_dir / "metrics.jsonl")) >= ckpt["epoch"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# The lr jumps by 1e30 at a milestone: the loss turns NaN in the epoch after it, not before.
BLOW_UP_AFTER_EPOCH_1 = ("train.warmup=0", "train.schedule=step", "train.milestones=[1]", "train.gamma=1e30")


def test_a_nan_loss_in_stage1_names_epoch_and_step_and_keeps_the_last_good_checkpoints(fake_cifar10, tmp_path):
    run_dir = tmp_path / "run"
    args = [a for a in command(1, fake_cifar10, run_dir) if not a.startswith("train.warmup")]
    line = _assert_one_line_error(_finish([*args, *BLOW_UP_AFTER_EPOCH_1]), "epoch 2/4, step",
                                  "the loss became NaN or infinite", "lower train.lr")
    assert "nothing of this epoch was saved" in line
    for name in ("last.pt", "best.pt"):
        assert _finite_checkpoint(run_dir / name)["epoch"] == 1
    assert [r["epoch"] for r in _strict_json_lines(run_dir / "metrics.jsonl")] == [1]
    assert line in (run_dir / "train.log").read_text()


@pytest.mark.parametrize("method, blow_up, message", [
    ("crt", ("train.schedule=step", "train.milestones=[9]", "train.gamma=1e30"), "the head's loss became"),
    ("balms", ("meta_sampler.gumbel_tau=1e-300",), "the head's meta loss became"),
])
def test_a_nan_in_stage2_or_its_meta_sampler_is_one_line_and_saves_no_nan_weights(fake_cifar10, tmp_path, method,
                                                                                  blow_up, message):
    backbone = tmp_path / "backbone"
    run_to_end([sys.executable, "stage1_train.py", f"data.root={fake_cifar10}", f"log_dir={backbone}",
                *STAGE1, "train.epochs=2"])
    run_dir = tmp_path / "run"
    stage2 = [a for a in STAGE2 if not a.startswith(("stage2.method", "meta_sampler" if method != "balms" else "-"))]
    args = [sys.executable, "stage2_classifier.py", f"data.root={fake_cifar10}", f"log_dir={run_dir}",
            f"stage1.checkpoint={backbone / 'last.pt'}", *stage2, f"stage2.method={method}", *blow_up]
    _assert_one_line_error(_finish(args), message, "NaN or infinite", "step")
    for path in run_dir.glob("*.pt"):
        _finite_checkpoint(path)
    if (run_dir / "metrics.jsonl").exists():
        _strict_json_lines(run_dir / "metrics.jsonl")


def test_a_feature_cache_larger_than_memory_is_refused_before_its_first_view(fake_cifar10, stage1_run, tmp_path):
    """10**8 views of the tiny training set's 64-wide features would take terabytes: one line, at once."""
    stage2 = [a for a in STAGE2 if not a.startswith("stage2.cache_views")]
    args = [sys.executable, "stage2_classifier.py", f"data.root={fake_cifar10}", f"log_dir={tmp_path / 'run'}",
            f"stage1.checkpoint={stage1_run / 'last.pt'}", *stage2, "stage2.cache_views=100000000"]
    line = _assert_one_line_error(_finish(args), "of host memory: lower stage2.cache_views (0 = the backbone on "
                                                 "every batch)")
    assert line.startswith("error: stage2.cache_views=100000000 makes 100000000 x ")
    assert not list((tmp_path / "run").glob("*.pt"))
