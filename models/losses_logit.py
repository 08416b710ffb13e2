"""Softmax losses that act on the logits by a per-class additive shift.

- ``CrossEntropyLoss``: plain softmax CE (the baseline and the stage-1 loss).
- ``BalancedSoftmaxLoss`` (Ren et al. 2020): CE(z + log n, y).
- ``LogitAdjustLoss`` (Menon et al. 2021): CE(z + tau * log(n / sum n), y); with tau = 1 it
  equals Balanced Softmax exactly, because softmax is invariant to the constant log(sum n).
- ``posthoc_logit_adjust``: the test-time counterpart, z - tau * log prior.
- ``ARBLoss`` (Xie et al. 2023): the shift uses the class counts of the current batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from models.losses_base import REDUCTIONS, LongTailLoss, check_choice, counts_tensor, reduce_batch

# ARB clamps logits before the exp so the count-ratio terms cannot overflow.
ARB_LOGIT_CLAMP = 30.0


def _check_tau(tau: float) -> None:
    if not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number (1.0 = the Bayes-optimal adjustment), got {tau}")


def posthoc_logit_adjust(
    logits: torch.Tensor, class_counts: Sequence[int] | torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """Test-time logit adjustment: logits (B, C) - tau * log(n_c / sum n) -> (B, C)."""
    _check_tau(tau)
    counts = counts_tensor(class_counts, require_positive=True)
    if logits.ndim != 2 or logits.shape[1] != counts.numel():
        raise ValueError(
            f"logits must have shape (batch, {counts.numel()}) to match class_counts, got {tuple(logits.shape)}"
        )
    log_prior = torch.log(counts / counts.sum()).to(device=logits.device, dtype=logits.dtype)
    return logits - tau * log_prior


class CrossEntropyLoss(LongTailLoss):
    """Softmax cross-entropy with optional label smoothing; class counts are not used."""

    def __init__(
        self, class_counts: Sequence[int] | torch.Tensor, label_smoothing: float = 0.0, reduction: str = "mean"
    ) -> None:
        super().__init__(class_counts, require_positive=False)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        check_choice("reduction", reduction, REDUCTIONS)
        self.label_smoothing = label_smoothing
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_inputs(logits, labels)
        per_sample = nn.functional.cross_entropy(
            logits, labels, label_smoothing=self.label_smoothing, reduction="none"
        )
        return reduce_batch(per_sample, self.reduction)


class BalancedSoftmaxLoss(LongTailLoss):
    """Balanced Softmax: CE(z + log n, y); ``reduction="none"`` gives (B,) losses for meta-sampling."""

    def __init__(self, class_counts: Sequence[int] | torch.Tensor, reduction: str = "mean") -> None:
        super().__init__(class_counts, require_positive=True)
        check_choice("reduction", reduction, REDUCTIONS)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_inputs(logits, labels)
        shifted = logits + torch.log(self.class_counts).to(logits.dtype)
        return reduce_batch(nn.functional.cross_entropy(shifted, labels, reduction="none"), self.reduction)


class LogitAdjustLoss(LongTailLoss):
    """Logit-adjusted CE: CE(z + tau * log(n / sum n), y), tau = logit_adjust_tau (the config key's name)."""

    def __init__(self, class_counts: Sequence[int] | torch.Tensor, logit_adjust_tau: float = 1.0) -> None:
        super().__init__(class_counts, require_positive=True)
        _check_tau(logit_adjust_tau)
        self.tau = logit_adjust_tau

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_inputs(logits, labels)
        log_prior = torch.log(self.class_counts / self.class_counts.sum()).to(logits.dtype)
        return nn.functional.cross_entropy(logits + self.tau * log_prior, labels)


class ARBLoss(LongTailLoss):
    """Attraction-repulsion-balanced loss, per sample -log(exp(z_y) / sum_j (m_j / m_y) exp(z_j)).

    m are the label counts of the current batch, so classes absent from the batch drop out
    of the denominator. This equals CE(z + log m, y) with log 0 = -inf, which is how it is
    computed. ``use_global_counts=True`` uses the training-set counts n instead (= Balanced Softmax).
    """

    def __init__(self, class_counts: Sequence[int] | torch.Tensor, use_global_counts: bool = False) -> None:
        # Batch counts never take log 0 for a present label, so zero training counts are only
        # a problem when the global counts are used.
        super().__init__(class_counts, require_positive=use_global_counts)
        self.use_global_counts = use_global_counts

    @property
    def batch_dependent(self) -> bool:
        return not self.use_global_counts

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.micro_batch_loss(logits, labels, labels)

    def micro_batch_loss(self, logits: torch.Tensor, labels: torch.Tensor, batch_labels: torch.Tensor) -> torch.Tensor:
        """LongTailLoss.micro_batch_loss: m are the counts of the whole batch (batch_labels), not the micro-batch's."""
        self.check_inputs(logits, labels)
        clamped = logits.clamp(-ARB_LOGIT_CLAMP, ARB_LOGIT_CLAMP)
        if self.use_global_counts:
            counts = self.class_counts
        else:
            # (C,) label counts of the batch; not bincount, whose output size depends on the labels (a GPU
            # waits for their maximum) and which the meta device (the tests' stand-in for a GPU) lacks. Counted in
            # float32 at least: bfloat16 counts no further than 256, float16 than 2048.
            ones = logits.new_ones(len(batch_labels), dtype=torch.promote_types(logits.dtype, torch.float32))
            counts = ones.new_zeros(self.num_classes).index_add_(0, batch_labels, ones)
        # log 0 = -inf removes absent classes; the true class is always present so each row
        # keeps a finite maximum and log-softmax (and its gradient) stays finite.
        shifted = clamped + torch.log(counts).to(logits.dtype)
        return nn.functional.cross_entropy(shifted, labels) * (len(labels) / len(batch_labels))
