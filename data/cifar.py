"""Read CIFAR-10 / CIFAR-100 from the official "python version" on-disk format.

The official files are pickled dicts (python-2 pickles, hence ``encoding="latin1"``)
holding ``data``: uint8 (N, 3072) rows laid out as 1024 R, then 1024 G, then 1024 B
values of a 32x32 image in row-major order, plus a list of integer labels. This module
checks that layout file by file, so a truncated or foreign file fails with a message
naming it instead of surfacing later as a shape error deep in training.
"""

from __future__ import annotations

import logging
import pickle
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

IMAGE_SHAPE = (3, 32, 32)
ROW_BYTES = 3 * 32 * 32
SPLITS = ("train", "test")


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant lives on disk and online, and how its pickles are keyed."""

    display_name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    names_key: str
    label_key: str
    num_classes: int
    url: str
    md5: str
    archive_mb: int


CIFAR: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        display_name="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        names_key="label_names",
        label_key="labels",
        num_classes=10,
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        archive_mb=163,
    ),
    "cifar100": CifarSpec(
        display_name="CIFAR-100",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        names_key="fine_label_names",
        label_key="fine_labels",
        num_classes=100,
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        archive_mb=161,
    ),
}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset folder or some of its files are not on disk."""


class DatasetFormatError(ValueError):
    """A dataset file that is not in the official format."""


@dataclass
class CifarSplit:
    """One split in memory: images uint8 (N, 3, 32, 32), labels int64 (N,), class names."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]


def get_spec(name: str) -> CifarSpec:
    """Look up the CIFAR variant called ``name``."""
    if name not in CIFAR:
        raise ValueError(f"unknown CIFAR dataset {name!r}; valid names: {sorted(CIFAR)}")
    return CIFAR[name]


def load_cifar(name: str, root: str | Path, split: str, download: bool = False) -> CifarSplit:
    """Load ``split`` ("train" or "test") of CIFAR ``name`` from ``root/<folder>``.

    With ``download=True`` the official archive is fetched only when files are missing.
    """
    spec = get_spec(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {spec.display_name}; valid splits: {list(SPLITS)}")
    root = Path(root).expanduser()
    folder = root / spec.folder
    data_files = spec.train_files if split == "train" else spec.test_files
    needed = (*data_files, spec.meta_file)

    missing = _missing(folder, needed)
    if missing and download:
        _download(spec, root)
        missing = _missing(folder, needed)
    if missing:
        raise DatasetNotFoundError(
            f"{spec.display_name} not found: looked in {folder.resolve()} and these files are missing: "
            f"{', '.join(missing)}. Set data.download=true to download the official archive "
            f"(about {spec.archive_mb} MB) from {spec.url}, or point data.root / the LT_DATA_ROOT "
            f"environment variable at a folder that holds {spec.folder}/."
        )

    images, labels = [], []
    for file_name in data_files:
        batch_images, batch_labels = _read_data_file(folder / file_name, spec)
        images.append(batch_images)
        labels.append(batch_labels)
    class_names = _read_meta_file(folder / spec.meta_file, spec)

    # (N, 3072) rows are R, G, B planes of 32x32 each, so a plain reshape gives (N, C, H, W).
    image_array = np.concatenate(images).reshape(-1, *IMAGE_SHAPE)
    split_data = CifarSplit(
        images=torch.from_numpy(np.ascontiguousarray(image_array)),
        labels=torch.from_numpy(np.concatenate(labels).astype(np.int64)),
        class_names=class_names,
    )
    logger.info("loaded %s %s: %d images from %s", spec.display_name, split, len(split_data.labels), folder)
    return split_data


def _missing(folder: Path, file_names: tuple[str, ...]) -> list[str]:
    return [f for f in file_names if not (folder / f).is_file()]


def _download(spec: CifarSpec, root: Path) -> None:
    logger.info("downloading %s from %s into %s", spec.display_name, spec.url, root)
    from torchvision.datasets import utils as tv_utils  # here: importing torchvision takes about 1 s
    try:
        tv_utils.download_and_extract_archive(spec.url, download_root=root, md5=spec.md5)
    # URLError and socket timeouts are OSErrors; torchvision raises RuntimeError on a bad checksum.
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise DatasetNotFoundError(
            f"{spec.display_name} could not be downloaded from {spec.url} ({type(err).__name__}: {err}). "
            f"Check the network connection, or download and extract the archive yourself so that "
            f"{root / spec.folder}/ exists."
        ) from err


def _bad_file(path: Path, problem: str) -> DatasetFormatError:
    return DatasetFormatError(
        f"{path} is not a valid CIFAR file: {problem}. The file is damaged or from another source: copy it "
        f"again from the official archive, or get a fresh copy with data.root=<an empty folder> data.download=true "
        f"(the folder may be shared: nothing in it is deleted)."
    )


def _read_pickle(path: Path) -> dict[str, Any]:
    """Unpickle ``path`` and normalise bytes keys (some python-2 pickles) to str."""
    try:
        with path.open("rb") as handle:
            content = pickle.load(handle, encoding="latin1")
    except OSError:
        raise
    except Exception as err:  # damaged bytes make pickle raise nearly anything (OverflowError, KeyError, ...)
        raise _bad_file(path, f"it cannot be unpickled ({type(err).__name__}: {err})") from err
    if not isinstance(content, dict):
        raise _bad_file(path, f"it holds a {type(content).__name__}, expected a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in content.items()}


def _read_data_file(path: Path, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """Return uint8 data (N, 3072) and integer labels (N,) of one batch file, checked."""
    content = _read_pickle(path)
    for key in ("data", spec.label_key):
        if key not in content:
            raise _bad_file(path, f"key {key!r} is missing (keys present: {sorted(map(str, content))})")
    data = content["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise _bad_file(path, f"'data' must be a uint8 numpy array, got {kind}")
    if data.ndim != 2 or data.shape[1] != ROW_BYTES:
        raise _bad_file(path, f"'data' must have shape (N, {ROW_BYTES}), got {data.shape}")
    labels = np.asarray(content[spec.label_key])
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise _bad_file(
            path, f"{spec.label_key!r} has shape {labels.shape}, expected ({data.shape[0]},) to match 'data'"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise _bad_file(path, f"{spec.label_key!r} must hold integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise _bad_file(
            path,
            f"{spec.label_key!r} has values in [{labels.min()}, {labels.max()}], expected [0, {spec.num_classes})",
        )
    return data, labels


def _read_meta_file(path: Path, spec: CifarSpec) -> list[str]:
    content = _read_pickle(path)
    if spec.names_key not in content:
        raise _bad_file(path, f"key {spec.names_key!r} is missing (keys present: {sorted(map(str, content))})")
    raw = content[spec.names_key]
    if not isinstance(raw, (list, tuple)) or not all(isinstance(n, (str, bytes)) for n in raw):
        raise _bad_file(path, f"{spec.names_key!r} must be a list of class names, got {type(raw).__name__}")
    names = [n.decode("latin1") if isinstance(n, bytes) else n for n in raw]
    if len(names) != spec.num_classes:
        raise _bad_file(path, f"{spec.names_key!r} has {len(names)} names, expected {spec.num_classes}")
    return names
