"""Backbones with a separate classifier head, losses, checkpoints and pretrained weights."""
from models.pretrained import load_pretrained
from models.registry import MODELS, build_model

__all__ = ["MODELS", "build_model", "load_pretrained"]
