"""The run directory, on plain arguments: whose it is (one writing process at a time), logging and seeding as
a run starts there, and which of its checkpoints a run continues from or tests."""
from __future__ import annotations

import fcntl
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (e.g. it holds a run and --resume was not given)."""


def setup_run(run_dir: str | Path, seed: int, num_threads: int, writes: bool = True, log_file: bool = True) -> Path:
    """Create the run directory, log to stderr and <run_dir>/train.log, seed every RNG.

    writes=False (the ranks other than 0 of a multi-process run): no directory, no file, and only
    warnings and errors on stderr. log_file=False (--test): stderr only, the run's train.log untouched.
    """
    run_dir = Path(run_dir)
    if writes:
        make_run_dir(run_dir)
    root = logging.getLogger()
    root.setLevel(logging.INFO if writes else logging.WARNING)
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if writes and log_file:
        # UTF-8 whatever the locale; a file name that is not UTF-8 (a surrogate) is written as its \x escapes
        handlers.append(logging.FileHandler(run_dir / "train.log", encoding="utf-8", errors="backslashreplace"))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    return run_dir


_claimed: dict[Path, int] = {}  # run directories this process writes: path -> its open descriptor, flock()ed
_created: set[Path] = set()  # run directories this process created (resolved paths)


def make_run_dir(run_dir: Path) -> None:
    """Create the run directory (and its parents) unless it exists, noting whether this process created it:
    only its creator may remove it again (config.program.nothing_left_of_a_refused_run), never a second
    process that found it there a moment later."""
    try:
        run_dir.mkdir(parents=True)
        _created.add(run_dir.resolve())
    except FileExistsError:
        if not run_dir.is_dir():
            raise


def created_here(run_dir: Path) -> bool:
    """Whether this process created `run_dir` (make_run_dir) and still holds it, if it claimed it."""
    return Path(run_dir).resolve() in _created


def forget_run_dir(run_dir: Path) -> None:
    """Before a refused run's directory is removed: give up its claim and the note that this process made it."""
    release_run_dir(run_dir)
    _created.discard(Path(run_dir).resolve())


def _forget_claims_in_child() -> None:
    """In a forked child (a DataLoader worker): close the inherited descriptors of the claims. The flock
    belongs to the open file description both processes share and lasts until its last descriptor closes,
    so a worker that outlives a killed run (until it notices: about a second, longer mid-batch) would
    refuse a --resume started at once (a requeued job). Closing, not unlocking: the parent's claim stands."""
    for fd in _claimed.values():
        os.close(fd)
    _claimed.clear()


os.register_at_fork(after_in_child=_forget_claims_in_child)


def claim_run_dir(run_dir: Path) -> None:
    """Take the run directory (created if need be) for this process until the run ends (release_run_dir,
    from finish_run) or the process does: another process that would write it (the same command started
    twice, a resume while the run still goes on) is refused here, before it reads or writes anything. The
    lock is the directory's own (flock), so the kernel drops it when the process ends, however it ends,
    and no lock file is left behind. On a file system without such locks (some cluster ones): a warning,
    and no claim."""
    run_dir, key = Path(run_dir), Path(run_dir).resolve()
    if key in _claimed:
        return
    make_run_dir(run_dir)
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirError(f"{run_dir} is in use: another process is writing a run there (the same command started "
                          f"twice, or a run still stopping); wait for it to end or stop it, or choose another "
                          f"name=... / log_dir=...") from None
    except OSError as e:
        os.close(fd)
        logger.warning("%s cannot be locked (%s): a second run started there would not be refused", run_dir, e)
        return
    _claimed[key] = fd


def release_run_dir(run_dir: Path) -> None:
    """Give up this process's claim on the run directory (claim_run_dir): the run has ended, and a process
    that goes on (a notebook, a sweep of runs) no longer keeps other processes out."""
    fd = _claimed.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops its flock


def resume_checkpoint(run_dir: Path, resume: bool) -> dict | None:
    """The run's last.pt to continue from, None for a new run; a run is never overwritten, nor its best.pt (a run
    killed before its first last.pt, train.save_every_s after its start, has one: --resume starts it again)."""
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    if last.exists() and not last.is_file():
        raise RunDirError(f"{last} is not a checkpoint file: move it away, or choose another name=... / log_dir=...")
    if not last.is_file():
        if best.is_file() and not resume:
            raise RunDirError(f"{run_dir} holds {best.name} of a run but no last.pt to continue it from: choose "
                              f"another name=... / log_dir=... for a new run, or pass --resume to start that run "
                              f"again from its first step (its best.pt is then replaced)")
        return None  # with --resume beside a best.pt: config.cli.start_run says the run starts again
    if not resume:
        raise RunDirError(f"{run_dir} already holds a run ({last}); pass --resume to continue it, "
                          f"or choose another name=... / log_dir=... for a new run")
    ckpt = load_checkpoint(last)
    if not isinstance(ckpt.get("config"), dict) or "epoch" not in ckpt:  # a release or an import copied there
        raise RunDirError(f"{last} holds weights but no run to continue (no config or epoch: a release or an "
                          f"imported checkpoint?): start a new run with it as model.pretrained, in another "
                          f"name=... / log_dir=...")
    return ckpt


def default_checkpoint(run_dir: Path) -> Path:
    """best.pt (chosen on the validation split) when the run has one, else last.pt."""
    best = run_dir / "best.pt"
    return best if best.is_file() else run_dir / "last.pt"
