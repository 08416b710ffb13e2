"""The long-tailed training set of an experiment, from a dataset name and plain arguments.

The long-tailed training set is the reference rule's (LDAM / BALMS code: n_i images of class i of
an exponential or step profile from n_max = all 5000 / 500 images of a CIFAR class); validation
images (balanced, k per class) come from the training images it leaves out, so model selection
never sees a training image and the training set stays the benchmark's (a head class that keeps
all its images gives k of them up). The class counts are computed here once and passed
explicitly to everything that needs them.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from data.augment import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from data.cifar import DatasetFormatError, get_spec, load_cifar
from data.image_files import IMAGENET_MEAN, IMAGENET_STD, INAT_MEAN, INAT_STD
from data.image_lists import LIST_DATASETS
from data.long_tail import class_counts, long_tail_counts, long_tail_split, second_draw

logger = logging.getLogger(__name__)

# Per-channel mean / std of the training images: CIFAR-10's as the papers' code; CIFAR-100's own (their
# code uses CIFAR-10's for both); image files (folders, split lists) ImageNet's, as the papers' ImageNet-LT
# code, and iNaturalist its own, as the Decoupling code.
Normalization = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per channel
NORMALIZATION: dict[str, Normalization] = {
    "cifar10": (tuple(CIFAR10_MEAN), tuple(CIFAR10_STD)),
    "cifar100": (tuple(CIFAR100_MEAN), tuple(CIFAR100_STD)),
    **{name: (IMAGENET_MEAN, IMAGENET_STD) for name in ("folder", *LIST_DATASETS)},
    "inat2018": (INAT_MEAN, INAT_STD),
}


@dataclass
class LongTailData:
    train_images: torch.Tensor  # uint8 (N, 3, H, W)
    train_labels: torch.Tensor  # int64 (N,)
    val_images: torch.Tensor  # uint8 (V, 3, H, W); V = 0 without a validation split
    val_labels: torch.Tensor  # int64 (V,)
    class_names: list[str]
    class_counts: list[int]  # training images per class of the long-tailed set
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_digest: str  # training_digest of the labels and the image bytes, in order


def training_digest(*parts: bytes | memoryview) -> str:
    """The first 16 hex digits of the sha256 of `parts`: which training images a run trains on, in their order.
    Checkpoints record it; stage 2 compares its own with its stage-1 run's (a copy of the data in another order,
    with other pixels or other files under data.root trains the head on other images than the backbone's)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()[:16]


def check_hold_out(labels: torch.Tensor, class_names: list[str], val_per_class: int) -> None:
    """data.val_per_class leaves every class that has images at least one training image (else one line)."""
    counts = class_counts(labels, len(class_names))
    smallest = min((c for c in range(len(counts)) if counts[c]), key=counts.__getitem__)
    if val_per_class >= counts[smallest]:
        raise DatasetFormatError(
            f"data.val_per_class={val_per_class} would hold out every training image of class "
            f"{class_names[smallest]!r} ({counts[smallest]} images): set it below {counts[smallest]}")


def check_every_class_kept(counts: list[int], class_names: list[str], n_max: int, imbalance_factor: float) -> None:
    """The long-tailed counts leave every class at least one training image (else one line naming the key)."""
    if 0 in counts:
        empty = class_names[counts.index(0)]
        raise DatasetFormatError(
            f"data.imbalance_factor={imbalance_factor:g} with {n_max} images in the smallest full class leaves "
            f"class {empty!r} with no training image: lower data.imbalance_factor")


def rule_counts(labels: torch.Tensor, class_names: list[str], imbalance_factor: float, profile: str) -> list[int]:
    """The reference rule's long-tailed counts of n_max = the smallest class's images (IF 1: every image)."""
    full_counts = class_counts(labels, len(class_names))
    if 0 in full_counts:
        raise DatasetFormatError(f"class {class_names[full_counts.index(0)]!r} has no training image: the long-tailed "
                                 f"rule takes images of every class; check the training data (data.root)")
    if imbalance_factor > 1 and len(class_names) < 2:
        raise DatasetFormatError(f"data.imbalance_factor={imbalance_factor:g} needs at least 2 classes, the training "
                                 f"data has {len(class_names)}: set data.imbalance_factor=1")
    n_max = min(full_counts)
    counts = (long_tail_counts(n_max, len(class_names), imbalance_factor, profile) if imbalance_factor > 1
              else full_counts)
    check_every_class_kept(counts, class_names, n_max, imbalance_factor)
    return counts


def long_tail_subset(labels: torch.Tensor, class_names: list[str], imbalance_factor: float, profile: str,
                     subset_seed: int, val_per_class: int, subset_draw: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices: the rule's counts (rule_counts) drawn by `subset_draw` (long_tail.SUBSET_DRAWS),
    validation images from the images the long-tailed draw leaves out (long_tail_split)."""
    check_hold_out(labels, class_names, val_per_class)
    counts = rule_counts(labels, class_names, imbalance_factor, profile)
    return long_tail_split(labels, counts, val_per_class, subset_seed, subset_draw)


def recorded_normalization(ckpt: dict, dataset: str) -> Normalization:
    """The (mean, std) a checkpoint's model was trained with: its record, or, for a checkpoint written before they
    recorded it (2026-12-06), NORMALIZATION's entry for its dataset (inat2018's was ImageNet's before 2026-11-28)."""
    record = ckpt.get("normalization")
    return (tuple(record["mean"]), tuple(record["std"])) if record else NORMALIZATION[dataset]


def build_long_tail(dataset: str, root: str | Path, download: bool, imbalance_factor: float,
                    profile: str, subset_seed: int, val_per_class: int,
                    normalization: Normalization | None = None, subset_draw: str = "torch") -> LongTailData:
    """The CIFAR long-tailed set; normalization: (mean, std) other than the dataset's (a checkpoint's record)."""
    spec = get_spec(dataset)
    full = load_cifar(dataset, root, "train", download=download)
    keep, val = long_tail_subset(full.labels, full.class_names, imbalance_factor, profile, subset_seed, val_per_class,
                                 subset_draw)
    images, labels = full.images[keep], full.labels[keep]
    counts = class_counts(labels, spec.num_classes)
    mean, std = normalization or NORMALIZATION[dataset]
    logger.info("%s-LT %s IF %g: %d training images, %d validation, counts %s",
                spec.display_name, profile, imbalance_factor, len(keep), len(val), counts)
    return LongTailData(
        train_images=images, train_labels=labels, val_images=full.images[val], val_labels=full.labels[val],
        class_names=full.class_names, class_counts=counts, mean=mean, std=std,
        train_digest=training_digest(labels.numpy().tobytes(), memoryview(images.numpy())),
    )


def build_meta_resample(dataset: str, root: str | Path, download: bool, imbalance_factor: float, profile: str,
                        subset_seed: int, val_per_class: int, subset_draw: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, labels) of BALMS's meta set on CIFAR: a second long-tailed draw of the training
    split with the same counts and seed subset_seed + 1, never a validation image (second_draw)."""
    full = load_cifar(dataset, root, "train", download=download)
    _, val = long_tail_subset(full.labels, full.class_names, imbalance_factor, profile, subset_seed, val_per_class,
                              subset_draw)
    counts = rule_counts(full.labels, full.class_names, imbalance_factor, profile)
    meta = second_draw(full.labels, counts, val, subset_seed + 1)
    logger.info("meta set: a second long-tailed draw of %d training-split images (seed %d), counts %s",
                len(meta), subset_seed + 1, class_counts(full.labels[meta], len(full.class_names)))
    return full.images[meta], full.labels[meta]
