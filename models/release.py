"""Released stage-1 checkpoints: a run's weights in float16 with what stage 2 reads from a stage-1 run.

    python -m models release logs/cifar10_lt_if100_exp_ce/last.pt models/released/NAME.pt

A release keeps the model (floating tensors as float16: half the bytes, a ResNet-32 in under 1 MB),
its model_args, the training set's class counts and names, and the run's config, so that
`--pretrained NAME` in stage 2 reads the training set from it as from the run itself; no optimiser,
scheduler or sampler state. Releases ship in models/released/ and are listed in models.zoo with their
SHA-256, checked on every load like a download.
"""
from __future__ import annotations

from pathlib import Path

import torch

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.download import file_sha256

RELEASED_DIR = Path(__file__).resolve().parent / "released"
KEPT = ("model_args", "class_counts", "class_names", "config")  # what stage 2 and --test read
OPTIONAL = ("normalization",)  # read too where present (a checkpoint written before 2026-12-06 has none)


def half_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors as float16 (loading into a float32 model casts them back); integers unchanged."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def write_release(ckpt_path: str | Path, out: str | Path) -> tuple[str, int]:
    """Write the release of a stage-1 checkpoint to `out`; return its SHA-256 and size in bytes."""
    ckpt = load_checkpoint(ckpt_path)
    missing = [k for k in KEPT if not ckpt.get(k)]
    if missing:
        raise CheckpointError(f"{ckpt_path} lacks {', '.join(missing)}: release a checkpoint of a training run")
    if "stage2" in ckpt["config"]:  # as models.pretrained.training_run tells the stages apart
        raise CheckpointError(f"{ckpt_path} is a stage-2 checkpoint: release the stage-1 run it started from")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, {"model": half_state(ckpt["model"]), **{k: ckpt[k] for k in KEPT + OPTIONAL if k in ckpt},
                          "released_from": {"run": ckpt["config"].get("name", ""), "step": ckpt.get("step")}})
    return file_sha256(out), out.stat().st_size


def released_file(relative: str, sha256: str, name: str) -> Path:
    """The shipped file of a registry entry, its SHA-256 checked (a damaged or changed file is refused)."""
    path = RELEASED_DIR / relative
    if not path.is_file():
        raise CheckpointError(f"{name}: the released file {path} is missing; restore it with "
                              f"`git checkout -- {path.relative_to(RELEASED_DIR.parents[1])}`")
    digest = file_sha256(path)
    if not digest.startswith(sha256.lower()):
        raise CheckpointError(f"{name}: {path} has SHA-256 {digest}, not the registry's {sha256}: the file was "
                              f"changed or damaged; restore it with `git checkout -- "
                              f"{path.relative_to(RELEASED_DIR.parents[1])}`")
    return path
