"""Classify image files with a trained model, or export a model for inference.

    python predict.py logs/<run>/best.pt cat.png dog.jpg       # a checkpoint of either stage
    python predict.py exported/ cat.png dog.jpg                # an export directory
    python predict.py logs/<run>/best.pt --export exported/    # write exported/model.pt + model.json

Prints one tab-separated line per image: path, predicted class name (its index when the checkpoint
has no class names), softmax probability; an unreadable image gets an error line on stderr instead,
and the exit status is then 2. Images are converted to RGB and resized (bilinear) to the training
resolution, 32x32 for the CIFAR models. Checkpoints without a training config
(`python -m models import` results) need --dataset for their normalisation.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from config.cli import USER_ERROR_STATUS, OneLineParser, run_program
from config.schema import DataConfig
from data.build import NORMALIZATION
from data.build_files import FILE_DATASETS
from data.cifar import IMAGE_SHAPE
from engine.device import DeviceError, resolve_device
from engine.loop import predict_logits
from models.checkpoint import CheckpointError, load_checkpoint
from models.export import export_meta, load_export, model_from_export, write_export


def positive_int(text: str) -> int:
    if not text.isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def read_images(paths: Sequence[str], size: int) -> tuple[list[str], list[torch.Tensor]]:
    """The paths that read as images and their uint8 (3, size, size) RGB tensors; each other path
    gets an error line on stderr."""
    read, images = [], []
    for path in paths:
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except (OSError, Image.DecompressionBombError) as e:
            print(f"error: cannot read {path} as an image ({e}); skipped", file=sys.stderr)
            continue
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        read.append(path)
        images.append(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1))  # (H, W, 3) -> (3, H, W)
    return read, images


def checkpoint_for_inference(path: str, dataset: str | None) -> tuple[dict, dict]:
    """(state dict, export meta) of a checkpoint of this tool; dataset=None takes its training config's."""
    ckpt = load_checkpoint(path)
    dataset = dataset or (ckpt["config"] or {}).get("data", {}).get("dataset")
    if dataset is None:
        raise SystemExit(f"error: {path} records no training dataset; pass --dataset "
                         f"({' | '.join(NORMALIZATION)}) to choose the normalisation it expects")
    mean, std = NORMALIZATION[dataset]
    # CIFAR models take 32x32 images; image-file models the data.image_size they were trained at.
    size = (ckpt["config"] or {}).get("data", {}).get("image_size", DataConfig().image_size) \
        if dataset in FILE_DATASETS else IMAGE_SHAPE[1]
    meta = export_meta(ckpt["model_args"], ckpt["class_names"], ckpt["class_counts"], mean, std, size)
    return ckpt["model"], meta


def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint .pt of this tool, or an export directory")
    parser.add_argument("images", nargs="*", help="image files to classify")
    parser.add_argument("--export", metavar="DIR", help="write the checkpoint as DIR/model.pt + DIR/model.json")
    parser.add_argument("--dataset", choices=sorted(NORMALIZATION),
                        help="normalisation of a checkpoint without a training config")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N | mps")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error too")
    args = parser.parse_intermixed_args(argv)  # options may come between the image paths
    if not args.export and not args.images:
        parser.error("give image files to classify, or --export DIR")
    try:
        device = resolve_device(args.device)
        if Path(args.model).is_dir():
            if args.export:
                raise SystemExit(f"error: {args.model} is already an export directory")
            model, meta = load_export(args.model)
        else:
            state, meta = checkpoint_for_inference(args.model, args.dataset)
            if args.export:
                print(f"wrote {write_export(args.export, state, meta)}")
            model = model_from_export(state, meta, args.model)
    except (CheckpointError, FileNotFoundError, FileExistsError, DeviceError) as e:
        raise SystemExit(f"error: {e}") from None
    if not args.images:
        return
    paths, images = read_images(args.images, meta["image_size"])
    if images:
        probs = predict_logits(model.to(device), torch.stack(images), args.batch_size, meta["mean"],
                               meta["std"]).softmax(dim=1)
        confidence, predicted = probs.max(dim=1)
        names = meta["class_names"]
        for path, c, p in zip(paths, predicted.tolist(), confidence.tolist()):
            print(f"{path}\t{names[c] if names else c}\t{p:.4f}")
    if len(paths) < len(args.images):
        raise SystemExit(USER_ERROR_STATUS)  # the skipped images have their error lines


if __name__ == "__main__":
    run_program(main, debug="--debug" in sys.argv[1:])
