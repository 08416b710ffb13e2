"""Loss registry: choose a long-tailed classification loss by name.

Every loss is built as ``Cls(class_counts, **params)`` and called as
``loss(logits (B, C), labels (B,) int64) -> scalar``. All of them expose
``set_epoch(epoch)`` (call at each epoch start) and ``init_bias() -> float | None``
(a classifier-bias init the head should use, or None). Mixup is composed by the caller
as ``lam * loss(z, y_a) + (1 - lam) * loss(z, y_b)``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch

from models.losses_base import EmptyClassError, LongTailLoss
from models.losses_logit import ARBLoss, BalancedSoftmaxLoss, CrossEntropyLoss, LogitAdjustLoss, posthoc_logit_adjust
from models.losses_weighted import ClassBalancedLoss, FocalLoss, LDAMLoss, ReweightLoss

__all__ = ["LOSSES", "EmptyClassError", "LongTailLoss", "build_loss", "output_probability", "posthoc_logit_adjust",
           "training_logit_scale", "training_probability"]

logger = logging.getLogger(__name__)

LOSSES: dict[str, type[LongTailLoss]] = {
    "ce": CrossEntropyLoss,
    "balanced_softmax": BalancedSoftmaxLoss,
    "logit_adjust": LogitAdjustLoss,
    "class_balanced": ClassBalancedLoss,
    "focal": FocalLoss,
    "reweight": ReweightLoss,
    "ldam": LDAMLoss,
    "arb": ARBLoss,
}


# Losses that fit each class's logit by its own sigmoid (one-vs-all) rather than a softmax over the classes, by the
# parameter that chooses it and its sigmoid values: what a trained model's probabilities are (predict.py).
SIGMOID_CHOICES: dict[str, tuple[str, tuple[str, ...]]] = {
    "focal": ("form", ("sigmoid",)),
    "class_balanced": ("variant", ("sigmoid", "focal")),
}


def output_probability(name: str, params: dict[str, Any]) -> str:
    """"sigmoid" or "softmax": how loss `name` with `params` (None or absent = its default) maps logits to the class
    probabilities it fits."""
    param, sigmoid_values = SIGMOID_CHOICES.get(name, ("", ()))
    return "sigmoid" if params.get(param) in sigmoid_values else "softmax"


def training_logit_scale(ckpt: dict) -> float | None:
    """The factor checkpoint `ckpt`'s training loss multiplied the logits by before its softmax, so that the
    probabilities (predict.py) and the post-hoc logit adjustment (--test) act on the logits training fitted:
    loss.scale for ldam (its default, 30, when unset), else 1; stage 2's config has no loss (its linear head
    learns from plain logits). None for a cosine head without a training config (an import): no scale is
    recorded, and 1 would squeeze the cosines' softmax towards uniform (each of 10 classes about 0.1)."""
    head = ckpt["model_args"].get("head", "linear")
    if ckpt["config"] is None:
        return None if head == "cosine" else 1.0  # foreign linear heads: trained on plain logits
    loss = ckpt["config"].get("loss") or {}
    if loss.get("scale") is not None:
        return float(loss["scale"])
    default = inspect.signature(LOSSES[loss["name"]]).parameters.get("scale") if loss.get("name") in LOSSES else None
    return float(default.default) if default is not None else 1.0


def training_probability(ckpt: dict) -> str:
    """"sigmoid" when the stage-1 loss fitted each class's logit by a sigmoid, else "softmax" (stage 2's
    methods, imports)."""
    loss = (ckpt["config"] or {}).get("loss") or {}
    return output_probability(loss["name"], loss) if loss.get("name") in LOSSES else "softmax"


def loss_params(name: str) -> list[str]:
    """The parameters loss `name` takes besides the class counts (its __init__'s, in order)."""
    return [p for p in inspect.signature(LOSSES[name].__init__).parameters if p not in ("self", "class_counts")]


def build_loss(name: str, class_counts: Sequence[int] | torch.Tensor, **params: Any) -> LongTailLoss:
    """Build the loss registered as ``name`` for the given training-set class counts.

    Raises ValueError for an unknown name or a parameter the loss does not take.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {sorted(LOSSES)}")
    cls, valid = LOSSES[name], loss_params(name)
    for param in params:
        if param not in valid:
            raise ValueError(f"unknown param {param!r} for loss {name!r}; valid params: {valid}")
    logger.info("building loss %r with params %s", name, params)
    return cls(class_counts, **params)
