"""Learning-rate schedules as per-step multipliers of the peak lr: linear warm-up, then cosine or step."""
from __future__ import annotations

import math
from typing import Sequence

import torch

SCHEDULES = ("cosine", "step")


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str,
              milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """Multiplier of the peak lr for optimiser step `step` (0-based) of `total_steps`.

    Warm-up rises linearly from 1/warmup_steps to 1 over the first warmup_steps steps; cosine then
    falls to 0 at total_steps; step multiplies by gamma at each milestone (in steps).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; valid schedules: {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return gamma ** sum(step >= m for m in milestones)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, kind: str,
                    milestones: Sequence[int] = (), gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimiser step."""
    lr_factor(0, total_steps, warmup_steps, kind)  # validates `kind` before training starts
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, kind, milestones, gamma)
    )
