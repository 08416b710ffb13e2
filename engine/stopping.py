"""Stopping a run on request: SIGINT / SIGTERM end the training loop after its current step, which saves
last.pt and says how to resume."""
from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.distributed import launched_world
from engine.runlog import RunLog
from models.checkpoint import check_weights_finite, save_checkpoint

if TYPE_CHECKING:  # engine.run imports this module
    from engine.run import Progress

logger = logging.getLogger(__name__)


class Terminated(KeyboardInterrupt):
    """SIGTERM where no StopRequest listens (start-up, stage 2's features, --test, between a sweep's runs), raised
    as Ctrl-C's KeyboardInterrupt is: the program unwinds the same way (a DataLoader worker that gets the signal
    too exits quietly, as on Ctrl-C) and its top prints one line (config.cli.exit_on_user_error)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def raise_on_sigterm() -> None:
    """SIGTERM raises Terminated in a single process. Under torchrun (WORLD_SIZE > 1) it still ends a worker at
    once: a Python handler runs only between Python steps, and torchrun stops a failed job's other workers,
    which may wait inside a collective, with SIGTERM."""
    if launched_world() == 1:
        signal.signal(signal.SIGTERM, _raise_terminated)


class StopRequest:
    """SIGINT / SIGTERM ask the training loop to stop after its current step (it saves last.pt and
    exits, see stop_run); a SIGINT after either stops at once (a repeated SIGTERM, as schedulers send, does
    not). Calling it says whether a signal came."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopRequest":
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def uninstall(self) -> None:
        """Give the signals back to the handlers before install: a program that runs several runs in turn (a
        sweep) must not have a finished run's handler swallow a Ctrl-C between them."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: now, without saving
            logger.warning("SIGINT again: stopped at once; last.pt is the last checkpoint written (--resume "
                           "continues from it)")
            raise SystemExit(128 + signum)
        self.signum = signum
        logger.warning("%s: stopping after this step and saving last.pt (Ctrl-C again to stop at once)",
                       signal.Signals(signum).name)

    def __call__(self) -> bool:  # train_one_epoch's `stop`
        return self.signum is not None


def stop_run(run_dir: Path, runlog: RunLog | None, progress: Progress, payload: dict, signum: int) -> None:
    """Save last.pt mid-epoch (progress.step counts the steps taken), say how to resume, and exit
    with 128 + the signal's number, as a shell reports a process a signal ended."""
    check_weights_finite(payload, progress.epoch + 1)  # a step can leave them so with a finite loss: keep the last good
    if runlog is not None:
        save_checkpoint(run_dir / "last.pt", {**payload, **progress.as_checkpoint()})
        runlog.close()
    name = signal.Signals(signum).name
    logger.warning("stopped by %s at step %d (epoch %d); last.pt saved: the same command with --resume continues",
                   name, progress.step, progress.epoch + 1)
    raise SystemExit(128 + signum)
