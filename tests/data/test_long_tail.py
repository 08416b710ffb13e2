"""Behaviour of long-tailed count profiles, seeded subset draws and shot grouping."""

import numpy as np
import pytest
import torch

from data.long_tail import (class_counts, hold_out_per_class, long_tail_counts, long_tail_split, second_draw,
                            shot_groups)


def test_cifar10_exp_if200_matches_published_counts():
    assert long_tail_counts(5000, 10, 200, "exp") == [5000, 2775, 1540, 854, 474, 263, 146, 81, 45, 25]


def test_cifar10_exp_if100_head_and_tail_counts():
    counts = long_tail_counts(5000, 10, 100, "exp")
    assert counts[0] == 5000
    assert counts[-1] == 50
    assert sum(counts) == 12406  # CIFAR-10-LT IF100 training-set size reported by Cao et al.


def test_cifar100_exp_if100_tail_is_five():
    counts = long_tail_counts(500, 100, 100, "exp")
    assert counts[0] == 500
    assert counts[-1] == 5
    assert sum(counts) == 10847  # CIFAR-100-LT IF100 training-set size reported by Cao et al.


@pytest.mark.parametrize("n_max,num_classes", [(5000, 10), (500, 100)])
@pytest.mark.parametrize("imbalance_factor", [10, 50, 100, 200])
def test_exp_profile_follows_geometric_decay(n_max, num_classes, imbalance_factor):
    # n_i = int(n_max * (1/IF) ** (i / (C - 1))), the CIFAR-LT reference formula.
    expected = [int(n_max * (1 / imbalance_factor) ** (i / (num_classes - 1))) for i in range(num_classes)]
    got = long_tail_counts(n_max, num_classes, imbalance_factor, "exp")
    assert got == expected
    assert got[0] == n_max
    assert got[-1] == int(n_max / imbalance_factor)  # the tail class holds n_max / IF images


@pytest.mark.parametrize("n_max,num_classes", [(5000, 10), (500, 100)])
@pytest.mark.parametrize("imbalance_factor", [10, 50, 100, 200])
def test_step_profile_keeps_head_half_and_divides_tail_half(n_max, num_classes, imbalance_factor):
    half = num_classes // 2
    expected = [n_max] * half + [n_max // imbalance_factor] * (num_classes - half)
    assert long_tail_counts(n_max, num_classes, imbalance_factor, "step") == expected


def test_step_profile_rounds_a_fractional_factor_as_the_ldam_code_does():
    # img_max * imb_factor with imb_factor = 1 / IF: 1300 * (1 / 10.4) is 124.99999999999999, 1300 / 10.4 is 125.0
    assert long_tail_counts(1300, 4, 10.4, "step") == [1300, 1300, 124, 124]


def test_step_profile_odd_class_count_puts_middle_class_in_tail():
    assert long_tail_counts(100, 5, 10, "step") == [100, 100, 10, 10, 10]


@pytest.mark.parametrize("profile", ["exp", "step"])
def test_imbalance_factor_one_is_balanced(profile):
    assert long_tail_counts(500, 100, 1, profile) == [500] * 100


def test_imbalance_factor_below_one_is_rejected():
    with pytest.raises(ValueError, match="imbalance_factor"):
        long_tail_counts(5000, 10, 0.5, "exp")


def test_unknown_profile_error_lists_valid_profiles():
    with pytest.raises(ValueError, match=r"'linear'.*\['exp', 'step'\]"):
        long_tail_counts(5000, 10, 100, "linear")


def _balanced_labels(num_classes: int, per_class: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat(per_class)


def test_long_tail_split_keeps_requested_count_per_class_sorted_int64():
    labels = _balanced_labels(4, 10)
    idx = long_tail_split(labels, [10, 6, 3, 0], 0, 0)[0]
    assert idx.dtype == torch.int64
    assert torch.equal(idx, idx.sort().values)
    assert len(set(idx.tolist())) == idx.numel()
    assert torch.bincount(labels[idx], minlength=4).tolist() == [10, 6, 3, 0]


def test_long_tail_split_same_seed_same_indices():
    labels = _balanced_labels(3, 50)
    assert torch.equal(long_tail_split(labels, [20, 10, 5], 0, 7)[0], long_tail_split(labels, [20, 10, 5], 0, 7)[0])


def test_long_tail_split_different_seed_different_indices():
    labels = _balanced_labels(3, 50)
    assert not torch.equal(long_tail_split(labels, [20, 10, 5], 0, 1)[0], long_tail_split(labels, [20, 10, 5], 0, 2)[0])


def test_long_tail_split_draws_first_counts_of_seeded_class_permutation():
    labels = torch.tensor([1, 0, 1, 0, 1, 0])
    g = torch.Generator().manual_seed(3)
    class0 = torch.tensor([1, 3, 5])[torch.randperm(3, generator=g)][:2]
    class1 = torch.tensor([0, 2, 4])[torch.randperm(3, generator=g)][:1]
    expected = sorted(class0.tolist() + class1.tolist())
    assert long_tail_split(labels, [2, 1], 0, 3)[0].tolist() == expected


def test_long_tail_split_too_few_images_names_class_asked_and_available():
    labels = _balanced_labels(3, 4)
    with pytest.raises(ValueError, match=r"class 2: asked for 5 images but only 4"):
        long_tail_split(labels, [4, 4, 5], 0, 0)[0]


def test_long_tail_split_rejects_labels_beyond_counts():
    with pytest.raises(ValueError, match="class 3"):
        long_tail_split(torch.tensor([0, 1, 3]), [1, 1], 0, 0)[0]


def test_long_tail_split_rejects_float_labels():
    with pytest.raises(ValueError, match="integer"):
        long_tail_split(torch.tensor([0.0, 1.0]), [1, 1], 0, 0)[0]


def test_hold_out_takes_exactly_per_class_and_partitions_indices():
    labels = _balanced_labels(5, 12)
    remaining, held = hold_out_per_class(labels, 3, seed=0)
    assert torch.bincount(labels[held], minlength=5).tolist() == [3] * 5
    assert torch.bincount(labels[remaining], minlength=5).tolist() == [9] * 5
    assert sorted(remaining.tolist() + held.tolist()) == list(range(60))
    assert torch.equal(held, held.sort().values)
    assert torch.equal(remaining, remaining.sort().values)


def test_hold_out_is_seeded():
    labels = _balanced_labels(5, 12)
    assert torch.equal(hold_out_per_class(labels, 3, 4)[1], hold_out_per_class(labels, 3, 4)[1])
    assert not torch.equal(hold_out_per_class(labels, 3, 4)[1], hold_out_per_class(labels, 3, 5)[1])


def test_hold_out_zero_returns_everything_and_empty():
    remaining, held = hold_out_per_class(torch.tensor([2, 0, 1, 0]), 0, seed=0)
    assert remaining.tolist() == [0, 1, 2, 3]
    assert held.numel() == 0 and held.dtype == torch.int64


def test_hold_out_skips_a_class_number_without_images():
    # A split list may skip a class number (class 1 here): nothing to hold out there.
    labels = torch.tensor([0, 0, 0, 2, 2, 2])
    remaining, held = hold_out_per_class(labels, 1, seed=0)
    assert labels[held].tolist() == [0, 2]
    assert torch.bincount(labels[remaining], minlength=3).tolist() == [2, 0, 2]


def test_hold_out_more_than_available_names_class():
    with pytest.raises(ValueError, match=r"class 1: asked for 3 images but only 2"):
        hold_out_per_class(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2]), 3, seed=0)


def test_class_counts_counts_each_class_including_absent_ones():
    assert class_counts(torch.tensor([0, 2, 2, 0, 2]), 4) == [2, 0, 3, 0]


def test_class_counts_rejects_label_out_of_range():
    with pytest.raises(ValueError, match="num_classes=2"):
        class_counts(torch.tensor([0, 2]), 2)


def test_shot_groups_boundaries_are_exact():
    groups = shot_groups([101, 100, 20, 19, 500, 0])
    assert groups == {"many": [0, 4], "medium": [1, 2], "few": [3, 5]}


def test_shot_groups_allow_empty_groups():
    assert shot_groups([5000, 2000]) == {"many": [0, 1], "medium": [], "few": []}
    assert shot_groups([]) == {"many": [], "medium": [], "few": []}


def test_shot_groups_custom_thresholds():
    assert shot_groups([10, 5, 4], many_above=9, few_below=5) == {"many": [0], "medium": [1], "few": [2]}


def _reference_counts(img_max: int, cls_num: int, imb_factor: float, imb_type: str) -> list[int]:
    """The LDAM-DRW / BALMS code's get_img_num_per_cls, transcribed (imb_factor there is 1 / IF)."""
    img_num_per_cls = []
    if imb_type == "exp":
        for cls_idx in range(cls_num):
            num = img_max * (imb_factor ** (cls_idx / (cls_num - 1.0)))
            img_num_per_cls.append(int(num))
    else:
        for cls_idx in range(cls_num // 2):
            img_num_per_cls.append(int(img_max))
        for cls_idx in range(cls_num // 2):
            img_num_per_cls.append(int(img_max * imb_factor))
    return img_num_per_cls


@pytest.mark.parametrize("num_classes, per_class", [(10, 5000), (100, 500)])
@pytest.mark.parametrize("imbalance", [10, 50, 100, 200])
@pytest.mark.parametrize("profile", ["exp", "step"])
@pytest.mark.parametrize("val_per_class", [0, 20])
def test_cifar_lt_training_set_has_the_reference_counts_and_validation_from_the_images_it_left_out(
        num_classes, per_class, imbalance, profile, val_per_class):
    labels = torch.arange(num_classes).repeat_interleave(per_class)  # a CIFAR training split's labels
    counts = long_tail_counts(per_class, num_classes, imbalance, profile)
    reference = _reference_counts(per_class, num_classes, 1 / imbalance, profile)
    assert counts == reference
    train, val = long_tail_split(labels, counts, val_per_class, seed=0)
    assert not set(train.tolist()) & set(val.tolist())  # no validation image is a training image
    assert torch.bincount(labels[val], minlength=num_classes).tolist() == [val_per_class] * num_classes
    # Every class trains on the reference count, except where the rule leaves fewer than
    # val_per_class images out (the head): the shortfall comes from its own training images.
    expected = [n - max(0, val_per_class - (per_class - n)) for n in reference]
    assert torch.bincount(labels[train], minlength=num_classes).tolist() == expected


def test_cifar10_lt_if100_has_the_benchmarks_12406_images():
    labels = torch.arange(10).repeat_interleave(5000)
    counts = long_tail_counts(5000, 10, 100, "exp")
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50] and sum(counts) == 12406
    assert long_tail_split(labels, counts, 0, seed=0)[0].numel() == 12406


def test_validation_is_seeded_and_the_training_draw_does_not_depend_on_it():
    labels = torch.arange(4).repeat_interleave(30)
    counts = [30, 12, 6, 3]
    train0, _ = long_tail_split(labels, counts, 0, seed=5)
    train5, val5 = long_tail_split(labels, counts, 5, seed=5)
    # Classes with spare images keep exactly the draw of val_per_class=0; the whole class gives 5 up.
    assert set(train5.tolist()) <= set(train0.tolist())
    assert set(train0.tolist()) - set(train5.tolist()) == set(val5[labels[val5] == 0].tolist())
    assert torch.equal(val5, long_tail_split(labels, counts, 5, seed=5)[1])
    assert not torch.equal(val5, long_tail_split(labels, counts, 5, seed=6)[1])


def test_second_draw_has_the_rule_counts_no_validation_image_and_mostly_new_tail_images():
    labels = torch.arange(10).repeat_interleave(5000)  # CIFAR-10's training split
    counts = long_tail_counts(5000, 10, 100, "exp")
    train, val = long_tail_split(labels, counts, 20, seed=0)
    meta = second_draw(labels, counts, val, seed=1)
    assert torch.equal(meta, meta.sort().values) and meta.dtype == torch.int64
    assert not set(meta.tolist()) & set(val.tolist())
    # The head class keeps all its 5000 images, so its validation 20 leave 4980 to draw; the rest draw their count.
    assert torch.bincount(labels[meta], minlength=10).tolist() == [4980] + counts[1:]
    shared = torch.isin(meta, train)
    for c, n in enumerate(counts):  # an independent draw of n of 5000: about n / 5000 of them shared
        if 0 < c:
            assert shared[labels[meta] == c].float().mean() < n / 5000 + 0.1, c
    assert torch.equal(meta, second_draw(labels, counts, val, seed=1))
    assert not torch.equal(meta, second_draw(labels, counts, val, seed=2))


def test_second_draw_without_exclusions_is_a_seeded_long_tail_draw():
    labels = torch.arange(3).repeat_interleave(8)
    drawn = second_draw(labels, [8, 4, 2], torch.empty(0, dtype=torch.int64), seed=3)
    assert torch.equal(drawn, long_tail_split(labels, [8, 4, 2], 0, seed=3)[0])  # same rule, same generator order


def ldam_code_keeps(labels: np.ndarray, counts: list[int], rand_number: int) -> list[int]:
    """The indices of the images the LDAM-DRW code's IMBALANCECIFAR10 keeps (imbalance_cifar.py,
    gen_imbalanced_data, written from it), ascending; numpy's global state is put back afterwards."""
    state = np.random.get_state()
    np.random.seed(rand_number)
    kept = []
    for the_class, the_img_num in zip(np.unique(labels), counts):
        idx = np.where(labels == the_class)[0]
        np.random.shuffle(idx)
        kept += idx[:the_img_num].tolist()
    np.random.set_state(state)
    return sorted(kept)


@pytest.mark.parametrize("seed", [0, 3])
def test_the_ldam_draw_keeps_the_images_the_ldam_code_keeps(seed):
    labels = torch.arange(10).repeat(500)[torch.randperm(5000, generator=torch.Generator().manual_seed(1))]
    counts = long_tail_counts(500, 10, 100, "exp")  # classes interleaved, as in CIFAR's files
    train, val = long_tail_split(labels, counts, 0, seed, draw="ldam")
    assert train.tolist() == ldam_code_keeps(labels.numpy(), counts, seed) and val.numel() == 0
    assert not torch.equal(train, long_tail_split(labels, counts, 0, seed)[0])  # not the torch draw's images


def test_the_ldam_draw_s_validation_images_come_from_the_images_it_leaves_out():
    labels = torch.arange(10).repeat_interleave(500)
    counts = long_tail_counts(500, 10, 100, "exp")
    train, val = long_tail_split(labels, counts, 5, 0, draw="ldam")
    kept = set(ldam_code_keeps(labels.numpy(), counts, 0))
    assert not set(val.tolist()) & kept - set(labels.eq(0).nonzero().flatten().tolist())  # head class: its own
    assert set(train.tolist()) <= kept and torch.bincount(labels[train]).tolist() == [495] + counts[1:]


def test_an_unknown_draw_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown subset draw 'numpy'; valid draws: \['ldam', 'torch'\]"):
        long_tail_split(torch.arange(2), [1, 1], 0, 0, draw="numpy")
