"""Backbones with a separate classifier head, losses and checkpoints."""
from models.registry import MODELS, build_model

__all__ = ["MODELS", "build_model"]
