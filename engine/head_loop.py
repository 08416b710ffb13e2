"""Stage-2 loop: train a classifier head on (B, D) features of a frozen backbone.

Two ways to choose each batch: a data sampler's epoch of indices (instance or class-balanced),
or the BALMS meta-sampler, which draws classes from learned weights and updates those weights
by a bilevel step (meta_sampler.meta_step) before the head's own step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm import tqdm

from data.transfer import to_device, widest_float
from engine.loop import finite_check_interval, last_step_lr
from meta_sampler.learner import ClassSampler, balanced_batch
from meta_sampler.meta_step import meta_step

Features = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # (B,) indices -> (B, D)


@dataclass
class MetaSampling:
    """What the BALMS path needs beyond the head: the sampler, its optimiser and the meta data."""

    sampler: ClassSampler
    optimizer: torch.optim.Optimizer
    meta_labels: torch.Tensor  # (M,) labels of the split meta batches come from
    meta_features: Features  # features of that split by index
    meta_batch_size: int
    gumbel_tau: float  # Gumbel-softmax temperature of the draws
    relax: str = "image"  # meta_sampler.learner.RELAXATIONS: over the images (BALMS's) or over the classes


def train_head_epoch(
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    labels: torch.Tensor,
    features: Features,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    index_batches: Iterable[torch.Tensor] | None = None,
    meta: MetaSampling | None = None,
    desc: str = "head",
    stop: Callable[[], bool] | None = None,
    carry: Sequence[float] = (0.0, 0.0, 0, 0.0),
) -> dict[str, float]:
    """`steps` optimiser steps of the head; returns mean loss, training accuracy, lr, the steps taken
    and, for BALMS, the meta loss and each class's sampling probability. When `stop()` turns true,
    the epoch ends after the step in progress; its raw sums come back as "sums", which a stopped run
    saves and gives back as `carry` (loss, correct, images, meta loss) when it resumes.

    Exactly one of index_batches (plain sampling) and meta (BALMS) is given. For BALMS,
    loss_fn must return per-sample losses (reduction "none"). Training accuracy is that of the
    head as it was before each step, on both paths.
    """
    if (index_batches is None) == (meta is None):
        raise ValueError("give exactly one of index_batches (plain sampling) or meta (BALMS sampling)")
    head.train()
    batches = iter(index_batches) if index_batches is not None else None
    device = next(head.parameters()).device
    # As in engine.loop.train_one_epoch: the sums stay on the device and the losses are checked for
    # NaN/inf every finite_check_interval steps (each check waits for the device).
    check_every = finite_check_interval(device)
    wide = widest_float(device)
    sums = to_device(torch.tensor([carry[0], carry[1], carry[3]], dtype=wide), device)  # loss, correct, meta
    # (N,) labels on the head's device, once: a step gathers its labels where its indices are (on a GPU, the
    # BALMS sampler's draws are made there).
    labels_here = to_device(labels, device)
    finite = torch.ones(2, dtype=torch.bool, device=device)  # loss, meta loss
    no_meta_loss = torch.zeros((), device=device)
    seen, lr = int(carry[2]), last_step_lr(optimizer, scheduler)
    for step in tqdm(range(steps), desc=desc, leave=False, disable=None):
        lr = optimizer.param_groups[0]["lr"]
        if meta is None:
            logits, y, step_loss = _plain_step(head, optimizer, loss_fn, labels_here, features, batches, generator,
                                               steps)
            meta_loss = no_meta_loss
        else:
            logits, y, step_loss, meta_loss = _balms_step(head, optimizer, loss_fn, labels_here, features, meta,
                                                          batch_size, generator)
        losses = torch.stack((step_loss, meta_loss)).to(wide)
        finite &= losses.isfinite()
        if (step + 1) % check_every == 0:
            _raise_unless_finite(*finite.tolist(), f"{desc}, step {step + 1}", lr, meta is not None)
        scheduler.step()
        hits = (logits.argmax(1) == y).sum().to(wide)
        sums += torch.stack((losses[0] * len(y), hits, losses[1] * len(y)))
        seen += len(y)
        if stop is not None and stop():
            steps = step + 1
            break
    # The epoch's one wait for the device: its sums, finiteness and (BALMS) the sampler's class shares after
    # the epoch's updates, read back together.
    probs = [meta.sampler.class_probs().to(wide)] if meta is not None else []
    read = torch.cat((sums, finite.to(wide), *probs)).tolist()
    total_loss, correct, total_meta, loss_ok, meta_ok, *class_probs = read
    _raise_unless_finite(loss_ok, meta_ok, f"{desc}, in the epoch's last {check_every} steps", lr, meta is not None)
    out = {"loss": total_loss / max(1, seen), "train_acc": correct / max(1, seen), "lr": lr, "steps": steps,
           "sums": [total_loss, correct, seen, total_meta]}
    if meta is not None:
        out["meta_loss"] = total_meta / max(1, seen)
        out["sample_probs"] = class_probs  # (C,)
    return out


def _plain_step(head: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, labels: torch.Tensor,
                features: Features, batches: Iterator[torch.Tensor], generator: torch.Generator,
                steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step on the next batch of indices: the logits before the step (B, C), their labels (B,), the loss."""
    idx = next(batches, None)
    if idx is None:
        raise ValueError(f"index_batches ran out before {steps} steps: give at least as many batches as steps")
    x = features(idx, generator)
    y = labels[to_device(idx, labels.device)]
    logits = head(x)
    loss = loss_fn(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, y, loss.detach()


def _balms_step(head: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, labels: torch.Tensor,
                features: Features, meta: MetaSampling, batch_size: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One BALMS step on a batch the meta-sampler draws: as _plain_step, and the meta loss."""
    idx, weights = meta.sampler.draw(batch_size, generator, meta.gumbel_tau, meta.relax)
    x = features(idx, generator)
    y = labels[to_device(idx, labels.device)]
    with torch.no_grad():  # before meta_step changes the head, as the plain path's logits
        logits = head(x)
    midx = balanced_batch(meta.meta_labels, meta.sampler.num_classes, meta.meta_batch_size, generator)
    # The weights carry theta's gradient from the head's device to the sampler's (the same one in
    # stage 2; a sampler on the CPU would make each step wait for that gradient).
    out = meta_step(head, optimizer, meta.sampler, meta.optimizer, x, y, weights.to(x.device),
                    meta.meta_features(midx, generator), to_device(meta.meta_labels[midx], x.device), loss_fn)
    return logits, y, out["loss"], out["meta_loss"]


def _raise_unless_finite(loss_ok: float, meta_ok: float, where: str, lr: float, balms: bool) -> None:
    """A clear error when the loss or the meta loss (flags read back from the device) went NaN/inf."""
    if not (loss_ok and meta_ok):
        raise FloatingPointError(f"{where}: the head's {'loss' if not loss_ok else 'meta loss'} became NaN or infinite "
                                 f"(lr {lr:.4g}); nothing of this epoch was saved: lower train.lr"
                                 + (" or meta_sampler.lr, or raise meta_sampler.gumbel_tau" if balms else ""))
