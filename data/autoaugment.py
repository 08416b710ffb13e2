"""CIFAR-10 AutoAugment applied to a whole uint8 batch at once, on the batch's device.

torchvision's `v2.AutoAugment` transforms one image per call and draws from the global RNG: on a
GPU, a batch of 512 costs 512 x (a dozen small kernels + Python), about 130 ms on an H200 against
10 ms for the ResNet-32 step itself. Here every image of the batch gets its own sub-policy, coins
and signs, drawn at once from the caller's CPU generator, and each op runs once per batch on the
images that drew it, with per-image magnitudes as tensors: about ten batched calls per op slot,
no host-device synchronisation (index and parameter tensors are copied with non_blocking=True).

The policy table, magnitude bins, sign rule and op definitions are torchvision's (`v2.AutoAugment`
with the CIFAR10 policy, nearest interpolation); the tests check each op against torchvision's own
per-image application: the geometric ops, posterize, solarize, autocontrast, equalize, invert and
brightness give the same bytes; color, contrast and sharpness blend with a per-image factor tensor
instead of a Python float, so a pixel can differ by one grey level from float rounding.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

# The 25 sub-policies of Cubuk et al. 2019 (reduced CIFAR-10): two (op, probability, magnitude bin)
# each, in torchvision's order; a bin of None means the op takes no magnitude.
CIFAR10_POLICY: tuple[tuple[tuple[str, float, int | None], ...], ...] = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)
NUM_BINS = 10
# Ops whose magnitude is negated with probability 1/2.
SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                    "Brightness", "Color", "Contrast", "Sharpness"})
GEOMETRIC = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})


def magnitudes(op: str, height: int, width: int) -> Tensor | None:
    """The NUM_BINS magnitudes of `op` for (height, width) images (None: the op has none)."""
    table = {
        "ShearX": lambda: torch.linspace(0.0, 0.3, NUM_BINS),
        "ShearY": lambda: torch.linspace(0.0, 0.3, NUM_BINS),
        "TranslateX": lambda: torch.linspace(0.0, 150.0 / 331.0 * width, NUM_BINS),
        "TranslateY": lambda: torch.linspace(0.0, 150.0 / 331.0 * height, NUM_BINS),
        "Rotate": lambda: torch.linspace(0.0, 30.0, NUM_BINS),
        "Brightness": lambda: torch.linspace(0.0, 0.9, NUM_BINS),
        "Color": lambda: torch.linspace(0.0, 0.9, NUM_BINS),
        "Contrast": lambda: torch.linspace(0.0, 0.9, NUM_BINS),
        "Sharpness": lambda: torch.linspace(0.0, 0.9, NUM_BINS),
        "Posterize": lambda: (8 - (torch.arange(NUM_BINS) / ((NUM_BINS - 1) / 4))).round().int(),
        "Solarize": lambda: torch.linspace(1.0, 0.0, NUM_BINS),
    }
    return table[op]() if op in table else None


@functools.lru_cache
def _policy_magnitudes(height: int, width: int) -> dict[str, tuple[float, ...] | None]:
    """The magnitude bins of every op of the policy for (height, width) images, built once per size."""
    ops = {op for sub in CIFAR10_POLICY for op, _, _ in sub}
    return {op: None if (m := magnitudes(op, height, width)) is None else tuple(float(v) for v in m) for op in ops}


def inverse_affine(op: str, magnitude: float, height: int, width: int) -> list[float]:
    """Row-major 2x3 inverse affine matrix (output pixel -> input pixel, origin at the image centre)
    of a geometric op, as torchvision's affine/rotate build it for AutoAugment."""
    cx = cy = tx = ty = angle = shear_x = shear_y = 0.0
    if op in ("ShearX", "ShearY"):
        cx, cy = -width * 0.5, -height * 0.5  # torchvision shears about the top-left corner
        shear = math.degrees(math.atan(magnitude))
        shear_x, shear_y = (shear, 0.0) if op == "ShearX" else (0.0, shear)
    elif op == "TranslateX":
        tx = float(int(magnitude))
    elif op == "TranslateY":
        ty = float(int(magnitude))
    elif op == "Rotate":
        angle = -(magnitude % 360)  # rotate() is counter-clockwise, affine() clockwise
    else:
        raise ValueError(f"{op} is not a geometric op")
    rot, sx, sy = math.radians(angle), math.radians(shear_x), math.radians(shear_y)
    a = math.cos(rot - sy) / math.cos(sy)
    b = -(a * math.tan(sx) + math.sin(rot))
    c = math.sin(rot - sy) / math.cos(sy)
    d = math.cos(rot) - c * math.tan(sx)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += cx - m[0] * (cx + tx) - m[1] * (cy + ty)
    m[5] += cy - m[3] * (cx + tx) - m[4] * (cy + ty)
    return m


# Geometric ops take one of NUM_BINS magnitudes, with either sign: a few dozen distinct matrices.
_cached_inverse_affine = functools.lru_cache(maxsize=None)(inverse_affine)


def warp(images: Tensor, thetas: Tensor, fill: int) -> Tensor:
    """Nearest-neighbour warp of uint8 (B, C, H, W) by per-image inverse matrices (B, 2, 3) fp32;
    pixels from outside the image get `fill`."""
    b, c, h, w = images.shape
    device = images.device
    base = torch.empty(h, w, 3, device=device)  # pixel centres, origin at the image centre
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=device).unsqueeze(-1))
    base[..., 2].fill_(1)
    scale = torch.tensor([0.5 * w, 0.5 * h]).to(device, non_blocking=True)
    rescaled = thetas.transpose(1, 2) / scale  # (B, 3, 2), to grid_sample's [-1, 1] units
    grid = base.view(1, h * w, 3).expand(b, h * w, 3).bmm(rescaled).view(b, h, w, 2)
    # A channel of ones marks the pixels that came from inside the image.
    x = torch.cat((images.float(), images.new_ones(b, 1, h, w, dtype=torch.float32)), 1)
    x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    x, inside = x[:, :c], x[:, c:]
    return torch.where(inside < 0.5, float(fill), x).round_().to(torch.uint8)


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """factor * images + (1 - factor) * other, clamped to uint8; factor (B,) per image."""
    f = factor.view(-1, 1, 1, 1)
    return (images.float() * f + other * (1.0 - f)).clamp_(0, 255).to(torch.uint8)


def _sharpness(images: Tensor, factor: Tensor) -> Tensor:
    """Blend with a 3x3 smoothed copy (centre weight 5/13, border pixels kept), as torchvision."""
    c = images.shape[1]
    kernel = torch.full((c, 1, 3, 3), 1.0 / 13.0, device=images.device)
    kernel[:, :, 1, 1] = 5.0 / 13.0
    out = images.float()
    blurred = F.conv2d(out, kernel, groups=c).round_()
    inner = out[..., 1:-1, 1:-1]
    inner.add_((blurred - inner) * (1.0 - factor.view(-1, 1, 1, 1)))
    return out.clamp_(0, 255).to(torch.uint8)


def apply_op(op: str, images: Tensor, mags: Tensor) -> Tensor:
    """Apply the non-geometric `op` to every image of uint8 (B, C, H, W), image i with magnitude
    mags[i] ((B,) fp32 on the images' device; ignored by the ops that take none)."""
    # Imported here: torchvision's import takes about 1 s (it loads torch._dynamo), which a command
    # that augments nothing (--test, --help, a refused config) would pay.
    from torchvision.transforms.v2 import functional as TF
    per_image = mags.view(-1, 1, 1, 1)
    if op == "Brightness":
        return _blend(images, torch.zeros((), device=images.device), 1.0 + mags)
    if op == "Color":
        return _blend(images, TF.rgb_to_grayscale(images).float(), 1.0 + mags)
    if op == "Contrast":
        mean = TF.rgb_to_grayscale(images).float().mean(dim=(-3, -2, -1), keepdim=True)
        return _blend(images, mean, 1.0 + mags)
    if op == "Sharpness":
        return _sharpness(images, 1.0 + mags)
    if op == "Posterize":  # keep the top `bits` bits of each value
        keep = (256 - 2 ** (8 - per_image.int())).to(torch.uint8)
        return images & keep
    if op == "Solarize":  # invert values at or above the threshold (a fraction of 255, in fp64 first)
        return torch.where(images >= (255.0 * per_image.double()).float(), 255 - images, images)
    if op == "AutoContrast":
        return TF.autocontrast(images)
    if op == "Equalize":
        return TF.equalize(images)
    if op == "Invert":
        return TF.invert(images)
    raise ValueError(f"unknown AutoAugment op {op!r}")


def draw_plan(batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Random draws for a batch, in this order: sub-policy index (B,), op coins (B, 2), sign coins
    (B, 2). Op k of image i runs when coins[i, k] <= its probability; a signed magnitude is
    negated when signs[i, k] <= 0.5 (torchvision's rule)."""
    policy = torch.randint(0, len(CIFAR10_POLICY), (batch,), generator=generator)
    return policy, torch.rand(batch, 2, generator=generator), torch.rand(batch, 2, generator=generator)


@functools.lru_cache
def _slot_table(slot: int, height: int, width: int) -> tuple[tuple[str, ...], Tensor, Tensor, Tensor, Tensor]:
    """Slot `slot` of every sub-policy as tensors indexed by sub-policy: op names, op index (25,),
    probability (25,) fp64, unsigned magnitude (25,) fp64 (0 for ops without one), signed (25,)."""
    names = tuple(sorted({op for sub in CIFAR10_POLICY for op, _, _ in sub}))
    tables = _policy_magnitudes(height, width)
    rows = [sub[slot] for sub in CIFAR10_POLICY]
    return (names, torch.tensor([names.index(op) for op, _, _ in rows]),
            torch.tensor([p for _, p, _ in rows], dtype=torch.float64),
            torch.tensor([0.0 if tables[op] is None else tables[op][b] for op, _, b in rows], dtype=torch.float64),
            torch.tensor([op in SIGNED for op, _, _ in rows]))


def slot_ops(plan: tuple[Tensor, Tensor, Tensor], slot: int, height: int,
             width: int) -> dict[str, tuple[list[int], list[float]]]:
    """{op: (image indices, signed magnitudes)} of the ops that run in slot 0 or 1 of a plan,
    in op-name order. Vectorised over the images: a host cost per op, not per image."""
    policy, coins, signs = plan
    names, op_index, probability, magnitude, signed = _slot_table(slot, height, width)
    ops = op_index[policy]
    runs = coins[:, slot].double() <= probability[policy]  # coin <= p, compared in fp64 as Python would
    mags = magnitude[policy]
    mags = torch.where(signed[policy] & (signs[:, slot] <= 0.5), -mags, mags)
    groups: dict[str, tuple[list[int], list[float]]] = {}
    for k in ops[runs].unique().tolist():
        idx = torch.nonzero(runs & (ops == k)).flatten()
        groups[names[k]] = (idx.tolist(), mags[idx].tolist())
    return groups


class BatchAutoAugment:
    """CIFAR-10 AutoAugment for uint8 batches (B, 3, H, W) on any device; `fill` is the grey value
    of pixels that shear, translate and rotate bring in from outside the image."""

    def __init__(self, fill: int = 128) -> None:
        self.fill = fill

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        b, _, h, w = images.shape
        device = images.device
        plan = draw_plan(b, generator)
        out = images.clone()
        for slot in (0, 1):
            geometric_idx: list[int] = []
            thetas: list[list[float]] = []
            for op, (idx, mags) in slot_ops(plan, slot, h, w).items():
                if op in GEOMETRIC:  # one warp for every geometric op of the slot
                    geometric_idx += idx
                    thetas += [_cached_inverse_affine(op, m, h, w) for m in mags]
                    continue
                index = torch.tensor(idx).to(device, non_blocking=True)
                mag = torch.tensor(mags, dtype=torch.float32).to(device, non_blocking=True)
                out.index_copy_(0, index, apply_op(op, out.index_select(0, index), mag))
            if geometric_idx:
                index = torch.tensor(geometric_idx).to(device, non_blocking=True)
                theta = torch.tensor(thetas, dtype=torch.float32).view(-1, 2, 3).to(device, non_blocking=True)
                out.index_copy_(0, index, warp(out.index_select(0, index), theta, self.fill))
        return out
