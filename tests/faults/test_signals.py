"""SIGTERM and SIGINT: the step in progress ends, last.pt is saved mid-epoch, the run says how to
resume and exits 128 + the signal; --resume then reaches the uninterrupted result. A second Ctrl-C
stops at once. (Stage 1's single signal: tests/test_stage1_cli.py.)"""
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from tests.conftest import wait_for_checkpoint, write_image_folder
from tests.faults.kill_resume import REPO, command, differences, run_to_end

pytestmark = pytest.mark.slow


def _signal_after_first_checkpoint(args: list[str], run_dir, signum: int) -> subprocess.CompletedProcess:
    """Start `args`, send it `signum` once its first last.pt is there, wait for its end."""
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signum)
    stderr = proc.communicate(timeout=120)[1]
    return subprocess.CompletedProcess(args, proc.returncode, "", stderr)


@pytest.fixture(scope="module")
def backbone(fake_cifar10, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("backbone")
    run_to_end(command(1, fake_cifar10, run_dir))
    return run_dir / "last.pt"


@pytest.fixture(scope="module")
def uninterrupted(fake_cifar10, backbone, tmp_path_factory):
    """The stage-2 run both signals are compared with."""
    full = tmp_path_factory.mktemp("full")
    run_to_end(command(2, fake_cifar10, full, backbone))
    return full


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_stage2_mid_epoch_and_resume_reaches_the_uninterrupted_state(fake_cifar10, backbone,
                                                                                    uninterrupted, tmp_path, signum):
    full, stopped = uninterrupted, tmp_path / "stopped"
    proc = _signal_after_first_checkpoint(command(2, fake_cifar10, stopped, backbone), stopped, signum)
    assert proc.returncode == 128 + signum, proc.stderr
    assert f"stopped by {signal.Signals(signum).name} at step" in proc.stderr and "--resume" in proc.stderr
    assert "Traceback" not in proc.stderr
    saved = torch.load(stopped / "last.pt", weights_only=True)
    assert saved["step"] < 60 and "epoch_rng" in saved, "the signal did not land mid-epoch"
    run_to_end([*command(2, fake_cifar10, stopped, backbone), "--resume"])
    assert differences(full, stopped) == []


def test_a_second_ctrl_c_stops_at_once_without_a_traceback_and_keeps_a_loadable_last_pt(fake_cifar10, backbone,
                                                                                       tmp_path, run):
    # Both Ctrl-Cs in epoch 2's third step (its 12th stop check: 8 steps and the end of epoch 1 before it), the
    # second after the first was handled: sent from outside, the second could come after the run had saved and
    # ended (in CI one did, 50 ms after the first), and would test nothing.
    stopped = tmp_path / "stopped"
    proc = run("-m", "tests.stop_in_step", "12:SIGINT,SIGINT", *command(2, fake_cifar10, stopped, backbone)[1:],
               check=False)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert "Traceback" not in proc.stderr and "SIGINT again: stopped at once" in proc.stderr
    assert "stopped by SIGINT at step" not in proc.stderr  # not the first Ctrl-C's stop after the step
    assert torch.load(stopped / "last.pt", weights_only=True)["step"] == 8  # epoch 1's, the last one written
    assert not [p.name for p in stopped.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("meanwhile", ["overwritten", "deleted"])
def test_a_resumed_cached_stage2_run_reads_its_own_last_pt_not_a_changed_or_missing_stage1_file(
        fake_cifar10, backbone, tmp_path, meanwhile):
    """--resume takes the backbone (and the features cached in memory, made again from it), the training set
    and the architecture from the run's last.pt: a stage-1 checkpoint overwritten in between (stage 1
    resumed, another run copied there) changes nothing, and one deleted (a cleaned-up scratch disk) is not
    needed."""
    s1 = tmp_path / "s1.pt"
    shutil.copy(backbone, s1)

    def stage2(run_dir):
        return [sys.executable, "stage2_classifier.py", f"data.root={fake_cifar10}", f"log_dir={run_dir}",
                f"stage1.checkpoint={s1}", "stage2.method=crt", "stage2.cache_views=1", "train.iterations=400",
                "train.batch_size=32", "train.warmup=0", "train.num_threads=1", "eval.batch_size=64"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run_to_end(stage2(full))
    proc = _signal_after_first_checkpoint(stage2(stopped), stopped, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    if meanwhile == "deleted":
        s1.unlink()
    else:
        ckpt = torch.load(s1, weights_only=True)
        ckpt["model"] = {k: v * 1.1 if v.is_floating_point() and "running" not in k else v
                         for k, v in ckpt["model"].items()}  # another backbone, as a resumed stage 1 leaves
        torch.save(ckpt, s1)
    run_to_end([*stage2(stopped), "--resume"])
    assert differences(full, stopped) == []


def test_a_resumed_fine_tuning_run_needs_not_its_pretrained_file_again(fake_cifar10, backbone, tmp_path):
    """Stage 1 from model.pretrained (a path, a release in a download cache): every weight of a resumed run
    comes from its last.pt, so the pretrained file deleted in between (a cache cleared, a requeued job on a
    node without it or without internet) is not read, and the run ends where an uninterrupted one does."""
    weights = tmp_path / "pretrained.pt"
    shutil.copy(backbone, weights)
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run_to_end([*command(1, fake_cifar10, full), f"model.pretrained={weights}"])
    proc = _signal_after_first_checkpoint([*command(1, fake_cifar10, stopped), f"model.pretrained={weights}"],
                                          stopped, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    weights.unlink()
    run_to_end([*command(1, fake_cifar10, stopped), f"model.pretrained={weights}", "--resume"])
    assert differences(full, stopped) == []


def test_a_sigterm_to_every_process_of_an_image_file_run_stops_it_after_the_step_workers_and_all(tmp_path):
    """A scheduler stopping a job signals all of its processes, the DataLoader workers too: they outlive the
    signal, so the main process finishes its step, saves last.pt mid-epoch and shuts them down (torch's own
    handler killed them, and the step failed on 'worker killed by signal', with a traceback and nothing saved)."""
    root = write_image_folder(tmp_path / "images", {"train": dict.fromkeys("abcd", 40),
                                                    "test": dict.fromkeys("abcd", 5)})
    run_dir = tmp_path / "run"
    args = [sys.executable, "stage1_train.py", "data.dataset=folder", f"data.root={root}", "data.imbalance_factor=1",
            "data.workers=2", "data.image_size=32", "train.epochs=4", "train.warmup=1", "train.batch_size=8",
            "train.num_threads=1", f"log_dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a job's
    wait_for_checkpoint(run_dir, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM at step" in stderr and "Traceback" not in stderr
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["step"] > 20 and "epoch_sums" in saved  # mid-epoch 2, 20 steps an epoch
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no worker of it is left
    run_to_end([*args, "--resume"])
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 80
