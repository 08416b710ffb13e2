"""Decode and augment the images of long-tailed datasets stored as image files (data.image_lists reads which).

:class:`ImageFileDataset` decodes with torchvision.io and augments with torchvision.transforms.v2 on uint8
tensors; given a per-sample seed, a sample's augmentation depends only on (index, seed), not on which worker
process draws it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from data.cifar import DatasetFormatError, DatasetNotFoundError
from data.image_lists import ImageList

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# iNaturalist 2018's own statistics, and no colour jitter in its training pipeline, as the Decoupling code's
# data/dataloader.py (RGB_statistics, get_data_transform) has them.
INAT_MEAN: tuple[float, float, float] = (0.466, 0.471, 0.380)
INAT_STD: tuple[float, float, float] = (0.195, 0.194, 0.192)

# "decode_jpeg, /path/decode_jpeg.cpp:171, <reason>", "operator(), /path/decode_png.cpp:79, <reason>"
_TORCHVISION_PREFIX = re.compile(r"^[\w()]+, \S+:\d+, ")


def decoder_reason(err: Exception) -> str:
    """The first line of a decoder's error, without the C++ source torchvision starts some with."""
    reason = _TORCHVISION_PREFIX.sub("", str(err).splitlines()[0] if str(err) else type(err).__name__)
    if reason.startswith("Unsupported image file"):  # torchvision goes on about decoders we do not call
        return "not a JPEG, PNG, WebP or GIF image"
    return reason


def decode_rgb(path: Path) -> torch.Tensor:
    """Decode the image file ``path`` to uint8 (3, H, W) RGB (grayscale and alpha images included; an animated
    GIF's first frame, as Pillow reads it)."""
    # torchvision is imported where it is used: its import takes about 1 s (it loads torch._dynamo),
    # which every command that reads no image file (CIFAR runs, --help, a refused config) would pay.
    from torchvision.io import ImageReadMode, decode_image
    try:
        # The bytes read here, not by torchvision's read_file, which refuses a name that is not UTF-8 (Latin-1).
        data = Path(path).read_bytes()
        if not data:
            raise ValueError("the file is empty (0 bytes)")
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (FileNotFoundError, IsADirectoryError, RuntimeError, ValueError) as err:  # others: their own words
        if not Path(path).exists():
            raise DatasetNotFoundError(f"image {path} does not exist; restore it or re-read the split.") from err
        if Path(path).is_dir():
            raise DatasetFormatError(f"image {path} is a folder, not an image file; remove it from the split") from err
        raise DatasetFormatError(f"cannot decode image {path}: {decoder_reason(err)}; restore it from the "
                                 f"dataset's source (without it the training set is another, which --resume "
                                 f"refuses: a run on it starts anew).") from err
    if image.dim() == 4:  # an animated GIF: (frames, 3, H, W)
        image = image[0]
    # 16-bit PNGs decode to uint16: scale them to uint8 so every image takes the same path.
    if image.dtype != torch.uint8:
        from torchvision.transforms import v2
        image = v2.functional.to_dtype(image, torch.uint8, scale=True)
    return image


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (pixels), got {image_size!r}; e.g. 224")


def train_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    color_jitter: bool = True, flip: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (3, H, W) -> float32 (3, S, S): the Decoupling / BALMS ImageNet-LT training pipeline (its
    iNaturalist one: color_jitter=False and INAT_MEAN / INAT_STD); flip=False leaves out its horizontal flip."""
    _check_size(image_size)
    from torchvision.transforms import v2
    jitter = [v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0)] if color_jitter else []
    return v2.Compose([
        v2.RandomResizedCrop(image_size, antialias=True),
        *([v2.RandomHorizontalFlip()] if flip else []),
        *jitter,
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def eval_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (3, H, W) -> float32 (3, S, S): shorter side to S * 256/224 (256 for 224), centre crop S."""
    _check_size(image_size)
    from torchvision.transforms import v2
    return v2.Compose([
        v2.Resize(round(image_size * 256 / 224), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


class ImageFileDataset(Dataset):
    """Decoded, transformed images of an :class:`ImageList`; items are ``index`` or ``(index, seed)``.

    With a seed the transform's random draws come from the global torch RNG seeded with it, so
    the sample depends only on (index, seed); the caller's RNG state is restored afterwards.
    Returns (float tensor from the transform, int label).
    """

    def __init__(self, images: ImageList, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = decode_rgb(self.images.paths[index])
        if seed is None:
            image = self.transform(image)
        else:
            # v2 transforms draw from the global CPU generator only; fork_rng(devices=[]) restores it
            # afterwards without touching (or initialising) CUDA.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image = self.transform(image)
        return image, int(self.images.labels[index])
