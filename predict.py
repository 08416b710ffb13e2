"""Classify image files with a trained model, or export a model for inference.

    python predict.py logs/<run>/best.pt cat.png dog.jpg       # a checkpoint of either stage
    python predict.py exported/ cat.png dog.jpg                # an export directory
    python predict.py logs/<run>/best.pt --export exported/    # write exported/model.pt + model.json

Prints one tab-separated line per image: path, predicted class name (its index when the checkpoint
has no class names), softmax probability; an unreadable image gets an error line on stderr instead,
and the exit status is then 2. Images (JPEG, PNG, WebP or GIF: what torchvision decodes) are decoded
and prepared as --test prepares the model's test images: decoded as in training (a 16-bit PNG scaled
to 8 bits), then resized straight to 32x32 (bilinear) for the CIFAR models, or, for image-file models
(data.dataset folder, imagenet_lt, places_lt, inat2018), shorter side to S * 256/224 and the centre
S x S crop, S = the data.image_size they were trained at. The probability is the softmax of the logits
times the scale the training loss applied to them: loss.scale for ldam (30 by default, meant for
model.head=cosine), 1 for every other loss and for stage 2; for a model trained with a one-vs-all sigmoid
loss (focal with form sigmoid, class_balanced with variant sigmoid or focal), the sigmoid of the predicted
class's logit, the probability that loss fitted. A cosine-head model that records no
training config (an import) has no such scale: its third column is the cosine score in [-1, 1], and a
note on stderr says so. Checkpoints without a training config (`python -m models import` results)
need --dataset for their normalisation.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from config.program import USER_ERROR_STATUS, OneLineParser, run_program
from config.schema import DataConfig
from data.augment import normalize
from data.build import NORMALIZATION, recorded_normalization
from data.build_files import FILE_DATASETS
from data.cifar import IMAGE_SHAPE, DatasetFormatError
from data.image_files import decode_rgb, decoder_reason, eval_transform
from engine.device import DeviceError, resolve_device
from models.checkpoint import CheckpointError, load_checkpoint
from models.export import (META_FILE, WEIGHTS_FILE, export_meta, load_export, model_from_export, path_error_message,
                           write_export)
from models.losses import training_logit_scale, training_probability


def positive_int(text: str) -> int:
    if not text.isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def read_images(paths: Sequence[str]) -> tuple[list[str], list[torch.Tensor]]:
    """The paths that read as images and their uint8 (3, H, W) RGB tensors, decoded as training and --test
    decode them (data.image_files.decode_rgb; Pillow's convert("RGB") turned a 16-bit PNG nearly white);
    each other path gets an error line on stderr."""
    read, images = [], []
    for path in paths:
        try:
            with open(path, "rb"):  # a missing or unreadable path gets the plain words of its OSError
                pass
            images.append(decode_rgb(Path(path)))  # an animated GIF: its first frame
            read.append(path)
        except OSError as e:
            print(f"error: cannot read {path} as an image ({e}); skipped", file=sys.stderr)
        except DatasetFormatError as e:  # not a format torchvision decodes (JPEG, PNG, WebP, GIF), or damaged
            print(f"error: cannot read {path} as an image ({decoder_reason(e.__cause__ or e)}); skipped",
                  file=sys.stderr)
    return read, images


def model_input(meta: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (3, H, W) -> the normalised float32 (3, S, S) the model takes, prepared as --test prepares its
    test images (meta["resize"], models/export.py)."""
    size = meta["image_size"]
    if meta["resize"] == "shorter_side_crop":
        return eval_transform(size, meta["mean"], meta["std"])  # the statistics of the model's dataset

    def square(image: torch.Tensor) -> torch.Tensor:
        if image.shape[1:] != (size, size):
            # Pillow's bilinear resize, as predict.py has always resized for CIFAR models (--test needs none).
            rgb = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((size, size), Image.Resampling.BILINEAR)
            image = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        return normalize(image, meta["mean"], meta["std"])
    return square


def checkpoint_for_inference(path: str, dataset: str | None) -> tuple[dict, dict]:
    """(state dict, export meta) of a checkpoint of this tool; dataset=None takes its training config's."""
    ckpt = load_checkpoint(path)
    recorded = (ckpt["config"] or {}).get("data", {}).get("dataset")
    if dataset is not None and recorded is not None and dataset != recorded:
        raise SystemExit(f"error: {path} was trained on {recorded}, not {dataset}: its normalisation and image size "
                         f"are {recorded}'s; leave --dataset out (it is for checkpoints that record no dataset)")
    dataset = dataset or recorded
    if dataset is None:
        raise SystemExit(f"error: {path} records no training dataset; pass --dataset "
                         f"({' | '.join(NORMALIZATION)}) to choose the normalisation it expects")
    mean, std = recorded_normalization(ckpt, dataset)
    # CIFAR models take 32x32 images; image-file models the data.image_size they were trained at, cropped
    # as engine.evaluate crops their test images.
    if dataset in FILE_DATASETS:
        size = (ckpt["config"] or {}).get("data", {}).get("image_size", DataConfig().image_size)
        resize = "shorter_side_crop"
    else:
        size, resize = IMAGE_SHAPE[1], "square"
    meta = export_meta(ckpt["model_args"], ckpt["class_names"], ckpt["class_counts"], mean, std, size, resize,
                       training_logit_scale(ckpt), training_probability(ckpt))
    return ckpt["model"], meta


def export_to(folder: str, state: dict, meta: dict) -> None:
    """write_export, its OSErrors one line each: a folder of the path that is a file, permissions, a full disk."""
    try:
        out = write_export(folder, state, meta)
        command = f"python predict.py {shlex.quote(str(out))} IMAGE ..."
        print(f"wrote {out / WEIGHTS_FILE} and {out / META_FILE}; classify with: {command}")
    except OSError as e:
        if e.errno is None:  # write_export's refusal to overwrite an export, which says what to do
            raise SystemExit(f"error: {e}") from None
        raise SystemExit(f"error: cannot write the export: {path_error_message(e)}; give --export a new folder "
                         f"in one you can write") from None


def classify(model: torch.nn.Module, meta: dict, paths: Sequence[str], batch_size: int,
             device: torch.device) -> int:
    """Print the line of each image, reading and preparing batch_size images at a time (a folder of photos
    never sits in memory whole); returns how many paths were no image."""
    prepare, scale, names = model_input(meta), meta["logit_scale"], meta["class_names"]
    if scale is None:
        print("note: the model has a cosine head and records no logit scale (no training config): the third "
              "column is the cosine of the image's features and the class's weights, in [-1, 1], not a "
              "probability", file=sys.stderr)
    model, skipped = model.to(device), 0
    for start in range(0, len(paths), batch_size):
        read, images = read_images(paths[start:start + batch_size])
        skipped += min(batch_size, len(paths) - start) - len(read)
        if not images:
            continue
        with torch.no_grad():
            logits = model(torch.stack([prepare(image) for image in images]).to(device)).float().cpu()
        if scale is None:
            scores = logits
        elif meta["probability"] == "sigmoid":
            scores = (scale * logits).sigmoid()
        else:
            scores = (scale * logits).softmax(dim=1)
        confidence, predicted = scores.max(dim=1)
        for path, c, p in zip(read, predicted.tolist(), confidence.tolist()):
            print(f"{path}\t{names[c] if names else c}\t{p:.4f}")
    return skipped


def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint .pt of this tool, or an export directory")
    parser.add_argument("images", nargs="*", help="image files to classify")
    parser.add_argument("--export", metavar="DIR", help="write the checkpoint as DIR/model.pt + DIR/model.json")
    parser.add_argument("--dataset", choices=sorted(NORMALIZATION),
                        help="normalisation of a checkpoint without a training config")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images read and classified at a time")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N | mps")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error too")
    args = parser.parse_intermixed_args(argv)  # options may come between the image paths
    if not args.export and not args.images:
        parser.error("give image files to classify, or --export DIR")
    try:
        device = resolve_device(args.device, "--device")
        if Path(args.model).is_dir():
            model, meta = load_export(args.model)  # a run directory: one line naming its checkpoints
            if args.export:
                raise SystemExit(f"error: {args.model} is already an export directory")
        else:
            state, meta = checkpoint_for_inference(args.model, args.dataset)
            if args.export:
                export_to(os.path.expanduser(args.export), state, meta)
            model = model_from_export(state, meta, args.model)
    except (CheckpointError, DeviceError) as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # a model path that cannot be read
        raise SystemExit(f"error: {path_error_message(e)}") from None
    try:
        skipped = args.images and classify(model, meta, args.images, args.batch_size, device)
    except BrokenPipeError:  # the reader stopped reading (`| head`): stop quietly, as SIGPIPE ends other programs
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush then goes nowhere
        raise SystemExit(128 + signal.SIGPIPE) from None
    if skipped:
        raise SystemExit(USER_ERROR_STATUS)  # the skipped images have their error lines


if __name__ == "__main__":
    run_program(main, debug="--debug" in sys.argv[1:])
