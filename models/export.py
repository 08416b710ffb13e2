"""Inference export of a trained model: a plain state dict and a small JSON of what inference needs.

    <dir>/model.pt    state dict of models.build_model(arch, num_classes, head), backbone + head (linear
                      but for a stage-1 cosine head); loads with torch.load(weights_only=True)
    <dir>/model.json  {"format", "arch", "head", "num_classes", "class_names", "class_counts",
                       "mean", "std", "image_size", "resize", "logit_scale", "probability"}: images are
                       resized (below), scaled to [0, 1] and normalised per channel by mean / std;
                       probabilities are the softmax of logit_scale * logits (null: no probability, the
                       logits are scores), or with "probability": "sigmoid" each class's sigmoid of its logit

resize is how the model's evaluation (--test) prepared its images: "square" resizes straight to
image_size x image_size (bilinear; the CIFAR models, 32), "shorter_side_crop" resizes the shorter side
to round(image_size * 256 / 224) and takes the centre image_size x image_size crop (the image-file
models: data.image_files.eval_transform). logit_scale is the factor the training loss multiplied the
logits by before its softmax: LDAM's loss.scale (30 for its cosine head), else 1. probability is "sigmoid"
for a model trained with a one-vs-all sigmoid loss (models.losses.SIGMOID_CHOICES), else "softmax". Exports
written before these keys existed read as "square" (as they were resized then), 1 (or null for a cosine head,
whose scale they did not record) and "softmax".
"""
from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from models.checkpoint import CheckpointError, load_state_checked, run_checkpoints, write_atomic
from models.registry import build_model

EXPORT_FORMAT = "lt-decoupled-export/1"  # bumped when model.json changes meaning
WEIGHTS_FILE, META_FILE = "model.pt", "model.json"
META_KEYS = ("arch", "num_classes", "class_names", "mean", "std", "image_size")  # those inference reads
RESIZES = ("square", "shorter_side_crop")  # model.json "resize" (module docstring)
PROBABILITIES = ("softmax", "sigmoid")  # model.json "probability"


def export_meta(model_args: dict, class_names: Sequence[str] | None, class_counts: Sequence[int] | None,
                mean: Sequence[float], std: Sequence[float], image_size: int, resize: str = "square",
                logit_scale: float | None = 1.0, probability: str = "softmax") -> dict:
    """The model.json dict; class names and counts may be None (imported checkpoints lack them)."""
    num_classes = model_args["num_classes"]
    if class_names is not None and len(class_names) != num_classes:
        raise CheckpointError(f"{len(class_names)} class names for a {num_classes}-class model")
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {', '.join(RESIZES)}, got {resize!r}")
    if probability not in PROBABILITIES:
        raise ValueError(f"probability must be one of {', '.join(PROBABILITIES)}, got {probability!r}")
    return {"format": EXPORT_FORMAT, "arch": model_args["name"], "head": model_args.get("head", "linear"),
            "num_classes": num_classes,
            "class_names": None if class_names is None else list(class_names),
            "class_counts": None if class_counts is None else list(class_counts),
            "mean": list(mean), "std": list(std), "image_size": image_size, "resize": resize,
            "logit_scale": logit_scale, "probability": probability}


# The errno words of the OSErrors of a path through a file, which name neither the file nor the cause.
PATH_THROUGH_A_FILE = {errno.EEXIST: "a file stands where a folder is needed",
                       errno.ENOTDIR: "a folder on this path is a file"}


def path_error_message(e: OSError) -> str:
    """'<path>: <what failed>' of an OSError of writing a file (an export, a checkpoint, the download
    cache), for a one-line error; an OSError without an errno is one of ours, whose message says it all."""
    if e.errno is None:
        return str(e)
    what = dangling_link(e) or PATH_THROUGH_A_FILE.get(e.errno) or e.strerror or str(e)
    return f"{e.filename}: {what}" if e.filename else what


def dangling_link(e: OSError) -> str | None:
    """What an OSError's file is when it is a symbolic link to nothing (a folder on an unmounted disk): mkdir
    says 'File exists' of it, which reads as a file standing there."""
    path = Path(e.filename) if isinstance(e.filename, str) else None
    if path is None or not path.is_symlink() or path.exists():
        return None
    return f"a symbolic link to {os.readlink(path)}, which does not exist (a disk not mounted?)"


def model_from_export(state: dict[str, torch.Tensor], meta: dict, what: str) -> nn.Module:
    """The model of an export's meta with `state` loaded (every key checked), in eval mode."""
    model = build_model(meta["arch"], meta["num_classes"], meta.get("head", "linear"))
    load_state_checked(model, state, what)
    return model.eval()


def write_export(out_dir: str | Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write model.pt and model.json into out_dir (created); returns out_dir. An export already
    there is never overwritten (FileExistsError)."""
    out_dir = Path(out_dir)
    if (out_dir / WEIGHTS_FILE).exists() or (out_dir / META_FILE).exists():
        raise FileExistsError(f"{out_dir} already holds an export ({WEIGHTS_FILE}, {META_FILE}); give another "
                              f"--export folder, or delete those two files first")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / WEIGHTS_FILE, lambda f: torch.save(dict(state), f))
    write_atomic(out_dir / META_FILE, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return out_dir


def meta_problem(meta: dict) -> str | None:
    """What makes a model.json dict unusable for inference (an edit, a damaged file), or None."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 1

    n = meta["num_classes"]
    checks = {
        f"resize {meta['resize']!r} is none of {', '.join(RESIZES)}": meta["resize"] in RESIZES,
        f"num_classes {n!r} is not a positive int": count(n),
        f"image_size {meta['image_size']!r} is not a positive int (pixels)": count(meta["image_size"]),
        "mean and std must be 3 numbers each (std > 0)": all(isinstance(v, list) and len(v) == 3 and all(map(number, v))
                                                            for v in (meta["mean"], meta["std"]))
        and all(s > 0 for s in meta["std"]),
        f"class_names must be {n} names": meta["class_names"] is None or (
            isinstance(meta["class_names"], list) and len(meta["class_names"]) == n
            and all(isinstance(c, str) for c in meta["class_names"])),
        f"class_counts must be {n} counts": meta.get("class_counts") is None or (
            isinstance(meta["class_counts"], list) and len(meta["class_counts"]) == n
            and all(isinstance(c, int) and c >= 0 for c in meta["class_counts"])),
        f"logit_scale {meta['logit_scale']!r} is not a number > 0 or null": meta["logit_scale"] is None or (
            number(meta["logit_scale"]) and meta["logit_scale"] > 0),
        f"probability {meta['probability']!r} is none of {', '.join(PROBABILITIES)}":
            meta["probability"] in PROBABILITIES,
    }
    return next((what for what, ok in checks.items() if not ok), None)


def load_export(out_dir: str | Path) -> tuple[nn.Module, dict]:
    """(model in eval mode, the model.json dict) of an export directory."""
    out_dir = Path(out_dir)
    meta_path, weights_path = out_dir / META_FILE, out_dir / WEIGHTS_FILE
    command = f"python predict.py <checkpoint.pt> --export {out_dir}"
    if not meta_path.is_file() or not weights_path.is_file():
        found = run_checkpoints(out_dir)
        if found:  # a run directory: its checkpoints are read as they are
            raise CheckpointError(f"{out_dir} is a run directory, not an export: pass {' or '.join(map(str, found))}")
        raise CheckpointError(f"{out_dir} is not an export directory (it needs {WEIGHTS_FILE} and {META_FILE}); "
                              f"write one with: {command}")
    export_again = f"delete its {WEIGHTS_FILE} and {META_FILE} and export again: {command}"
    try:
        meta = json.loads(meta_path.read_bytes())
    except ValueError as e:  # not JSON, or not text
        raise CheckpointError(f"{meta_path} is damaged ({e}); {export_again}") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{meta_path} is not an export of this tool (expected format {EXPORT_FORMAT!r}); "
                              f"{export_again}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path} is damaged (missing {', '.join(missing)}); {export_again}")
    # Exports from before these keys: read as they were then (module docstring).
    meta.setdefault("resize", "square")
    meta.setdefault("logit_scale", 1.0 if meta.get("head", "linear") == "linear" else None)
    meta.setdefault("probability", "softmax")
    problem = meta_problem(meta)
    if problem:
        raise CheckpointError(f"{meta_path} is damaged ({problem}); {export_again}")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a torch file
        cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise CheckpointError(f"{weights_path} is damaged ({cause}); {export_again}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{weights_path} holds no state dict; {export_again}")
    return model_from_export(state, meta, str(weights_path)), meta
