"""Print images/s of each augmentation op on a 512-image CIFAR-sized uint8 batch.

Run from the repository root: python3 -m bench.augment_speed
Measured at torch's default thread count and at 1 thread: these ops are small, so
intra-op threading overhead (and any other process competing for the 2 cores) shows.
"""

import time
from collections.abc import Callable

import torch

from data.augment import CIFAR10_MEAN, CIFAR10_STD, BatchAugment, normalize

BATCH = 512
SIZE = 32
# Minimum wall time per measurement in seconds, so fast ops are timed over many calls.
MIN_SECONDS = 1.0


def images_per_second(fn: Callable[[], torch.Tensor]) -> float:
    fn()  # warm-up: first-call allocations and lazy imports
    calls = 0
    start = time.perf_counter()
    while time.perf_counter() - start < MIN_SECONDS:
        fn()
        calls += 1
    return BATCH * calls / (time.perf_counter() - start)


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


def main() -> None:
    default_threads = torch.get_num_threads()
    report(default_threads)
    if default_threads != 1:
        report(1)


if __name__ == "__main__":
    main()
