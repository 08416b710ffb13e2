"""Behaviour of the long-tailed losses on fixed tensors, checked against hand / numpy formulas."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from models.losses import LOSSES, build_loss, output_probability, posthoc_logit_adjust
from models.losses_base import EmptyClassError, effective_number_weights

LOGITS = [[2.0, -1.0, 0.5], [0.3, 0.8, -0.4], [-1.2, 0.1, 1.7], [0.0, 0.0, 0.0]]
LABELS = [0, 2, 1, 1]
COUNTS = [100, 20, 5]


def _logits() -> torch.Tensor:
    return torch.tensor(LOGITS, dtype=torch.float64)


def _labels() -> torch.Tensor:
    return torch.tensor(LABELS, dtype=torch.int64)


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _np_ce_per_sample(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -_np_log_softmax(z)[np.arange(len(y)), y]


def _np_sigmoid_focal_per_sample(z: np.ndarray, y: np.ndarray, gamma: float) -> np.ndarray:
    t = np.eye(z.shape[1])[y]
    p = 1.0 / (1.0 + np.exp(-z))
    p_t = np.where(t == 1, p, 1.0 - p)
    return ((1.0 - p_t) ** gamma * -np.log(p_t)).sum(axis=1)


def _value(loss: torch.nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(loss(logits, labels))


# --- class-balanced -------------------------------------------------------------------------


def test_effective_number_weights_for_5000_500_50_at_beta_0999():
    weights = effective_number_weights([5000, 500, 50], beta=0.999)
    expected = [0.12562886279516517, 0.31701682497375954, 2.5573543122310753]
    assert weights.tolist() == pytest.approx(expected, rel=1e-12)


def test_effective_number_weights_beta_zero_are_equal():
    assert effective_number_weights([5000, 500, 50], beta=0.0).tolist() == [1.0, 1.0, 1.0]


def test_effective_number_weights_reject_beta_one():
    with pytest.raises(ValueError, match="beta"):
        effective_number_weights([5, 1], beta=1.0)


def _cb_weights_np(counts: list[int], beta: float) -> np.ndarray:
    w = (1.0 - beta) / (1.0 - beta ** np.array(counts, dtype=np.float64))
    return w * len(counts) / w.sum()


def test_class_balanced_softmax_is_weighted_ce_over_batch_size():
    loss = build_loss("class_balanced", COUNTS, beta=0.99, variant="softmax").double()
    w = _cb_weights_np(COUNTS, 0.99)
    y = np.array(LABELS)
    expected = (w[y] * _np_ce_per_sample(np.array(LOGITS), y)).sum() / len(y)
    assert _value(loss, _logits(), _labels()) == pytest.approx(expected, rel=1e-6)


def test_class_balanced_sigmoid_sums_classes_and_averages_batch():
    loss = build_loss("class_balanced", COUNTS, beta=0.99, variant="sigmoid").double()
    w = _cb_weights_np(COUNTS, 0.99)
    y = np.array(LABELS)
    expected = (w[y] * _np_sigmoid_focal_per_sample(np.array(LOGITS), y, 0.0)).mean()
    assert _value(loss, _logits(), _labels()) == pytest.approx(expected, rel=1e-6)


def test_class_balanced_focal_weights_sigmoid_focal_terms():
    loss = build_loss("class_balanced", COUNTS, beta=0.99, variant="focal", gamma=2.0).double()
    w = _cb_weights_np(COUNTS, 0.99)
    y = np.array(LABELS)
    expected = (w[y] * _np_sigmoid_focal_per_sample(np.array(LOGITS), y, 2.0)).mean()
    assert _value(loss, _logits(), _labels()) == pytest.approx(expected, rel=1e-6)


def test_class_balanced_sigmoid_bias_is_minus_log_c_minus_1_as_cui_et_al_and_softmax_has_none():
    # b = -log(C - 1): every sigmoid starts at probability 1/C (Cui et al.'s code), here C = 3.
    assert build_loss("class_balanced", COUNTS, variant="sigmoid").init_bias() == -math.log(2.0)
    assert build_loss("class_balanced", COUNTS, variant="focal").init_bias() == -0.6931471805599453
    assert build_loss("class_balanced", list(range(1, 11)), variant="sigmoid").init_bias() == -math.log(9.0)
    assert build_loss("focal", COUNTS, form="sigmoid").init_bias() == pytest.approx(-math.log(9.0))  # RetinaNet's 0.1
    assert build_loss("class_balanced", COUNTS, variant="softmax").init_bias() is None
    assert build_loss("ce", COUNTS).init_bias() is None


def test_class_balanced_gamma_only_allowed_for_focal_variant():
    with pytest.raises(ValueError, match="gamma only applies"):
        build_loss("class_balanced", COUNTS, variant="sigmoid", gamma=2.0)


def test_class_balanced_unknown_variant_lists_valid_ones():
    with pytest.raises(ValueError, match="softmax.*sigmoid.*focal"):
        build_loss("class_balanced", COUNTS, variant="tanh")


# --- focal ----------------------------------------------------------------------------------


def test_focal_softmax_gamma_zero_equals_ce_exactly():
    focal = build_loss("focal", COUNTS, gamma=0.0).double()
    ce = build_loss("ce", COUNTS).double()
    assert _value(focal, _logits(), _labels()) == _value(ce, _logits(), _labels())


def test_focal_softmax_gamma_two_on_hand_computed_pair():
    # Sample 1: p_y = 1/2 -> (1/2)^2 * log 2.  Sample 2: p_y = 3/4 -> (1/4)^2 * log(4/3).
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    labels = torch.tensor([1, 0])
    expected = (0.25 * math.log(2.0) + 0.0625 * math.log(4.0 / 3.0)) / 2
    loss = build_loss("focal", [1, 1], gamma=2.0)
    assert _value(loss, logits, labels) == pytest.approx(expected, rel=1e-12)



@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 0.9, 2.0])
def test_focal_softmax_gradient_stays_finite_where_fp32_rounds_the_true_class_probability_to_one(gamma):
    # Sample 0's true logit leads by 20: its fp32 cross-entropy is exactly 0, where (1 - p_y)^gamma has an
    # infinite slope for gamma < 1. The gradient must be the float64 one (no rounding to 0 there).
    logits = torch.tensor([[20.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    labels = torch.tensor([0, 2])
    z32 = logits.clone().requires_grad_()
    loss = build_loss("focal", [10, 5, 2], gamma=gamma)(z32, labels)
    loss.backward()
    z64 = logits.double().requires_grad_()
    ce = nn.functional.cross_entropy(z64, labels, reduction="none")
    assert ce[0] > 0 and nn.functional.cross_entropy(logits, labels, reduction="none")[0] == 0
    ((1 - torch.exp(-ce)) ** gamma * ce).mean().backward()
    assert torch.isfinite(z32.grad).all()
    assert torch.allclose(z32.grad.double(), z64.grad, atol=1e-6)
    assert loss.item() == pytest.approx(((1 - torch.exp(-ce)) ** gamma * ce).mean().item(), rel=1e-6)

def test_focal_sigmoid_form_matches_one_vs_all_formula():
    loss = build_loss("focal", COUNTS, gamma=1.5, form="sigmoid")
    expected = _np_sigmoid_focal_per_sample(np.array(LOGITS), np.array(LABELS), 1.5).mean()
    assert _value(loss, _logits(), _labels()) == pytest.approx(expected, rel=1e-6)


# --- logit shifts ---------------------------------------------------------------------------


def test_balanced_softmax_equals_ce_for_equal_counts():
    bs = build_loss("balanced_softmax", [7, 7, 7])
    ce = build_loss("ce", [7, 7, 7])
    assert _value(bs, _logits(), _labels()) == pytest.approx(_value(ce, _logits(), _labels()), rel=1e-12)


def test_balanced_softmax_is_ce_of_logits_plus_log_counts():
    shifted = np.array(LOGITS) + np.log(np.array(COUNTS, dtype=np.float64))
    expected = _np_ce_per_sample(shifted, np.array(LABELS))
    loss = build_loss("balanced_softmax", COUNTS, reduction="none")
    per_sample = loss(_logits(), _labels())
    assert per_sample.shape == (4,)
    assert per_sample.tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    mean_loss = build_loss("balanced_softmax", COUNTS)
    assert _value(mean_loss, _logits(), _labels()) == pytest.approx(expected.mean(), rel=1e-6)


def test_ce_label_smoothing_mixes_true_class_and_uniform_targets():
    logp = _np_log_softmax(np.array(LOGITS))
    y = np.array(LABELS)
    expected = (0.9 * -logp[np.arange(4), y] + 0.1 * -logp.mean(axis=1)).mean()
    loss = build_loss("ce", COUNTS, label_smoothing=0.1)
    assert _value(loss, _logits(), _labels()) == pytest.approx(expected, rel=1e-6)


def test_logit_adjust_tau_one_equals_balanced_softmax():
    la = build_loss("logit_adjust", COUNTS, logit_adjust_tau=1.0).double()
    bs = build_loss("balanced_softmax", COUNTS).double()
    assert _value(la, _logits(), _labels()) == pytest.approx(_value(bs, _logits(), _labels()), rel=1e-12)


def test_logit_adjust_tau_half_shifts_by_half_log_prior():
    prior = np.array(COUNTS, dtype=np.float64) / sum(COUNTS)
    expected = _np_ce_per_sample(np.array(LOGITS) + 0.5 * np.log(prior), np.array(LABELS)).mean()
    loss = build_loss("logit_adjust", COUNTS, logit_adjust_tau=0.5)
    assert _value(loss, _logits(), _labels()) == pytest.approx(expected, rel=1e-6)


def test_posthoc_logit_adjust_subtracts_tau_log_prior():
    adjusted = posthoc_logit_adjust(torch.zeros(1, 2, dtype=torch.float64), [3, 1], tau=2.0)
    assert adjusted.tolist()[0] == pytest.approx([-2 * math.log(0.75), -2 * math.log(0.25)], rel=1e-12)


# --- ARB ------------------------------------------------------------------------------------


def test_arb_with_global_counts_equals_balanced_softmax():
    arb = build_loss("arb", COUNTS, use_global_counts=True).double()
    bs = build_loss("balanced_softmax", COUNTS).double()
    assert _value(arb, _logits(), _labels()) == pytest.approx(_value(bs, _logits(), _labels()), rel=1e-12)


def test_arb_batch_counts_drop_absent_class_from_denominator():
    # Batch counts m = [2, 1, 0]; class 2 is absent, so its large logit must not matter.
    logits = torch.tensor([[0.0, 0.0, 5.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    e = math.e
    expected = (math.log(1.5) + math.log(1 + 0.5 / e) + math.log(1 + 2 / e)) / 3
    value = build_loss("arb", [50, 10, 1])(logits, labels)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    value.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[:, 2].tolist() == [0.0, 0.0, 0.0]


def test_arb_micro_batches_take_the_whole_batch_s_counts_and_their_share_of_its_images():
    """Gradient accumulation: each part uses m of the whole batch [2, 1, 0] and carries (its images) / 3 of the mean."""
    logits = torch.tensor([[0.0, 0.0, 5.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    e = math.e
    arb = build_loss("arb", [50, 10, 1])
    first = arb.micro_batch_loss(logits[:2], labels[:2], labels).item()
    last = arb.micro_batch_loss(logits[2:], labels[2:], labels).item()
    assert first == pytest.approx((math.log(1.5) + math.log(1 + 0.5 / e)) / 3, rel=1e-12)
    assert last == pytest.approx(math.log(1 + 2 / e) / 3, rel=1e-12)
    assert first + last == pytest.approx(arb(logits, labels).item(), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_arb_counts_a_batch_s_labels_exactly_when_the_logits_are_half_precision(dtype):
    """20000 labels of class 0 and 12 of class 1: bfloat16 stops counting at 256 and float16 at 2048 (a loss 15 and
    2.4 times too large), so the batch counts are summed in float32 and only their log is cast to the logits' dtype
    (bfloat16's log 20000 is 0.06 off: within 25 %)."""
    labels = torch.tensor([0] * 20000 + [1] * 12)
    logits = torch.zeros(len(labels), 2)
    logits[:, 1] = 0.5
    arb = build_loss("arb", [1, 1])
    m = torch.tensor([20000.0, 12.0]).log()
    expected = nn.functional.cross_entropy(logits + m, labels).item()
    assert arb(logits.to(dtype), labels).item() == pytest.approx(expected, rel=0.25)
    assert arb(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_arb_clamps_logits_to_30():
    labels = torch.tensor([0, 1])
    big = torch.tensor([[100.0, 0.0], [0.0, -100.0]], dtype=torch.float64)
    at_clamp = torch.tensor([[30.0, 0.0], [0.0, -30.0]], dtype=torch.float64)
    arb = build_loss("arb", [1, 1])
    assert _value(arb, big, labels) == _value(arb, at_clamp, labels)
    # Sample 2 (y=1, m = [1, 1]): -(-30) + log(e^0 + e^-30).
    expected = (math.log(1 + math.exp(-30)) + 30 + math.log(1 + math.exp(-30))) / 2
    assert _value(arb, big, labels) == pytest.approx(expected, rel=1e-12)


# --- LDAM / DRW -----------------------------------------------------------------------------


def test_ldam_margins_follow_inverse_fourth_root_with_max_half():
    # n^(-1/4) = [0.1, 0.2, 0.5]; the largest is already 0.5.
    loss = build_loss("ldam", [10000, 625, 16])
    assert loss.margins.tolist() == pytest.approx([0.1, 0.2, 0.5], rel=1e-6)
    assert build_loss("ldam", [10000, 625, 16], max_margin=1.0).margins.tolist() == pytest.approx(
        [0.2, 0.4, 1.0], rel=1e-6
    )


def test_ldam_loss_on_one_sample():
    # y = 1: z - m = [0.2, 0.1 - 0.2, 0.0], times 30 = [6, -3, 0].
    logits = torch.tensor([[0.2, 0.1, 0.0]], dtype=torch.float64)
    expected = 3.0 + math.log(math.exp(6.0) + math.exp(-3.0) + 1.0)
    loss = build_loss("ldam", [10000, 625, 16]).double()
    assert _value(loss, logits, torch.tensor([1])) == pytest.approx(expected, rel=1e-6)


def test_ldam_drw_weights_switch_on_at_drw_epoch():
    counts = [10000, 625, 16]
    loss = build_loss("ldam", counts, drw_epoch=2).double()
    logits, labels = _logits(), _labels()
    margins = np.array([0.1, 0.2, 0.5])
    y = np.array(LABELS)
    z = 30.0 * (np.array(LOGITS) - np.eye(3)[y] * margins[y][:, None])
    per_sample = _np_ce_per_sample(z, y)
    w = [0.007374335344607821, 0.07693702584006975, 2.9156886388153224]  # beta = 0.9999, sum 3
    # F.cross_entropy(weight=w) as the LDAM code: sum_i w_i l_i / sum_i w_i, not a mean over the batch.
    weighted = (np.array(w)[y] * per_sample).sum() / np.array(w)[y].sum()
    reference = nn.functional.cross_entropy(torch.tensor(z), labels, weight=torch.tensor(w, dtype=torch.float64))
    assert weighted == pytest.approx(reference.item(), rel=1e-12)
    loss.set_epoch(0)
    assert _value(loss, logits, labels) == pytest.approx(per_sample.mean(), rel=1e-6)
    loss.set_epoch(1)
    assert _value(loss, logits, labels) == pytest.approx(per_sample.mean(), rel=1e-6)
    loss.set_epoch(2)
    assert _value(loss, logits, labels) == pytest.approx(weighted, rel=1e-6)
    loss.set_epoch(5)
    assert _value(loss, logits, labels) == pytest.approx(weighted, rel=1e-6)


def test_ldam_without_drw_never_reweights():
    loss = build_loss("ldam", [10000, 625, 16]).double()
    before = _value(loss, _logits(), _labels())
    loss.set_epoch(1000)
    assert _value(loss, _logits(), _labels()) == before


# --- reweight -------------------------------------------------------------------------------


def test_reweight_weights_inverse_and_inverse_sqrt_frequency():
    # n = [100, 25]: n^-1 = [0.01, 0.04] -> [0.4, 1.6]; n^-0.5 = [0.1, 0.2] -> [2/3, 4/3].
    assert build_loss("reweight", [100, 25]).class_weights.tolist() == pytest.approx([0.4, 1.6], rel=1e-6)
    assert build_loss("reweight", [100, 25], power=0.5).class_weights.tolist() == pytest.approx(
        [2 / 3, 4 / 3], rel=1e-6
    )


def test_reweight_loss_is_weighted_ce_over_batch_size():
    # p_y = 1/2, 3/4, 1/4; weights 1.6 + 0.4 + 0.4 = 2.4: dividing by their sum instead of 3 gives 5/4 of this.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)]], dtype=torch.float64)
    labels = torch.tensor([1, 0, 0])
    expected = (1.6 * math.log(2.0) + 0.4 * math.log(4.0 / 3.0) + 0.4 * math.log(4.0)) / 3
    assert _value(build_loss("reweight", [100, 25]).double(), logits, labels) == pytest.approx(expected, rel=1e-6)


# --- mixup, registry, errors ----------------------------------------------------------------


def test_lam_weighted_balanced_softmax_of_two_label_sets_is_the_lam_weighted_formula():
    # The loss side of mixup; train_one_epoch's mixing: tests/engine/test_loop.py::test_mixup_loss_is_lam_...
    y_a, y_b, lam = np.array(LABELS), np.array([2, 0, 0, 1]), 0.3
    shifted = np.array(LOGITS) + np.log(np.array(COUNTS, dtype=np.float64))
    expected = lam * _np_ce_per_sample(shifted, y_a).mean() + (1 - lam) * _np_ce_per_sample(shifted, y_b).mean()
    loss = build_loss("balanced_softmax", COUNTS)
    mixed = lam * loss(_logits(), torch.from_numpy(y_a)) + (1 - lam) * loss(_logits(), torch.from_numpy(y_b))
    assert float(mixed) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_builds_from_counts_alone_and_gives_finite_scalar(name):
    loss = build_loss(name, COUNTS)
    loss.set_epoch(3)
    value = loss(_logits().float(), _labels())
    assert value.shape == () and torch.isfinite(value)


def test_class_counts_are_float_buffers():
    loss = build_loss("balanced_softmax", COUNTS)
    assert loss.class_counts.dtype == torch.float32
    assert "class_counts" in dict(loss.named_buffers())
    assert loss.class_counts.tolist() == [100.0, 20.0, 5.0]


def test_unknown_loss_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown loss 'cross_entropy'.*balanced_softmax"):
        build_loss("cross_entropy", COUNTS)


def test_unknown_param_names_param_and_valid_ones():
    with pytest.raises(ValueError, match="unknown param 'gama' for loss 'focal'.*gamma.*form"):
        build_loss("focal", COUNTS, gama=2.0)


def test_zero_class_count_rejected_for_log_count_losses():
    with pytest.raises(EmptyClassError, match=r"classes with none: 1 \(1 of 3\)$"):
        build_loss("balanced_softmax", [10, 0, 3])
    with pytest.raises(EmptyClassError, match=r"classes with none: 1, 2, 3, 4, 5, \.\.\. \(7 of 8\)$"):
        build_loss("ldam", [10] + [0] * 7)


def test_logits_with_wrong_class_dimension_rejected():
    with pytest.raises(ValueError, match=r"shape \(batch, 3\)"):
        build_loss("ce", COUNTS)(torch.zeros(2, 4), torch.tensor([0, 1]))


def test_unknown_reduction_rejected():
    with pytest.raises(ValueError, match="reduction"):
        build_loss("ce", COUNTS, reduction="sum")


@pytest.mark.parametrize("name, params", [(name, {}) for name in sorted(LOSSES)] + [
    ("class_balanced", {"variant": "sigmoid"}), ("class_balanced", {"variant": "focal"}),
    ("focal", {"form": "sigmoid"}), ("ldam", {"drw_epoch": 2})])
def test_every_loss_runs_forward_and_backward_without_float64_on_the_device(no_float64_on_meta, name, params):
    """MPS (Apple GPUs) has no float64: the losses' buffers (counts, weights, margins), forward pass and
    gradient stay in float32 on the device (the meta device stands in for it)."""
    loss = build_loss(name, COUNTS, **params).to("meta")
    loss.set_epoch(3)
    logits = _logits().float().to("meta").requires_grad_()
    loss(logits, _labels().to("meta")).backward()
    assert logits.grad.shape == logits.shape and logits.grad.dtype == torch.float32


@pytest.mark.parametrize("name, params", [
    ("ce", {}), ("balanced_softmax", {}), ("ldam", {}), ("focal", {}), ("focal", {"form": "softmax"}),
    ("focal", {"form": "sigmoid"}), ("class_balanced", {}), ("class_balanced", {"variant": "softmax"}),
    ("class_balanced", {"variant": "sigmoid"}), ("class_balanced", {"variant": "focal"}),
])
def test_a_loss_s_output_probability_is_sigmoid_exactly_when_it_fits_one_vs_all_sigmoids(name, params):
    # The sigmoid forms are the ones whose head starts from the one-vs-all prior bias (RetinaNet's init).
    sigmoid = build_loss(name, COUNTS, **params).init_bias() is not None
    assert output_probability(name, {**params, "unrelated": None}) == ("sigmoid" if sigmoid else "softmax")


@pytest.mark.parametrize("variant", ["sigmoid", "focal"])
def test_class_balanced_sigmoid_variants_refuse_a_single_class_whose_prior_bias_is_log_0(variant):
    with pytest.raises(ValueError, match=rf"^variant='{variant}' starts each class's sigmoid at the prior 1/C, which "
                                         r"needs at least 2 classes, and the training set has 1$"):
        build_loss("class_balanced", [7], variant=variant)
    assert build_loss("class_balanced", [7]).init_bias() is None  # softmax: no bias, one class trains
