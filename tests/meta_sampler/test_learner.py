"""Tests for meta_sampler.learner: init weights, class distribution, sampling and weights."""

from __future__ import annotations

import math

import pytest
import torch

from meta_sampler.learner import ClassSampler, balanced_batch, init_class_weights


def _labels(counts: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])


def _within_binomial(observed: torch.Tensor, probs: torch.Tensor, draws: int) -> bool:
    # 5 standard deviations of a binomial proportion: a false alarm is ~1e-6 per class.
    freq = observed.double() / draws
    tol = 5 * torch.sqrt(probs * (1 - probs) / draws) + 1e-12
    return bool(((freq - probs).abs() <= tol).all())


@pytest.mark.parametrize(
    "init_pow, expected",
    [
        (0.0, [0.5, 0.5, 0.5]),
        # 1/sqrt(pi) = sqrt(111) * [1/10, 1/sqrt(10), 1]; min + max = sqrt(111) * 11/10.
        (0.5, [1 / 11, math.sqrt(10) / 11, 10 / 11]),
        # 1/pi = 111 * [1/100, 1/10, 1]; min + max = 111 * 101/100.
        (1.0, [1 / 101, 10 / 101, 100 / 101]),
    ],
)
def test_init_weights_match_hand_values(init_pow: float, expected: list[float]) -> None:
    weights = init_class_weights([100, 10, 1], init_pow)
    assert weights.shape == (3,)
    torch.testing.assert_close(weights, torch.tensor(expected), rtol=0, atol=1e-7)


def test_init_weights_ignore_empty_classes_in_min_max() -> None:
    # Non-empty classes: 1/pi = 101 * [1/100, 1]; min + max = 101 * 101/100.
    weights = init_class_weights([100, 0, 1], 1.0)
    torch.testing.assert_close(weights, torch.tensor([1 / 101, 0.5, 100 / 101]), rtol=0, atol=1e-7)


def test_init_pow_one_gives_class_balanced_distribution() -> None:
    sampler = ClassSampler(_labels([100, 10, 1]), 3, init_pow=1.0)
    torch.testing.assert_close(sampler.class_probs(), torch.full((3,), 1 / 3), rtol=0, atol=1e-6)


def test_init_pow_zero_gives_instance_balanced_distribution() -> None:
    sampler = ClassSampler(_labels([100, 10, 1]), 3, init_pow=0.0)
    torch.testing.assert_close(
        sampler.class_probs(), torch.tensor([100 / 111, 10 / 111, 1 / 111]), rtol=0, atol=1e-6
    )


def test_class_probs_equal_count_times_weight_over_sum() -> None:
    sampler = ClassSampler(_labels([100, 10, 1]), 3)
    with torch.no_grad():
        sampler.theta.copy_(torch.tensor([0.0, math.log(3.0), -math.log(3.0)]))
    # w = [1/2, 3/4, 1/4]; n * w = [50, 7.5, 0.25], total 57.75.
    expected = torch.tensor([50 / 57.75, 7.5 / 57.75, 0.25 / 57.75])
    probs = sampler.class_probs()
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)
    assert not probs.requires_grad


def test_sampled_class_frequencies_match_class_probs() -> None:
    sampler = ClassSampler(_labels([100, 10, 1]), 3)
    with torch.no_grad():
        sampler.theta.copy_(torch.tensor([-1.0, 0.5, 2.0]))
    w = torch.sigmoid(torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64))
    mass = torch.tensor([100.0, 10.0, 1.0], dtype=torch.float64) * w
    draws = 200_000
    classes, _ = sampler.sample_classes(draws, torch.Generator().manual_seed(0))
    assert _within_binomial(torch.bincount(classes, minlength=3), mass / mass.sum(), draws)


def test_sample_weights_are_exactly_one() -> None:
    sampler = ClassSampler(_labels([100, 10, 1]), 3, init_pow=0.5)
    _, weights = sampler.sample_classes(4096, torch.Generator().manual_seed(1), tau=0.3)
    assert torch.equal(weights.detach(), torch.ones(4096))
    assert weights.requires_grad


def test_theta_gets_gradient_through_weights() -> None:
    sampler = ClassSampler(_labels([100, 10, 1]), 3)
    _, weights = sampler.sample_classes(64, torch.Generator().manual_seed(2))
    (weights * torch.arange(64, dtype=torch.float32)).sum().backward()
    assert sampler.theta.grad is not None
    assert bool((sampler.theta.grad != 0).any())


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_weight_gradient_is_that_of_the_gumbel_perturbed_soft_entry_at_temperature_tau(tau: float) -> None:
    counts, theta = [100, 10, 1], torch.tensor([-1.0, 0.5, 2.0])
    sampler = ClassSampler(_labels(counts), 3)
    with torch.no_grad():
        sampler.theta.copy_(theta)
    classes, weights = sampler.sample_classes(16, torch.Generator().manual_seed(8), tau=tau)
    weights.sum().backward()

    # The same noise again: one (B, C) block of uniforms from the generator, g = -log(-log u).
    u = torch.rand((16, 3), generator=torch.Generator().manual_seed(8))
    gumbel = -torch.log(-torch.log(u))
    leaf = theta.clone().requires_grad_()
    perturbed = torch.tensor(counts, dtype=torch.float32).log() + torch.log(torch.sigmoid(leaf)) + gumbel
    drawn = perturbed.detach().argmax(1)
    soft = torch.softmax(perturbed / tau, dim=1).gather(1, drawn.unsqueeze(1)).sum()
    (expected,) = torch.autograd.grad(soft, leaf)
    assert torch.equal(classes, drawn)
    # Straight-through: the value is exactly 1, the gradient that of the soft entry.
    assert torch.equal(weights.detach(), torch.ones(16))
    torch.testing.assert_close(sampler.theta.grad, expected, rtol=1e-5, atol=1e-7)


def test_weight_gradient_raises_drawn_class_and_lowers_others() -> None:
    sampler = ClassSampler(_labels([100, 10, 1]), 3)
    classes, weights = sampler.sample_classes(1, torch.Generator().manual_seed(3))
    weights.sum().backward()
    drawn = int(classes[0])
    grad = sampler.theta.grad
    # Raising theta of the drawn class raises its soft probability; raising any other lowers it.
    assert grad[drawn] > 0
    assert all(grad[c] < 0 for c in range(3) if c != drawn)


def test_empty_class_is_never_drawn_and_gradients_stay_finite() -> None:
    labels = _labels([30, 0, 5])
    sampler = ClassSampler(labels, 3, init_pow=1.0)
    assert sampler.class_probs()[1] == 0
    classes, weights = sampler.sample_classes(20_000, torch.Generator().manual_seed(4))
    assert not bool((classes == 1).any())
    weights.sum().backward()
    assert bool(torch.isfinite(sampler.theta.grad).all())
    assert sampler.theta.grad[1] == 0


def test_same_generator_seed_gives_same_draws() -> None:
    sampler = ClassSampler(_labels([100, 10, 1]), 3)
    a, _ = sampler.sample_classes(256, torch.Generator().manual_seed(5))
    b, _ = sampler.sample_classes(256, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_draw_images_picks_uniform_image_of_each_drawn_class() -> None:
    # Interleaved labels so class-sorting actually matters: class 1 at indices 1, 4, 7, 10.
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 0])
    sampler = ClassSampler(labels, 3)
    draws = 40_000
    idx = sampler.draw_images(torch.ones(draws, dtype=torch.int64), torch.Generator().manual_seed(6))
    assert torch.equal(labels[idx], torch.ones(draws, dtype=torch.int64))
    counts = torch.bincount(idx, minlength=12)[[1, 4, 7, 10]]
    assert int(counts.sum()) == draws
    assert _within_binomial(counts, torch.full((4,), 0.25, dtype=torch.float64), draws)


def test_draw_images_rejects_empty_class() -> None:
    sampler = ClassSampler(_labels([3, 0, 2]), 3)
    with pytest.raises(ValueError, match="no images"):
        sampler.draw_images(torch.tensor([0, 1]), torch.Generator())


def test_balanced_batch_is_uniform_over_nonempty_classes_then_images() -> None:
    labels = _labels([50, 5, 0, 1])
    draws = 60_000
    idx = balanced_batch(labels, 4, draws, torch.Generator().manual_seed(7))
    per_class = torch.bincount(labels[idx], minlength=4)
    assert per_class[2] == 0
    assert _within_binomial(per_class[[0, 1, 3]], torch.full((3,), 1 / 3, dtype=torch.float64), draws)
    # Within class 1 (indices 50..54) every image has probability 1/5.
    within = torch.bincount(idx[labels[idx] == 1] - 50, minlength=5)
    assert _within_binomial(within, torch.full((5,), 0.2, dtype=torch.float64), int(per_class[1]))


@pytest.mark.parametrize(
    "labels, num_classes, message",
    [
        (torch.tensor([0.0, 1.0]), 2, "int64"),
        (torch.tensor([[0, 1]]), 2, "1-D"),
        (torch.tensor([0, 3]), 3, "range"),
        (torch.tensor([-1, 0]), 3, "range"),
        (torch.tensor([], dtype=torch.int64), 3, "empty"),
    ],
)
def test_bad_labels_are_rejected_with_a_clear_error(
    labels: torch.Tensor, num_classes: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ClassSampler(labels, num_classes)


def test_bad_sampling_arguments_are_rejected() -> None:
    sampler = ClassSampler(_labels([3, 2]), 2)
    with pytest.raises(ValueError, match="tau"):
        sampler.sample_classes(4, torch.Generator(), tau=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        sampler.sample_classes(0, torch.Generator())
    with pytest.raises(ValueError, match="init_pow"):
        init_class_weights([3, 2], float("nan"))
    with pytest.raises(ValueError, match="positive"):
        init_class_weights([0, 0], 1.0)


def test_state_dict_holds_theta_and_counts_but_not_the_image_index() -> None:
    sampler = ClassSampler(_labels([4, 2]), 2)
    assert set(sampler.state_dict()) == {"theta", "counts", "log_counts"}


def balms_reference_draw(sampler: ClassSampler, uniform: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The BALMS code's SampleLearner on the same noise (uniforms (B, N)), as it is written: logits log
    sigmoid(theta) of each image's class expanded to (B, N), a hard Gumbel-softmax over the N images, and the
    drawn image's entry of the straight-through one-hot (hard - soft.detach() + soft) as its weight."""
    logits = torch.nn.functional.logsigmoid(sampler.theta)[sampler.labels].expand(uniform.shape[0], -1)
    perturbed = logits - torch.log(-torch.log(uniform.clamp_min(torch.finfo(uniform.dtype).tiny)))
    soft = torch.softmax(perturbed / tau, dim=1)
    idx = perturbed.argmax(dim=1)
    hard = torch.zeros_like(soft).scatter_(1, idx.unsqueeze(1), 1.0)
    return idx, (hard - soft.detach() + soft).gather(1, idx.unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("tau, chunk", [(1.0, 1 << 22), (0.5, 150), (2.0, 1)])  # 150: rows in chunks of 2
def test_image_relaxation_draws_and_differentiates_as_the_balms_code_without_its_b_by_n_graph(tau, chunk) -> None:
    counts = [40, 25, 0, 10, 4]
    sampler = ClassSampler(_labels(counts)[torch.randperm(79, generator=torch.Generator().manual_seed(0))], 5,
                           init_pow=0.5).double()
    with torch.no_grad():
        sampler.theta.add_(torch.tensor([0.3, -0.2, 0.0, 0.5, -0.4], dtype=torch.float64))
    batch, a = 7, torch.linspace(-1.0, 2.0, 7, dtype=torch.float64)  # a: any downstream use of the weights
    idx, weights = sampler.sample_images(batch, torch.Generator().manual_seed(3), tau, chunk=chunk)
    (a * weights).sum().backward()
    ours = sampler.theta.grad.clone()
    sampler.theta.grad = None
    uniform = torch.rand((batch, 79), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref_idx, ref_weights = balms_reference_draw(sampler, uniform, tau)
    (a * ref_weights).sum().backward()
    assert torch.equal(idx, ref_idx) and torch.equal(weights.detach(), torch.ones(batch, dtype=torch.float64))
    torch.testing.assert_close(ours, sampler.theta.grad, rtol=1e-8, atol=1e-10)  # T in units of 2^-40
    assert ours.abs().sum() > 0 and ours[2] == 0  # the empty class gets no gradient


def test_image_relaxation_draws_classes_in_proportion_to_count_times_weight() -> None:
    sampler = ClassSampler(_labels([100, 10, 1]), 3, init_pow=1.0)
    draws = 20_000
    idx, _ = sampler.draw(draws, torch.Generator().manual_seed(4), 1.0, "image")
    observed = torch.bincount(sampler.labels[idx], minlength=3)
    assert _within_binomial(observed, sampler.class_probs().double(), draws)
    with pytest.raises(ValueError, match="relax must be one of image, class, got 'images'"):
        sampler.draw(4, torch.Generator(), 1.0, "images")


@pytest.mark.parametrize("tau", [1.0, 0.1, 0.05])
def test_image_relaxation_stays_exact_when_a_rare_class_with_a_large_weight_meets_a_low_temperature(tau) -> None:
    """One image of a class with theta = 8 beside 5000 of one with theta = -12, in float32: the per-class sums
    are taken relative to the row's maximum of (logit + noise) / tau, so none underflows to a wrong 0."""
    sampler = ClassSampler(_labels([1, 5000]), 2)
    with torch.no_grad():
        sampler.theta.copy_(torch.tensor([8.0, -12.0]))
    idx, weights = sampler.sample_images(8, torch.Generator().manual_seed(5), tau)
    weights.sum().backward()
    reference = ClassSampler(_labels([1, 5000]), 2).double()
    with torch.no_grad():
        reference.theta.copy_(torch.tensor([8.0, -12.0], dtype=torch.float64))
    uniform = torch.rand((8, 5001), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref_idx, ref_weights = balms_reference_draw(reference, uniform, tau)
    ref_weights.sum().backward()
    assert torch.equal(idx, ref_idx) and torch.isfinite(sampler.theta.grad).all()
    torch.testing.assert_close(sampler.theta.grad.double(), reference.theta.grad, rtol=1e-4, atol=1e-7)
