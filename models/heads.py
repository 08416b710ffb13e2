"""Classifier heads beyond a plain nn.Linear.

Stage 1: the cosine head of the LDAM code (`CosineLinear`, its NormedLinear), chosen by name in
HEADS. Stage 2: learnable weight scaling (LWS) and the tau-normalised classifier (Kang et al.
2020, "Decoupling representation and classifier").
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from models.checkpoint import load_state_checked


class CosineLinear(nn.Module):
    """logits_c = cos(x, w_c) in [-1, 1], no bias: the LDAM code's NormedLinear (Cao et al. 2019).

    LDAM multiplies these by its scale (30) inside the loss; a plain linear head's logits are
    unbounded, and 30 times them overflows the softmax. weight is (C, D), nn.Linear's layout,
    so that a checkpoint's `head.weight` has the same shape for both heads.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # Uniform in [-1, 1], then unit rows, as NormedLinear's renorm of each class vector.
        self.weight = nn.Parameter(F.normalize(torch.empty(out_features, in_features).uniform_(-1, 1), dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) features -> (B, C) cosine similarities."""
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).T


HEADS: dict[str, Callable[[int, int], nn.Module]] = {
    "linear": nn.Linear,  # w_c . x + b_c
    "cosine": CosineLinear,  # cos(x, w_c); for ldam
}


def build_head(name: str, in_features: int, num_classes: int) -> nn.Module:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; valid heads: {', '.join(HEADS)}")
    return HEADS[name](in_features, num_classes)


def head_name(head: nn.Module) -> str:
    """The HEADS name of a head module (checkpoints record it in model_args)."""
    return next((name for name, cls in HEADS.items() if type(head) is cls), type(head).__name__)


class ScaledLinear(nn.Module):
    """LWS: logits_c = s_c * (w_c . x + b_c) with the stage-1 weights frozen and s (C,) learned."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().clone())  # (C, D), frozen
        self.register_buffer("bias", linear.bias.detach().clone())  # (C,), frozen
        self.scales = nn.Parameter(torch.ones(linear.out_features, device=linear.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight.T + self.bias) * self.scales

    def to_linear(self) -> nn.Linear:
        """The same function as a plain Linear (scales folded into weight and bias) for deployment."""
        out = nn.Linear(self.weight.shape[1], self.weight.shape[0], device=self.weight.device)
        with torch.no_grad():
            out.weight.copy_(self.weight * self.scales[:, None])
            out.bias.copy_(self.bias * self.scales)
        return out


def tau_normalized(linear: nn.Linear, tau: float) -> nn.Linear:
    """w_c / ||w_c||^tau, bias dropped as in the Decoupling code (its tau-norm uses W only).

    tau = 0 keeps the weights (without bias); tau = 1 gives unit-norm class weights.
    """
    weight = linear.weight.detach()
    out = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device)
    with torch.no_grad():
        out.weight.copy_(weight / weight.norm(dim=1, keepdim=True).pow(tau))
        out.bias.zero_()
    return out


def as_linear(head: nn.Module) -> nn.Linear:
    """The deployable nn.Linear of a trained head, so that every checkpoint has one model layout."""
    return head.to_linear() if isinstance(head, ScaledLinear) else head


def deployable_state(model: nn.Module, head: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with `head` as a plain Linear: one layout for every checkpoint."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    state.update({f"head.{k}": v for k, v in as_linear(head).state_dict().items()})
    return state


def load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load every tensor of `state` but the head's into model (all keys checked); model.head is kept."""
    own_head = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    load_state_checked(model, {**{k: v for k, v in state.items() if not k.startswith("head.")}, **own_head}, what)
