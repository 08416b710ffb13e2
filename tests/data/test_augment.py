"""Behaviour of data.augment: crop, flip, cutout, AutoAugment, reproducibility, normalize."""

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from data.augment import CIFAR10_MEAN, CIFAR10_STD, BatchAugment, normalize


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unique_pixel_images(batch: int, size: int, seed: int) -> torch.Tensor:
    """(B, 3, size, size) uint8 where each image holds a permutation of 1..3*size*size.

    Every value is non-zero and appears once per image, so an output pixel names its
    source position and zero can only come from padding.
    """
    n = 3 * size * size
    assert n <= 255
    g = _generator(seed)
    perms = torch.stack([torch.randperm(n, generator=g) + 1 for _ in range(batch)])
    return perms.to(torch.uint8).reshape(batch, 3, size, size)


def _hand_shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[:, i, j] = image[:, i + dy, j + dx] where that is inside the image, else 0."""
    _, h, w = image.shape
    out = torch.zeros_like(image)
    for i in range(h):
        for j in range(w):
            si, sj = i + dy, j + dx
            if 0 <= si < h and 0 <= sj < w:
                out[:, i, j] = image[:, si, sj]
    return out


def _recover_shift(image: torch.Tensor, shifted: torch.Tensor) -> tuple[int, int]:
    """Shift (dy, dx) mapping `image` to `shifted`, read off one non-zero pixel of channel 0."""
    i, j = (shifted[0] != 0).nonzero()[0].tolist()
    si, sj = (image[0] == shifted[0, i, j]).nonzero()[0].tolist()
    return si - i, sj - j


def _hand_hole(h: int, w: int, cy: int, cx: int, length: int) -> torch.Tensor:
    """Boolean (H, W) square of side `length` starting at (cy - length//2, cx - length//2), clipped."""
    hole = torch.zeros(h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            if cy - length // 2 <= i < cy - length // 2 + length and cx - length // 2 <= j < cx - length // 2 + length:
                hole[i, j] = True
    return hole


def test_crop_output_is_zero_filled_shift_of_input_with_offsets_within_padding():
    padding, size = 2, 8
    images = _unique_pixel_images(200, size, seed=1)
    out = BatchAugment(crop_padding=padding, flip=False)(images, _generator(0))
    seen_shifts = set()
    for b in range(images.shape[0]):
        dy, dx = _recover_shift(images[b], out[b])
        assert abs(dy) <= padding and abs(dx) <= padding
        assert torch.equal(out[b], _hand_shift(images[b], dy, dx))
        seen_shifts.add((dy, dx))
    # 200 independent draws over 25 shifts: each is missed with probability (24/25)^200 ~ 3e-4.
    assert len(seen_shifts) == (2 * padding + 1) ** 2


def test_no_padding_and_no_flip_returns_input_unchanged():
    images = _unique_pixel_images(16, 8, seed=2)
    out = BatchAugment(crop_padding=0, flip=False)(images, _generator(0))
    assert torch.equal(out, images)


def test_flip_gives_input_or_its_mirror_about_half_the_time():
    images = _unique_pixel_images(1000, 8, seed=3)
    out = BatchAugment(crop_padding=0, flip=True)(images, _generator(0))
    mirrored = 0
    for b in range(images.shape[0]):
        if torch.equal(out[b], images[b].flip(-1)):
            mirrored += 1
        else:
            assert torch.equal(out[b], images[b])
    # Binomial(1000, 0.5): mean 500, sd sqrt(250) ~ 15.8; allow 5 sd.
    assert abs(mirrored - 500) <= 5 * math.sqrt(250)


def test_crop_then_flip_is_a_mirror_of_a_zero_filled_shift():
    padding, size = 3, 8
    images = _unique_pixel_images(300, size, seed=4)
    out = BatchAugment(crop_padding=padding, flip=True)(images, _generator(5))
    mirrored = 0
    for b in range(images.shape[0]):
        matches = []
        for flip in (False, True):
            unflipped = out[b].flip(-1) if flip else out[b]
            dy, dx = _recover_shift(images[b], unflipped)
            if torch.equal(unflipped, _hand_shift(images[b], dy, dx)):
                assert abs(dy) <= padding and abs(dx) <= padding
                matches.append(flip)
        assert len(matches) == 1
        mirrored += matches[0]
    assert 0 < mirrored < images.shape[0]


def test_crop_and_flip_draw_uniformly_from_what_torchvision_random_crop_and_flip_can_give():
    """The reference code's per-image transform (RandomCrop(32, padding=4) then RandomHorizontalFlip):
    each output is one of its 9 x 9 x 2 outputs for that image, and the batch draws them uniformly."""
    padding, size, n = 4, 32, 3240
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=_generator(6))
    out = BatchAugment(crop_padding=padding, flip=True)(images, _generator(7))
    padded = TF.pad(images, [padding])
    cells = torch.zeros(2 * padding + 1, 2 * padding + 1, 2)
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = TF.crop(padded, top, left, size, size)
            for flip, candidate in enumerate((crop, TF.horizontal_flip(crop))):
                cells[top, left, flip] = (candidate == out).flatten(1).all(1).sum()
    assert cells.sum() == n  # every output is exactly one of torchvision's candidates
    # Pearson's chi-square over the 162 equally likely cells (20 expected each), 161 degrees of freedom:
    # mean 161, sd 17.9; 6 sd above the mean is far beyond chance and well below a skewed draw.
    expected = n / cells.numel()
    assert ((cells - expected) ** 2 / expected).sum() < 161 + 6 * 17.9


@pytest.mark.parametrize("length", [4, 5])
def test_cutout_zeroes_exactly_one_square_of_side_length_clipped_at_borders(length):
    size = 12
    images = torch.full((300, 3, size, size), 255, dtype=torch.uint8)
    out = BatchAugment(crop_padding=0, flip=False, cutout=length)(images, _generator(7))
    possible = [_hand_hole(size, size, cy, cx, length) for cy in range(size) for cx in range(size)]
    clipped = 0
    for b in range(images.shape[0]):
        zero = out[b] == 0
        # Same hole in every channel, and every other pixel keeps its value 255.
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])
        assert torch.all(out[b][~zero] == 255)
        assert any(torch.equal(zero[0], hole) for hole in possible)
        clipped += int(zero[0].sum()) < length * length
    # Centres within length//2 of a border get clipped: (12 - 2*2)^2 / 144 unclipped = 44%.
    assert 0 < clipped < images.shape[0]


def test_cutout_does_not_write_into_the_input():
    images = torch.full((8, 3, 6, 6), 255, dtype=torch.uint8)
    BatchAugment(crop_padding=2, flip=True, autoaugment=True, cutout=3)(images, _generator(0))
    assert torch.all(images == 255)


def test_same_seed_gives_identical_bytes_with_every_op_on():
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=_generator(11))
    aug = BatchAugment(crop_padding=4, flip=True, autoaugment=True, cutout=8)
    first = aug(images, _generator(123))
    torch.manual_seed(999)  # the global RNG must not matter
    second = aug(images, _generator(123))
    assert first.dtype == torch.uint8
    assert torch.equal(first, second)


def test_different_seed_gives_different_output():
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=_generator(11))
    aug = BatchAugment(crop_padding=4, flip=True, autoaugment=True, cutout=8)
    assert not torch.equal(aug(images, _generator(1)), aug(images, _generator(2)))


def test_call_leaves_global_rng_state_unchanged_and_advances_generator():
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=_generator(11))
    aug = BatchAugment(crop_padding=4, flip=True, autoaugment=True, cutout=8)
    generator = _generator(5)
    before_global = torch.get_rng_state()
    before_generator = generator.get_state()
    aug(images, generator)
    assert torch.equal(torch.get_rng_state(), before_global)
    assert not torch.equal(generator.get_state(), before_generator)


def test_consecutive_batches_from_one_generator_differ():
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=_generator(11))
    aug = BatchAugment(crop_padding=4, flip=True, autoaugment=True, cutout=8)
    generator = _generator(5)
    assert not torch.equal(aug(images, generator), aug(images, generator))


def test_autoaugment_keeps_dtype_and_shape_and_changes_some_images():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=_generator(3))
    out = BatchAugment(crop_padding=0, flip=False, autoaugment=True)(images, _generator(0))
    assert out.dtype == torch.uint8
    assert out.shape == images.shape
    changed = sum(not torch.equal(out[b], images[b]) for b in range(images.shape[0]))
    # Every CIFAR-10 sub-policy fires at least one op with probability >= 0.5 and most
    # ops visibly change a random-noise image, so far more than a handful change.
    assert changed >= 16


def test_normalize_matches_hand_computed_values():
    images = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    images[0, 0, 1, 0] = 255
    images[0, 1, 1, 0] = 128
    images[0, 2, 1, 0] = 0
    out = normalize(images, CIFAR10_MEAN, CIFAR10_STD)
    assert out.dtype == torch.float32
    expected = [(1.0 - 0.4914) / 0.2023, (128 / 255 - 0.4822) / 0.1994, (0.0 - 0.4465) / 0.2010]
    for c in range(3):
        assert out[0, c, 1, 0].item() == pytest.approx(expected[c], abs=1e-6)
    assert out[0, 0, 0, 0].item() == pytest.approx(-0.4914 / 0.2023, abs=1e-6)


def test_normalize_with_unit_std_and_zero_mean_is_division_by_255():
    images = torch.tensor([[[[0, 51]], [[102, 255]], [[204, 153]]]], dtype=torch.uint8)
    out = normalize(images, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    expected = torch.tensor([[[[0.0, 0.2]], [[0.4, 1.0]], [[0.8, 0.6]]]])
    assert torch.allclose(out, expected, atol=1e-7, rtol=0)


def test_float_images_are_rejected_with_a_message_naming_the_fix():
    aug = BatchAugment()
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.zeros(2, 3, 8, 8), _generator(0))
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(2, 3, 8, 8), CIFAR10_MEAN, CIFAR10_STD)


def test_bad_shapes_and_arguments_are_rejected():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        BatchAugment()(torch.zeros(3, 8, 8, dtype=torch.uint8), _generator(0))
    with pytest.raises(TypeError, match="torch.Generator"):
        BatchAugment()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="crop_padding"):
        BatchAugment(crop_padding=-1)
    with pytest.raises(ValueError, match="cutout"):
        BatchAugment(cutout=2.5)
    with pytest.raises(ValueError, match="one value per channel"):
        normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), (0.5, 0.5), (0.2, 0.2))
    with pytest.raises(ValueError, match="positive"):
        normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), (0.5,) * 3, (0.2, 0.0, 0.2))
