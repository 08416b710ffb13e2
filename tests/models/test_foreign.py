"""Foreign checkpoint layouts built from our own modules import to the same logits as their source model."""
from __future__ import annotations

import argparse
import copy
import pickle
import re

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from models import MODELS, load_pretrained
from models.checkpoint import CheckpointError, save_checkpoint
from models.pretrained import HeadMismatchError
from models.registry import build_model


@pytest.fixture(scope="module")
def source() -> nn.Module:
    """A ResNet-32 with random weights and BN statistics away from their init, in eval mode."""
    torch.manual_seed(0)
    model = build_model("resnet32", 10)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))  # moves running_mean / running_var
        model.head.bias.uniform_(-1, 1)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _parallel_parts(model: nn.Module) -> tuple[dict, dict]:
    """(feat_model, classifier) state dicts as the papers' code saves them: DataParallel-wrapped, head named fc."""
    feat = copy.deepcopy(model)
    del feat.head
    classifier = nn.Module()
    classifier.fc = copy.deepcopy(model.head)
    return nn.DataParallel(feat).state_dict(), nn.DataParallel(classifier).state_dict()


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def test_balms_parts_carry_the_key_names_of_the_balms_resnet32(source):
    feat, classifier = _parallel_parts(source)
    assert {"module.conv1.weight", "module.bn1.running_var", "module.layer1.0.conv1.weight",
            "module.layer3.4.bn2.num_batches_tracked", "module.layer3.4.bn2.running_mean"} <= set(feat)
    assert not any("shortcut" in k for k in feat)  # option A: parameter-free shortcuts
    # conv1 + bn1 (weight, bias, running_mean, running_var, num_batches_tracked), then 15 blocks of two of each
    assert len(feat) == (1 + 5) + 15 * 2 * (1 + 5) == 186
    assert set(classifier) == {"module.fc.weight", "module.fc.bias"}


def test_balms_final_checkpoint_imports_to_identical_logits(source, images, tmp_path):
    feat, classifier = _parallel_parts(source)
    path = tmp_path / "final_model_checkpoint.pth"
    torch.save({"epoch": 200, "best_epoch": 187, "best_acc": np.float64(0.412), "centroids": None,
                "state_dict_best": {"feat_model": feat, "classifier": classifier}}, path)
    model = load_pretrained(str(path), arch="resnet32", num_classes=10)
    assert torch.equal(_logits(model, images), _logits(source, images))


def test_balms_latest_checkpoint_imports_to_identical_logits(source, images, tmp_path):
    feat, classifier = _parallel_parts(source)
    path = tmp_path / "latest_model_checkpoint.pth"
    torch.save({"epoch": 13, "state_dict": {"feat_model": feat, "classifier": classifier}}, path)
    model = load_pretrained(str(path), arch="resnet32")
    assert model.head.out_features == 10  # taken from the classifier
    assert torch.equal(_logits(model, images), _logits(source, images))


def test_mislas_checkpoint_imports_to_identical_logits(source, images, tmp_path):
    feat, classifier = _parallel_parts(source)
    path = tmp_path / "ckpt.best.pth.tar"
    torch.save({"epoch": 200, "state_dict_model": feat, "state_dict_classifier": classifier,
                "best_acc1": torch.tensor(41.2), "its_ece": torch.tensor(20.1)}, path)
    model = load_pretrained(str(path), arch="resnet32", num_classes=10)
    assert torch.equal(_logits(model, images), _logits(source, images))



def test_a_mislas_places_checkpoint_with_its_extra_block_is_refused_not_imported_without_it(source, tmp_path):
    feat, classifier = _parallel_parts(source)
    block = nn.DataParallel(nn.Conv2d(64, 64, 1)).state_dict()  # stands for its trained Bottleneck
    path = tmp_path / "places_stage2.pth.tar"
    torch.save({"state_dict_model": feat, "state_dict_classifier": classifier, "state_dict_block": block}, path)
    with pytest.raises(CheckpointError, match="has a state_dict_block .*one more trained block"):
        load_pretrained(str(path), arch="resnet32")

def test_mislas_stage2_scales_are_folded_into_the_head(source, images, tmp_path):
    feat, classifier = _parallel_parts(source)
    scales = torch.linspace(0.5, 2.0, 10).reshape(1, 10)  # LearnableWeightScaling.learned_norm
    path = tmp_path / "stage2.pth.tar"
    torch.save({"state_dict_model": feat, "state_dict_classifier": classifier,
                "state_dict_lws_model": {"module.learned_norm": scales}}, path)
    model = load_pretrained(str(path), arch="resnet32")
    # MiSLAS computes lws(classifier(features)) = s * (W x + b); folded: (s W) x + s b, equal up to rounding.
    torch.testing.assert_close(_logits(model, images), scales * _logits(source, images), rtol=1e-5, atol=1e-5)


def test_decoupling_lws_release_folds_its_scales_into_the_head(source, images, tmp_path):
    # Decoupling's LWS releases (TauNormClassifier: fc frozen, fc(x) * scales) save the scales in the classifier.
    feat, classifier = _parallel_parts(source)
    scales = torch.linspace(0.5, 2.0, 10)
    path = tmp_path / "final_model_checkpoint.pth"
    torch.save({"state_dict_best": {"feat_model": feat, "classifier": {**classifier, "module.scales": scales}}}, path)
    model = load_pretrained(str(path), arch="resnet32", num_classes=10)
    torch.testing.assert_close(_logits(model, images), scales * _logits(source, images), rtol=1e-5, atol=1e-5)


def test_torchvision_state_dict_imports_to_identical_logits(images, tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()  # ImageNet layout: 1000-class fc
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(reference.state_dict(), path)
    model = load_pretrained(str(path), arch="resnet18")
    assert model.head.out_features == 1000
    assert torch.equal(_logits(model, images), _logits(reference, images))



def test_a_file_saved_before_batchnorm_counted_its_batches_imports_as_torch_loads_it(images, tmp_path):
    # torchvision's ImageNet ResNet files date from PyTorch 0.3: their BatchNorms have no num_batches_tracked.
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    old = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(old) == 102 and len(reference.state_dict()) == 122
    torch.save(old, tmp_path / "resnet18-f37072fd.pth")
    model = load_pretrained(str(tmp_path / "resnet18-f37072fd.pth"), arch="resnet18")
    assert torch.equal(_logits(model, images), _logits(reference, images))
    del old["layer1.0.bn1.running_mean"]  # any other missing key is still named
    torch.save(old, tmp_path / "damaged.pth")
    with pytest.raises(CheckpointError,
                       match=r"missing keys \(2\): layer1.0.bn1.num_batches_tracked, layer1.0.bn1.running_mean;"):
        load_pretrained(str(tmp_path / "damaged.pth"), arch="resnet18")

def test_resnet50_keys_are_torchvision_keys_with_fc_renamed_head():
    ours = set(build_model("resnet50", 1000).state_dict())
    theirs = set(torchvision.models.resnet50(weights=None).state_dict())
    assert ours == {k.replace("fc.", "head.", 1) if k.startswith("fc.") else k for k in theirs}


def test_our_checkpoint_imports_without_naming_the_architecture(source, images, tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": source.state_dict(), "model_args": {"name": "resnet32", "num_classes": 10},
                           "class_counts": [50] * 10, "class_names": list("abcdefghij"), "config": {}})
    assert torch.equal(_logits(load_pretrained(str(path)), images), _logits(source, images))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod."])
def test_plain_state_dict_of_a_data_parallel_or_compiled_model_imports(source, images, tmp_path, prefix):
    """nn.DataParallel / DistributedDataParallel name the keys module.*, torch.compile _orig_mod.*, both nest."""
    path = tmp_path / "plain.pt"
    torch.save({prefix + k: v for k, v in source.state_dict().items()}, path)
    assert torch.equal(_logits(load_pretrained(str(path), arch="resnet32"), images), _logits(source, images))
    assert next(iter(nn.DataParallel(source).state_dict())).startswith("module.")
    assert next(iter(torch.compile(source).state_dict())).startswith("_orig_mod.")


def test_reset_head_loads_the_backbone_only_for_another_number_of_classes(source, images, tmp_path):
    feat, classifier = _parallel_parts(source)
    path = tmp_path / "final_model_checkpoint.pth"
    torch.save({"state_dict_best": {"feat_model": feat, "classifier": classifier}}, path)
    model = load_pretrained(str(path), arch="resnet32", num_classes=3, reset_head=True).eval()
    assert model.head.weight.shape == (3, 64)
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), source.forward_features(images))


def test_missing_and_unexpected_keys_are_listed_by_name(source, tmp_path):
    feat, classifier = _parallel_parts(source)
    del feat["module.layer3.4.bn2.running_var"]
    feat["module.extra.weight"] = torch.zeros(1)
    path = tmp_path / "final_model_checkpoint.pth"
    torch.save({"state_dict_best": {"feat_model": feat, "classifier": classifier}}, path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(str(path), arch="resnet32")
    assert f"{path} (balms layout) does not fit the model" in str(err.value)
    assert "missing keys (1): layer3.4.bn2.running_var | unexpected keys (1): extra.weight; if these weights are " \
           "not a resnet32's, pass the architecture they are (model.name=, or --arch" in str(err.value)


def test_head_for_another_number_of_classes_names_both_shapes_and_the_fix(source, tmp_path):
    feat, classifier = _parallel_parts(source)
    path = tmp_path / "mislas.pth"
    torch.save({"state_dict_model": feat, "state_dict_classifier": classifier}, path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(str(path), arch="resnet32", num_classes=100)
    msg = str(err.value)
    assert ("shape mismatches (2): head.bias: checkpoint (10,) vs model (100,); "
            "head.weight: checkpoint (10, 64) vs model (100, 64)") in msg
    assert "reset_head=True (model.reset_head=true) starts a new one" in msg
    # an error sent between ranks is pickled: it comes back whole
    again = pickle.loads(pickle.dumps(err.value))
    assert type(again) is HeadMismatchError and str(again) == msg and again.problem == err.value.problem


def test_weights_of_another_architecture_are_one_short_line_asking_for_theirs_not_a_new_head(source, tmp_path):
    feat, classifier = _parallel_parts(source)
    path = tmp_path / "final_model_checkpoint.pth"
    torch.save({"state_dict_best": {"feat_model": feat, "classifier": classifier}}, path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(str(path), arch="resnet18")  # a ResNet-32's 10-class head, 64 features wide
    msg = str(err.value)
    assert not isinstance(err.value, HeadMismatchError) and "reset_head" not in msg
    assert re.search(r"missing keys \(\d+\): [^|]*, \.\.\. \| unexpected keys \(\d+\): ", msg) and len(msg) < 1000
    assert msg.endswith("if these weights are not a resnet18's, pass the architecture they are (model.name=, or "
                        f"--arch of `python -m models import`; one of {', '.join(MODELS)})")


def test_foreign_checkpoint_without_an_architecture_asks_for_one(source, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(source.state_dict(), path)
    with pytest.raises(CheckpointError, match="does not record its architecture: pass model.name= .--arch of "
                                              "`python -m models import`., one of"):
        load_pretrained(str(path))


def test_architecture_other_than_the_recorded_one_is_refused(source, tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": source.state_dict(), "model_args": {"name": "resnet32", "num_classes": 10}})
    with pytest.raises(CheckpointError, match=r"holds a resnet32, not a resnet50: use arch='resnet32' \(model.name="):
        load_pretrained(str(path), arch="resnet50")


def test_unknown_layout_lists_the_known_ones_and_the_top_level_keys(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"weights": {"a": torch.zeros(1)}, "step": 3}, path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(str(path), arch="resnet32")
    assert "has none of the known layouts (lt-decoupled, balms, mislas, state_dict" in str(err.value)
    assert "its top-level keys are: step, weights" in str(err.value)


def test_checkpoint_pickling_arbitrary_objects_is_refused_for_safety(source, tmp_path):
    path = tmp_path / "train.pth"
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match="pickles argparse.Namespace, and only tensors, numbers and strings"):
        load_pretrained(str(path), arch="resnet32")


def test_truncated_checkpoint_is_a_clear_error(source, tmp_path):
    path = tmp_path / "final_model_checkpoint.pth"
    torch.save({"state_dict_best": {"feat_model": source.state_dict()}}, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot be read as a checkpoint .*is it complete"):
        load_pretrained(str(path), arch="resnet32")
