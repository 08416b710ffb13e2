"""predict.py as a user runs it: classify image files with a checkpoint or an export, and write an export."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from config.load import config_to_dict
from config.schema import Config
from data.augment import CIFAR10_MEAN, CIFAR10_STD, normalize
from models.checkpoint import save_checkpoint
from models.export import export_meta, write_export
from models.registry import build_model

pytestmark = pytest.mark.slow

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def checkpoint(tmp_path):
    """A stage-2-like checkpoint of this tool (random ResNet-32, CIFAR-10 config) and its model."""
    torch.manual_seed(0)
    model = build_model("resnet32", 10).eval()
    with torch.no_grad():
        model.head.bias.copy_(torch.linspace(-2, 2, 10))  # confident, distinct predictions
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_args": {"name": "resnet32", "num_classes": 10},
                           "class_counts": [50, 40, 30, 25, 20, 15, 12, 10, 7, 5], "class_names": NAMES,
                           "config": config_to_dict(Config())})
    return path, model


@pytest.fixture
def image_files(tmp_path) -> list:
    """Two 32x32 PNGs and a 48x20 JPEG (resized to 32x32 by predict)."""
    rng = np.random.default_rng(0)
    paths = []
    for name, (w, h) in (("a.png", (32, 32)), ("b.png", (32, 32)), ("c.jpg", (48, 20))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def _expected_lines(model, paths) -> list[str]:
    """What predict must print: the same decoding, resize and normalisation, done here in-process."""
    images = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        if img.size != (32, 32):
            img = img.resize((32, 32), Image.Resampling.BILINEAR)
        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    with torch.no_grad():
        probs = model(normalize(torch.stack(images), CIFAR10_MEAN, CIFAR10_STD)).softmax(dim=1)
    conf, pred = probs.max(dim=1)
    return [f"{p}\t{NAMES[c]}\t{q:.4f}" for p, c, q in zip(paths, pred.tolist(), conf.tolist())]


def test_predict_prints_class_and_probability_per_image(checkpoint, image_files, run):
    path, model = checkpoint
    proc = run("predict.py", str(path), *map(str, image_files))
    assert proc.stdout.splitlines() == _expected_lines(model, image_files)
    assert run("predict.py", str(path), "--device", "cpu", *map(str, image_files)).stdout == proc.stdout
    bad = run("predict.py", str(path), "--device", "tpu", *map(str, image_files), check=False)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: train.device='tpu' is not one of")


def test_export_writes_plain_state_dict_and_json_that_predict_the_same(checkpoint, image_files, tmp_path, run):
    path, model = checkpoint
    out = tmp_path / "exported"
    assert run("predict.py", str(path), "--export", str(out)).stdout.strip() == f"wrote {out}"
    meta = json.loads((out / "model.json").read_text())
    assert meta == {"format": "lt-decoupled-export/1", "arch": "resnet32", "head": "linear", "num_classes": 10,
                    "class_names": NAMES,
                    "class_counts": [50, 40, 30, 25, 20, 15, 12, 10, 7, 5], "mean": list(CIFAR10_MEAN),
                    "std": list(CIFAR10_STD), "image_size": 32}
    state = torch.load(out / "model.pt", weights_only=True)
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    proc = run("predict.py", str(out), *map(str, image_files))
    assert proc.stdout.splitlines() == _expected_lines(model, image_files)


def test_imported_checkpoint_without_config_needs_the_dataset(checkpoint, image_files, tmp_path, run):
    _, model = checkpoint
    path = tmp_path / "imported.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_args": {"name": "resnet32", "num_classes": 10},
                           "class_counts": None, "class_names": None, "config": None})
    proc = run("predict.py", str(path), str(image_files[0]), check=False)
    assert proc.returncode == 2 and "records no training dataset; pass --dataset (cifar10 | cifar100 | folder | imagenet_lt | places_lt | inat2018)" in proc.stderr
    proc = run("predict.py", str(path), str(image_files[0]), "--dataset", "cifar10")
    expected = _expected_lines(model, image_files[:1])[0].split("\t")
    assert proc.stdout.split("\t") == [expected[0], str(NAMES.index(expected[1])), expected[2] + "\n"]


def _one_error_line(proc) -> str:
    """The one stderr line of a user error: exit status 2, no traceback, nothing on stdout."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_unreadable_image_is_skipped_and_the_others_still_classified(checkpoint, image_files, tmp_path, run):
    path, model = checkpoint
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    proc = run("predict.py", str(path), str(image_files[0]), str(notes), *map(str, image_files[1:]), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stdout.splitlines() == _expected_lines(model, image_files)
    assert proc.stderr.splitlines() == [
        f"error: cannot read {notes} as an image (cannot identify image file '{notes}'); skipped"]


def test_batch_of_only_unreadable_images_prints_one_error_line_each_and_no_results(checkpoint, tmp_path, run):
    path, _ = checkpoint
    (tmp_path / "notes.txt").write_text("not an image")
    proc = run("predict.py", str(path), str(tmp_path / "notes.txt"), str(tmp_path / "missing.png"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"error: cannot read {tmp_path / 'notes.txt'} as an image (")
    assert lines[1] == (f"error: cannot read {tmp_path / 'missing.png'} as an image "
                        f"([Errno 2] No such file or directory: '{tmp_path / 'missing.png'}'); skipped")


@pytest.mark.parametrize("value", ["0", "-3"])
def test_batch_size_below_one_is_one_line_before_anything_loads(value, tmp_path, run):
    # The checkpoint does not exist: the command line is refused before it is looked for.
    proc = run("predict.py", str(tmp_path / "none.pt"), "a.png", f"--batch-size={value}", check=False)
    assert _one_error_line(proc) == (f"predict.py: error: argument --batch-size: expected a whole number of "
                                     f"at least 1, got '{value}'; see --help")


def test_export_never_overwrites_an_existing_export(checkpoint, tmp_path, run):
    path, _ = checkpoint
    out = tmp_path / "exported"
    out.mkdir()
    (out / "model.json").write_text("{}")  # even an export of another model, or half of one
    proc = run("predict.py", str(path), "--export", str(out), check=False)
    assert _one_error_line(proc) == (f"error: {out} already holds an export (model.pt, model.json); give another "
                                     f"--export folder, or delete those two files first")
    assert [p.name for p in out.iterdir()] == ["model.json"] and (out / "model.json").read_text() == "{}"


@pytest.mark.parametrize("damage, file, cause", [
    ("json", "model.json", "Expecting value: line 1 column 1 (char 0)"),
    ("keys", "model.json", "missing arch, num_classes, class_names, mean, std, image_size"),
    ("truncated", "model.pt", "RuntimeError: PytorchStreamReader failed reading zip archive")])
def test_damaged_export_is_one_line_that_names_the_file_and_says_to_export_again(damage, file, cause, checkpoint,
                                                                                image_files, tmp_path, run):
    _, model = checkpoint
    out = tmp_path / "exported"
    write_export(out, model.state_dict(), export_meta({"name": "resnet32", "num_classes": 10}, NAMES, None,
                                                      CIFAR10_MEAN, CIFAR10_STD, 32))
    if damage == "json":
        (out / "model.json").write_text("not json")
    elif damage == "keys":
        (out / "model.json").write_text(json.dumps({"format": "lt-decoupled-export/1"}))
    else:
        (out / "model.pt").write_bytes((out / "model.pt").read_bytes()[:1000])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = _one_error_line(run("predict.py", str(out), str(image_files[0]), check=False))
    assert line.startswith(f"error: {out / file} is damaged ({cause}")
    assert line.endswith(f"); delete its model.pt and model.json and export again: "
                         f"python predict.py <checkpoint.pt> --export {out}")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
