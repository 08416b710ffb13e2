"""The training, validation and test splits of a dataset stored as image files (class folders or the
papers' split lists), from plain arguments; the file-backed counterpart of data/build.py.

Folders: `root/train/<class>/*` is subset to a long tail like CIFAR when imbalance_factor > 1 (so a
balanced folder such as CIFAR-10 as JPEGs becomes CIFAR-10-LT); the validation split is
`root/val/<class>/*` when present, else val_per_class images per class from the train/ images the
long-tailed draw leaves out (as data/build.py does). Split lists (ImageNet-LT, Places-LT, iNaturalist
2018) are long-tailed as published and are used as they are.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from data.build import (NORMALIZATION, LongTailData, Normalization, build_long_tail, check_hold_out, long_tail_subset,
                        training_digest)
from data.cifar import DatasetFormatError
from data.image_files import ImageFileDataset, eval_transform, train_transform
from data.image_lists import LIST_DATASETS, ImageList, read_folder_split, read_list_split
from data.long_tail import class_counts, hold_out_per_class

logger = logging.getLogger(__name__)

FILE_DATASETS = ("folder", *LIST_DATASETS)
# Every data.dataset name and its kind: cifar (in memory, data/build.py), folder or list (image files).
DATASET_KINDS: dict[str, str] = {"cifar10": "cifar", "cifar100": "cifar", "folder": "folder",
                                 **{name: "list" for name in LIST_DATASETS}}


@dataclass
class FileData:
    train_images: ImageFileDataset  # training transform, indexed by (index, seed); as LongTailData's name
    train_labels: torch.Tensor  # int64 (N,)
    val_images: ImageFileDataset | None  # evaluation transform; None without a validation split
    val_labels: torch.Tensor  # int64 (V,); V = 0 without a validation split
    class_names: list[str]
    class_counts: list[int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_digest: str  # training_digest of the paths relative to data.root and the labels, in order


def _subset(images: ImageList, index: torch.Tensor) -> ImageList:
    return ImageList([images.paths[i] for i in index.tolist()], images.labels[index], images.class_names)


def _folder_splits(root: Path, imbalance_factor: float, profile: str, subset_seed: int,
                   val_per_class: int, subset_draw: str) -> tuple[ImageList, ImageList | None]:
    full = read_folder_split(root, "train")
    # test/, when there, read now (a listing, no image decoded): the --test after the run must not fail on a stray
    # or empty class folder
    read_folder_split(root, "test", full.class_names)
    val = read_folder_split(root, "val", full.class_names)
    if val is not None and val_per_class:
        raise DatasetFormatError(f"{root / 'val'} is the validation split; data.val_per_class={val_per_class} would "
                                 f"hold out more: set data.val_per_class=0")
    keep, held = long_tail_subset(full.labels, full.class_names, imbalance_factor, profile, subset_seed,
                                  val_per_class, subset_draw)
    return _subset(full, keep), (_subset(full, held) if val_per_class else val)


def _list_splits(dataset: str, root: Path, list_dir: Path, subset_seed: int,
                 val_per_class: int) -> tuple[ImageList, ImageList | None]:
    train = read_list_split(dataset, "train", list_dir, root)
    if "val" in LIST_DATASETS[dataset].files:
        if val_per_class:
            raise DatasetFormatError(f"{dataset} has a validation list; data.val_per_class={val_per_class} would "
                                     f"hold out more: set data.val_per_class=0")
        return train, read_list_split(dataset, "val", list_dir, root)
    if not val_per_class:
        return train, None
    check_hold_out(train.labels, train.class_names, val_per_class)
    rest, held = hold_out_per_class(train.labels, val_per_class, subset_seed)
    return _subset(train, rest), _subset(train, held)


def read_test_split(dataset: str, root: str | Path, list_dir: str | Path, class_names: list[str]) -> ImageList:
    """The test split of a file dataset, labelled with the training split's class names."""
    root = Path(root)
    if dataset == "folder":
        test = read_folder_split(root, "test", class_names)
        if test is None:
            raise DatasetFormatError(f"{root / 'test'} does not exist: put the test images in test/<class>/")
        return test
    return read_list_split(dataset, "test", Path(list_dir or root), root)


def build_file_data(dataset: str, root: str | Path, list_dir: str | Path, imbalance_factor: float, profile: str,
                    subset_seed: int, val_per_class: int, image_size: int,
                    normalization: Normalization | None = None, subset_draw: str = "torch",
                    flip: bool = True) -> FileData:
    """The splits of `dataset` (a FILE_DATASETS name): lists are read from list_dir (empty: root), image
    paths are relative to root; images decode when a loader asks for them, normalised with (mean, std)
    `normalization` (default: the dataset's); flip: the training images' random horizontal flip."""
    # The splits hold resolved paths (data.image_lists), so the digest's paths are relative to the resolved root:
    # a relative, ~ or symlinked data.root gives the same digest as the absolute one.
    root = Path(root).expanduser().resolve()
    if dataset == "folder":
        train, val = _folder_splits(root, imbalance_factor, profile, subset_seed, val_per_class, subset_draw)
    else:
        train, val = _list_splits(dataset, root, Path(list_dir or root), subset_seed, val_per_class)
    counts = class_counts(train.labels, len(train.class_names))
    mean, std = normalization or NORMALIZATION[dataset]
    logger.info("%s at %s: %d training images, %d validation, %d classes, counts %d ... %d", dataset, root,
                len(train.paths), len(val.paths) if val else 0, len(counts), max(counts), min(counts))
    return FileData(
        train_images=ImageFileDataset(train, train_transform(image_size, mean, std,
                                                             color_jitter=dataset != "inat2018", flip=flip)),
        train_labels=train.labels,
        val_images=ImageFileDataset(val, eval_transform(image_size, mean, std)) if val else None,
        val_labels=val.labels if val else torch.empty(0, dtype=torch.int64),
        class_names=train.class_names, class_counts=counts, mean=mean, std=std,
        train_digest=training_digest(_listing(train, root)),
    )


def _listing(split: ImageList, root: Path) -> bytes:
    """The training images and labels the digest reads; a file name that is not UTF-8 (an old archive's Latin-1)
    comes from the file system as surrogates, which take back their own bytes."""
    text = "".join(f"{_under(p, root)}\t{label}\n" for p, label in zip(split.paths, split.labels.tolist()))
    return text.encode(errors="surrogateescape")


def _under(path: Path, root: Path) -> str:
    """`path` relative to `root` as the digest reads it; a split list may name absolute paths elsewhere (or through a
    link of root), which keep their own form."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def build_training_set(dataset: str, root: str | Path, list_dir: str | Path, download: bool, imbalance_factor: float,
                       profile: str, subset_seed: int, val_per_class: int, image_size: int,
                       normalization: Normalization | None = None, subset_draw: str = "torch",
                       flip: bool = True) -> LongTailData | FileData:
    """The training and validation splits of any data.dataset: CIFAR in memory (data/build.py), or image files;
    normalization: the (mean, std) a checkpoint being continued records (None: the dataset's); flip: image files'
    training flip (CIFAR's is data.augment.BatchAugment's)."""
    if dataset in FILE_DATASETS:
        return build_file_data(dataset, root, list_dir, imbalance_factor, profile, subset_seed, val_per_class,
                               image_size, normalization, subset_draw, flip)
    return build_long_tail(dataset, root, download, imbalance_factor, profile, subset_seed, val_per_class,
                           normalization, subset_draw)


def data_record(data: LongTailData | FileData) -> dict:
    """What a checkpoint records of its training set: class counts and names, the (mean, std) its images were
    normalised with (read back by data.build.recorded_normalization) and its digest (data.build.training_digest)."""
    return {"class_counts": data.class_counts, "class_names": data.class_names,
            "normalization": {"mean": list(data.mean), "std": list(data.std)}, "train_digest": data.train_digest}
