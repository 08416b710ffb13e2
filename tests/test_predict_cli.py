"""predict.py as a user runs it: classify image files with a checkpoint or an export, and write an export."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from config.load import config_to_dict
from config.schema import Config
from data.augment import CIFAR10_MEAN, CIFAR10_STD, normalize
from data.image_files import IMAGENET_MEAN, IMAGENET_STD, decode_rgb, eval_transform
from models.checkpoint import save_checkpoint
from models.export import export_meta, write_export
from models.registry import build_model
from tests.conftest import REPO

pytestmark = pytest.mark.slow

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# The fixture model's class of each colour: it classifies an image by the colour of these it is closest to.
COLOURS = [(100, 150, 220), (200, 40, 40), (220, 200, 40), (130, 130, 130), (140, 90, 40), (220, 220, 220),
           (40, 180, 40), (40, 40, 40), (40, 40, 200), (200, 40, 200)]
TEMPERATURE = 0.5  # logits -0.5 * squared distance: probabilities well inside (0, 1), which any change of input moves


def _normalised(image: torch.Tensor) -> torch.Tensor:
    """(x / 255 - mean) / std of a uint8 (..., 3, H, W) image with CIFAR-10's statistics, written out here."""
    mean, std = torch.tensor(CIFAR10_MEAN)[:, None, None], torch.tensor(CIFAR10_STD)[:, None, None]
    return (image.float() / 255 - mean) / std


def _colour_features(rgb) -> torch.Tensor:
    """(relu(x), relu(-x)) of the normalised channels x of a solid image of colour rgb: the fixture's features."""
    x = _normalised(torch.tensor(rgb, dtype=torch.uint8)[:, None, None]).flatten()
    return torch.cat([x.clamp(min=0), (-x).clamp(min=0)])


def _colour_resnet32() -> torch.nn.Module:
    """A ResNet-32 whose logits are a known function of the image: its stem copies the normalised channels x
    (and -x) through a ReLU, every residual branch is zeroed (bn2 weight 0), so the option-A shortcuts carry
    relu(x), relu(-x) to feature channels 24..29 (padded by 8, then 16 channels), averaged over the pixels
    (4i, 4j); the head's logit of class c is -TEMPERATURE * ||f - p_c||^2 + TEMPERATURE * ||f||^2, p_c the
    features of COLOURS[c]. A nearly solid image of COLOURS[c] is class c, with probability below 1."""
    torch.manual_seed(0)
    model = build_model("resnet32", 10).eval()
    prototypes = torch.stack([_colour_features(rgb) for rgb in COLOURS])  # (10, 6)
    with torch.no_grad():
        model.conv1.weight.zero_()
        for k in range(3):
            model.conv1.weight[k, k, 1, 1], model.conv1.weight[3 + k, k, 1, 1] = 1.0, -1.0
        for stage in (model.layer1, model.layer2, model.layer3):
            for block in stage:
                block.bn2.weight.zero_()
                block.bn2.bias.zero_()
        model.head.weight.zero_()
        model.head.weight[:, 24:30] = 2 * TEMPERATURE * prototypes
        model.head.bias.copy_(-TEMPERATURE * prototypes.pow(2).sum(dim=1))
    return model


@pytest.fixture
def checkpoint(tmp_path):
    """A stage-2-like checkpoint of this tool (CIFAR-10 config) of _colour_resnet32, and the model."""
    model = _colour_resnet32()
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_args": {"name": "resnet32", "num_classes": 10},
                           "class_counts": [50, 40, 30, 25, 20, 15, 12, 10, 7, 5], "class_names": NAMES,
                           "config": config_to_dict(Config())})
    return path, model


def _noisy(rgb, w: int, h: int, rng) -> np.ndarray:
    """An (h, w, 3) uint8 image of colour rgb with noise of standard deviation 8."""
    return np.clip(np.array(rgb) + rng.normal(0, 8, (h, w, 3)), 0, 255).round().astype(np.uint8)


# The classes image_files' colours (red, blue, green) are made to be: a different class each, and swapping the
# red and blue channels swaps the first two.
IMAGE_CLASSES = ["automobile", "ship", "frog"]


@pytest.fixture
def image_files(tmp_path) -> list:
    """Two 32x32 PNGs, red and blue, and a green 48x20 JPEG (resized to 32x32 by predict)."""
    rng = np.random.default_rng(0)
    paths = []
    for name, (w, h), rgb in (("a.png", (32, 32), COLOURS[1]), ("b.png", (32, 32), COLOURS[8]),
                              ("c.jpg", (48, 20), COLOURS[6])):
        Image.fromarray(_noisy(rgb, w, h, rng)).save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def _expected_lines(model, paths) -> list[str]:
    """What predict must print: the images decoded by Pillow, resized and normalised here in-process, through
    the model; their classes are checked against IMAGE_CLASSES by the callers."""
    images = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        if img.size != (32, 32):
            img = img.resize((32, 32), Image.Resampling.BILINEAR)
        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    with torch.no_grad():
        probs = model(_normalised(torch.stack(images))).softmax(dim=1)
    conf, pred = probs.max(dim=1)
    return [f"{p}\t{NAMES[c]}\t{q:.4f}" for p, c, q in zip(paths, pred.tolist(), conf.tolist())]


def test_the_fixture_model_classifies_each_colour_by_its_nearest_prototype_with_a_probability_below_one():
    """The fixture model computes the function its docstring says: a solid image of COLOURS[c] has the
    logits -TEMPERATURE * ||f - p_j||^2 (up to a constant), f = p_c."""
    model = _colour_resnet32()
    solid = torch.stack([torch.tensor(rgb, dtype=torch.uint8)[:, None, None].expand(3, 32, 32) for rgb in COLOURS])
    prototypes = torch.stack([_colour_features(rgb) for rgb in COLOURS])
    expected = (-TEMPERATURE * torch.cdist(prototypes, prototypes).pow(2)).softmax(dim=1)
    with torch.no_grad():
        probs = model(_normalised(solid)).softmax(dim=1)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-4)  # BatchNorm's eps scales x by 1 - 5e-6
    assert probs.argmax(dim=1).tolist() == list(range(10)) and probs.max() < 0.99


def test_predict_prints_class_and_probability_per_image(checkpoint, image_files, run):
    path, model = checkpoint
    proc = run("predict.py", str(path), *map(str, image_files))
    assert proc.stdout.splitlines() == _expected_lines(model, image_files)
    assert [line.split("\t")[1] for line in proc.stdout.splitlines()] == IMAGE_CLASSES
    assert run("predict.py", str(path), "--device", "cpu", *map(str, image_files)).stdout == proc.stdout
    bad = run("predict.py", str(path), "--device", "tpu", *map(str, image_files), check=False)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --device 'tpu' is not one of")
    if not torch.cuda.is_available():  # the fix names predict.py's own option, not the training config's key
        bad = run("predict.py", str(path), "--device", "cuda", *map(str, image_files), check=False)
        assert bad.stderr.strip() == "error: --device cuda: no CUDA device is visible here; use --device cpu (or auto)"


def test_export_writes_plain_state_dict_and_json_that_predict_the_same(checkpoint, image_files, tmp_path, run):
    path, model = checkpoint
    out = tmp_path / "exported"
    assert run("predict.py", str(path), "--export", str(out)).stdout.strip() == (
        f"wrote {out}/model.pt and {out}/model.json; classify with: python predict.py {out} IMAGE ...")
    meta = json.loads((out / "model.json").read_text())
    assert meta == {"format": "lt-decoupled-export/1", "arch": "resnet32", "head": "linear", "num_classes": 10,
                    "class_names": NAMES,
                    "class_counts": [50, 40, 30, 25, 20, 15, 12, 10, 7, 5], "mean": list(CIFAR10_MEAN),
                    "std": list(CIFAR10_STD), "image_size": 32, "resize": "square", "logit_scale": 1.0,
                    "probability": "softmax"}
    state = torch.load(out / "model.pt", weights_only=True)
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    proc = run("predict.py", str(out), *map(str, image_files))
    assert proc.stdout.splitlines() == _expected_lines(model, image_files)
    assert [line.split("\t")[1] for line in proc.stdout.splitlines()] == IMAGE_CLASSES


def test_imported_checkpoint_without_config_needs_the_dataset(checkpoint, image_files, tmp_path, run):
    _, model = checkpoint
    path = tmp_path / "imported.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_args": {"name": "resnet32", "num_classes": 10},
                           "class_counts": None, "class_names": None, "config": None})
    proc = run("predict.py", str(path), str(image_files[0]), check=False)
    assert proc.returncode == 2 and ("records no training dataset; pass --dataset (cifar10 | cifar100 | folder | "
                                     "imagenet_lt | places_lt | inat2018)") in proc.stderr
    proc = run("predict.py", str(path), str(image_files[0]), "--dataset", "cifar10")
    expected = _expected_lines(model, image_files[:1])[0].split("\t")
    assert expected[1] == IMAGE_CLASSES[0]
    assert proc.stdout.split("\t") == [expected[0], str(NAMES.index(expected[1])), expected[2] + "\n"]


def test_dataset_other_than_the_checkpoint_s_own_is_one_line_not_a_silent_other_normalisation(checkpoint,
                                                                                                 image_files, run):
    path, model = checkpoint
    same = run("predict.py", str(path), str(image_files[0]), "--dataset", "cifar10")  # its own: no harm
    assert same.stdout.splitlines() == _expected_lines(model, image_files[:1])
    proc = run("predict.py", str(path), str(image_files[0]), "--dataset", "cifar100", check=False)
    assert _one_error_line(proc) == (f"error: {path} was trained on cifar10, not cifar100: its normalisation and "
                                     "image size are cifar10's; leave --dataset out (it is for checkpoints that "
                                     "record no dataset)")


def test_a_run_directory_given_as_the_model_names_its_checkpoints_to_classify_or_export_with(checkpoint, image_files,
                                                                                             tmp_path, run):
    path, _ = checkpoint
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(path.read_bytes())
    for extra in ([str(image_files[0])], ["--export", str(tmp_path / "out")]):
        proc = run("predict.py", str(run_dir), *extra, check=False)
        expected = f"error: {run_dir} is a run directory, not an export: pass {run_dir / 'last.pt'}"
        assert _one_error_line(proc) == expected
    assert not (tmp_path / "out").exists()


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
    assert [line.split("\t")[1] for line in proc.stdout.splitlines()] == IMAGE_CLASSES
    assert proc.stderr.splitlines() == [
        f"error: cannot read {notes} as an image (not a JPEG, PNG, WebP or GIF image); skipped"]


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


@pytest.mark.parametrize("inside", ["file/out", "file"])
def test_export_to_a_path_through_a_file_is_one_line_naming_it_and_the_fix(inside, checkpoint, tmp_path, run):
    path, _ = checkpoint
    (tmp_path / "file").write_text("a file, not a folder")
    proc = run("predict.py", str(path), "--export", str(tmp_path / inside), check=False)
    what = "a folder on this path is a file" if inside == "file/out" else "a file stands where a folder is needed"
    assert _one_error_line(proc) == (f"error: cannot write the export: {tmp_path / inside}: {what}; give --export "
                                     f"a new folder in one you can write")
    assert (tmp_path / "file").read_text() == "a file, not a folder"


def _classify(argv: list[str], capsys) -> tuple[str, str]:
    """predict.py's stdout and stderr, run in this process (single-threaded, as the tests' other runs)."""
    torch.set_num_threads(1)
    predict.main([*argv, "--device", "cpu"])
    out = capsys.readouterr()
    return out.out, out.err


def _line(path, probs: torch.Tensor, names) -> str:
    conf, pred = probs.max(dim=1)
    return f"{path}\t{names[int(pred)] if names else int(pred)}\t{float(conf):.4f}\n"


def test_16_bit_png_reads_as_evaluation_decodes_it_not_nearly_white(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    ramp = np.linspace(0, 65535, 32 * 32).astype(np.uint16).reshape(32, 32)  # 16-bit grayscale, mode I;16
    png = tmp_path / "deep.png"
    Image.fromarray(ramp).save(png)
    decoded = decode_rgb(png)
    assert decoded.float().std() > 50  # a ramp, which Pillow's convert("RGB") turned nearly white
    meta = predict.checkpoint_for_inference(str(path), None)[1]
    paths, images = predict.read_images([str(png)])
    assert paths == [str(png)] and torch.equal(images[0], decoded)
    x = predict.model_input(meta)(decoded)
    assert torch.equal(x, _normalised(decoded))  # CIFAR models: 32x32 kept as it is
    with torch.no_grad():
        expected = _line(png, model(x[None]).softmax(dim=1), NAMES)
    assert _classify([str(path), str(png)], capsys) == (expected, "")


def test_animated_gif_is_classified_by_its_first_frame(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    greys = (40, 130, 220)  # the fixture model's horse, cat and dog: each frame a different line
    frames = [Image.fromarray(np.full((32, 32, 3), grey, dtype=np.uint8)) for grey in greys]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    stills = [tmp_path / f"frame{i}.png" for i in range(3)]
    for frame, still in zip(frames, stills):
        frame.save(still)
    assert predict.read_images([str(tmp_path / "anim.gif")])[1][0].shape == (3, 32, 32)
    out, err = _classify([str(path), str(tmp_path / "anim.gif"), *map(str, stills)], capsys)
    with torch.no_grad():
        solid = torch.tensor(greys, dtype=torch.uint8)[:, None, None, None].expand(3, 3, 32, 32)
        probs = model(_normalised(solid)).softmax(dim=1)
    expected = [_line(p, q[None], NAMES) for p, q in zip([tmp_path / "anim.gif", *stills], probs[[0, 0, 1, 2]])]
    assert err == "" and out.splitlines(keepends=True) == expected
    assert [line.split("\t")[1] for line in expected] == ["horse", "horse", "cat", "dog"]


@pytest.fixture
def folder_checkpoint(tmp_path):
    """A stage-1-like checkpoint of an image-file model (data.dataset=folder, trained at 40x40) and its model."""
    torch.manual_seed(0)
    model = build_model("resnet10", 3).eval()
    cfg = Config()
    cfg.data.dataset, cfg.data.image_size = "folder", 40
    path = tmp_path / "folder.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_args": {"name": "resnet10", "num_classes": 3,
                                                                       "head": "linear"},
                           "class_counts": [9, 4, 2], "class_names": ["ant", "bee", "cow"],
                           "config": config_to_dict(cfg, "stage1")})
    return path, model


def test_image_file_model_input_is_the_evaluation_transform_of_a_non_square_image(folder_checkpoint, tmp_path,
                                                                                 capsys):
    path, model = folder_checkpoint
    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(image)
    meta = predict.checkpoint_for_inference(str(path), None)[1]
    assert (meta["image_size"], meta["resize"], meta["mean"], meta["std"]) == (
        40, "shorter_side_crop", list(IMAGENET_MEAN), list(IMAGENET_STD))
    evaluated = eval_transform(40)(decode_rgb(image))  # what --test feeds the model: shorter side 46, centre 40x40
    x = predict.model_input(meta)(decode_rgb(image))
    assert x.shape == (3, 40, 40) and torch.equal(x, evaluated)
    with torch.no_grad():
        expected = _line(image, model(evaluated[None]).softmax(dim=1), ["ant", "bee", "cow"])
    assert _classify([str(path), str(image)], capsys) == (expected, "")
    predict.main([str(path), "--export", str(tmp_path / "exported")])  # the export preprocesses the same way
    capsys.readouterr()
    assert _classify([str(tmp_path / "exported"), str(image)], capsys) == (expected, "")


@pytest.mark.parametrize("loss, scale, applied", [("ldam", None, 30.0), ("ldam", 10.0, 10.0), ("ce", None, 1.0)])
def test_cosine_head_probabilities_use_the_logit_scale_the_training_loss_applied(loss, scale, applied, image_files,
                                                                               tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("resnet32", 10, head="cosine").eval()
    cfg = Config()
    cfg.loss.name, cfg.loss.scale, cfg.model.head = loss, scale, "cosine"
    path = tmp_path / "ldam.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_args": {"name": "resnet32", "num_classes": 10,
                                                                       "head": "cosine"},
                           "class_counts": [50, 40, 30, 25, 20, 15, 12, 10, 7, 5], "class_names": NAMES,
                           "config": config_to_dict(cfg, "stage1")})
    x = normalize(torch.stack(predict.read_images([str(image_files[0])])[1]), CIFAR10_MEAN, CIFAR10_STD)
    with torch.no_grad():
        expected = _line(image_files[0], (applied * model(x)).softmax(dim=1), NAMES)
    assert _classify([str(path), str(image_files[0])], capsys) == (expected, "")
    predict.main([str(path), "--export", str(tmp_path / "exported")])
    capsys.readouterr()
    assert json.loads((tmp_path / "exported" / "model.json").read_text())["logit_scale"] == applied
    assert _classify([str(tmp_path / "exported"), str(image_files[0])], capsys) == (expected, "")



@pytest.mark.parametrize("loss, params, probability", [
    ("focal", {"form": "sigmoid"}, "sigmoid"), ("class_balanced", {"variant": "sigmoid"}, "sigmoid"),
    ("class_balanced", {"variant": "focal"}, "sigmoid"), ("class_balanced", {}, "softmax"), ("focal", {}, "softmax"),
])
def test_a_model_trained_with_a_sigmoid_loss_reports_the_sigmoid_of_its_logit(loss, params, probability, image_files,
                                                                              tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("resnet32", 10).eval()
    cfg = Config()
    cfg.loss.name = loss
    for key, value in params.items():
        setattr(cfg.loss, key, value)
    path = tmp_path / "sigmoid.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_args": {"name": "resnet32", "num_classes": 10},
                           "class_counts": [50, 40, 30, 25, 20, 15, 12, 10, 7, 5], "class_names": NAMES,
                           "config": config_to_dict(cfg, "stage1")})
    x = normalize(torch.stack(predict.read_images([str(image_files[0])])[1]), CIFAR10_MEAN, CIFAR10_STD)
    with torch.no_grad():
        logits = model(x)
    expected = _line(image_files[0], logits.sigmoid() if probability == "sigmoid" else logits.softmax(dim=1), NAMES)
    assert _classify([str(path), str(image_files[0])], capsys) == (expected, "")
    predict.main([str(path), "--export", str(tmp_path / "exported")])
    capsys.readouterr()
    assert json.loads((tmp_path / "exported" / "model.json").read_text())["probability"] == probability
    assert _classify([str(tmp_path / "exported"), str(image_files[0])], capsys) == (expected, "")

def test_cosine_head_without_a_recorded_scale_prints_its_cosine_labelled_as_a_score(image_files, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("resnet32", 10, head="cosine").eval()
    path = tmp_path / "imported.pt"  # as `python -m models import` writes: no training config
    save_checkpoint(path, {"model": model.state_dict(), "model_args": {"name": "resnet32", "num_classes": 10,
                                                                       "head": "cosine"},
                           "class_counts": None, "class_names": None, "config": None})
    x = normalize(torch.stack(predict.read_images([str(image_files[0])])[1]), CIFAR10_MEAN, CIFAR10_STD)
    with torch.no_grad():
        expected = _line(image_files[0], model(x), None)
    note = ("note: the model has a cosine head and records no logit scale (no training config): the third column "
            "is the cosine of the image's features and the class's weights, in [-1, 1], not a probability\n")
    assert _classify([str(path), str(image_files[0]), "--dataset", "cifar10"], capsys) == (expected, note)


def test_images_are_classified_batch_size_at_a_time_each_once_in_order(checkpoint, image_files, tmp_path, capsys):
    """--batch-size changes only how many images are read at a time: every batch size prints the same lines, in
    the order given, an unreadable path in a later batch still sets exit status 2, and a last batch shorter than
    --batch-size counts no image as skipped."""
    path, model = checkpoint
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    paths = [*image_files, notes, image_files[0]]  # batches of 2: two images, an image and notes, an image
    expected = "".join(f"{line}\n" for line in _expected_lines(model, [*image_files, image_files[0]]))
    skipped = f"error: cannot read {notes} as an image (not a JPEG, PNG, WebP or GIF image); skipped\n"
    for batch_size in ("1", "2", "256"):
        with pytest.raises(SystemExit) as e:
            predict.main([str(path), *map(str, paths), "--batch-size", batch_size, "--device", "cpu"])
        assert e.value.code == 2 and capsys.readouterr() == (expected, skipped), batch_size
    assert _classify([str(path), *map(str, image_files), "--batch-size", "2"], capsys) == (
        "".join(f"{line}\n" for line in _expected_lines(model, image_files)), "")


@pytest.mark.parametrize("size", [(32, 20), (20, 32)])
def test_a_cifar_model_s_image_with_one_side_of_32_is_resized_to_32x32_too(size, checkpoint, tmp_path, capsys):
    """(width, height): an image 32 pixels wide or high but not both is resized, as one with neither side 32."""
    path, model = checkpoint
    image = tmp_path / "strip.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(image)
    meta = predict.checkpoint_for_inference(str(path), None)[1]
    assert predict.model_input(meta)(decode_rgb(image)).shape == (3, 32, 32)
    assert _classify([str(path), str(image)], capsys) == (f"{_expected_lines(model, [image])[0]}\n", "")


def test_an_export_directory_is_never_exported_again(checkpoint, image_files, tmp_path, capsys):
    path, _ = checkpoint
    out = tmp_path / "exported"
    predict.main([str(path), "--export", str(out)])
    capsys.readouterr()
    for extra in ([], [str(image_files[0])]):  # nothing is classified either
        with pytest.raises(SystemExit) as e:
            predict.main([str(out), "--export", str(tmp_path / "again"), *extra, "--device", "cpu"])
        assert e.value.code == f"error: {out} is already an export directory"
        assert capsys.readouterr() == ("", "") and not (tmp_path / "again").exists()


@pytest.mark.slow
def test_a_reader_that_stops_reading_ends_predict_quietly_as_sigpipe_would(checkpoint, image_files, tmp_path):
    many = [str(image_files[i % 3]) for i in range(400)]  # lines still to come when the reader closes
    proc = subprocess.Popen([sys.executable, "predict.py", str(checkpoint[0]), *many, "--batch-size", "50"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith(str(image_files[0]))  # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE and err == ""


def test_an_export_folder_given_with_a_tilde_is_in_the_home_folder(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    predict.main([str(checkpoint[0]), "--export=~/exported"])  # no shell expands a ~ after =
    assert (tmp_path / "home" / "exported" / "model.json").is_file() and not (tmp_path / "~").exists()
