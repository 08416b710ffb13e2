"""What both entry scripts do around their loops, on plain arguments: the run directory, logging,
seeding, resuming, and the end of each epoch (best and last checkpoints, the metric log)."""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.distributed import Dist, shutdown
from engine.runlog import RunLog
from engine.stopping import StopRequest
from models.checkpoint import (CheckpointError, load_checkpoint, load_state_checked, save_checkpoint,
                               write_atomic)

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
        run_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.INFO if writes else logging.WARNING)
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if writes and log_file:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
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
    run_dir.mkdir(parents=True, exist_ok=True)
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
    return load_checkpoint(last)


def default_checkpoint(run_dir: Path) -> Path:
    """best.pt (chosen on the validation split) when the run has one, else last.pt."""
    best = run_dir / "best.pt"
    return best if best.is_file() else run_dir / "last.pt"


@dataclass
class Progress:
    """Where a run stands: epochs and optimiser steps done, and the best validation score so far."""

    metric: str  # validation metric that picks best.pt
    epoch: int = 0  # epochs done
    step: int = 0  # optimiser steps done
    best_value: float | None = None
    best_epoch: int | None = None
    epoch_step: int = 0  # steps done of epoch `epoch` + 1: > 0 only when a run stopped inside it
    # time.monotonic() when last.pt was last written (or the run started): end_epoch's clock, not saved
    saved_at: float = field(default_factory=time.monotonic, compare=False, repr=False)

    def as_checkpoint(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "epoch_step": self.epoch_step,
                "best": {"metric": self.metric, "value": self.best_value, "epoch": self.best_epoch}}

    def steps_this_epoch(self, steps_total: int, epoch_len: int) -> int:
        """Steps the epoch in progress takes: the rest of its epoch_len, no further than steps_total."""
        return min(epoch_len - self.epoch_step, steps_total - self.step)

    def took(self, steps: int) -> None:
        """Count `steps` optimiser steps of the epoch in progress."""
        self.step += steps
        self.epoch_step += steps

    def next_epoch(self) -> None:
        """The epoch in progress has ended (not stopped inside)."""
        self.epoch, self.epoch_step = self.epoch + 1, 0

    def final_epoch(self, steps_total: int, epoch_len: int) -> int:
        """The number of the run's last epoch: enough epochs of epoch_len steps after this one's
        epoch_step to reach steps_total. A run resumed under another number of processes (one process
        keeps an epoch's short last batch, several do not) may have had other epoch lengths so far: it
        still ends at steps_total, its last epoch cut short or one short epoch added."""
        return self.epoch + math.ceil(max(0, steps_total - self.step + self.epoch_step) / epoch_len)


def restore(ckpt: dict, objects: dict[str, Any], run_dir: Path, class_counts: list[int], epoch_len: int, *,
            train_digest: str) -> Progress:
    """Load ckpt[name] into each object (modules with every key checked) and return the progress.
    The training set (class_counts, train_digest: data.build.training_digest) must be the run's (a checkpoint
    written before 2026-12-06 records no digest: its counts alone are compared). (A checkpoint written before
    2026-11-27 has no epoch_step: a mid-epoch one, which has epoch_sums, took step - epoch * epoch_len steps of
    its epoch, since it was written by one process at this epoch length.)"""
    missing = [name for name in objects if name not in ckpt]
    if missing:
        raise CheckpointError(f"{run_dir / 'last.pt'} holds no {', '.join(missing)}: an older version of this tool "
                              f"wrote it; start a new run (another name=... or log_dir=...)")
    if ckpt["class_counts"] != class_counts:
        raise RunDirError(f"--resume: this training set has class counts {class_counts}, the run's "
                          f"{ckpt['class_counts']}: point data.root at the copy of the dataset the run was started on")
    if ckpt.get("train_digest", train_digest) != train_digest:
        raise RunDirError(f"--resume: these training images (digest {train_digest}) are not the run's "
                          f"({ckpt['train_digest']}), though their class counts are: point data.root at the copy of "
                          f"the dataset the run was started on")
    for name, obj in objects.items():
        if isinstance(obj, nn.Module):
            load_state_checked(obj, ckpt[name], f"{name} in {run_dir / 'last.pt'}")
        else:
            obj.load_state_dict(ckpt[name])
    logger.info("resumed from %s at epoch %d, step %d", run_dir / "last.pt", ckpt["epoch"], ckpt["step"])
    best = _best_saved(run_dir, ckpt["best"])
    legacy = ckpt["step"] - ckpt["epoch"] * epoch_len if "epoch_sums" in ckpt else 0
    return Progress(best["metric"], ckpt["epoch"], ckpt["step"], best["value"], best["epoch"],
                    ckpt.get("epoch_step", legacy))


def _best_saved(run_dir: Path, best: dict) -> dict:
    """The best score so far: last.pt's record, or best.pt's where that is higher. best.pt is written before
    last.pt, and under train.save_every_s last.pt may wait several epochs, so a run killed in between has a
    best.pt of an epoch last.pt does not know; from last.pt's record alone, a resumed run would overwrite that
    best.pt with any weaker epoch that beats last.pt's record."""
    path = run_dir / "best.pt"
    if not path.is_file():
        return best
    saved = load_checkpoint(path, mmap=True).get("best", {})
    if saved.get("metric") != best["metric"] or saved.get("value") is None:
        return best
    if best["value"] is None or saved["value"] > best["value"]:
        logger.info("%s holds epoch %d (%s %.4g), after last.pt: a resumed epoch must beat it to replace it",
                    path, saved["epoch"], saved["metric"], saved["value"])
        return saved
    return best


def end_epoch(run_dir: Path, runlog: RunLog | None, progress: Progress, record: dict, val: dict | None,
              payload: dict, num_epochs: int, save_every_s: float = 0.0) -> None:
    """Close epoch progress.epoch: validation metrics into the record, the metric log, then best.pt
    when they improved (only with a validation split) and last.pt (atomically) after the last epoch and
    whenever save_every_s seconds have passed since the last write (0: after every epoch).

    runlog=None (ranks other than 0): the same bookkeeping, nothing written. Weights that are no
    longer finite stop the run before anything is saved: the last checkpoint stays the last good one.
    """
    floats = {k: v for k, v in payload.get("model", {}).items() if v.is_floating_point()}
    # One flag per tensor, read back together: on a GPU, one wait rather than one per tensor (about 190 for ResNet-32).
    finite = torch.stack([torch.isfinite(v).all() for v in floats.values()]).tolist() if floats else []
    bad = [k for k, ok in zip(floats, finite) if not ok]
    if bad:
        raise FloatingPointError(f"the weights became NaN or infinite in epoch {progress.epoch} ({bad[0]} and "
                                 f"{len(bad) - 1} more); nothing of this epoch was saved: lower train.lr, or "
                                 f"--resume from the last checkpoint with other settings")
    record["epoch"] = progress.epoch
    is_best = False
    if val is not None:
        record.update({f"val_{k}": val[k] for k in ("top1", "many", "medium", "few")})
        score = val[progress.metric]
        if score is not None and (progress.best_value is None or score > progress.best_value):
            progress.best_value, progress.best_epoch, is_best = score, progress.epoch, True
    if runlog is None:
        return
    # The metric line first: a run killed before last.pt has a line of an epoch the checkpoint lacks,
    # which resume drops (trim_metrics_log, from start_run) and logs again; the other order would lose the line.
    runlog.log(progress.step, record)
    state = {**payload, **progress.as_checkpoint(), "finished": progress.epoch >= num_epochs}
    if is_best:
        save_checkpoint(run_dir / "best.pt", state)
    saves = progress.epoch >= num_epochs or time.monotonic() - progress.saved_at >= save_every_s
    if saves:
        save_checkpoint(run_dir / "last.pt", state)
        progress.saved_at = time.monotonic()
    logger.info("epoch %d/%d %s%s", progress.epoch, num_epochs,
                " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)),
                " (last.pt written)" if saves else "")


def finish_run(runlog: RunLog | None, d: Dist, stop: StopRequest | None = None) -> None:
    """Close the metric log and give up the run directory's claim (rank 0), give the signals back (stop),
    and leave the process group (several processes)."""
    if runlog is not None:
        runlog.close()
        release_run_dir(runlog.run_dir)
    if stop is not None:
        stop.uninstall()
    shutdown(d)


def finished_run(ckpt: dict | None, run_dir: Path, d: Dist) -> bool:
    """Whether --resume found a run's end (end_epoch marks its last.pt; a tau_norm checkpoint, which records
    its tau, is written only at its end): then it says so, gives up the run directory and nothing is trained
    or rewritten."""
    if ckpt is None or not ckpt.get("finished", "tau" in ckpt):
        return False
    logger.info("%s: the run is finished (epoch %d); nothing left to do", run_dir, ckpt["epoch"])
    if d.is_main:
        release_run_dir(run_dir)
    shutdown(d)
    return True


def trim_metrics_log(run_dir: Path, last_epoch: int) -> None:
    """On resume, drop metric lines of epochs after the checkpoint (logged before a kill). Only the
    writing rank may call it: ranks rewriting one file at once can read it while another has emptied
    it, and lose lines. The file is replaced whole, so a kill while trimming leaves the old log."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        old = path.read_text(encoding="utf-8", errors="replace")  # bytes that are not text: a line dropped below
        text = "".join(line + "\n" for line in old.splitlines() if _epoch_of(line) <= last_epoch)
        if text != old:
            write_atomic(path, lambda f: f.write(text.encode()))


def _epoch_of(line: str) -> float:
    """A metric line's epoch (0 without one); infinite for a line a kill cut short, so that it is dropped."""
    try:
        return json.loads(line).get("epoch", 0)
    except json.JSONDecodeError:
        return math.inf
