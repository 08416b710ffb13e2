"""Model names -> builders. Every model exposes `forward_features(x) -> (B, D)`, `feature_dim`
and a `head` (linear, or another of models.heads.HEADS), the boundary stage 2 works at."""
from __future__ import annotations

from typing import Callable

from torch import nn

from models.heads import build_head
from models.resnet_cifar import resnet32
from models.resnet_imagenet import resnet10, resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet32": resnet32,  # CIFAR ResNet-32, 32x32 inputs
    # ImageNet-style (torchvision layout): for torchvision / ImageNet-LT weights
    "resnet10": resnet10,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "resnext50_32x4d": resnext50_32x4d,  # Decoupling's ImageNet-LT ResNeXt-50
}


def build_model(name: str, num_classes: int, head: str = "linear") -> nn.Module:
    """Model `name` with a `head` classifier (models.heads.HEADS) for num_classes classes.

    Checkpoints store these three arguments as model_args; older ones without `head` are linear.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    model = MODELS[name](num_classes=num_classes)
    if head != "linear":
        model.head = build_head(head, model.feature_dim, num_classes)
    return model
