"""Print images/s of each augmentation op on a 512-image CIFAR-sized uint8 batch, and the host's
work per call and per image of the whole training augmentation.

    python bench/augment_speed.py        (or python -m bench.augment_speed; takes no options)

Measured at torch's default thread count and at 1 thread: these ops are small, so
intra-op threading overhead (and any other process competing for the 2 cores) shows.

Host work: on a GPU the host thread only draws random numbers and queues kernels, and when it is
slower than the GPU the training step waits for it. On torch's meta device ops compute shapes but
no pixels, so timing the pipeline there at two batch sizes splits the host's time into a part per
call (per kernel queued; meta ops are slower to queue than CUDA ones, so this part is an upper
bound) and a part per image (draws and Python work that grow with the batch), which no chunking
amortises.
"""

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.program import OneLineParser  # noqa: E402
from data.augment import CIFAR10_MEAN, CIFAR10_STD, BatchAugment, normalize  # noqa: E402

BATCH = 512
SIZE = 32
# Minimum wall time per measurement in seconds, so fast ops are timed over many calls.
MIN_SECONDS = 1.0


def seconds_per_call(fn: Callable[[], torch.Tensor]) -> float:
    fn()  # warm-up: first-call allocations and lazy imports
    calls = 0
    start = time.perf_counter()
    while time.perf_counter() - start < MIN_SECONDS:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def images_per_second(fn: Callable[[], torch.Tensor]) -> float:
    return BATCH / seconds_per_call(fn)


def report(threads: int) -> None:
    torch.set_num_threads(threads)
    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    ops = {
        "crop (padding 4)": BatchAugment(crop_padding=4, flip=False),
        "flip": BatchAugment(crop_padding=0, flip=True),
        "crop + flip": BatchAugment(crop_padding=4, flip=True),
        "autoaugment (CIFAR10)": BatchAugment(crop_padding=0, flip=False, autoaugment=True),
        "cutout (16)": BatchAugment(crop_padding=0, flip=False, cutout=16),
        "crop + flip + autoaugment + cutout": BatchAugment(
            crop_padding=4, flip=True, autoaugment=True, cutout=16
        ),
    }
    print(f"batch {BATCH}x3x{SIZE}x{SIZE} uint8, torch threads {torch.get_num_threads()}")
    for name, aug in ops.items():
        rate = images_per_second(lambda aug=aug: aug(images, generator))
        print(f"{name:36s} {rate:12,.0f} images/s")
    rate = images_per_second(lambda: normalize(images, CIFAR10_MEAN, CIFAR10_STD))
    print(f"{'normalize':36s} {rate:12,.0f} images/s")


HOST_SIZES = (512, 8192)  # images per call: one batch, and data.loader.AUGMENT_CHUNK


def host_work() -> None:
    aug = BatchAugment(crop_padding=4, flip=True, autoaugment=True, cutout=16)
    generator = torch.Generator().manual_seed(0)
    seconds = {}
    for n in HOST_SIZES:
        images = torch.empty(n, 3, SIZE, SIZE, dtype=torch.uint8, device="meta")
        seconds[n] = seconds_per_call(lambda: normalize(aug(images, generator), CIFAR10_MEAN, CIFAR10_STD))
        print(f"host work, crop + flip + autoaugment + cutout + normalize of {n:5d} images: {seconds[n] * 1e3:6.1f} ms")
    small, large = HOST_SIZES
    per_image = (seconds[large] - seconds[small]) / (large - small)
    print(f"host work per image {per_image * 1e6:.2f} us, per call {(seconds[small] - small * per_image) * 1e3:.1f} ms")


def main() -> None:
    OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    default_threads = torch.get_num_threads()
    report(default_threads)
    if default_threads != 1:
        report(1)
    host_work()


if __name__ == "__main__":
    main()
