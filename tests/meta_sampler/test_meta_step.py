"""Tests for meta_sampler.meta_step: look-ahead SGD, meta-gradient to theta, real head step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meta_sampler.learner import ClassSampler, balanced_batch
from meta_sampler.meta_step import lookahead, meta_step
from models.losses import build_loss

D, C, B, M = 5, 3, 8, 6
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4


def _ce_none(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def _batch(seed: int, n: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)


def _head(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D, C).double()


def _hand_grads(weight, bias, feats, labels, sample_w):
    """Gradient of mean_i(w_i * CE(x_i W^T + b, y_i)) w.r.t. (W, b), written without nn.Linear."""
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    logits = feats @ weight.T + bias
    loss = (F.cross_entropy(logits, labels, reduction="none") * sample_w).mean()
    return torch.autograd.grad(loss, (weight, bias))


def test_lookahead_first_step_equals_hand_sgd_with_momentum_and_weight_decay() -> None:
    head = _head()
    opt = torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    feats, labels = _batch(1)
    sample_w = torch.linspace(0.5, 2.0, B, dtype=torch.float64).requires_grad_()
    gw, gb = _hand_grads(head.weight, head.bias, feats, labels, sample_w.detach())
    # First step: buffer = g + wd * p, so p' = p - lr * (g + wd * p).
    expected = [p - LR * (g + WD * p) for p, g in ((head.weight.detach(), gw), (head.bias.detach(), gb))]
    fhead = lookahead(head, opt, feats, labels, sample_w, _ce_none)
    for fast, want in zip(fhead.fast_params, expected):
        torch.testing.assert_close(fast.detach(), want, rtol=0, atol=1e-6)


def test_lookahead_second_step_uses_real_momentum_buffer() -> None:
    head = _head()
    opt = torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    first_feats, first_labels = _batch(2)
    ones = torch.ones(B, dtype=torch.float64)
    g0w, g0b = _hand_grads(head.weight, head.bias, first_feats, first_labels, ones)
    buf = [g0w + WD * head.weight.detach(), g0b + WD * head.bias.detach()]
    opt.zero_grad()
    _ce_none(head(first_feats), first_labels).mean().backward()
    opt.step()

    feats, labels = _batch(3)
    sample_w = torch.linspace(2.0, 0.25, B, dtype=torch.float64).requires_grad_()
    params = [head.weight.detach().clone(), head.bias.detach().clone()]
    grads = _hand_grads(params[0], params[1], feats, labels, sample_w.detach())
    expected = []
    for p, g, b in zip(params, grads, buf):
        new_buf = MOMENTUM * b + g + WD * p
        expected.append(p - LR * new_buf)
    fhead = lookahead(head, opt, feats, labels, sample_w, _ce_none)
    for fast, want in zip(fhead.fast_params, expected):
        torch.testing.assert_close(fast.detach(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prior_steps", [0, 1, 2])
@pytest.mark.parametrize(
    "momentum, dampening, nesterov, weight_decay",
    [(0.0, 0.0, False, 0.0), (0.9, 0.0, False, 5e-4), (0.9, 0.3, False, 1e-3), (0.8, 0.0, True, 5e-4)],
)
def test_lookahead_matches_torch_sgd_next_step(
    prior_steps: int, momentum: float, dampening: float, nesterov: bool, weight_decay: float
) -> None:
    head = _head()
    opt = torch.optim.SGD(
        head.parameters(), lr=LR, momentum=momentum, dampening=dampening,
        nesterov=nesterov, weight_decay=weight_decay,
    )
    for step in range(prior_steps):
        x, y = _batch(10 + step)
        opt.zero_grad()
        _ce_none(head(x), y).mean().backward()
        opt.step()
    feats, labels = _batch(20)
    sample_w = torch.linspace(0.5, 1.5, B, dtype=torch.float64)

    twin = copy.deepcopy(head)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=LR)
    # deepcopy: load_state_dict shares same-dtype buffers, and the twin's step mutates them in place.
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin_opt.zero_grad()
    (_ce_none(twin(feats), labels) * sample_w).mean().backward()
    twin_opt.step()

    fhead = lookahead(head, opt, feats, labels, sample_w.requires_grad_(), _ce_none)
    for fast, want in zip(fhead.fast_params, twin.parameters()):
        torch.testing.assert_close(fast.detach(), want.detach(), rtol=0, atol=1e-6)


def test_lookahead_leaves_head_and_optimizer_state_untouched() -> None:
    head = _head()
    opt = torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    x, y = _batch(4)
    opt.zero_grad()
    _ce_none(head(x), y).mean().backward()
    opt.step()
    params = [p.detach().clone() for p in head.parameters()]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in head.parameters()]
    feats, labels = _batch(5)
    lookahead(head, opt, feats, labels, torch.ones(B, dtype=torch.float64, requires_grad=True), _ce_none)
    for p, before, buf in zip(head.parameters(), params, bufs):
        assert torch.equal(p.detach(), before)
        assert torch.equal(opt.state[p]["momentum_buffer"], buf)


def _double_sampler(counts: list[int]) -> tuple[ClassSampler, torch.Tensor]:
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    return ClassSampler(labels, len(counts), init_pow=0.3).double(), labels


def test_theta_gradient_equals_independent_meta_gradient_and_real_step_adds_none() -> None:
    sampler, _ = _double_sampler([12, 5, 2])
    head = _head()
    opt = torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    sampler_lr = 0.5
    sampler_opt = torch.optim.SGD(sampler.parameters(), lr=sampler_lr)
    labels, sample_w = sampler.sample_classes(B, torch.Generator().manual_seed(6), tau=0.5)
    feats, _ = _batch(7)
    meta_feats, meta_labels = _batch(8, M)

    # Independent meta-gradient: unrolled first SGD step on (W, b) written out by hand.
    weight, bias = head.weight.detach(), head.bias.detach()
    w_req, b_req = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    inner = (_ce_none(feats @ w_req.T + b_req, labels) * sample_w).mean()
    gw, gb = torch.autograd.grad(inner, (w_req, b_req), create_graph=True)
    fast_w = weight - LR * (gw + WD * weight)
    fast_b = bias - LR * (gb + WD * bias)
    outer = F.cross_entropy(meta_feats @ fast_w.T + fast_b, meta_labels)
    (expected_grad,) = torch.autograd.grad(outer, sampler.theta, retain_graph=True)
    theta_before = sampler.theta.detach().clone()

    out = meta_step(
        head, opt, sampler, sampler_opt, feats, labels, sample_w, meta_feats, meta_labels, _ce_none
    )
    assert bool((expected_grad != 0).any())
    torch.testing.assert_close(sampler.theta.grad, expected_grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        sampler.theta.detach(), theta_before - sampler_lr * expected_grad, rtol=1e-9, atol=1e-12
    )
    assert out["meta_loss"].item() == pytest.approx(outer.item(), abs=1e-9) and not out["meta_loss"].requires_grad


def test_the_meta_loss_is_plain_cross_entropy_whatever_the_inner_loss() -> None:
    # Inner loss balanced softmax, CE(z + log n, y): its log n shift would change the meta loss if reused there.
    inner_counts = [50.0, 10.0, 1.0]
    inner = build_loss("balanced_softmax", inner_counts, reduction="none")
    sampler, _ = _double_sampler([12, 5, 2])
    head = _head()
    opt = torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    sampler_opt = torch.optim.SGD(sampler.parameters(), lr=0.5)
    labels, sample_w = sampler.sample_classes(B, torch.Generator().manual_seed(13), tau=0.5)
    feats, _ = _batch(14)
    meta_feats, meta_labels = _batch(15, M)

    # Look-ahead head by hand: one first SGD step (buffer = g + wd * p) on the weighted balanced-softmax loss.
    log_n = torch.tensor(inner_counts, dtype=torch.float64).log()
    weight, bias = head.weight.detach(), head.bias.detach()
    w_req, b_req = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    inner_loss = (_ce_none(feats @ w_req.T + b_req + log_n, labels) * sample_w).mean()
    gw, gb = torch.autograd.grad(inner_loss, (w_req, b_req), create_graph=True)
    fast_w, fast_b = weight - LR * (gw + WD * weight), bias - LR * (gb + WD * bias)
    outer = F.cross_entropy(meta_feats @ fast_w.T + fast_b, meta_labels)  # no log n shift on the meta batch
    (expected_grad,) = torch.autograd.grad(outer, sampler.theta, retain_graph=True)

    out = meta_step(head, opt, sampler, sampler_opt, feats, labels, sample_w, meta_feats, meta_labels, inner)
    assert bool((expected_grad != 0).any())
    assert out["meta_loss"].item() == pytest.approx(outer.item(), rel=0, abs=1e-6)
    torch.testing.assert_close(sampler.theta.grad, expected_grad, rtol=1e-6, atol=1e-9)


def test_real_head_step_equals_plain_sgd_step() -> None:
    sampler, _ = _double_sampler([12, 5, 2])
    head = _head()
    opt = torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    sampler_opt = torch.optim.Adam(sampler.parameters(), lr=0.1)
    twin = copy.deepcopy(head)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    gen = torch.Generator().manual_seed(9)
    for step in range(3):
        labels, sample_w = sampler.sample_classes(B, gen)
        feats, _ = _batch(30 + step)
        meta_feats, meta_labels = _batch(40 + step, M)
        out = meta_step(
            head, opt, sampler, sampler_opt, feats, labels, sample_w, meta_feats, meta_labels, _ce_none
        )
        twin_opt.zero_grad()
        loss = _ce_none(twin(feats), labels).mean()
        loss.backward()
        twin_opt.step()
        assert out["loss"].item() == loss.item()
        for p, q in zip(head.parameters(), twin.parameters()):
            assert torch.equal(p.detach(), q.detach())
            assert torch.equal(opt.state[p]["momentum_buffer"], twin_opt.state[q]["momentum_buffer"])


def _gaussian_toy(counts: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    return means[labels] + torch.randn(len(labels), 2, generator=g), labels


def test_meta_sampler_raises_minority_share_on_imbalanced_toy_problem() -> None:
    counts = [500, 20]
    feats, labels = _gaussian_toy(counts, seed=0)
    sampler = ClassSampler(labels, 2, init_pow=0.0)
    initial_share = counts[1] / sum(counts)
    assert sampler.class_probs()[1].item() == pytest.approx(initial_share, abs=1e-7)
    torch.manual_seed(0)
    head = nn.Linear(2, 2)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sampler_opt = torch.optim.Adam(sampler.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    theta_before = sampler.theta.detach().clone()
    for _ in range(150):
        classes, sample_w = sampler.sample_classes(64, gen)
        idx = sampler.draw_images(classes, gen)
        meta_idx = balanced_batch(labels, 2, 64, gen)
        meta_step(head, opt, sampler, sampler_opt, feats[idx], labels[idx], sample_w,
                  feats[meta_idx], labels[meta_idx], _ce_none)
    assert not torch.equal(sampler.theta.detach(), theta_before)
    assert sampler.class_probs()[1].item() > 3 * initial_share


def test_bad_meta_step_inputs_are_rejected() -> None:
    sampler, _ = _double_sampler([4, 3, 2])
    head = _head()
    feats, labels = _batch(11)
    meta_feats, meta_labels = _batch(12, M)
    sample_w = torch.ones(B, dtype=torch.float64, requires_grad=True)
    sgd = torch.optim.SGD(head.parameters(), lr=LR)
    sampler_opt = torch.optim.SGD(sampler.parameters(), lr=LR)
    args = (feats, labels, sample_w, meta_feats, meta_labels)
    with pytest.raises(TypeError, match="SGD"):
        meta_step(head, torch.optim.Adam(head.parameters()), sampler, sampler_opt, *args, _ce_none)
    with pytest.raises(ValueError, match="maximize"):
        maximizing = torch.optim.SGD(head.parameters(), lr=LR, maximize=True)
        meta_step(head, maximizing, sampler, sampler_opt, *args, _ce_none)
    with pytest.raises(ValueError, match="reduction='none'"):
        meta_step(head, sgd, sampler, sampler_opt, *args, F.cross_entropy)
    with pytest.raises(ValueError, match="without detaching"):
        detached = (feats, labels, sample_w.detach(), meta_feats, meta_labels)
        meta_step(head, sgd, sampler, sampler_opt, *detached, _ce_none)
    with pytest.raises(ValueError, match="meta labels"):
        short_meta = (feats, labels, sample_w, meta_feats, meta_labels[:2])
        meta_step(head, sgd, sampler, sampler_opt, *short_meta, _ce_none)
