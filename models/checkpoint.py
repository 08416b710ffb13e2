"""Self-describing checkpoints, written atomically, loaded with explicit key checks.

A checkpoint is a plain dict (tensors, numbers, strings, lists) so that it loads with
`torch.load(weights_only=True)`: model and optimiser state, scheduler state, epoch and step,
the resolved config, the model's constructor arguments and the training class counts.
"""
from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import torch
from torch import nn

FORMAT = "lt-decoupled/1"  # bumped when the layout of the dict changes


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model or is not one of ours."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint file at the path given."""


# write_atomic's temporary files (.<name>.<8 hex digits>.tmp): of checkpoints and of the trimmed metric log
WRITE_TEMP_GLOB = ".*." + "[0-9a-f]" * 8 + ".tmp"


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """write(file) into a temporary file in path's folder, fsync, then rename over `path`.

    A process killed mid-write leaves the previous file intact, never a truncated one (a SIGKILL
    leaves the temporary file, which remove_stale_temp_files clears at the next start). The temporary
    file's name is known before it exists, so an exception at any point (a second Ctrl-C) removes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        # O_EXCL: a new file; mode 0666 less the umask, as open() gives.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            try:
                write(f)
            except RuntimeError as e:  # torch.save turns whatever the file's write raised into a RuntimeError
                raise _write_error(e, path) from e
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temporary files that killed write_atomic calls left in `folder` (call it only where
    no other process is writing there: at the start of a training run, on rank 0)."""
    for stale in folder.glob(WRITE_TEMP_GLOB):
        stale.unlink(missing_ok=True)


def _write_error(e: RuntimeError, path: Path) -> BaseException:
    """What to raise for torch.save's RuntimeError: the exception the write raised when it was a signal's
    (SystemExit, KeyboardInterrupt) or the disk's (OSError, with the path), else an OSError of its text."""
    cause = e.__context__
    if isinstance(cause, BaseException) and not isinstance(cause, Exception):
        return cause
    kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
    if isinstance(cause, OSError) and cause.errno is not None:
        return OSError(cause.errno, f"{cause.strerror} ({kept})", str(path))
    return OSError(errno.EIO, f"writing it failed ({str(e).splitlines()[0]}); is the disk full? Free space, then "
                              f"run the same command with --resume: {kept}", str(path))


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Atomically write the checkpoint dict (with its format tag) to `path`."""
    write_atomic(path, lambda f: torch.save({"format": FORMAT, **payload}, f))


def run_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints of a run directory that exist: best.pt, last.pt."""
    return [folder / n for n in ("best.pt", "last.pt") if (folder / n).is_file()]


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at `path`, its tensors on the CPU; mmap=True reads a tensor's bytes only when it is
    used (for a caller that wants the small entries of a large file)."""
    path = Path(path)
    if path.is_dir():
        found = " or ".join(map(str, run_checkpoints(path)))
        raise CheckpointNotFoundError(f"{path} is a directory, not a checkpoint: give a .pt file in it"
                                      + (f", {found}" if found else ""))
    if not path.is_file():
        last = path.parent / "last.pt"
        if path.name == "best.pt" and last.is_file():  # a run without a validation split has last.pt only
            raise CheckpointNotFoundError(f"{path.parent} has no best.pt (written when an epoch ends and a "
                                          f"validation split chooses it: data.val_per_class > 0, or a val split); "
                                          f"use {last}")
        missing = f" ({path.parent} does not exist)" if not path.parent.exists() else ""
        raise CheckpointNotFoundError(f"no checkpoint at {path}{missing}: train first, or give the path of a .pt file "
                                      f"of a run directory")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except PermissionError:  # not a damaged file: the OSError's own message (config.cli.user_errors) says so
        raise
    except Exception as e:  # truncated file, not a torch file, or pickled objects we do not load
        # torch's own message is not passed on: for a text file it advises weights_only=False, which runs code
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({type(e).__name__}); is it complete, and a "
                              f".pt file this tool wrote (a run's best.pt or last.pt)?") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this tool (expected format {FORMAT!r})")
    return ckpt


def load_state_checked(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict) with an error that names every missing, unexpected or misshapen key."""
    own = module.state_dict()
    # PyTorch before 0.4.1 saved BatchNorm without num_batches_tracked, and files of that time are still
    # published (torchvision's ImageNet ResNets among them). torch's own loading fills it in for them; so do we,
    # with the model's value (it is read only by a BatchNorm with momentum=None, which no model here has), where
    # the file holds the rest of that BatchNorm.
    old_bn = [k for k in own.keys() - state.keys()
              if k.endswith(".num_batches_tracked") and k.replace("num_batches_tracked", "running_mean") in state]
    state = {**{k: own[k] for k in old_bn}, **state}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    def first(items: list[str], sep: str) -> str:  # a whole ResNet's keys would make a line of kilobytes
        return f"({len(items)}): " + sep.join(items[:5]) + (f"{sep}..." if len(items) > 5 else "")
    problems = []
    if missing:
        problems.append(f"missing keys {first(missing, ', ')}")
    if unexpected:
        problems.append(f"unexpected keys {first(unexpected, ', ')}")
    if misshapen:
        problems.append(f"shape mismatches {first(misshapen, '; ')}")
    if problems:
        raise CheckpointError(f"{what} does not fit the model: " + " | ".join(problems))
    module.load_state_dict(state)


def check_weights_finite(payload: dict, epoch: int) -> None:
    """Raise FloatingPointError, before a checkpoint of them is written, when payload's model weights are no
    longer all finite (a loss can stay finite through the step that makes them so)."""
    floats = {k: v for k, v in payload.get("model", {}).items() if v.is_floating_point()}
    # One flag per tensor, read back together: on a GPU, one wait rather than one per tensor (about 190 for ResNet-32).
    finite = torch.stack([torch.isfinite(v).all() for v in floats.values()]).tolist() if floats else []
    bad = [k for k, ok in zip(floats, finite) if not ok]
    if bad:
        raise FloatingPointError(f"the weights became NaN or infinite in epoch {epoch} ({bad[0]} and "
                                 f"{len(bad) - 1} more); nothing of this epoch was saved: lower train.lr in a new "
                                 f"run (--resume keeps the run's settings), which may start from the last good "
                                 f"weights: model.pretrained=<the run's last.pt>")
