"""Learning-rate schedules as per-step multipliers of the peak lr: linear warm-up, then cosine or step."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

SCHEDULES = ("cosine", "step")


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str,
              milestones: Sequence[int] = (), gamma: float = 0.1, warmup_start: float = 0.0) -> float:
    """Multiplier of the peak lr for optimiser step `step` (0-based) of `total_steps`.

    Warm-up rises linearly over the first warmup_steps steps, from warmup_start + (1 - warmup_start)
    / warmup_steps to 1 (warmup_start 0: from 1/warmup_steps; BALMS's 0.05 -> 0.1: 0.5); cosine then
    falls to 0 at total_steps; step multiplies by gamma at each milestone (in steps).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; valid schedules: {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * (step + 1) / warmup_steps
    if kind == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return gamma ** sum(step >= m for m in milestones)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, kind: str,
                    milestones: Sequence[int] = (), gamma: float = 0.1,
                    warmup_start: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimiser step."""
    lr_factor(0, total_steps, warmup_steps, kind)  # validates `kind` before training starts
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, kind, milestones, gamma, warmup_start)
    )


def total_steps(epoch_len: int, epochs: int, iterations: int) -> int:
    """Optimiser steps of a run: `iterations` when > 0, else `epochs` epochs of epoch_len steps."""
    return iterations if iterations > 0 else epochs * epoch_len


def sgd_with_schedule(params: Iterable[torch.nn.Parameter] | Iterable[dict], epoch_len: int, lr: float,
                      momentum: float, weight_decay: float, nesterov: bool, epochs: int, iterations: int,
                      warmup: float, kind: str, milestones: Sequence[float], gamma: float, warmup_start: float = 0.0,
                      fused: bool = False) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR, int]:
    """(SGD, its per-step schedule, total steps) of a run of `epochs` epochs or `iterations` steps.

    warmup and milestones count epochs, or steps when iterations > 0. `params` may be parameter
    groups (dicts), e.g. one whose weight_decay is 0. fused: SGD's one-kernel step, which takes an
    fp16 GradScaler's scale and overflow flag as device tensors and skips itself on an overflow; with a
    plain SGD the scaler reads the flag back to the host before each step, a wait for the GPU a step.
    """
    steps = total_steps(epoch_len, epochs, iterations)
    unit = 1 if iterations > 0 else epoch_len  # steps per unit of warmup and milestones
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                fused=fused or None)
    keep_kernel(optimizer, fused)
    optimizer.register_load_state_dict_post_hook(lambda opt: keep_kernel(opt, fused))
    scheduler = build_scheduler(optimizer, steps, round(warmup * unit), kind, [round(m * unit) for m in milestones],
                                gamma, warmup_start)
    return optimizer, scheduler, steps


def keep_kernel(optimizer: torch.optim.SGD, fused: bool) -> None:
    """The SGD kernel this run chose, after construction and after loading a checkpoint, whose param groups
    carry the kernel of the run that saved it: whether GradScaler hands the step its overflow flag was fixed
    when the optimiser was made, and a plain step handed one fails. A fused one gets `zero_momentum`."""
    for group in optimizer.param_groups:
        group["fused"] = fused or None
    if fused:
        zero_momentum(optimizer)


def zero_momentum(optimizer: torch.optim.SGD) -> None:
    """Zero momentum buffers for the parameters that have none yet (no step taken), so that a skipped first step
    leaves them defined.

    The fused step makes its buffers with torch.empty_like on its first call and fills them only if that step
    is taken: one skipped for an fp16 overflow, as the first steps at GradScaler's initial scale can be, left
    them uninitialised (NaN weights a step later; torch 2.14). From zero, the first step taken sets a buffer to
    momentum * 0 + (1 - dampening) * grad: plain SGD's first buffer, grad, exactly when dampening is 0.
    """
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        if group["dampening"] != 0:
            raise ValueError("zero_momentum needs dampening 0: plain SGD's first buffer is the gradient itself")
        for p in group["params"]:
            if p.requires_grad and "momentum_buffer" not in optimizer.state[p]:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
