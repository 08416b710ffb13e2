"""ResNet-32 for CIFAR: parameter count, option-A shortcuts, feature/head split, key names, registry, layout."""
import copy

import pytest
import torch

from models.registry import build_model
from models.resnet_cifar import BasicBlock, resnet32


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet32", 10).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_resnet32_has_exactly_464154_parameters_for_10_classes(model):
    # conv1 432 + bn1 32 + layer1 23,360 + layer2 88,192 + layer3 351,488 + head 650 (64 * 10 + 10)
    assert _n_params(model) == 464_154


def test_parameter_count_grows_only_by_the_head_for_more_classes():
    assert _n_params(resnet32(100)) == 464_154 + 90 * 65


def test_forward_features_gives_64_dimensional_features(model, images):
    with torch.no_grad():
        feats = model.forward_features(images)
    assert feats.shape == (3, 64)
    assert model.feature_dim == 64
    assert model.head.in_features == 64 and model.head.out_features == 10


def test_forward_equals_head_of_forward_features(model, images):
    with torch.no_grad():
        logits = model(images)
        via_head = model.head(model.forward_features(images))
    assert logits.shape == (3, 10)
    assert torch.equal(logits, via_head)


def test_downsampling_block_has_only_conv_and_bn_parameters(model):
    block = model.layer2[0]
    assert block.conv1.stride == (2, 2)
    names = {name for name, _ in block.named_parameters()}
    assert names == {"conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias"}
    # conv 16->32 (4,608) + conv 32->32 (9,216) + two BN(32) (64 each): no shortcut parameters.
    assert _n_params(block) == 4_608 + 9_216 + 64 + 64 == 13_952
    assert _n_params(model.layer3[0]) == 18_432 + 36_864 + 128 + 128


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    block = BasicBlock(4, 8, stride=2)
    x = torch.arange(4 * 4 * 4, dtype=torch.float32).view(1, 4, 4, 4)
    out = block.shortcut(x)
    assert out.shape == (1, 8, 2, 2)
    assert torch.equal(out[:, :2], torch.zeros(1, 2, 2, 2))
    assert torch.equal(out[:, 6:], torch.zeros(1, 2, 2, 2))
    assert torch.equal(out[:, 2:6], x[:, :, ::2, ::2])
    assert out[0, 2].tolist() == [[0.0, 2.0], [8.0, 10.0]]


def test_a_block_adds_its_shortcut_before_the_last_relu():
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)): He et al.'s block, as the papers' ResNet-32."""
    torch.manual_seed(0)
    block = BasicBlock(16, 32, stride=2).eval()
    x = torch.randn(2, 16, 8, 8)
    residual = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    shortcut = torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    torch.testing.assert_close(block(x), torch.relu(residual + shortcut), rtol=0, atol=0)


def test_identity_block_shortcut_returns_its_input():
    block = BasicBlock(16, 16, stride=1)
    x = torch.randn(2, 16, 8, 8)
    assert block.shortcut(x) is x


def test_state_dict_key_names_match_the_papers_checkpoints(model):
    keys = set(model.state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer3.4.bn2.weight",
                "head.weight", "head.bias", "layer2.0.bn1.num_batches_tracked"):
        assert key in keys, key
    assert not any("layer4" in k or "layer3.5" in k or "shortcut" in k or "fc." in k for k in keys)


def test_build_model_unknown_name_lists_valid_models():
    with pytest.raises(ValueError, match=r"unknown model 'resnet56'; valid models: resnet10, resnet101, resnet152, "
                                         r"resnet18, resnet32, resnet34, resnet50, resnext50_32x4d$"):
        build_model("resnet56", 10)


def test_channels_last_model_gives_same_output_as_default_layout(model, images):
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert cl_model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(images)
        out = cl_model(images.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_build_model_with_a_cosine_head_keeps_the_backbone_and_drops_the_bias():
    torch.manual_seed(0)
    model = build_model("resnet32", 10, head="cosine").eval()
    keys = set(model.state_dict())
    assert "head.weight" in keys and "head.bias" not in keys and model.head.weight.shape == (10, 64)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        assert torch.allclose(logits, model.head(model.forward_features(x)))
    assert logits.abs().max() <= 1.0 + 1e-6  # cosines
    with pytest.raises(ValueError, match="unknown head 'normed'; valid heads: linear, cosine"):
        build_model("resnet32", 10, head="normed")
