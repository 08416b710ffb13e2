"""Read the splits of long-tailed datasets stored as image files: which files, with which labels.

Two on-disk layouts are read:

* split lists (ImageNet-LT, Places-LT, iNaturalist 2018): text files of
  ``relative/path.jpg label`` lines, as published with the OLTR / Decoupling code; image
  paths are relative to a dataset root;
* class folders: ``root/<split>/<class>/<image>``, class index = position of the folder
  name in the sorted training folder names.

Both give an :class:`ImageList` of absolute paths and int64 labels. Everything short of decoding
is checked when the split is read, so a wrong root or a broken list fails at once with one line
naming the file (and line) instead of as a worker crash mid-epoch; data.image_files decodes and augments them.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from data.cifar import DatasetFormatError, DatasetNotFoundError

logger = logging.getLogger(__name__)

# Suffixes (compared lower-cased) of the formats torchvision.io.decode_image reads; it cannot
# read BMP, so .bmp files are left out rather than failing at decode time mid-epoch.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")

_LIST_SOURCE = (
    "the split lists come with the papers' code, e.g. the data/ folder of the Decoupling repo "
    "(github.com/facebookresearch/classifier-balancing)"
)
_LABEL = re.compile(r"-?[0-9]+")  # ASCII digits only: int() would also take "1_0", "+3" or non-ASCII digits


@dataclass(frozen=True)
class ListSpec:
    """One split-list dataset: its name in messages, class count, and list file name per split."""

    display_name: str
    num_classes: int
    files: dict[str, str]


LIST_DATASETS: dict[str, ListSpec] = {
    "imagenet_lt": ListSpec(
        display_name="ImageNet-LT",
        num_classes=1000,
        files={"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt", "test": "ImageNet_LT_test.txt"},
    ),
    "places_lt": ListSpec(
        display_name="Places-LT",
        num_classes=365,
        files={"train": "Places_LT_train.txt", "val": "Places_LT_val.txt", "test": "Places_LT_test.txt"},
    ),
    # The papers report iNaturalist 2018 on its official val list, so that list is the test split.
    "inat2018": ListSpec(
        display_name="iNaturalist 2018",
        num_classes=8142,
        files={"train": "iNaturalist18_train.txt", "test": "iNaturalist18_val.txt"},
    ),
}


@dataclass
class ImageList:
    """One split: absolute image paths, labels int64 (N,), and the class names labels index into."""

    paths: list[Path]
    labels: torch.Tensor
    class_names: list[str]


def read_list_split(dataset: str, split: str, list_dir: Path, root: Path, check_files: bool = True) -> ImageList:
    """Read ``split`` of list dataset ``dataset`` from its list file in ``list_dir``.

    Image paths in the list are relative to ``root``. With ``check_files`` every listed image
    must exist (one stat per image; turn it off for a quick look at the labels).
    """
    if dataset not in LIST_DATASETS:
        raise ValueError(f"unknown list dataset {dataset!r}; valid names: {sorted(LIST_DATASETS)}")
    spec = LIST_DATASETS[dataset]
    if split not in spec.files:
        raise ValueError(f"{spec.display_name} has no split {split!r}; valid splits: {list(spec.files)}")
    list_dir, root = Path(list_dir).expanduser(), Path(root).expanduser().resolve()
    list_file = list_dir / spec.files[split]
    if not list_file.is_file():
        raise DatasetNotFoundError(
            f"{spec.display_name} {split} list not found: {list_file}; {_LIST_SOURCE}. "
            f"Put {spec.files[split]} in {list_dir} or point data.list_dir at the folder that holds it."
        )

    paths: list[Path] = []
    labels: list[int] = []
    missing: list[tuple[int, Path]] = []  # (line, image): all of them counted, so one rerun finds every gap
    seen: dict[Path, tuple[int, int]] = {}  # image -> (line, label) where first listed
    # Bytes, decoded line by line, so a bad byte gets its line number; lines end in \n, \r\n or an old Mac's \r.
    for line_no, raw in enumerate(list_file.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a BOM some editors write first
        except UnicodeDecodeError as err:
            raise DatasetFormatError(
                f"{list_file}:{line_no}: not UTF-8 text ({err.reason}); replace the file with the original list."
            ) from err
        if not line.strip():
            continue
        path, label = _parse_line(line, f"{list_file}:{line_no}", spec.num_classes)
        path = root / path
        first_line, first_label = seen.setdefault(path, (line_no, label))
        if first_label != label:
            raise DatasetFormatError(f"{list_file}:{line_no}: image {path} is listed with label {label}, and with "
                                     f"{first_label} at line {first_line}; replace the file with the original list.")
        if check_files and not path.is_file():
            missing.append((line_no, path))
        paths.append(path)
        labels.append(label)
    if missing:
        line_no, path = missing[0]
        more = (f" (and {len(missing) - 1} more of its {len(paths)} images, e.g. line {missing[-1][0]})"
                if len(missing) > 1 else "")
        raise DatasetNotFoundError(
            f"{list_file}:{line_no}: image {path} does not exist{more}; point data.root at the folder the list's "
            f"paths are relative to (now {root}) or restore the missing files."
        )
    if not paths:
        raise DatasetFormatError(f"{list_file} lists no images; replace it with the original list ({_LIST_SOURCE}).")
    logger.info("read %s %s: %d images listed in %s", spec.display_name, split, len(paths), list_file)
    return ImageList(
        paths=paths,
        labels=torch.tensor(labels, dtype=torch.int64),
        class_names=[str(c) for c in range(spec.num_classes)],  # the lists carry no class names
    )


def _parse_line(line: str, where: str, num_classes: int) -> tuple[str, int]:
    """Split ``relative/path label`` (the path may hold spaces) into the path and a checked label."""
    fields = line.strip().rsplit(maxsplit=1)
    if len(fields) != 2:
        raise DatasetFormatError(
            f"{where}: expected 'relative/path.jpg label', got {line.strip()!r}; add the class index after the path."
        )
    path, label = fields
    if not _LABEL.fullmatch(label):
        raise DatasetFormatError(f"{where}: label {label!r} is not an integer; each line must end with a class index.")
    if not 0 <= int(label) < num_classes:
        raise DatasetFormatError(
            f"{where}: label {label} is outside [0, {num_classes}); the list belongs to another dataset or is damaged."
        )
    return path, int(label)


def read_folder_split(root: Path, split: str, class_names: list[str] | None = None) -> ImageList | None:
    """Read ``root/<split>/<class>/<image>``; None when ``root/<split>`` does not exist (except train).

    Without ``class_names`` the classes are the sorted folder names; with them (the training
    split's), each folder is mapped onto that list, so a split may lack classes but not add any.
    Names starting with "." are skipped (.DS_Store, macOS "._x.jpg" resource forks, checkpoints).
    """
    split_dir = Path(root).expanduser().resolve() / split
    if not split_dir.is_dir():
        if split == "train":
            raise DatasetNotFoundError(
                f"training images not found: {split_dir} is not a folder; point data.root at a folder that "
                f"holds train/<class>/<image> (and optionally val/ and test/ laid out the same way)."
            )
        return None
    folders = _class_folders(split_dir, class_names)
    names = folders if class_names is None else class_names
    class_index = {name: i for i, name in enumerate(names)}

    paths: list[Path] = []
    labels: list[int] = []
    skipped: list[str] = []
    empty: list[str] = []
    for folder in folders:
        # DirEntry.is_file() needs no extra stat on most file systems: this runs once per image.
        with os.scandir(split_dir / folder) as scan:
            entries = sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
        is_image = [e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file() for e in entries]
        images = [e.name for e, keep in zip(entries, is_image) if keep]
        if not images and class_names is None:  # a training class with no image
            raise DatasetFormatError(
                f"{split_dir / folder}: class folder holds no images ({' '.join(IMAGE_EXTENSIONS)}); "
                f"add its images or remove the folder."
            )
        empty += [] if images else [folder]  # another split's class without images there, as without its folder
        skipped += [f"{folder}/{e.name}" for e, keep in zip(entries, is_image) if not keep]
        paths += [split_dir / folder / n for n in images]
        labels += [class_index[folder]] * len(images)
    if skipped:
        logger.warning(
            "%s: skipped %d entries that are not %s images, e.g. %s",
            split_dir, len(skipped), "/".join(IMAGE_EXTENSIONS), skipped[0],
        )
    if empty:
        logger.warning("%s: %d class folders hold no images (%s): those classes have no %s images",
                       split_dir, len(empty), ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""), split)
    if not paths:
        raise DatasetFormatError(f"{split_dir}: no class folder holds images ({' '.join(IMAGE_EXTENSIONS)}); add "
                                 f"the {split} images or remove {split_dir}.")
    logger.info("read %s: %d images in %d class folders", split_dir, len(paths), len(folders))
    return ImageList(paths=paths, labels=torch.tensor(labels, dtype=torch.int64), class_names=list(names))


def _class_folders(split_dir: Path, class_names: list[str] | None) -> list[str]:
    """The sorted class folders of split_dir; with class_names (the training split's), each one of them."""
    with os.scandir(split_dir) as scan:
        folders = sorted(e.name for e in scan if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise DatasetFormatError(f"{split_dir} has no class folders; put each class's images in {split_dir}/<class>/.")
    for folder in folders if class_names is not None else ():
        if folder not in class_names:
            raise DatasetFormatError(f"{split_dir / folder}: class {folder!r} has no folder in the training split; "
                                     f"rename it to a training class or remove it.")
    return folders
