"""engine.run_dir: a run directory never overwritten, one writing process at a time, and which checkpoint a run
continues from."""
import os
import signal
import subprocess
import sys

import pytest

from engine.distributed import Dist
from engine.run import finish_run
from engine.run_dir import RunDirError, claim_run_dir, release_run_dir, resume_checkpoint
from engine.runlog import RunLog
from models.checkpoint import save_checkpoint
from tests.conftest import REPO


def test_a_run_directory_with_a_run_is_refused_without_resume_and_returned_with_it(tmp_path):
    assert resume_checkpoint(tmp_path, resume=False) is None  # nothing there: a new run
    save_checkpoint(tmp_path / "last.pt", {"epoch": 2, "config": {}})
    with pytest.raises(RunDirError, match="pass --resume"):
        resume_checkpoint(tmp_path, resume=False)
    assert resume_checkpoint(tmp_path, resume=True)["epoch"] == 2


@pytest.mark.parametrize("payload", [{"model": {}, "config": None}, {"model": {}, "config": {}}])
def test_a_last_pt_that_holds_weights_but_no_run_is_one_line_on_resume(tmp_path, payload):
    # an import (config None) or a release (no epoch) copied or written over a run's last.pt
    save_checkpoint(tmp_path / "last.pt", payload)
    with pytest.raises(RunDirError, match=r"last.pt holds weights but no run to continue .*model.pretrained"):
        resume_checkpoint(tmp_path, resume=True)


def test_a_best_pt_without_last_pt_is_never_overwritten_by_a_new_run_and_resume_starts_it_again(tmp_path):
    """A run whose last.pt was deleted (or that was killed before its first one): a new run there would replace
    its best.pt; --resume, which has nothing to continue from, starts it again (config.cli.start_run says so)."""
    save_checkpoint(tmp_path / "best.pt", {"epoch": 7})
    with pytest.raises(RunDirError, match=f"^{tmp_path} holds best.pt of a run but no last.pt to continue it from: "
                                          "choose another name=... / log_dir=... for a new run, or pass --resume"):
        resume_checkpoint(tmp_path, resume=False)
    assert resume_checkpoint(tmp_path, resume=True) is None


@pytest.mark.parametrize("resume", [False, True])
def test_a_last_pt_that_is_not_a_file_is_refused_before_anything_is_written(tmp_path, resume):
    (tmp_path / "last.pt").mkdir()
    with pytest.raises(RunDirError, match=f"^{tmp_path / 'last.pt'} is not a checkpoint file: move it away"):
        resume_checkpoint(tmp_path, resume=resume)


HOLD = ("import sys, time; from engine.run_dir import claim_run_dir; claim_run_dir(sys.argv[1]); "
        "print('held', flush=True); time.sleep(60)")


@pytest.mark.slow
def test_a_run_directory_another_process_writes_is_refused_until_that_process_ends(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunDirError, match="is in use: another process is writing a run there"):
            claim_run_dir(run_dir)
    finally:
        holder.kill()  # SIGKILL: the kernel drops its claim
        holder.wait()
    claim_run_dir(run_dir)
    claim_run_dir(run_dir)  # this process holds it already: a second run of it in one process goes on
    assert list(run_dir.iterdir()) == []  # no lock file
    # A run that ended in a process that goes on (a notebook, a sweep) lets another process in.
    finish_run(RunLog(run_dir), Dist())
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
    finally:
        holder.kill()
        holder.wait()


# The holder forks a child that outlives it, as a DataLoader worker does for a moment after its
# process is killed, and prints the child's pid.
HOLD_AND_FORK = ("import os, sys, time; from engine.run_dir import claim_run_dir; claim_run_dir(sys.argv[1])\n"
                 "pid = os.fork()\n"
                 "if pid == 0: time.sleep(60); os._exit(0)\n"
                 "print(pid, flush=True); time.sleep(60)")


@pytest.mark.slow
def test_a_killed_run_s_forked_children_do_not_keep_its_run_directory_claimed(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(RunDirError, match="is in use"):
            claim_run_dir(run_dir)
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the child still lives
        claim_run_dir(run_dir)  # and the claim died with the holder
    finally:
        release_run_dir(run_dir)
        os.kill(child, signal.SIGKILL)


def test_train_log_is_utf_8_and_writes_a_file_name_that_is_not_utf_8_as_its_escapes(tmp_path):
    """A skipped file of an old archive (caf\\xe9.txt, a surrogate in Python) logged by name: without errors= the
    FileHandler printed a 'Logging error' traceback instead of the line; the C locale does not change the file."""
    code = ("import logging, sys; from engine.run_dir import setup_run; setup_run(sys.argv[1], 0, 1); "
            "logging.getLogger('data').warning('skipped caf\\udce9.txt and d\\u00e9j\\u00e0.txt')")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=REPO, capture_output=True,
                          timeout=120, env={**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0"})
    assert done.returncode == 0 and b"Logging error" not in done.stderr
    log = (tmp_path / "run" / "train.log").read_bytes()
    assert log.endswith(b"skipped caf\\udce9.txt and d\xc3\xa9j\xc3\xa0.txt\n")
