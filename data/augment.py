"""Fast, reproducible training augmentation for uint8 image batches held in memory.

The whole training set lives in memory as a uint8 tensor (N, 3, H, W). The training
loop gathers a batch (B, 3, H, W), calls :class:`BatchAugment` with its own
``torch.Generator`` and then :func:`normalize`. The op order follows the
BALMS / Decoupling CIFAR pipeline:

    RandomCrop(H, padding) -> RandomHorizontalFlip -> CIFAR10 AutoAugment -> Cutout -> Normalize

Every op is vectorised over the batch and runs on the batch's device (AutoAugment in
data/autoaugment.py). Every random draw comes from the CPU generator passed in, in a fixed
order per call (crop offsets (B, 2), flip coins (B,), AutoAugment's sub-policies (B,), op
coins (B, 2) and signs (B, 2), cutout centres (B, 2); draws of disabled ops are skipped), so
the same generator state gives the same output on any device, and the global torch RNG seen
by the caller is left untouched. The draws, a few integers per image, reach the device in one
non-blocking copy per call (no step waits for the GPU), and everything of the size of the
images (gather indices, masks) is built there: on a GPU the host's work per image is only its
few draws.
"""

import functools
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from data.autoaugment import apply_plan, draw_plan, group_sizes, plan_codes
from data.transfer import to_device

logger = logging.getLogger(__name__)

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)

# Columns of the (B, 9) int64 draws of a call: crop row and column offsets, mirror (0/1),
# AutoAugment's codes (data.autoaugment.plan_codes, two slots of op and magnitude), the cutout
# hole's top row and left column (before clipping). Columns of disabled ops stay 0.
_CROP, _MIRROR, _AUTOAUGMENT, _CUTOUT = slice(0, 2), 2, slice(3, 7), slice(7, 9)

# Grey fill for pixels that shear/translate/rotate move in from outside the image, as in
# the DeepVoltaire CIFAR10Policy used by the BALMS / Decoupling code (fillcolor=128).
_AUTOAUGMENT_FILL = 128


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 in [0, 255], got dtype {images.dtype}; "
            "augment before converting to float and call normalize() afterwards"
        )
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must have shape (B, 3, H, W), got {tuple(images.shape)}; "
            "add a batch dimension with images.unsqueeze(0) for a single image"
        )


def _check_non_negative_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}; use 0 to turn it off")


class BatchAugment:
    """Random crop with zero padding, horizontal flip, CIFAR10 AutoAugment and Cutout.

    Args:
        crop_padding: zero padding in pixels on each side before a random HxW crop;
            0 turns the crop off.
        flip: mirror each image left-right with probability 0.5.
        autoaugment: apply one of the 25 CIFAR-10 AutoAugment sub-policies
            (Cubuk et al. 2019) to each image.
        cutout: side in pixels of one zero-filled square hole per image, centre uniform
            over the image and clipped at the borders (DeVries & Taylor 2017); 0 turns it off.
    """

    def __init__(
        self,
        crop_padding: int = 4,
        flip: bool = True,
        autoaugment: bool = False,
        cutout: int = 0,
    ) -> None:
        _check_non_negative_int("crop_padding", crop_padding)
        _check_non_negative_int("cutout", cutout)
        if not isinstance(flip, bool):
            raise ValueError(f"flip must be a bool, got {flip!r}")
        if not isinstance(autoaugment, bool):
            raise ValueError(f"autoaugment must be a bool, got {autoaugment!r}")
        self.crop_padding = crop_padding
        self.flip = flip
        self.cutout = cutout
        self.autoaugment = autoaugment
        logger.debug("built %r", self)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(crop_padding={self.crop_padding}, flip={self.flip}, "
            f"autoaugment={self.autoaugment}, cutout={self.cutout})"
        )

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Augment a batch (B, 3, H, W) uint8 and return a (B, 3, H, W) uint8 tensor.

        The input is never written to (it is usually a slice of the in-memory dataset);
        any enabled op makes a new tensor, and with every op off the input is returned.
        """
        _check_images(images)
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator, got {type(generator).__name__}; "
                "pass the training loop's generator so runs are reproducible"
            )
        b, _, h, w = images.shape
        draws, sizes = self._draw(b, h, w, generator)
        draws = to_device(draws, images.device)
        out = images
        if self.crop_padding > 0 or self.flip:
            out = self._crop_flip(out, draws[:, _CROP], draws[:, _MIRROR])
        if self.autoaugment:
            out = apply_plan(out, draws[:, _AUTOAUGMENT].reshape(b, 2, 2), sizes, _AUTOAUGMENT_FILL)
        if self.cutout > 0:
            out = self._cutout(out, draws[:, _CUTOUT])
        return out

    def _draw(self, b: int, h: int, w: int, generator: torch.Generator) -> tuple[Tensor, list[list[int]]]:
        """Every draw of a call, in the fixed order, as (B, 9) int64 on the CPU; and AutoAugment's
        group sizes (data.autoaugment.group_sizes; empty when it is off)."""
        draws = torch.zeros(b, 9, dtype=torch.int64)
        sizes: list[list[int]] = []
        if self.crop_padding > 0:
            draws[:, _CROP] = torch.randint(0, 2 * self.crop_padding + 1, (b, 2), generator=generator)
        if self.flip:
            draws[:, _MIRROR] = torch.rand(b, generator=generator) < 0.5
        if self.autoaugment:
            codes = plan_codes(draw_plan(b, generator))
            draws[:, _AUTOAUGMENT] = codes.view(b, 4)
            sizes = group_sizes(codes)
        if self.cutout > 0:
            centre_y = torch.randint(0, h, (b,), generator=generator)
            centre_x = torch.randint(0, w, (b,), generator=generator)
            draws[:, _CUTOUT] = torch.stack((centre_y, centre_x), 1) - self.cutout // 2
        return draws, sizes

    def _crop_flip(self, images: Tensor, offsets: Tensor, mirror: Tensor) -> Tensor:
        """Pad once, then one gather with per-image source indices does crop and flip; `offsets`
        (B, 2) and `mirror` (B,) are the call's draws on the images' device.

        The (B, H*W) gather index is built on the images' device, so a large batch costs the host
        no per-pixel work or copy.
        """
        b, c, h, w = images.shape
        p = self.crop_padding
        padded_w = w + 2 * p
        device = images.device
        # Source row/column in the padded image of every output row/column: (B, H), (B, W).
        rows = torch.arange(h, device=device).expand(b, h)
        cols = torch.arange(w, device=device).expand(b, w)
        if p > 0:
            rows = rows + offsets[:, :1]
            cols = cols + offsets[:, 1:]
        if self.flip:  # flipping the cropped window reverses its column order
            cols = torch.where(mirror[:, None].bool(), cols.flip(1), cols)
        padded = F.pad(images, (p, p, p, p)) if p > 0 else images
        # Flat index into each padded image plane: (B, H*W), shared by the C channels.
        flat_index = (rows[:, :, None] * padded_w + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
        out = torch.gather(padded.reshape(b, c, -1), 2, flat_index)
        return out.reshape(b, c, h, w)

    def _cutout(self, images: Tensor, corner: Tensor) -> Tensor:
        """Zero one square of side `cutout` per image whose top-left corner is `corner` (B, 2) on
        the images' device, clipped at the borders.

        The centre is drawn uniformly over the image and the hole spans rows [cy - L//2,
        cy - L//2 + L) before clipping, so it has side L for odd L too (DeVries & Taylor's code
        gives L - 1 for odd L) and always contains its centre pixel.
        """
        b, _, h, w = images.shape
        length = self.cutout
        device = images.device
        top, left = corner[:, :1], corner[:, 1:]
        ys = torch.arange(h, device=device)
        xs = torch.arange(w, device=device)
        in_rows = (ys >= top) & (ys < top + length)  # (B, H)
        in_cols = (xs >= left) & (xs < left + length)  # (B, W)
        hole = in_rows[:, :, None] & in_cols[:, None, :]  # (B, H, W)
        return images.masked_fill(hole[:, None], 0)


def normalize(images_uint8: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Return float32 (x / 255 - mean[c]) / std[c] for uint8 images (..., C, H, W)."""
    if not isinstance(images_uint8, Tensor) or images_uint8.dtype != torch.uint8:
        got = images_uint8.dtype if isinstance(images_uint8, Tensor) else type(images_uint8).__name__
        raise ValueError(f"normalize expects a uint8 tensor in [0, 255], got {got}")
    if images_uint8.dim() < 3:
        raise ValueError(
            f"normalize expects images shaped (..., C, H, W), got {tuple(images_uint8.shape)}"
        )
    channels = images_uint8.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need one value per channel ({channels}), "
            f"got {len(mean)} and {len(std)}"
        )
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {tuple(std)}")
    mean_t, std_t = _channel_constants(tuple(map(float, mean)), tuple(map(float, std)), images_uint8.device)
    return (images_uint8.float().div_(255.0) - mean_t).div_(std_t)


@functools.lru_cache(maxsize=16)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """mean and std as (C, 1, 1) fp32 on `device`, copied there once, not on every call. The copy waits
    for its end (once per process): the cached tensors are then complete for every stream that reads
    them (the training one, a prefetch thread's)."""
    return tuple(torch.tensor(v, dtype=torch.float32).view(-1, 1, 1).to(device) for v in (mean, std))
