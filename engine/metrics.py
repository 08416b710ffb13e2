"""Long-tail evaluation metrics: overall top-1, many/medium/few-shot accuracy, per class, confusion.

Group accuracies are the mean of their classes' accuracies, with groups set by the training
class counts (many > 100, medium 20-100, few < 20 images). An empty group is None, never 0.
"""
from __future__ import annotations

from typing import Sequence

import torch

from data.long_tail import shot_groups


# Up to this many classes test_metrics.json holds the whole (C, C) confusion matrix; above, its nonzero cells:
# iNaturalist 2018's 8142 classes make 66M cells, a 400 MB file written in a minute, for 24k test images.
DENSE_CONFUSION_MAX = 1000


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def confusion_record(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list | dict:
    """The confusion matrix as a report holds it: nested lists (row = true class) up to
    DENSE_CONFUSION_MAX classes, else {"num_classes": C, "cells": [[true, predicted, count], ...]} of
    its nonzero cells in row-major order (read back by dense_confusion)."""
    if num_classes <= DENSE_CONFUSION_MAX:
        return confusion_matrix(preds, labels, num_classes).tolist()
    cells, counts = torch.unique(labels.long() * num_classes + preds.long(), return_counts=True)
    return {"num_classes": num_classes,
            "cells": [[c // num_classes, c % num_classes, n] for c, n in zip(cells.tolist(), counts.tolist())]}


def dense_confusion(record: list | dict) -> torch.Tensor:
    """The (C, C) int64 matrix of a report's confusion_matrix, either form of confusion_record."""
    if isinstance(record, list):
        return torch.tensor(record, dtype=torch.int64).view(len(record), len(record))
    c = record["num_classes"]
    cells = torch.tensor(record["cells"], dtype=torch.int64).view(-1, 3)
    return torch.zeros(c * c, dtype=torch.int64).index_put_((cells[:, 0] * c + cells[:, 1],), cells[:, 2]).view(c, c)


def summarize(preds: torch.Tensor, labels: torch.Tensor, train_counts: Sequence[int], confusion: bool = False) -> dict:
    """Metrics dict of predicted against true classes (N,); accuracies are fractions in [0, 1]. With
    `confusion`, also the confusion matrix (confusion_record); a validation needs none.

    A class with no test images has accuracy None and is left out of its group's mean.
    """
    num_classes = len(train_counts)
    labels = labels.long()
    total = torch.bincount(labels, minlength=num_classes)
    correct = torch.bincount(labels[preds.long() == labels], minlength=num_classes)
    per_class = [k / n if n else None for k, n in zip(correct.tolist(), total.tolist())]
    out = {"top1": int(correct.sum()) / max(int(total.sum()), 1)}
    for group, classes in shot_groups(train_counts).items():
        accs = [per_class[c] for c in classes if per_class[c] is not None]
        out[group] = sum(accs) / len(accs) if accs else None
    out["per_class"] = per_class
    out["train_class_counts"] = list(train_counts)
    if confusion:
        out["confusion_matrix"] = confusion_record(preds, labels, num_classes)
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
