"""ImageNet-style ResNets (He et al. 2016) and ResNeXt-50 (Xie et al. 2017) from torchvision's blocks,
with this tool's model interface.

Module names are torchvision's (conv1, bn1, layer1..layer4, layerN.i.downsample.{0,1}), so its
ImageNet weights and the Decoupling / BALMS ImageNet-LT backbones load by renaming the classifier
only (torchvision `fc` -> our `head`). ResNet-10 ([1, 1, 1, 1] basic blocks) is the ImageNet-LT
backbone of the Decoupling and BALMS papers; torchvision publishes no weights for it. ResNeXt-50
(32x4d) is Decoupling's larger ImageNet-LT backbone.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class ResNetImageNet(nn.Module):
    """Backbone (`forward_features` -> (B, 512 * block expansion)) + linear `head`."""

    def __init__(self, block: Literal["basic", "bottleneck"], layers: list[int], num_classes: int,
                 groups: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        # Imported here: torchvision's import takes about 1 s (it loads torch._dynamo), which every
        # command that builds no ImageNet model (CIFAR runs, --help, a refused config) would pay.
        from torchvision.models import resnet
        # torchvision's init; its 1000-class fc is replaced by `head`. groups / width_per_group: ResNeXt's
        # cardinality and channels per group in the first stage's 3x3 convs (1 / 64 = plain ResNet).
        blocks = {"basic": resnet.BasicBlock, "bottleneck": resnet.Bottleneck}
        net = resnet.ResNet(blocks[block], layers, groups=groups, width_per_group=width_per_group)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.avgpool = net.avgpool  # the same pooling op as torchvision, so imported logits match bit for bit
        self.feature_dim = net.fc.in_features
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, feature_dim) pooled features (32x32 images end as 1x1 maps)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def resnet10(num_classes: int) -> ResNetImageNet:
    return ResNetImageNet("basic", [1, 1, 1, 1], num_classes)


def resnet18(num_classes: int) -> ResNetImageNet:
    return ResNetImageNet("basic", [2, 2, 2, 2], num_classes)


def resnet34(num_classes: int) -> ResNetImageNet:
    return ResNetImageNet("basic", [3, 4, 6, 3], num_classes)


def resnet50(num_classes: int) -> ResNetImageNet:
    return ResNetImageNet("bottleneck", [3, 4, 6, 3], num_classes)


def resnet101(num_classes: int) -> ResNetImageNet:
    return ResNetImageNet("bottleneck", [3, 4, 23, 3], num_classes)


def resnet152(num_classes: int) -> ResNetImageNet:
    return ResNetImageNet("bottleneck", [3, 8, 36, 3], num_classes)


def resnext50_32x4d(num_classes: int) -> ResNetImageNet:
    return ResNetImageNet("bottleneck", [3, 4, 6, 3], num_classes, groups=32, width_per_group=4)
