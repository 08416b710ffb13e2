"""Long-tail evaluation metrics: overall top-1, many/medium/few-shot accuracy, per class, confusion.

Group accuracies are the mean of their classes' accuracies, with groups set by the training
class counts (many > 100, medium 20-100, few < 20 images). An empty group is None, never 0.
"""
from __future__ import annotations

from typing import Sequence

import torch

from data.long_tail import shot_groups


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def summarize(confusion: torch.Tensor, train_counts: Sequence[int]) -> dict:
    """Metrics dict from a confusion matrix; accuracies are fractions in [0, 1].

    A class with no test images has accuracy None and is left out of its group's mean.
    """
    per_class_total = confusion.sum(dim=1)
    correct = confusion.diag()
    per_class = [
        (correct[c] / per_class_total[c]).item() if per_class_total[c] > 0 else None
        for c in range(confusion.shape[0])
    ]
    out = {"top1": (correct.sum() / confusion.sum().clamp(min=1)).item()}
    for group, classes in shot_groups(train_counts).items():
        accs = [per_class[c] for c in classes if per_class[c] is not None]
        out[group] = sum(accs) / len(accs) if accs else None
    out["per_class"] = per_class
    out["train_class_counts"] = list(train_counts)
    out["confusion_matrix"] = confusion.tolist()
    return out


def format_table(metrics: dict, class_names: Sequence[str] | None = None) -> str:
    """The many/medium/few table and per-class accuracies as text, in percent; '-' for absent."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    lines = [
        f"{'top-1':>8} {'many':>8} {'medium':>8} {'few':>8}",
        f"{pct(metrics['top1']):>8} {pct(metrics['many']):>8} {pct(metrics['medium']):>8} {pct(metrics['few']):>8}",
        "",
        f"{'class':<16} {'train n':>8} {'acc':>8}",
    ]
    counts = metrics["train_class_counts"]
    for c, acc in enumerate(metrics["per_class"]):
        name = class_names[c] if class_names else str(c)
        lines.append(f"{name:<16} {counts[c]:>8} {pct(acc):>8}")
    return "\n".join(lines)
