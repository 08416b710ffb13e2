"""Heads: LWS ScaledLinear (frozen W, b; learned scales), tau-normalisation, as_linear; the cosine head."""
import math

import pytest
import torch
from torch import nn

from models.heads import (CosineLinear, ScaledLinear, as_linear, build_head, deployable_state, head_name,
                          load_backbone_state, tau_normalized)
from models.registry import build_model
from models.losses import build_loss


def _linear(weight, bias) -> nn.Linear:
    w = torch.tensor(weight, dtype=torch.float32)
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return lin


W = [[1.0, 2.0], [3.0, -1.0]]
B = [0.5, -1.0]
X = [[1.0, 1.0], [2.0, 0.0]]


def _scaled(scales=(2.0, -0.5)) -> ScaledLinear:
    head = ScaledLinear(_linear(W, B))
    with torch.no_grad():
        head.scales.copy_(torch.tensor(scales))
    return head


# ---------------------------------------------------------------- ScaledLinear


def test_scaled_linear_forward_is_scale_times_affine_score_per_class():
    # x0: w0.x + b0 = 1 + 2 + 0.5 = 3.5 -> *2 = 7;   w1.x + b1 = 3 - 1 - 1 = 1 -> *-0.5 = -0.5
    # x1: w0.x + b0 = 2 + 0 + 0.5 = 2.5 -> *2 = 5;   w1.x + b1 = 6 - 0 - 1 = 5 -> *-0.5 = -2.5
    out = _scaled()(torch.tensor(X))
    assert out.tolist() == [[7.0, -0.5], [5.0, -2.5]]


def test_scaled_linear_starts_with_unit_scales_so_it_equals_the_stage1_linear():
    lin = _linear(W, B)
    head = ScaledLinear(lin)
    assert head.scales.tolist() == [1.0, 1.0]
    assert head(torch.tensor(X)).tolist() == [[3.5, 1.0], [2.5, 5.0]]


def test_scaled_linear_only_parameter_is_scales_weight_and_bias_are_buffers():
    head = _scaled()
    assert [name for name, _ in head.named_parameters()] == ["scales"]
    buffers = dict(head.named_buffers())
    assert set(buffers) == {"weight", "bias"}
    assert not buffers["weight"].requires_grad and not buffers["bias"].requires_grad
    assert set(head.state_dict()) == {"weight", "bias", "scales"}


def test_scaled_linear_copies_the_stage1_weights_instead_of_sharing_them():
    lin = _linear(W, B)
    head = ScaledLinear(lin)
    with torch.no_grad():
        lin.weight.fill_(100.0)
        lin.bias.fill_(100.0)
    assert head.weight.tolist() == W and head.bias.tolist() == B


def test_training_scaled_linear_changes_only_the_scales():
    head = _scaled()
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    loss = head(torch.tensor(X)).sum()
    loss.backward()
    # d(sum)/ds_c = sum over samples of (w_c.x + b_c): class 0: 3.5 + 2.5 = 6, class 1: 1 + 5 = 6
    assert head.scales.grad.tolist() == [6.0, 6.0]
    opt.step()
    assert head.scales.tolist() == pytest.approx([2.0 - 0.6, -0.5 - 0.6])
    assert head.weight.tolist() == W and head.bias.tolist() == B


def test_to_linear_folds_scales_into_weight_and_bias():
    lin = _scaled().to_linear()
    assert type(lin) is nn.Linear
    # rows scaled by s = (2, -0.5)
    assert lin.weight.tolist() == [[2.0, 4.0], [-1.5, 0.5]]
    assert lin.bias.tolist() == [1.0, 0.5]


def test_to_linear_gives_identical_outputs():
    head = _scaled((1.7, 0.3))
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(head.to_linear()(x), head(x))


# ---------------------------------------------------------------- tau_normalized

TAU_W = [[3.0, 4.0], [0.0, 2.0]]  # row norms 5 and 2


def test_tau_one_gives_unit_norm_class_weights():
    out = tau_normalized(_linear(TAU_W, [1.0, -2.0]), 1.0)
    torch.testing.assert_close(out.weight, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))


def test_tau_half_divides_each_row_by_the_square_root_of_its_norm():
    out = tau_normalized(_linear(TAU_W, [1.0, -2.0]), 0.5)
    s5, s2 = math.sqrt(5.0), math.sqrt(2.0)
    torch.testing.assert_close(out.weight, torch.tensor([[3.0 / s5, 4.0 / s5], [0.0, 2.0 / s2]]))


def test_tau_zero_keeps_the_weights():
    out = tau_normalized(_linear(TAU_W, [1.0, -2.0]), 0.0)
    assert out.weight.tolist() == TAU_W


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_tau_normalized_drops_the_bias(tau):
    out = tau_normalized(_linear(TAU_W, [1.0, -2.0]), tau)
    assert out.bias.tolist() == [0.0, 0.0]


def test_tau_normalized_logits_are_normalised_weights_times_x_without_bias():
    out = tau_normalized(_linear(TAU_W, [1.0, -2.0]), 1.0)
    # x = (1, 1): (0.6 + 0.8, 0 + 1); with the bias kept it would be (2.4, -1)
    torch.testing.assert_close(out(torch.tensor([[1.0, 1.0]])), torch.tensor([[1.4, 1.0]]))


def test_tau_normalized_leaves_the_stage1_head_unchanged():
    lin = _linear(TAU_W, [1.0, -2.0])
    out = tau_normalized(lin, 1.0)
    assert type(out) is nn.Linear and out is not lin
    assert lin.weight.tolist() == TAU_W and lin.bias.tolist() == [1.0, -2.0]


# ---------------------------------------------------------------- as_linear


def test_as_linear_returns_a_plain_linear_unchanged():
    lin = _linear(W, B)
    assert as_linear(lin) is lin


def test_as_linear_folds_a_scaled_linear():
    out = as_linear(_scaled())
    assert type(out) is nn.Linear
    assert out.weight.tolist() == [[2.0, 4.0], [-1.5, 0.5]]
    assert out.bias.tolist() == [1.0, 0.5]
    assert out(torch.tensor(X)).tolist() == [[7.0, -0.5], [5.0, -2.5]]


# ---- cosine head (stage 1, for LDAM)


def test_cosine_linear_gives_the_cosines_of_features_and_class_vectors():
    head = CosineLinear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))
    out = head(torch.tensor([[1.0, 0.0], [2.0, 2.0]]))
    s = 1 / math.sqrt(2)
    expected = [[0.6, 0.0], [0.6 * s + 0.8 * s, -s]]
    assert torch.allclose(out, torch.tensor(expected), atol=1e-6)


def test_cosine_linear_ignores_feature_and_weight_norms_and_has_no_bias():
    torch.manual_seed(0)
    head = CosineLinear(8, 5)
    assert [name for name, _ in head.named_parameters()] == ["weight"] and head.weight.shape == (5, 8)
    assert torch.allclose(head.weight.norm(dim=1), torch.ones(5), atol=1e-6)  # unit class vectors at init
    x = torch.randn(4, 8)
    out = head(x)
    expected = (x / x.norm(dim=1, keepdim=True)) @ head.weight.detach().T  # cos(x, w_c) of unit w_c, written out
    assert torch.allclose(out, expected, atol=1e-6) and out.abs().max() <= 1.0 + 1e-6
    assert torch.allclose(head(7.5 * x), out, atol=1e-6)
    with torch.no_grad():
        head.weight.mul_(3.0)
    assert torch.allclose(head(x), out, atol=1e-6)
    with torch.no_grad():
        head.weight.mul_(torch.tensor([1.0, 0.5, 2.0, 10.0, 0.2])[:, None])  # a different norm for each class
    assert torch.allclose(head(x), out, atol=1e-6) and torch.allclose(head(0.1 * x), out, atol=1e-6)


def test_build_head_by_name_and_unknown_name_lists_the_valid_ones():
    assert type(build_head("linear", 4, 3)) is nn.Linear and head_name(build_head("linear", 4, 3)) == "linear"
    assert isinstance(build_head("cosine", 4, 3), CosineLinear) and head_name(build_head("cosine", 4, 3)) == "cosine"
    with pytest.raises(ValueError, match="unknown head 'normed'; valid heads: linear, cosine"):
        build_head("normed", 4, 3)


def _ldam_problem():
    """Features of 3 imbalanced classes (60 / 20 / 6), each around its own direction, norm ~10."""
    gen = torch.Generator().manual_seed(0)
    counts = [60, 20, 6]
    centres = 10 * torch.eye(16)[:3]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    feats = centres[labels] + 3 * torch.randn(len(labels), 16, generator=gen)
    return counts, feats, labels


def test_ldam_on_linear_logits_starts_huge_but_on_cosines_is_bounded():
    counts, feats, labels = _ldam_problem()
    loss = build_loss("ldam", counts)  # scale 30, max margin 0.5
    torch.manual_seed(0)
    linear = nn.Linear(16, 3)
    nn.init.kaiming_normal_(linear.weight)  # as ResNet-32 initialises its head
    with torch.no_grad():
        # The cross-entropy of 30 * (cos - margin) is at most 30 * (1 + 1 + 0.5) + log 3.
        assert loss(CosineLinear(16, 3)(feats), labels) <= 30 * 2.5 + math.log(3)
        assert loss(linear(feats), labels) > 100


def test_one_ldam_epoch_on_a_cosine_head_lowers_the_loss():
    counts, feats, labels = _ldam_problem()
    loss = build_loss("ldam", counts, drw_epoch=0)
    loss.set_epoch(0)  # with the deferred re-weighting on
    torch.manual_seed(0)
    head = CosineLinear(16, 3)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    with torch.no_grad():
        before = loss(head(feats), labels).item()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    for batch in order.split(16):  # one epoch of 6 steps
        opt.zero_grad()
        loss(head(feats[batch]), labels[batch]).backward()
        opt.step()
    with torch.no_grad():
        after = loss(head(feats), labels).item()
    assert after < 0.5 * before


def test_deployable_state_folds_lws_into_a_linear_head_and_load_backbone_state_keeps_the_head():
    torch.manual_seed(0)
    trained = build_model("resnet32", 10)
    trained.bn1.running_mean.fill_(0.5)  # a backbone state that differs from a fresh model's
    lws = ScaledLinear(trained.head)
    with torch.no_grad():
        lws.scales.copy_(torch.linspace(0.5, 2.0, 10))
    state = deployable_state(trained, lws)
    x = torch.randn(3, 64)
    torch.testing.assert_close(x @ state["head.weight"].T + state["head.bias"], lws(x))
    assert set(state) == set(trained.state_dict())  # one layout: backbone + plain linear head

    fresh = build_model("resnet32", 10)
    fresh.head = ScaledLinear(fresh.head)
    head_before = {k: v.clone() for k, v in fresh.head.state_dict().items()}
    load_backbone_state(fresh, state, "test")
    assert torch.equal(fresh.bn1.running_mean, trained.bn1.running_mean)
    assert all(torch.equal(head_before[k], v) for k, v in fresh.head.state_dict().items())
