"""What both entry scripts do around their loops, on plain arguments: resuming, and the end of each epoch
(best and last checkpoints, the metric log) and of the run. The run directory itself: engine.run_dir."""
from __future__ import annotations

import json
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from engine.distributed import Dist, shutdown
from engine.run_dir import RunDirError, release_run_dir
from engine.runlog import RunLog
from engine.stopping import StopRequest
from models.checkpoint import (CheckpointError, check_weights_finite, load_checkpoint, load_state_checked,
                               save_checkpoint, write_atomic)

logger = logging.getLogger(__name__)


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
    # Drawn when a run starts (again: a restart in a directory without last.pt) and kept by its resumes: a best.pt
    # of another id is an earlier attempt's, which this run replaces (None: a run started before 2026-12-07).
    run_id: str | None = field(default_factory=lambda: secrets.token_hex(8), compare=False)

    def as_checkpoint(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "epoch_step": self.epoch_step, "run_id": self.run_id,
                "best": {"metric": self.metric, "value": self.best_value, "epoch": self.best_epoch}}

    def steps_this_epoch(self, steps_total: int, epoch_len: int) -> int:
        """Steps the epoch in progress takes: the rest of its epoch_len, no further than steps_total; none when
        it took epoch_len already (stopped after its last step by one process, whose epochs keep a short last
        batch, and resumed under several, whose epochs drop it: one step shorter)."""
        return max(0, min(epoch_len - self.epoch_step, steps_total - self.step))

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
    best = _best_saved(run_dir, ckpt["best"], ckpt.get("run_id"))
    legacy = ckpt["step"] - ckpt["epoch"] * epoch_len if "epoch_sums" in ckpt else 0
    return Progress(best["metric"], ckpt["epoch"], ckpt["step"], best["value"], best["epoch"],
                    ckpt.get("epoch_step", legacy), run_id=ckpt.get("run_id"))


def _best_saved(run_dir: Path, best: dict, run_id: str | None) -> dict:
    """The best score so far: last.pt's record, or best.pt's where that is higher. best.pt is written before
    last.pt, and under train.save_every_s last.pt may wait several epochs, so a run killed in between has a
    best.pt of an epoch last.pt does not know; from last.pt's record alone, a resumed run would overwrite that
    best.pt with any weaker epoch that beats last.pt's record. A best.pt of another run_id is an earlier
    attempt's in this directory (killed before its first last.pt, then started again): never this run's best."""
    path = run_dir / "best.pt"
    if not path.is_file():
        return best
    ckpt = load_checkpoint(path, mmap=True)
    saved = ckpt.get("best", {})
    if saved.get("metric") != best["metric"] or saved.get("value") is None or ckpt.get("run_id") != run_id:
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
    check_weights_finite(payload, progress.epoch)
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
