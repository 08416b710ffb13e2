"""Images/s of the streaming image-file loader against the in-memory CIFAR loader, in one run.

    python bench/loader_speed.py --folder datasets/cifar10_jpeg [--root datasets] [--workers 0 1 2]

Both load CIFAR-10-LT (exp, imbalance 100) training batches of 128 on the CPU, without a model:
- memory: data/loader.BatchLoader on the official python format under --root (uint8 images in
  memory; crop + flip, normalisation);
- stream: data/stream.StreamLoader on the same images as JPEG files under --folder/train/<class>/
  (decode, RandomResizedCrop to 32, flip, colour jitter, normalisation), for each worker count.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from config.program import OneLineParser, at_least, run_program, user_errors  # noqa: E402
from data.augment import BatchAugment  # noqa: E402
from data.build import build_long_tail  # noqa: E402
from data.build_files import build_file_data  # noqa: E402
from data.loader import BatchLoader  # noqa: E402
from data.samplers import build_sampler  # noqa: E402
from data.stream import StreamLoader  # noqa: E402


def rate(loader, batches: int) -> float:
    """Images/s over `batches` batches (an in-memory loader's rounded up to whole chunks: it augments a chunk of
    batches at its first one), after one warm-up epoch start (workers up, first batch)."""
    per_call = getattr(loader, "steps_per_chunk", 1)
    batches = -(-batches // per_call) * per_call
    warm = loader.epoch(99)
    next(warm)
    del warm
    seen, start = 0, time.perf_counter()
    for i, (x, _) in enumerate(loader.epoch(0)):
        seen += len(x)
        if i + 1 == batches:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True, help="folder with train/<class>/*.jpg (CIFAR-10 as JPEG files)")
    p.add_argument("--root", default=os.environ.get("LT_DATA_ROOT", "datasets"),
                   help="folder with cifar-10-batches-py/")
    p.add_argument("--workers", nargs="+", type=at_least(0), default=[0, 1, 2])
    p.add_argument("--batches", type=at_least(1), default=40, help="timed batches of 128 per loader")
    args = p.parse_args()

    def command() -> None:
        with user_errors():  # no CIFAR-10 under --root, no images under --folder, an unreadable image: one line
            measure(args)

    run_program(command)


def measure(args: argparse.Namespace) -> None:
    cpu = torch.device("cpu")
    memory = build_long_tail("cifar10", args.root, False, 100.0, "exp", 0, 0)
    files = build_file_data("folder", args.folder, "", 100.0, "exp", 0, 0, 32)
    print(f"CIFAR-10-LT IF 100: {len(memory.train_labels)} images in memory, {len(files.train_labels)} JPEG files; "
          f"batch 128, torch {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    sampler = build_sampler("instance", memory.train_labels, 10)
    base = rate(BatchLoader(memory.train_images, memory.train_labels, 128, sampler, BatchAugment(4, True), memory.mean,
                            memory.std, 0), args.batches)
    print(f"{'memory (crop + flip)':34s} {base:9.0f} images/s  1.00")
    sampler = build_sampler("instance", files.train_labels, 10)
    for workers in args.workers:
        r = rate(StreamLoader(files.train_images, 128, sampler, 0, workers, cpu), args.batches)
        print(f"{f'stream, {workers} worker(s)':34s} {r:9.0f} images/s  {r / base:.2f}", flush=True)


if __name__ == "__main__":
    main()
