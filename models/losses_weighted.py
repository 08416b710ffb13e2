"""Losses that re-weight samples by class or by difficulty, or add per-class margins.

- ``ClassBalancedLoss`` (Cui et al. 2019): effective-number weights on softmax CE, sigmoid
  BCE or sigmoid focal loss.
- ``FocalLoss`` (Lin et al. 2017): softmax or one-vs-all sigmoid form.
- ``ReweightLoss``: CE weighted by n_c^(-power).
- ``LDAMLoss`` (Cao et al. 2019): label-distribution-aware margins, optionally with deferred
  re-weighting (DRW) switched on by ``set_epoch``.

Normalisation: every loss here returns sum_i w[y_i] * l_i / B, where l_i is the per-sample
loss and, for the sigmoid forms, l_i is the SUM over the C one-vs-all terms. This matches
Cui et al.'s TF code, which divides the summed sigmoid / focal loss by the number of
positive targets (= B for one-hot labels) and uses tf.losses.softmax_cross_entropy with
per-sample weights (also divided by B). The widely used PyTorch port (vandit15) matches
this for "focal" but averages its "sigmoid" variant over B * C, i.e. C times smaller. The
official LDAM-DRW code divides the weighted CE by sum_i w[y_i] instead of B.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from models.losses_base import (
    LongTailLoss,
    check_choice,
    effective_number_weights,
    inverse_frequency_weights,
    prior_bias,
    sigmoid_focal_per_sample,
)

CB_VARIANTS = ("softmax", "sigmoid", "focal")
FOCAL_FORMS = ("softmax", "sigmoid")
# Cui et al. start every sigmoid at probability 0.1 so the C - 1 negative terms do not
# dominate the first updates.
SIGMOID_PRIOR = 0.1
# Cao et al. use class-balanced weights with this beta for the DRW phase.
DRW_BETA = 0.9999
# Used for ClassBalancedLoss(variant="focal") when gamma is not given.
DEFAULT_CB_GAMMA = 1.0


def _check_gamma(gamma: float) -> None:
    if not (math.isfinite(gamma) and gamma >= 0.0):
        raise ValueError(f"gamma must be a finite number >= 0 (0 = no focusing), got {gamma}")


class ClassBalancedLoss(LongTailLoss):
    """Class-balanced loss: per-sample loss times w[y], w = effective-number weights (sum = C).

    ``variant``: "softmax" (CE), "sigmoid" (one-vs-all BCE summed over classes) or "focal"
    (sigmoid focal loss with ``gamma``, default 1.0; gamma is rejected for the other variants).
    """

    def __init__(
        self,
        class_counts: Sequence[int] | torch.Tensor,
        beta: float = 0.9999,
        variant: str = "softmax",
        gamma: float | None = None,
    ) -> None:
        super().__init__(class_counts, require_positive=True)
        check_choice("variant", variant, CB_VARIANTS)
        if gamma is not None and variant != "focal":
            raise ValueError(f"gamma only applies to variant='focal', got gamma={gamma} with variant={variant!r}")
        if variant != "softmax" and self.num_classes < 2:  # init_bias's prior 1/C: -log(C - 1)
            raise ValueError(f"variant={variant!r} starts each class's sigmoid at the prior 1/C, which needs at "
                             f"least 2 classes, and the training set has {self.num_classes}")
        self.gamma = DEFAULT_CB_GAMMA if gamma is None else gamma
        _check_gamma(self.gamma)
        self.variant = variant
        self.class_weights: torch.Tensor
        self.register_buffer("class_weights", effective_number_weights(class_counts, beta).float())

    def init_bias(self) -> float | None:
        """-log(C - 1) for the sigmoid variants (prior pi = 1/C, as Cui et al.'s code), None for softmax.
        The caller keeps this bias out of weight decay, as their code does."""
        return None if self.variant == "softmax" else -math.log(self.num_classes - 1)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_inputs(logits, labels)
        if self.variant == "softmax":
            per_sample = nn.functional.cross_entropy(logits, labels, reduction="none")
        else:
            gamma = self.gamma if self.variant == "focal" else 0.0
            per_sample = sigmoid_focal_per_sample(logits, labels, gamma)
        return (self.class_weights.to(logits.dtype)[labels] * per_sample).mean()


class FocalLoss(LongTailLoss):
    """Focal loss, unweighted; ``form="softmax"``: (1 - p_y)^gamma * CE, ``"sigmoid"``: summed one-vs-all.

    With gamma = 0 the softmax form is exactly CE and the sigmoid form is summed sigmoid BCE.
    """

    def __init__(self, class_counts: Sequence[int] | torch.Tensor, gamma: float = 1.0, form: str = "softmax") -> None:
        super().__init__(class_counts, require_positive=False)
        _check_gamma(gamma)
        check_choice("form", form, FOCAL_FORMS)
        self.gamma = gamma
        self.form = form

    def init_bias(self) -> float | None:
        """-log((1 - pi) / pi) with pi = 0.1 for the sigmoid form, None for softmax."""
        return prior_bias(SIGMOID_PRIOR) if self.form == "sigmoid" else None

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_inputs(logits, labels)
        if self.form == "sigmoid":
            return sigmoid_focal_per_sample(logits, labels, self.gamma).mean()
        ce = nn.functional.cross_entropy(logits, labels, reduction="none")
        # 1 - p_y = 1 - exp(-ce) = -expm1(-ce), accurate when p_y is close to 1. It is exactly 0 once the
        # true logit leads by about 17 (fp32), where x^gamma's slope is infinite for gamma < 1 and autograd's
        # inf * 0 made the weights NaN: the power is taken of 1 there and replaced by 0^gamma, so those
        # samples' gradient is 0 (the limit) and the others' unchanged.
        p_rest = -torch.expm1(-ce)
        positive = p_rest > 0
        modulator = torch.where(positive, torch.where(positive, p_rest, 1.0).pow(self.gamma), 0.0 ** self.gamma)
        return (modulator * ce).mean()


class ReweightLoss(LongTailLoss):
    """CE weighted by w_c proportional to n_c^(-power) (1 = inverse frequency, 0.5 = inverse sqrt), sum_c w_c = C."""

    def __init__(self, class_counts: Sequence[int] | torch.Tensor, power: float = 1.0) -> None:
        super().__init__(class_counts, require_positive=True)
        self.class_weights: torch.Tensor
        self.register_buffer("class_weights", inverse_frequency_weights(class_counts, power).float())

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_inputs(logits, labels)
        per_sample = nn.functional.cross_entropy(logits, labels, reduction="none")
        return (self.class_weights.to(logits.dtype)[labels] * per_sample).mean()


class LDAMLoss(LongTailLoss):
    """LDAM: CE(scale * (z - m_y * onehot(y)), y) with m_c proportional to n_c^(-1/4), max m_c = max_margin.

    With ``drw_epoch`` set, from that epoch on (via ``set_epoch``) each sample's loss is
    weighted by the class-balanced weight of its class (beta = 0.9999, sum_c w_c = C), and the
    batch's loss is their weighted mean, sum_i w_i l_i / sum_i w_i (as F.cross_entropy(weight=w)).
    """

    def __init__(
        self,
        class_counts: Sequence[int] | torch.Tensor,
        max_margin: float = 0.5,
        scale: float = 30.0,
        drw_epoch: int | None = None,
    ) -> None:
        super().__init__(class_counts, require_positive=True)
        if not (math.isfinite(max_margin) and max_margin > 0):
            raise ValueError(f"max_margin must be a finite number > 0 (Cao et al. use 0.5), got {max_margin}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0 (Cao et al. use 30), got {scale}")
        if drw_epoch is not None and (isinstance(drw_epoch, bool) or not isinstance(drw_epoch, int) or drw_epoch < 0):
            raise ValueError(f"drw_epoch must be None (no re-weighting) or an epoch index >= 0, got {drw_epoch!r}")
        self.scale = scale
        self.drw_epoch = drw_epoch
        self.drw_active = False
        inv_quarter = self.class_counts.double().pow(-0.25)
        self.margins: torch.Tensor
        self.register_buffer("margins", (inv_quarter * (max_margin / inv_quarter.max())).float())
        self.drw_weights: torch.Tensor | None
        drw = None if drw_epoch is None else effective_number_weights(class_counts, DRW_BETA).float()
        self.register_buffer("drw_weights", drw)

    def set_epoch(self, epoch: int) -> None:
        """Switch the DRW weights on for epoch >= drw_epoch (epochs counted as the loop counts them)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.drw_active = self.drw_epoch is not None and epoch >= self.drw_epoch

    @property
    def batch_dependent(self) -> bool:
        return self.drw_active and self.drw_weights is not None

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.micro_batch_loss(logits, labels, labels)

    def micro_batch_loss(self, logits: torch.Tensor, labels: torch.Tensor, batch_labels: torch.Tensor) -> torch.Tensor:
        """LongTailLoss.micro_batch_loss: with DRW on, the micro-batch's weighted sum over the whole batch's
        sum of weights (its share of the images would not add up to the batch's weighted mean)."""
        self.check_inputs(logits, labels)
        true_class = nn.functional.one_hot(labels, self.num_classes).to(logits.dtype)  # (B, C)
        margin = self.margins.to(logits.dtype)[labels].unsqueeze(1)  # (B, 1)
        per_sample = nn.functional.cross_entropy(
            self.scale * (logits - margin * true_class), labels, reduction="none"
        )
        if self.drw_active and self.drw_weights is not None:
            # F.cross_entropy(weight=w), as the LDAM code: the weighted mean divides by the batch's sum of weights.
            weights = self.drw_weights.to(logits.dtype)
            return (weights[labels] * per_sample).sum() / weights[batch_labels].sum()
        return per_sample.mean() * (len(labels) / len(batch_labels))
