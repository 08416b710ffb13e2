"""Classifier heads for stage 2 beyond a plain nn.Linear: learnable weight scaling (LWS) and the
tau-normalised classifier (Kang et al. 2020, "Decoupling representation and classifier")."""
from __future__ import annotations

import torch
from torch import nn


class ScaledLinear(nn.Module):
    """LWS: logits_c = s_c * (w_c . x + b_c) with the stage-1 weights frozen and s (C,) learned."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().clone())  # (C, D), frozen
        self.register_buffer("bias", linear.bias.detach().clone())  # (C,), frozen
        self.scales = nn.Parameter(torch.ones(linear.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight.T + self.bias) * self.scales

    def to_linear(self) -> nn.Linear:
        """The same function as a plain Linear (scales folded into weight and bias) for deployment."""
        out = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        with torch.no_grad():
            out.weight.copy_(self.weight * self.scales[:, None])
            out.bias.copy_(self.bias * self.scales)
        return out


def tau_normalized(linear: nn.Linear, tau: float) -> nn.Linear:
    """w_c / ||w_c||^tau, bias dropped as in the Decoupling code (its tau-norm uses W only).

    tau = 0 keeps the weights (without bias); tau = 1 gives unit-norm class weights.
    """
    weight = linear.weight.detach()
    out = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        out.weight.copy_(weight / weight.norm(dim=1, keepdim=True).pow(tau))
        out.bias.zero_()
    return out


def as_linear(head: nn.Module) -> nn.Linear:
    """The deployable nn.Linear of a trained head, so that every checkpoint has one model layout."""
    return head.to_linear() if isinstance(head, ScaledLinear) else head
