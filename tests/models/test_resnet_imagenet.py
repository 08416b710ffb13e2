"""ImageNet-style backbones: ResNet-10 as in Decoupling / BALMS, ResNeXt-50 (32x4d) in torchvision's layout."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNeXt50_32X4D_Weights

from models import MODELS, load_pretrained
from models.registry import build_model
from models.resnet_imagenet import ResNetImageNet, resnext50_32x4d
from models.zoo import PRETRAINED, PretrainedEntry


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # 64x64 -> 2x2 layer4 maps


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    """torchvision's ResNeXt-50 (32x4d), random weights, BN running statistics moved off their init."""
    torch.manual_seed(0)
    model = torchvision.models.resnext50_32x4d(weights=None)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 64, 64))
    return model.eval()


def test_resnet10_is_one_basic_block_per_stage_with_512_features():
    model = build_model("resnet10", 1000)
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [[type(b) for b in stage] for stage in stages] == [[BasicBlock]] * 4
    assert model.feature_dim == 512 and model.head.in_features == 512
    assert _n_params(model) == 5_418_792  # 4,905,792 backbone + 512 * 1000 + 1000 head


def test_resnext50_32x4d_state_dict_matches_torchvision_with_fc_renamed_head(reference):
    ours = {k: tuple(v.shape) for k, v in build_model("resnext50_32x4d", 1000).state_dict().items()}
    theirs = {k.replace("fc.", "head.", 1) if k.startswith("fc.") else k: tuple(v.shape)
              for k, v in reference.state_dict().items()}
    assert ours == theirs
    assert ours["layer1.0.conv2.weight"] == (128, 4, 3, 3)  # 32 groups of 4 channels
    assert ours["head.weight"] == (1000, 2048)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_each_torchvision_resnet_has_torchvision_s_layers_and_shapes_with_fc_named_head(name):
    """What makes torchvision's ImageNet weights load (models.zoo): the same keys and shapes, stage depths
    included (resnet34: 3, 4, 6, 3 blocks)."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        ours = {k: tuple(v.shape) for k, v in build_model(name, 1000).state_dict().items()}
        theirs = {k.replace("fc.", "head.", 1) if k.startswith("fc.") else k: tuple(v.shape)
                  for k, v in getattr(torchvision.models, name)(weights=None).state_dict().items()}
    assert ours == theirs


def test_resnext50_32x4d_has_torchvisions_25028904_parameters():
    assert _n_params(build_model("resnext50_32x4d", 1000)) == 25_028_904


def test_resnext50_32x4d_forward_features_are_2048_wide(images):
    model = build_model("resnext50_32x4d", 10).eval()
    assert isinstance(model, ResNetImageNet) and model.feature_dim == 2048
    assert (model.head.in_features, model.head.out_features) == (2048, 10)
    with torch.no_grad():
        assert model.forward_features(images).shape == (2, 2048)
        assert model(images).shape == (2, 10)


def test_torchvision_resnext50_32x4d_state_dict_imports_to_identical_logits(reference, images, tmp_path):
    path = tmp_path / "resnext50_32x4d-7cdf4587.pth"
    torch.save(reference.state_dict(), path)
    model = load_pretrained(str(path), arch="resnext50_32x4d")
    assert model.head.out_features == 1000
    assert torch.equal(model.head.weight, reference.fc.weight)
    assert torch.equal(_logits(model, images), _logits(reference, images))


def test_resnext50_32x4d_imagenet_entry_is_torchvisions_imagenet1k_v1_file():
    weights = ResNeXt50_32X4D_Weights.IMAGENET1K_V1
    assert PRETRAINED["resnext50_32x4d_imagenet"] == PretrainedEntry(
        weights.url, "7cdf4587", "resnext50_32x4d", "imagenet1k", len(weights.meta["categories"]), "state_dict")
    assert weights.url == "https://download.pytorch.org/models/resnext50_32x4d-7cdf4587.pth"


def test_registry_lists_resnext50_32x4d():
    assert MODELS["resnext50_32x4d"] is resnext50_32x4d
