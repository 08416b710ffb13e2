"""One bilevel BALMS meta-sampler update followed by the real classifier-head step.

Stage 2 of BALMS trains a linear head on frozen features. Each iteration:

1. ``lookahead``: a differentiable copy of the head takes one SGD step (same lr, momentum,
   dampening, nesterov and weight decay as the real optimizer, momentum buffers included)
   on the sampled batch, its per-sample losses multiplied by the sampler's weights (value 1,
   gradient to theta).
2. The looked-ahead head is scored with plain cross-entropy on a class-balanced meta batch,
   and that loss is back-propagated through the step into the sampler's theta only.
3. The real head takes an ordinary SGD step on the same batch.

The real step uses the unweighted mean of the per-sample losses. The weights are exactly 1,
so multiplying by them would not change the value, and their gradient must not reach theta
from the real step; the reweighting itself lives in which images were drawn.
"""

from __future__ import annotations

from typing import Callable

import higher
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meta_sampler.learner import ClassSampler

InnerLoss = Callable[[Tensor, Tensor], Tensor]


def _check_batch(feats: Tensor, labels: Tensor, name: str) -> None:
    if feats.dim() != 2:
        raise ValueError(f"{name} features must have shape (B, D), got {tuple(feats.shape)}.")
    if labels.dim() != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(
            f"{name} labels must have shape ({feats.shape[0]},) to match the features, "
            f"got {tuple(labels.shape)}."
        )


def _check_sgd(head_optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(head_optimizer, torch.optim.SGD):
        raise TypeError(
            f"head_optimizer must be torch.optim.SGD (the look-ahead step replays SGD), "
            f"got {type(head_optimizer).__name__}."
        )
    # higher 0.2.1's DifferentiableSGD ignores `maximize`, so it would step the wrong way.
    if any(group.get("maximize", False) for group in head_optimizer.param_groups):
        raise ValueError(
            "head_optimizer uses maximize=True, which the look-ahead step cannot replay; "
            "use maximize=False."
        )


def _per_sample(inner_loss: InnerLoss, logits: Tensor, labels: Tensor) -> Tensor:
    losses = inner_loss(logits, labels)
    if losses.shape != labels.shape:
        raise ValueError(
            f"inner_loss must return per-sample losses of shape {tuple(labels.shape)}, got "
            f"{tuple(losses.shape)}; construct it with reduction='none'."
        )
    return losses


def lookahead(
    head: nn.Module,
    head_optimizer: torch.optim.SGD,
    feats: Tensor,
    labels: Tensor,
    weights: Tensor,
    inner_loss: InnerLoss,
) -> nn.Module:
    """Return a functional copy of head after one differentiable weighted SGD step.

    feats (B, D) are constants; weights (B,) multiply the per-sample losses. The returned
    module's parameters are graph-connected to weights but not to head's own parameters
    (copy_initial_weights), and head_optimizer's state is copied, never modified.
    """
    _check_sgd(head_optimizer)
    _check_batch(feats, labels, "inner")
    if weights.shape != labels.shape:
        raise ValueError(f"weights must have shape {tuple(labels.shape)}, got {tuple(weights.shape)}.")
    with higher.innerloop_ctx(
        head, head_optimizer, copy_initial_weights=True, track_higher_grads=True
    ) as (fhead, diffopt):
        losses = _per_sample(inner_loss, fhead(feats.detach()), labels)
        diffopt.step((losses * weights).mean())
    return fhead


def meta_step(
    head: nn.Module,
    head_optimizer: torch.optim.SGD,
    sampler: ClassSampler,
    sampler_optimizer: torch.optim.Optimizer,
    feats: Tensor,
    labels: Tensor,
    weights: Tensor,
    meta_feats: Tensor,
    meta_labels: Tensor,
    inner_loss: InnerLoss,
) -> dict[str, float]:
    """Update sampler.theta by the meta-gradient, then take the real head step.

    feats (B, D), labels (B,) and weights (B,) come from ``sampler.sample_classes`` and
    ``sampler.draw_images``; meta_feats (M, D), meta_labels (M,) are a class-balanced
    batch. inner_loss maps (logits (B, C), labels (B,)) to per-sample losses (B,).
    Returns {"loss": real-step mean inner loss, "meta_loss": balanced CE after look-ahead}, as
    detached 0-dim tensors on the head's device (reading them would make the host wait for it).
    """
    _check_batch(meta_feats, meta_labels, "meta")
    if not weights.requires_grad:
        raise ValueError(
            "weights carry no gradient, so theta cannot learn; pass the weights returned "
            "by sampler.sample_classes without detaching them."
        )
    fhead = lookahead(head, head_optimizer, feats, labels, weights, inner_loss)
    meta_loss = F.cross_entropy(fhead(meta_feats.detach()), meta_labels)
    sampler_optimizer.zero_grad()
    # The graph reaches head's parameters only through detached copies, so this
    # backward fills sampler.theta.grad (and the discarded copies), nothing else.
    meta_loss.backward()
    if sampler.theta.grad is None:
        raise ValueError("sampler.theta got no gradient: were the weights produced by this sampler?")
    sampler_optimizer.step()

    head_optimizer.zero_grad()
    loss = _per_sample(inner_loss, head(feats.detach()), labels).mean()
    loss.backward()
    head_optimizer.step()
    return {"loss": loss.detach(), "meta_loss": meta_loss.detach()}
