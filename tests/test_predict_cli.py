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


def test_unreadable_image_is_named_in_one_error(checkpoint, tmp_path, run):
    path, _ = checkpoint
    (tmp_path / "notes.txt").write_text("not an image")
    proc = run("predict.py", str(path), str(tmp_path / "notes.txt"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: cannot read {tmp_path / 'notes.txt'} as an image")
