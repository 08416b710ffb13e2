"""Inference export: a plain state dict plus model.json, written atomically, loaded back to the same model."""
from __future__ import annotations

import errno
import json
import re

import pytest
import torch

from models.checkpoint import CheckpointError
from models.export import EXPORT_FORMAT, export_meta, load_export, path_error_message, write_export
from models.registry import build_model

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet32", 3).eval()


def test_export_round_trips_to_the_same_logits_and_plain_files(model, tmp_path):
    meta = export_meta({"name": "resnet32", "num_classes": 3}, ["cat", "dog", "eel"], [50, 10, 2], MEAN, STD, 32)
    write_export(tmp_path / "out", model.state_dict(), meta)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.json", "model.pt"]
    assert json.loads((tmp_path / "out" / "model.json").read_text()) == {
        "format": EXPORT_FORMAT, "arch": "resnet32", "head": "linear", "num_classes": 3,
        "class_names": ["cat", "dog", "eel"],
        "class_counts": [50, 10, 2], "mean": list(MEAN), "std": list(STD), "image_size": 32, "resize": "square",
        "logit_scale": 1.0, "probability": "softmax"}
    state = torch.load(tmp_path / "out" / "model.pt", weights_only=True)  # a plain dict of tensors
    assert set(state) == set(model.state_dict())
    loaded, loaded_meta = load_export(tmp_path / "out")
    assert loaded_meta == meta and not loaded.training
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_class_names_must_match_the_number_of_classes():
    with pytest.raises(CheckpointError, match="2 class names for a 3-class model"):
        export_meta({"name": "resnet32", "num_classes": 3}, ["a", "b"], None, MEAN, STD, 32)


def test_folder_without_an_export_says_how_to_write_one(tmp_path):
    with pytest.raises(CheckpointError, match=r"not an export directory .*python predict.py <checkpoint.pt> --export"):
        load_export(tmp_path)
    (tmp_path / "last.pt").write_bytes(b"")  # a run directory's checkpoint
    with pytest.raises(CheckpointError) as e:
        load_export(tmp_path)
    assert str(e.value) == f"{tmp_path} is a run directory, not an export: pass {tmp_path / 'last.pt'}"


def test_export_of_a_cosine_head_model_records_and_rebuilds_the_head(tmp_path):
    torch.manual_seed(0)
    cosine = build_model("resnet32", 3, head="cosine").eval()
    meta = export_meta({"name": "resnet32", "num_classes": 3, "head": "cosine"}, None, None, MEAN, STD, 32)
    write_export(tmp_path / "out", cosine.state_dict(), meta)
    loaded, loaded_meta = load_export(tmp_path / "out")
    assert loaded_meta["head"] == "cosine" and "head.bias" not in loaded.state_dict()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), cosine(x))


def test_write_export_never_overwrites_an_existing_export(model, tmp_path):
    meta = export_meta({"name": "resnet32", "num_classes": 3}, None, None, MEAN, STD, 32)
    write_export(tmp_path / "out", model.state_dict(), meta)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(FileExistsError, match="already holds an export .*give another --export folder"):
        write_export(tmp_path / "out", {}, {**meta, "image_size": 64})
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


@pytest.mark.parametrize("file, content, message", [
    ("model.json", b"{", r"model.json is damaged \(Expecting property name"),
    ("model.json", b"\xff\xfe\x00", r"model.json is damaged \("),
    ("model.json", b"[]", r"model.json is not an export of this tool"),
    ("model.json", json.dumps({"format": EXPORT_FORMAT, "arch": "resnet32"}).encode(),
     r"model.json is damaged \(missing num_classes, class_names, mean, std, image_size\)"),
    ("model.pt", b"PK\x03\x04 cut short", r"model.pt is damaged \(RuntimeError: "),
    ("model.pt", None, r"model.pt holds no state dict")])
def test_damaged_export_names_the_file_and_says_to_export_again(model, tmp_path, file, content, message):
    meta = export_meta({"name": "resnet32", "num_classes": 3}, None, None, MEAN, STD, 32)
    write_export(tmp_path / "out", model.state_dict(), meta)
    if content is None:
        torch.save(torch.zeros(3), tmp_path / "out" / file)  # loads, but is a tensor, not a state dict
    else:
        (tmp_path / "out" / file).write_bytes(content)
    with pytest.raises(CheckpointError, match=message + r".*; delete its model.pt and model.json and export again: "
                                              r"python predict.py <checkpoint.pt> --export "):
        load_export(tmp_path / "out")


@pytest.mark.parametrize("head, scale", [("linear", 1.0), ("cosine", None)])
def test_export_from_before_resize_logit_scale_and_probability_reads_as_it_was_then(head, scale, tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet32", 3, head=head).eval()
    meta = export_meta({"name": "resnet32", "num_classes": 3, "head": head}, None, None, MEAN, STD, 32)
    write_export(tmp_path / "out", model.state_dict(), meta)
    old = {k: v for k, v in meta.items() if k not in ("resize", "logit_scale", "probability")}
    (tmp_path / "out" / "model.json").write_text(json.dumps(old))
    # resized straight to 32x32 as those exports documented; softmax of plain logits, none for cosines
    assert load_export(tmp_path / "out")[1] == {**old, "resize": "square", "logit_scale": scale,
                                                "probability": "softmax"}


def test_export_with_an_unknown_resize_is_damaged_and_says_to_export_again(model, tmp_path):
    meta = export_meta({"name": "resnet32", "num_classes": 3}, None, None, MEAN, STD, 32)
    write_export(tmp_path / "out", model.state_dict(), {**meta, "resize": "stretch"})
    with pytest.raises(CheckpointError, match=r"model.json is damaged \(resize 'stretch' is none of square, "
                                              r"shorter_side_crop\); delete its model.pt and model.json"):
        load_export(tmp_path / "out")


@pytest.mark.parametrize("edit, problem", [
    ({"image_size": 0}, "image_size 0 is not a positive int (pixels)"),
    ({"image_size": "big"}, "image_size 'big' is not a positive int (pixels)"),
    ({"num_classes": 3.0}, "num_classes 3.0 is not a positive int"),
    ({"mean": [0.5, 0.5]}, "mean and std must be 3 numbers each (std > 0)"),
    ({"std": [0.2, 0.0, 0.2]}, "mean and std must be 3 numbers each (std > 0)"),
    ({"class_names": ["a", "b"]}, "class_names must be 3 names"),
    ({"class_counts": [5, -1, 2]}, "class_counts must be 3 counts"),
    ({"logit_scale": "x"}, "logit_scale 'x' is not a number > 0 or null"),
    ({"probability": "tanh"}, "probability 'tanh' is none of softmax, sigmoid"),
])
def test_an_edited_model_json_is_damaged_naming_the_key_before_any_image_is_read(model, tmp_path, edit, problem):
    """A hand edit that inference would trip over mid-way (a resize to 0 pixels, a class without a name)."""
    meta = export_meta({"name": "resnet32", "num_classes": 3}, ["a", "b", "c"], [5, 3, 2], MEAN, STD, 32)
    write_export(tmp_path / "out", model.state_dict(), {**meta, **edit})
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{tmp_path / 'out' / 'model.json'} is damaged "
                                                              f"({problem}); delete its model.pt and model.json")):
        load_export(tmp_path / "out")
    write_export(tmp_path / "whole", model.state_dict(), meta)
    assert load_export(tmp_path / "whole")[1] == meta


@pytest.mark.parametrize("error, message", [
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/d/f/out"), "/d/f/out: a folder on this path is a file"),
    (FileExistsError(errno.EEXIST, "File exists", "/d/f"), "/d/f: a file stands where a folder is needed"),
    (PermissionError(errno.EACCES, "Permission denied", "/d/ro"), "/d/ro: Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (FileExistsError("out already holds an export; give another --export folder"),
     "out already holds an export; give another --export folder")])
def test_path_error_message_names_the_path_and_what_is_in_the_way(error, message):
    assert path_error_message(error) == message


def test_an_export_path_through_a_symbolic_link_to_nothing_is_named_as_such(tmp_path):
    (tmp_path / "exp").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OSError) as e:
        (tmp_path / "exp").mkdir(parents=True)
    assert path_error_message(e.value) == f"{tmp_path / 'exp'}: a symbolic link to {tmp_path / 'nowhere'}, which " \
                                          f"does not exist (a disk not mounted?)"
