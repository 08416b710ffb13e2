"""Batched CIFAR-10 AutoAugment against torchvision's per-image v2.AutoAugment.

torchvision's policy table and op application are reached through v2.AutoAugment's private
members (_policies, _AUGMENTATION_SPACE, _apply_image_or_video_transform) here in the tests only,
so a torchvision change that moves them fails loudly instead of drifting silently.
"""
from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from data.augment import BatchAugment
from data.autoaugment import (CIFAR10_POLICY, CODES_PER_OP, GEOMETRIC, NO_OP, NUM_BINS, OPS, SIGNED,
                              apply_op, code_tables, draw_plan, group_sizes, inverse_affine, magnitudes, plan_codes,
                              warp)

FILL = 128
REFERENCE = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=FILL)
# The batched AutoAugment as training runs it, alone: it draws the plan (draw_plan) and nothing else
# from the generator, and brings in pixels from outside the image at grey FILL.
AUTOAUGMENT_ONLY = BatchAugment(crop_padding=0, flip=False, autoaugment=True, cutout=0)
# Ops that blend with a per-image factor tensor: a pixel may differ by one grey level.
BLENDS = {"Color", "Contrast", "Sharpness"}


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Smooth-ish images (noise on a gradient) so equalize/autocontrast/sharpness are not degenerate.
    ramp = torch.linspace(0, 200, size).view(1, 1, 1, size)
    noise = torch.randint(0, 56, (n, 3, size, size), generator=g)
    return (ramp + noise).clamp(0, 255).to(torch.uint8)


def _reference(image: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    return REFERENCE._apply_image_or_video_transform(image, op, magnitude, interpolation=REFERENCE.interpolation,
                                                     fill=REFERENCE._fill)


def _ours(images: torch.Tensor, op: str, mags: list[float]) -> torch.Tensor:
    if op in GEOMETRIC:
        h, w = images.shape[-2:]
        thetas = torch.tensor([inverse_affine(op, m, h, w) for m in mags]).view(-1, 2, 3)
        return warp(images, thetas, FILL)
    return apply_op(op, images, torch.tensor(mags, dtype=torch.float32))


def slot_ops(plan, slot: int) -> dict[str, tuple[list[int], list[float]]]:
    """{op: (image indices, signed fp32 magnitudes)} that the codes of a plan (32x32 images) say run in
    `slot`, decoded image by image through the magnitude table."""
    mags, _ = code_tables(32, 32)
    groups: dict[str, tuple[list[int], list[float]]] = {}
    for i, (op, code) in enumerate(plan_codes(plan)[:, slot].tolist()):
        if op != NO_OP:
            groups.setdefault(OPS[op], ([], []))[0].append(i)
            groups[OPS[op]][1].append(float(mags[op * CODES_PER_OP + code]))
    return groups


def test_the_policy_table_is_torchvisions_cifar10_policy():
    assert [tuple(sub) for sub in CIFAR10_POLICY] == [tuple(sub) for sub in REFERENCE._policies]


@pytest.mark.parametrize("op", sorted({op for sub in CIFAR10_POLICY for op, _, _ in sub} | {"ShearX", "Rotate"}))
def test_magnitude_bins_and_signs_are_torchvisions(op):
    fn, signed = REFERENCE._AUGMENTATION_SPACE[op]
    expected, ours = fn(NUM_BINS, 24, 32), magnitudes(op, 24, 32)
    assert (expected is None and ours is None) or torch.equal(expected, ours)
    assert signed == (op in SIGNED)


ALL_OPS = ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
           "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert"]


@pytest.mark.parametrize("op", ALL_OPS)
def test_each_op_on_a_batch_matches_torchvision_per_image(op):
    table = magnitudes(op, 32, 32)
    bins = range(NUM_BINS) if table is not None else [None]
    mags = []
    for b in bins:
        m = 0.0 if b is None else float(table[b])
        mags += [m, -m] if op in SIGNED else [m]
    images = _images(len(mags), seed=len(op))
    out = _ours(images, op, mags)
    expected = torch.stack([_reference(img, op, m) for img, m in zip(images, mags)])
    assert out.dtype == torch.uint8 and out.shape == images.shape
    diff = (out.int() - expected.int()).abs()
    if op in BLENDS:
        assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99
    else:
        assert torch.equal(out, expected)


def test_a_whole_batch_equals_torchvision_ops_applied_per_image_with_the_same_draws():
    images = _images(96, seed=7)
    out = AUTOAUGMENT_ONLY(images, torch.Generator().manual_seed(3))
    plan = draw_plan(len(images), torch.Generator().manual_seed(3))
    expected, blended = images.clone(), set()
    for slot in (0, 1):
        for op, (idx, mags) in slot_ops(plan, slot).items():
            for i, m in zip(idx, mags):
                expected[i] = _reference(expected[i], op, m)
            blended |= set(idx) if op in BLENDS else set()
    exact = [i for i in range(len(images)) if i not in blended]
    assert len(exact) > 48 and torch.equal(out[exact], expected[exact])
    # A one-level blend difference can grow through a following equalize or autocontrast.
    assert ((out.int() - expected.int()).abs() == 0).float().mean() > 0.99
    assert sum(not torch.equal(a, b) for a, b in zip(out, images)) > 48  # most images change


def test_ops_run_with_their_probabilities_and_sub_policies_are_uniform():
    n = 50_000
    policy, coins, signs = draw_plan(n, torch.Generator().manual_seed(0))
    counts = torch.bincount(policy, minlength=len(CIFAR10_POLICY)).float()
    assert (counts / n - 1 / len(CIFAR10_POLICY)).abs().max() < 0.006
    runs = {slot: slot_ops((policy, coins, signs), slot) for slot in (0, 1)}
    # Slot 0 of sub-policy 1 is Rotate with p = 0.7: the images that drew it run it 70% of the time.
    drew = int((policy == 1).sum())
    rotated = len(runs[0]["Rotate"][0])
    assert abs(rotated / drew - 0.7) < 0.03
    negative = sum(m < 0 for m in runs[0]["Rotate"][1])
    assert abs(negative / rotated - 0.5) < 0.04
    # Invert in slot 1 only appears with p = 0.0 (sub-policy 14) or 0.1 (sub-policy 23).
    expected_inverts = 0.1 * int((policy == 23).sum())
    assert abs(len(runs[1]["Invert"][0]) - expected_inverts) < 4 * expected_inverts ** 0.5


@pytest.mark.parametrize("slot", [0, 1])
def test_the_codes_give_each_image_the_op_coin_and_signed_magnitude_its_sub_policy_says(slot):
    """The vectorised codes and magnitude table against the policy read image by image: op k of
    image i runs when its coin <= the probability (compared in fp64), and a signed magnitude is
    negated when its sign coin <= 0.5 (fp32, as the ops take it)."""
    policy, coins, signs = draw_plan(3000, torch.Generator().manual_seed(11))
    expected: dict[str, tuple[list[int], list[float]]] = {}
    for i in range(len(policy)):
        op, probability, bin_ = CIFAR10_POLICY[int(policy[i])][slot]
        if float(coins[i, slot]) <= probability:
            table = magnitudes(op, 32, 32)
            mag = 0.0 if table is None else float(table[bin_])
            mag = -mag if op in SIGNED and float(signs[i, slot]) <= 0.5 else mag
            expected.setdefault(op, ([], []))[0].append(i)
            expected[op][1].append(float(torch.tensor(mag, dtype=torch.float32)))
    got = slot_ops((policy, coins, signs), slot)
    assert got == expected
    sizes = group_sizes(plan_codes((policy, coins, signs)))[slot]
    assert sizes == [len(got.get(op, ([], []))[0]) for op in OPS] + [len(policy) - sum(sizes[:-1])]


def test_geometric_ops_come_last_so_that_one_slice_of_the_sorted_images_holds_them():
    first = next(k for k, op in enumerate(OPS) if op in GEOMETRIC)
    assert all(op in GEOMETRIC for op in OPS[first:]) and not any(op in GEOMETRIC for op in OPS[:first])


def test_the_matrix_table_holds_each_geometric_ops_inverse_affine_for_both_signs():
    mags, thetas = code_tables(24, 32)
    for k, op in enumerate(OPS):
        for code in range(CODES_PER_OP):
            row = k * CODES_PER_OP + code
            m = float(magnitudes(op, 24, 32)[code // 2]) if op not in ("AutoContrast", "Equalize", "Invert") else 0.0
            m = -m if code % 2 else m
            assert mags[row] == torch.tensor(m, dtype=torch.float32)
            expected = torch.tensor(inverse_affine(op, m, 24, 32)).view(2, 3) if op in GEOMETRIC else torch.zeros(2, 3)
            assert torch.equal(thetas[row], expected)


def test_the_input_batch_is_not_written_and_the_generator_alone_decides():
    images = _images(32, seed=1)
    before = images.clone()
    aug = AUTOAUGMENT_ONLY
    first = aug(images, torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    assert torch.equal(first, aug(images, torch.Generator().manual_seed(5)))
    assert torch.equal(images, before)
    assert not torch.equal(first, aug(images, torch.Generator().manual_seed(6)))


def test_a_pixel_moved_in_from_outside_gets_the_fill_grey():
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    out = _ours(images, "TranslateX", [3.0, -3.0])
    assert torch.all(out[0, :, :, :3] == FILL) and torch.all(out[0, :, :, 3:] == 0)
    assert torch.all(out[1, :, :, -3:] == FILL) and torch.all(out[1, :, :, :-3] == 0)
