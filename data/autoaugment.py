"""CIFAR-10 AutoAugment applied to a whole uint8 batch at once, on the batch's device.

torchvision's `v2.AutoAugment` transforms one image per call and draws from the global RNG: on a
GPU, a batch of 512 costs 512 x (a dozen small kernels + Python), about 130 ms on an H200 against
10 ms for the ResNet-32 step itself. Here every image of the batch gets its own sub-policy, coins
and signs, drawn at once from the caller's CPU generator, and each op runs once per batch on the
images that drew it, with per-image magnitudes as tensors: about ten batched calls per op slot.
The host draws the plan and encodes it as a few integers per image (`plan_codes`); the device
sorts the images by op and takes each op's images as one slice of that order, with magnitudes and
warp matrices looked up in tables kept on the device, so a chunk costs one small copy to the
device, no per-image host work and no wait for the GPU.

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

from data.transfer import to_device

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


def warp(images: Tensor, thetas: Tensor, fill: int) -> Tensor:
    """Nearest-neighbour warp of uint8 (B, C, H, W) by per-image inverse matrices (B, 2, 3) fp32;
    pixels from outside the image get `fill`."""
    b, c, h, w = images.shape
    device = images.device
    base = torch.empty(h, w, 2, device=device)  # pixel centres (x, y), origin at the image centre
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=device).unsqueeze(-1))
    scale = to_device(torch.tensor([0.5 * w, 0.5 * h]), device)
    rescaled = thetas.transpose(1, 2) / scale  # (B, 3, 2), to grid_sample's [-1, 1] units
    # (B, H, W, 2): x * row 0 + y * row 1 + row 2, elementwise: a bmm would run in TF32 on a GPU with
    # train.tf32 and move coordinates by ~0.01 px, changing the nearest pixel of some; these are fp32 anywhere
    r = rescaled[:, None, None]  # (B, 1, 1, 3, 2)
    grid = base[..., 0, None] * r[..., 0, :] + base[..., 1, None] * r[..., 1, :] + r[..., 2, :]
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
    if op == "Solarize":  # invert values at or above the threshold, a fraction of 255
        # torchvision rounds the float64 product 255 * m to float32; for an fp32 m that is the fp32 product.
        return torch.where(images >= 255.0 * per_image, 255 - images, images)
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


# Op codes: the policy's non-geometric ops, then its geometric ones (so that, with the images sorted
# by code, every geometric op of a slot is one slice, warped in one call), each part in name order.
# NO_OP: the image's coin said no. A magnitude code is bin * 2 + (1 if the magnitude is negated).
_POLICY_OPS = {op for sub in CIFAR10_POLICY for op, _, _ in sub}
OPS: tuple[str, ...] = tuple(sorted(_POLICY_OPS - GEOMETRIC)) + tuple(sorted(_POLICY_OPS & GEOMETRIC))
FIRST_GEOMETRIC = len(_POLICY_OPS - GEOMETRIC)
NO_OP = len(OPS)
CODES_PER_OP = 2 * NUM_BINS


@functools.lru_cache
def _slot_table(slot: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Slot `slot` of every sub-policy as tensors indexed by sub-policy: op code (25,), probability
    (25,) fp64, magnitude bin (25,) (0 for ops without one), signed (25,)."""
    rows = [sub[slot] for sub in CIFAR10_POLICY]
    return (torch.tensor([OPS.index(op) for op, _, _ in rows]),
            torch.tensor([p for _, p, _ in rows], dtype=torch.float64),
            torch.tensor([b or 0 for _, _, b in rows]), torch.tensor([op in SIGNED for op, _, _ in rows]))


def plan_codes(plan: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """(B, 2, 2) int64 codes of a plan (draw_plan): for image i and slot k, [i, k, 0] is the code
    of the op it runs (NO_OP when its coin is above the op's probability, compared in fp64 as
    Python would) and [i, k, 1] its magnitude code (a signed op's magnitude is negated when the
    sign coin is <= 0.5, torchvision's rule)."""
    policy, coins, signs = plan
    codes = torch.empty(len(policy), 2, 2, dtype=torch.int64)
    for slot in (0, 1):
        op, probability, bins, signed = _slot_table(slot)
        runs = coins[:, slot].double() <= probability[policy]
        codes[:, slot, 0] = torch.where(runs, op[policy], NO_OP)
        codes[:, slot, 1] = bins[policy] * 2 + (signed[policy] & (signs[:, slot] <= 0.5))
    return codes


def group_sizes(codes: Tensor) -> list[list[int]]:
    """Images per op code (NO_OP last) in each slot of host `codes` (plan_codes): the slices of the
    device's sorted order, known on the host without reading anything back."""
    return [torch.bincount(codes[:, slot, 0], minlength=NO_OP + 1).tolist() for slot in (0, 1)]


@functools.lru_cache
def code_tables(height: int, width: int) -> tuple[Tensor, Tensor]:
    """Indexed by op code * CODES_PER_OP + magnitude code: the signed magnitude ((NO_OP + 1) *
    CODES_PER_OP,) fp32 (0 for ops without one) and, for geometric ops, the inverse affine matrix
    (..., 2, 3) fp32 in pixel units (zeros for the others)."""
    mags = torch.zeros(NO_OP + 1, NUM_BINS, 2, dtype=torch.float64)
    thetas = torch.zeros(NO_OP + 1, NUM_BINS, 2, 6)
    for k, op in enumerate(OPS):
        table = magnitudes(op, height, width)
        for b in range(NUM_BINS if table is not None else 0):
            for negated, m in enumerate((float(table[b]), -float(table[b]))):
                mags[k, b, negated] = m
                if op in GEOMETRIC:
                    thetas[k, b, negated] = torch.tensor(inverse_affine(op, m, height, width))
    return mags.float().flatten(), thetas.view(-1, 2, 3)


@functools.lru_cache
def _device_code_tables(height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """code_tables on `device`, copied there once; the copy waits for its end, so that the cached tables are
    complete for whichever stream reads them (the training one, a prefetch thread's)."""
    return tuple(t.to(device) for t in code_tables(height, width))


def apply_plan(images: Tensor, codes: Tensor, sizes: list[list[int]], fill: int) -> Tensor:
    """AutoAugment of uint8 images (B, C, H, W) by the plan encoded in `codes` (B, 2, 2) on the
    images' device (plan_codes), with `sizes` its group_sizes; the input is not written."""
    _, _, h, w = images.shape
    mag_table, theta_table = _device_code_tables(h, w, images.device)
    out = images.clone()
    for slot in (0, 1):
        op = codes[:, slot, 0]
        key = op * CODES_PER_OP + codes[:, slot, 1]  # (B,) row of the tables
        order = torch.argsort(op, stable=True)  # images grouped by op, in index order within a group
        start = 0
        for name, size in zip(OPS[:FIRST_GEOMETRIC], sizes[slot]):
            if size:
                idx = order[start : start + size]
                out.index_copy_(0, idx, apply_op(name, out.index_select(0, idx), mag_table[key[idx]]))
            start += size
        geometric = sum(sizes[slot][FIRST_GEOMETRIC:NO_OP])
        if geometric:  # one warp for every geometric op of the slot
            idx = order[start : start + geometric]
            out.index_copy_(0, idx, warp(out.index_select(0, idx), theta_table[key[idx]], fill))
    return out

