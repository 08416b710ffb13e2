"""Shared plumbing for the long-tailed classification losses.

Every loss is built as ``Cls(class_counts, **params)`` and called as
``loss(logits (B, C), labels (B,) int64)``. This module holds the base class that
stores the training-set class counts as a float buffer (so ``.to(device)`` moves
them), the per-epoch and bias-init hooks the training loop relies on, and the
class-weight formulas several losses share.

Weighted losses in this package reduce as ``sum_i w[y_i] * l_i / B`` (a plain batch
mean of weighted per-sample losses, as in Cui et al.'s TF code), not PyTorch's
``F.cross_entropy(weight=...)`` convention ``sum_i w[y_i] * l_i / sum_i w[y_i]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from data.long_tail import few_classes

REDUCTIONS = ("mean", "none")


class EmptyClassError(ValueError):
    """A loss over log or inverse class counts given a class with no training image."""


def counts_tensor(class_counts: Sequence[int] | torch.Tensor, require_positive: bool) -> torch.Tensor:
    """Validate per-class training counts and return them as a float64 (C,) tensor.

    ``require_positive`` is set by losses that take log n or 1/n of the counts.
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64).detach().cpu()
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(
            f"class_counts must be a non-empty 1-D sequence (one count per class), got shape {tuple(counts.shape)}"
        )
    if not bool(torch.isfinite(counts).all()) or bool((counts != counts.round()).any()):
        raise ValueError(f"class_counts must be whole numbers of images, got {counts.tolist()}")
    if bool((counts < 0).any()):
        raise ValueError(f"class_counts must be >= 0, got {counts.tolist()}")
    if require_positive and bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise EmptyClassError(f"this loss uses log or inverse class counts, so every class needs a training image; "
                              f"classes with none: {few_classes(empty)} ({len(empty)} of {counts.numel()})")
    return counts


def effective_number_weights(class_counts: Sequence[int] | torch.Tensor, beta: float) -> torch.Tensor:
    """Cui et al. 2019 class weights w_c = (1 - beta) / (1 - beta^n_c), rescaled so sum_c w_c = C.

    Returns a float64 (C,) tensor. beta = 0 gives equal weights; beta -> 1 tends to inverse frequency.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1) (0 = equal weights, ~0.9999 = strong re-weighting), got {beta}")
    counts = counts_tensor(class_counts, require_positive=True)
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return weights * (counts.numel() / weights.sum())


def inverse_frequency_weights(class_counts: Sequence[int] | torch.Tensor, power: float) -> torch.Tensor:
    """w_c proportional to n_c^(-power), rescaled so sum_c w_c = C; float64 (C,)."""
    if not (math.isfinite(power) and power >= 0.0):
        raise ValueError(f"power must be a finite number >= 0 (1 = inverse frequency, 0.5 = inverse sqrt), got {power}")
    counts = counts_tensor(class_counts, require_positive=True)
    weights = counts.pow(-power)
    return weights * (counts.numel() / weights.sum())


def check_choice(param: str, value: str, valid: Sequence[str]) -> None:
    """Raise a ValueError naming ``param`` and its valid values if ``value`` is not one of them."""
    if value not in valid:
        raise ValueError(f"unknown {param} {value!r}; valid values: {list(valid)}")


def reduce_batch(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B,) per-sample losses -> scalar batch mean ("mean") or unchanged ("none")."""
    return per_sample.mean() if reduction == "mean" else per_sample


def sigmoid_focal_per_sample(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample one-vs-all sigmoid focal loss summed over classes: (B, C), (B,) -> (B,).

    Each class term is (1 - p_t)^gamma * BCE(z, t), t the one-hot target, p_t the sigmoid
    probability of the target value. gamma = 0 is plain summed sigmoid BCE.
    """
    targets = nn.functional.one_hot(labels, logits.shape[1]).to(logits.dtype)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    # (1 - p_t)^gamma = exp(-gamma * (t * z + log(1 + exp(-z)))), stable for large |z|.
    modulator = torch.exp(-gamma * (targets * logits + nn.functional.softplus(-logits)))
    return (modulator * bce).sum(dim=1)


def prior_bias(prior: float) -> float:
    """Classifier bias b = -log((1 - pi) / pi) so every sigmoid starts at probability pi."""
    return -math.log((1.0 - prior) / prior)


class LongTailLoss(nn.Module):
    """Base class: stores class counts as a float buffer and provides the default hooks.

    Subclasses implement ``forward(logits (B, C), labels (B,) int64)``.
    """

    def __init__(self, class_counts: Sequence[int] | torch.Tensor, require_positive: bool) -> None:
        super().__init__()
        self.class_counts: torch.Tensor
        self.register_buffer("class_counts", counts_tensor(class_counts, require_positive).float())

    @property
    def num_classes(self) -> int:
        """Number of classes C the loss was built for."""
        return self.class_counts.numel()

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop at each epoch start; stateless losses ignore it."""

    def init_bias(self) -> float | None:
        """Initial value for the classifier bias, or None to keep the head's default init."""
        return None

    @property
    def batch_dependent(self) -> bool:
        """Whether an image's loss depends on the other labels of its batch (LDAM's DRW weight sum, arb's class
        counts): under torchrun every rank then needs the whole global batch's labels for micro_batch_loss."""
        return False

    def micro_batch_loss(self, logits: torch.Tensor, labels: torch.Tensor, batch_labels: torch.Tensor) -> torch.Tensor:
        """The part of the loss of a whole batch (labels batch_labels) that its micro-batch (logits, labels)
        carries: the parts of a batch's micro-batches add up to the batch's loss, so that gradient accumulation
        (train.accum_steps) takes the batch's step. For a mean over the batch's images, the micro-batch's mean
        times its share of the images; a loss that divides by something else overrides it (LDAM with DRW)."""
        return self(logits, labels) * (len(labels) / len(batch_labels))

    def check_inputs(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Raise a ValueError if logits / labels do not have shapes (B, C) / (B,) for this loss."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must have shape (batch, {self.num_classes}) for the {self.num_classes} class counts "
                f"the loss was built with, got {tuple(logits.shape)}"
            )
        if labels.ndim != 1 or labels.shape[0] != logits.shape[0] or labels.dtype != torch.int64:
            raise ValueError(
                f"labels must be an int64 tensor of shape ({logits.shape[0]},) matching the logits, "
                f"got dtype {labels.dtype} and shape {tuple(labels.shape)}"
            )
