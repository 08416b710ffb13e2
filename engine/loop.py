"""Training and evaluation loops shared by both stages: plain functions that return metric dicts."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data.augment import normalize
from engine.metrics import confusion_matrix, summarize


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_steps: int,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    mixup_alpha: float = 0.0,
    mixup_rng: np.random.Generator | None = None,
    desc: str = "train",
) -> dict[str, float]:
    """One pass over `batches`, one optimiser and scheduler step per batch.

    With mixup_alpha > 0 each batch is mixed with a permutation of itself by lam ~ Beta(a, a)
    and the loss is lam * L(y_a) + (1 - lam) * L(y_b), which composes with any loss.
    Returns the mean loss, the training accuracy (w.r.t. the mixed targets) and the last lr.
    """
    model.train()
    total_loss, total_correct, total_seen = 0.0, 0.0, 0
    lr = optimizer.param_groups[0]["lr"]
    for x, y in tqdm(batches, total=num_steps, desc=desc, leave=False, disable=None):
        lr = optimizer.param_groups[0]["lr"]
        if mixup_alpha > 0:
            lam = float(mixup_rng.beta(mixup_alpha, mixup_alpha))
            perm = torch.from_numpy(mixup_rng.permutation(len(y)))
            x = lam * x + (1 - lam) * x[perm]
            logits = model(x)
            loss = lam * loss_fn(logits, y) + (1 - lam) * loss_fn(logits, y[perm])
            pred = logits.argmax(1)
            correct = lam * (pred == y).sum().item() + (1 - lam) * (pred == y[perm]).sum().item()
        else:
            logits = model(x)
            loss = loss_fn(logits, y)
            correct = (logits.argmax(1) == y).sum().item()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at lr {lr:.4g}; lower train.lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(y)
        total_correct += correct
        total_seen += len(y)
    return {"loss": total_loss / max(1, total_seen), "train_acc": total_correct / max(1, total_seen), "lr": lr}


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    channels_last: bool = False,
    desc: str = "eval",
) -> torch.Tensor:
    """(N, C) logits of uint8 images (N, 3, H, W), model in eval mode, in order."""
    model.eval()
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=None):
        x = normalize(images[start : start + batch_size], mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(model(x).float())
    return torch.cat(out) if out else torch.empty(0)


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor, train_counts: Sequence[int]) -> dict:
    """top1 / many / medium / few / per_class / confusion_matrix of argmax predictions."""
    return summarize(confusion_matrix(logits.argmax(1), labels, len(train_counts)), train_counts)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, train_counts: Sequence[int],
             batch_size: int, mean: Sequence[float], std: Sequence[float], channels_last: bool = False,
             desc: str = "val") -> dict:
    """Metrics (engine.metrics.summarize) of the model on uint8 images (N, 3, H, W) with labels (N,)."""
    logits = predict_logits(model, images, batch_size, mean, std, channels_last, desc)
    return metrics_from_logits(logits, labels, train_counts)
