"""tau-normalisation (Kang et al. 2020): the post-hoc stage-2 method, tau chosen on validation features."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from engine.loop import metrics_from_logits
from models.heads import tau_normalized


def tau_search(stage1_head: nn.Linear, val_feats: torch.Tensor, val_labels: torch.Tensor,
               counts: Sequence[int], grid: Sequence[float], metric: str) -> tuple[float, list[dict]]:
    """Best tau on the validation features (N, D) (the first of equals), and one record per tau.

    A metric with no classes (None) ranks below any score. Scores are compared to 12 decimals: a group's score is
    a float mean of class accuracies, and two equal means can differ in their last bit (0.15 and
    0.15000000000000002), which would let a later tau win a tie.
    """
    records = []
    for tau in grid:
        with torch.no_grad():
            m = metrics_from_logits(tau_normalized(stage1_head, tau)(val_feats).cpu(), val_labels.cpu(), counts)
        records.append({"tau": tau, **{f"val_{k}": m[k] for k in ("top1", "many", "medium", "few")}})
    best = max(records, key=lambda r: -1.0 if r[f"val_{metric}"] is None else round(r[f"val_{metric}"], 12))
    return best["tau"], records
