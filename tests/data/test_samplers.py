"""Per-epoch samplers: class frequencies, exact per-class counts, determinism and errors."""

import logging
import math

import pytest
import torch

from data.samplers import SAMPLERS, build_sampler

COUNTS = [60, 25, 10, 5]  # N = 100, C = 4
N = sum(COUNTS)


def _labels(counts: list[int]) -> torch.Tensor:
    """Labels with the given per-class counts, in a fixed shuffled order (not grouped by class)."""
    grouped = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    return grouped[torch.randperm(grouped.numel(), generator=torch.Generator().manual_seed(7))]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _draw(sampler, epochs: int, epoch: int | None = None, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    return torch.cat([sampler.indices(e if epoch is None else epoch, g) for e in range(epochs)])


def _assert_within_5_sigma(observed: torch.Tensor, probs: list[float]) -> None:
    total = int(observed.sum())
    for c, p in enumerate(probs):
        expected = total * p
        sigma = math.sqrt(total * p * (1.0 - p))
        assert abs(int(observed[c]) - expected) <= 5.0 * sigma + 1e-9, (c, int(observed[c]), expected, sigma)


def test_instance_epoch_is_a_permutation_of_all_indices():
    labels = _labels(COUNTS)
    sampler = build_sampler("instance", labels, 4)
    idx = sampler.indices(0, _gen())
    assert sampler.num_samples == N
    assert idx.dtype == torch.int64
    assert sorted(idx.tolist()) == list(range(N))
    assert idx.tolist() != list(range(N))


def test_class_balanced_class_frequencies_are_uniform():
    labels = _labels(COUNTS)
    sampler = build_sampler("class_balanced", labels, 4)
    idx = _draw(sampler, epochs=200)
    assert sampler.num_samples == N and idx.numel() == 200 * N
    _assert_within_5_sigma(torch.bincount(labels[idx], minlength=4), [0.25, 0.25, 0.25, 0.25])


def test_class_balanced_images_within_a_class_are_uniform():
    labels = _labels(COUNTS)
    idx = _draw(build_sampler("class_balanced", labels, 4), epochs=200)
    # Class 3 has 5 images, each drawn with probability (1/4) * (1/5) = 1/20.
    members = torch.nonzero(labels == 3).flatten()
    per_image = torch.bincount(idx, minlength=N)[members]
    rest = torch.tensor([idx.numel() - int(per_image.sum())])
    _assert_within_5_sigma(torch.cat([per_image, rest]), [0.05] * 5 + [0.75])


def test_sqrt_class_frequencies_follow_sqrt_counts():
    labels = _labels(COUNTS)
    idx = _draw(build_sampler("sqrt", labels, 4), epochs=200)
    roots = [math.sqrt(n) for n in COUNTS]
    _assert_within_5_sigma(torch.bincount(labels[idx], minlength=4), [r / sum(roots) for r in roots])


def test_progressive_at_epoch_zero_matches_instance_frequencies():
    labels = _labels(COUNTS)
    idx = _draw(build_sampler("progressive", labels, 4, total_epochs=10), epochs=200, epoch=0)
    _assert_within_5_sigma(torch.bincount(labels[idx], minlength=4), [0.60, 0.25, 0.10, 0.05])


def test_progressive_at_epoch_T_is_uniform():
    labels = _labels(COUNTS)
    idx = _draw(build_sampler("progressive", labels, 4, total_epochs=10), epochs=200, epoch=10)
    _assert_within_5_sigma(torch.bincount(labels[idx], minlength=4), [0.25, 0.25, 0.25, 0.25])


def test_progressive_halfway_mixes_instance_and_uniform_equally():
    labels = _labels(COUNTS)
    idx = _draw(build_sampler("progressive", labels, 4, total_epochs=10), epochs=200, epoch=5)
    # 0.5 * n_c / N + 0.5 * 1/4
    _assert_within_5_sigma(torch.bincount(labels[idx], minlength=4), [0.425, 0.25, 0.175, 0.15])


def test_progressive_past_total_epochs_stays_class_balanced():
    # A run resumed under more processes has shorter epochs and may run more of them than T.
    sampler = build_sampler("progressive", _labels(COUNTS), 4, total_epochs=10)
    assert torch.equal(sampler.class_probabilities(13), sampler.class_probabilities(10))
    assert torch.allclose(sampler.class_probabilities(13), torch.full((4,), 0.25, dtype=torch.float64))


def test_oversample_gives_every_class_n_max_images_per_epoch():
    labels = _labels(COUNTS)
    sampler = build_sampler("oversample", labels, 4)
    assert sampler.num_samples == 4 * 60
    for epoch, idx in enumerate([sampler.indices(e, _gen(e)) for e in range(3)]):
        assert idx.numel() == 240, epoch
        assert torch.bincount(labels[idx], minlength=4).tolist() == [60, 60, 60, 60]
        # Class 1 (25 images, 60 = 2 * 25 + 10): every image 2 or 3 times, 10 of them 3 times.
        per_image = torch.bincount(idx, minlength=N)[labels == 1]
        assert sorted(per_image.tolist()) == [2] * 15 + [3] * 10
        # Class 0 is the largest: each image exactly once.
        assert torch.bincount(idx, minlength=N)[labels == 0].tolist() == [1] * 60


def test_undersample_cuts_every_class_to_n_min_without_repeats():
    labels = _labels(COUNTS)
    sampler = build_sampler("undersample", labels, 4)
    assert sampler.num_samples == 4 * 5
    g = _gen()
    first, second = sampler.indices(0, g), sampler.indices(1, g)
    for idx in (first, second):
        assert torch.bincount(labels[idx], minlength=4).tolist() == [5, 5, 5, 5]
        assert idx.unique().numel() == 20
    assert set(first.tolist()) != set(second.tolist())


def test_undersample_class_frequencies_within_class_are_uniform():
    labels = _labels(COUNTS)
    idx = _draw(build_sampler("undersample", labels, 4), epochs=400)
    # Each class-0 image is kept with probability 5/60 per epoch.
    per_image = torch.bincount(idx, minlength=N)[labels == 0]
    sigma = math.sqrt(400 * (5 / 60) * (55 / 60))
    assert ((per_image.double() - 400 * 5 / 60).abs() <= 5 * sigma).all()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_seed_gives_same_indices_and_other_seed_differs(name):
    params = {"total_epochs": 10} if name == "progressive" else {}
    sampler = build_sampler(name, _labels(COUNTS), 4, **params)
    a = sampler.indices(2, _gen(123))
    assert torch.equal(a, sampler.indices(2, _gen(123)))
    assert not torch.equal(a, sampler.indices(2, _gen(124)))
    assert a.shape == (sampler.num_samples,) and a.dtype == torch.int64


@pytest.mark.parametrize("name", ["class_balanced", "sqrt", "progressive"])
def test_empty_class_gets_probability_zero_and_a_warning(name, caplog):
    labels = _labels([30, 0, 10])
    params = {"total_epochs": 4} if name == "progressive" else {}
    with caplog.at_level(logging.WARNING, logger="data.samplers"):
        sampler = build_sampler(name, labels, 3, **params)
    assert "classes 1 (1 of 3) have no images" in caplog.text
    idx = _draw(sampler, epochs=50, epoch=4 if name == "progressive" else None)
    assert torch.bincount(labels[idx], minlength=3)[1] == 0
    assert idx.numel() == 50 * 40


def test_class_balanced_with_empty_class_is_uniform_over_the_rest():
    labels = _labels([30, 0, 10])
    idx = _draw(build_sampler("class_balanced", labels, 3), epochs=200)
    _assert_within_5_sigma(torch.bincount(labels[idx], minlength=3), [0.5, 0.0, 0.5])


def test_progressive_uniform_term_spreads_over_the_non_empty_classes_only():
    # counts [30, 0, 10]: instance term [3/4, 0, 1/4], uniform term [1/2, 0, 1/2]; all exact in binary.
    sampler = build_sampler("progressive", _labels([30, 0, 10]), 3, total_epochs=4)
    assert sampler.class_probabilities(4).tolist() == [0.5, 0.0, 0.5]
    assert sampler.class_probabilities(2).tolist() == [0.625, 0.0, 0.375]


@pytest.mark.parametrize("name, per_class", [("oversample", [30, 0, 30]), ("undersample", [10, 0, 10])])
def test_re_sampling_with_an_empty_class_sizes_the_epoch_by_the_non_empty_classes(name, per_class):
    # n_max = 30 and n_min = 10 are taken over the classes that have images, and the empty one adds none.
    labels = _labels([30, 0, 10])
    sampler = build_sampler(name, labels, 3)
    idx = sampler.indices(0, _gen())
    assert sampler.num_samples == idx.numel() == sum(per_class)
    assert torch.bincount(labels[idx], minlength=3).tolist() == per_class


def test_no_images_at_all_is_an_error():
    with pytest.raises(ValueError, match="labels is empty"):
        build_sampler("class_balanced", torch.zeros(0, dtype=torch.int64), 3)


def test_label_outside_num_classes_is_an_error():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        build_sampler("instance", torch.tensor([0, 1, 3]), 3)


def test_unknown_sampler_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown sampler 'balanced'.*class_balanced"):
        build_sampler("balanced", _labels(COUNTS), 4)


def test_unknown_param_names_param_and_valid_ones():
    with pytest.raises(ValueError, match="unknown param 'epochs' for sampler 'progressive'.*total_epochs"):
        build_sampler("progressive", _labels(COUNTS), 4, epochs=10)


def test_missing_required_param_is_named():
    with pytest.raises(ValueError, match="total_epochs"):
        build_sampler("progressive", _labels(COUNTS), 4)
