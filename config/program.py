"""What every command-line program here shares (the entry scripts, predict.py, the benches): a parser whose
errors are one line, user errors as one line (also in train.log) with exit status 2, Ctrl-C and SIGTERM as one
line, and a refused run that leaves nothing behind."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import signal
import sys
import traceback
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterator

from config.keys import ConfigError
from data.cifar import DatasetFormatError, DatasetNotFoundError
from engine.device import DeviceError
from engine.run_dir import RunDirError, created_here, forget_run_dir
from engine.stopping import Terminated, raise_on_sigterm
from models.checkpoint import CheckpointError
from models.download import DownloadError
from models.export import PATH_THROUGH_A_FILE, dangling_link

USER_ERROR_STATUS = 2  # the exit status of a user error, as argparse uses for a bad command line


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (argparse prints the whole usage first), and an option is
    never taken from its abbreviation (--resum is a typo, not --resume)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> None:
        self.exit(USER_ERROR_STATUS, f"{self.prog}: error: {message}; see --help\n")


def at_least(low: int) -> Callable[[str], int]:
    """argparse type: an int >= low."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"  # argparse names the type in its message for a non-number
    return parse


@contextmanager
def user_errors() -> Iterator[None]:
    """Errors the user causes and can fix (a config mistake, missing or damaged data, a bad
    checkpoint, a failed download, a run directory in use) end the program with their one
    message, which says what to do, and no traceback."""
    try:
        yield
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    except (DatasetNotFoundError, DatasetFormatError, CheckpointError, DownloadError, RunDirError, DeviceError,
            FloatingPointError) as e:
        raise SystemExit(f"error: {own_message(e)}") from None
    except OSError as e:  # the disk, permissions, a file the user named
        raise SystemExit(f"error: {os_error_message(e)}") from None
    except RuntimeError as e:  # Path.resolve() before Python 3.13 (an OSError, ELOOP, since)
        if not str(e).startswith("Symlink loop from"):
            raise
        raise SystemExit(f"error: {e}; {OS_ERROR_HINTS[errno.ELOOP]}") from None


# What to do about the OSErrors a user can cause (others get their own message only).
OS_ERROR_HINTS = {
    errno.ENOSPC: "free space on that disk, then run the same command with --resume",
    errno.EFBIG: "the file system refused a file that large: free space or raise the limit (ulimit -f), then --resume",
    errno.EDQUOT: "the disk quota is full: free space, then run the same command with --resume",
    errno.EACCES: "check the path's permissions, or choose a writable log_dir=... / data.root=...",
    **{no: f"{what}: move it away (for the run directory: or choose another log_dir=... / name=...)"
       for no, what in PATH_THROUGH_A_FILE.items()},
    errno.EROFS: "that file system is read-only: choose log_dir=... on a writable one",
    errno.ELOOP: "a symbolic link on that path leads back into it: fix the link, or give another path",
}


def os_error_message(e: OSError) -> str:
    """'<path>: <what failed>; <what to do>' for an OSError of the disk or permissions."""
    link = dangling_link(e)  # a link to nothing: the errno's hint (a file in the way) would mislead
    what = link or e.strerror or str(e)
    hint = None if link else OS_ERROR_HINTS.get(e.errno)
    return (f"{e.filename}: {what}" if e.filename else what) + (f"; {hint}" if hint else "")


def own_message(e: Exception) -> str:
    """An exception's message; for one a DataLoader worker raised, which the DataLoader re-raises with
    the worker's traceback in the message, the original message (its last line, past 'module.Type: ')."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if last.startswith(f"{type(e).__module__}.{type(e).__name__}: ") else last
    return text


def exit_on_user_error(command: Callable[[], object], debug: bool = False, resumable: bool = False) -> None:
    """Run a command-line program: a user error (SystemExit with its message) prints that one line to
    stderr (and to the run's train.log when one is open) and exits with USER_ERROR_STATUS, with the
    traceback first when `debug`; Ctrl-C and SIGTERM are one line too (exit 130, 143; a `resumable` program's
    line says that --resume continues); anything else (a bug) keeps its traceback."""
    try:
        command()
    except SystemExit as e:
        if isinstance(e.code, str):
            if debug:
                traceback.print_exception(e.__context__ or e)
            log_to_files(e.code)
            print(e.code, file=sys.stderr)
            raise SystemExit(USER_ERROR_STATUS) from None
        raise
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM where no StopRequest listens (start-up, --test, torchrun)
        signum, name = (signal.SIGTERM, "SIGTERM") if isinstance(e, Terminated) else (signal.SIGINT, "SIGINT (Ctrl-C)")
        message = f"stopped by {name}" + ("; --resume continues from the last checkpoint written, if any"
                                           if resumable else "")
        log_to_files(message)
        print(message, file=sys.stderr)
        raise SystemExit(128 + signum) from None


def run_program(command: Callable[[], object], debug: bool = False, resumable: bool = False) -> None:
    """A command-line program's top: SIGTERM raises as Ctrl-C does (raise_on_sigterm), exit_on_user_error, then
    signals end the process at once.

    Once `command` has returned or raised, its work is saved; a signal now lands while the interpreter
    shuts down, inside some finaliser (a second Ctrl-C 50 ms after the first, which has just stopped the
    run). Raising there, as StopRequest or Python's Ctrl-C do, prints that finaliser's traceback; this
    writes one line and exits with 128 + the signal instead. What the program printed is flushed first
    (predict.py's lines in a pipe): exiting at once skips the interpreter's own flush."""
    raise_on_sigterm()
    try:
        exit_on_user_error(command, debug, resumable)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _exit_at_once)
        with suppress(OSError, ValueError):  # a closed pipe or stream: the interpreter's exit reports it
            sys.stdout.flush()


def _exit_at_once(signum: int, frame: object) -> None:
    os.write(2, f"{signal.Signals(signum).name} while exiting: stopped at once\n".encode())
    os._exit(128 + signum)


def log_to_files(message: str) -> None:
    """`message` as an ERROR record into the file handlers of the root logger (train.log): stderr has it already."""
    record = logging.makeLogRecord({"name": "cli", "levelno": logging.ERROR, "levelname": "ERROR", "msg": message})
    for handler in _file_handlers():
        handler.handle(record)


def _file_handlers() -> list[logging.FileHandler]:
    """The root logger's handlers that write files (setup_run's train.log)."""
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


@contextmanager
def nothing_left_of_a_refused_run(run_dir: Path) -> Iterator[None]:
    """A run refused before it starts training (a user error before its config.yaml is written) removes
    the run directory it created, and the parent folders it created if they are empty: the next try is not
    told that the name is taken, nor sees a stray folder. A directory that was there before is never touched,
    nor one another process created meanwhile (the same command started twice: the refused one found it)."""
    created = [q for q in [run_dir, *run_dir.parents] if not q.exists()]  # deepest first
    try:
        yield
    except SystemExit as e:
        if isinstance(e.code, str) and created:
            if run_dir.is_dir() and created_here(run_dir) and not (run_dir / "config.yaml").exists():
                for handler in _file_handlers():
                    logging.getLogger().removeHandler(handler)
                    handler.close()
                forget_run_dir(run_dir)
                shutil.rmtree(run_dir, ignore_errors=True)
            for parent in created[1:]:
                with suppress(OSError):  # not empty: another run's directory is there
                    parent.rmdir()
        raise
