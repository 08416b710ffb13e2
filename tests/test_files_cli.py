"""Both stages and --test on image-file datasets (class folders, split lists), in real processes."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.conftest import write_image_folder, write_image_lists

pytestmark = pytest.mark.slow

CLASSES = ("ant", "bee", "cow")
FAST = ("data.image_size=16", "data.workers=1", "train.batch_size=8", "train.num_threads=1", "eval.batch_size=16",
        "model.channels_last=false", "train.warmup=0")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    return write_image_folder(root, {"train": dict.fromkeys(CLASSES, 12), "val": dict.fromkeys(CLASSES, 2),
                                     "test": dict.fromkeys(CLASSES, 4)})


def _error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


def test_a_long_tailed_folder_trains_both_stages_and_tests(folder, tmp_path, run):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    run("stage1_train.py", "data.dataset=folder", f"data.root={folder}", "data.imbalance_factor=4", *FAST,
        "train.epochs=2", "train.warmup=1", f"log_dir={s1}")
    run("stage2_classifier.py", f"stage1.checkpoint={s1 / 'best.pt'}", f"data.root={folder}", *FAST[1:],
        "stage2.method=balms", "stage2.cache_views=2", "meta_sampler.meta_batch_size=6", "train.iterations=4",
        f"log_dir={s2}")
    run("stage2_classifier.py", f"log_dir={s2}", f"data.root={folder}", "data.workers=1", "--test")
    # The cached views sit on disk as float16: 2 views of the 21 training images, 64 ResNet-32 features;
    # BALMS's meta batches come from the val/ folder (6 images).
    assert np.load(s2 / "features_train.npy", mmap_mode="r").shape == (2, 21, 64)
    assert np.load(s2 / "features_meta.npy", mmap_mode="r").dtype == np.float16
    report = json.loads((s2 / "test_metrics.json").read_text())
    assert report["train_class_counts"] == [12, 6, 3]  # exp long tail of 12 at IF 4
    assert report["class_names"] == list(CLASSES) and len(report["per_class"]) == 3
    assert sum(map(sum, report["confusion_matrix"])) == 12  # the 4 test images of each class
    assert report["few"] is not None and report["many"] is None and report["medium"] is None  # all < 20 images
    assert len(json.loads((s1 / "metrics.jsonl").read_text().splitlines()[-1]).keys() & {"val_top1"}) == 1
    # predict.py takes a folder model's image size (16) and ImageNet normalisation from its checkpoint.
    images = [str(folder / "test" / c / "0.jpg") for c in CLASSES]
    lines = run("predict.py", str(s2 / "best.pt"), *images).stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == images and all(line.split("\t")[1] in CLASSES for line in lines)


def test_split_lists_train_stage1_and_crt_and_test(tmp_path, run):
    root = write_image_lists(tmp_path / "places", {"Places_LT_train.txt": [0] * 6 + [1] * 4 + [2] * 2,
                                                   "Places_LT_val.txt": [0, 1, 2], "Places_LT_test.txt": [0, 1, 2, 2]})
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    run("stage1_train.py", "data.dataset=places_lt", f"data.root={root}", *FAST, "train.iterations=3", f"log_dir={s1}")
    # 362 of Places-LT's 365 classes have no image in this list: Balanced Softmax's log counts cannot take
    # them, refused in one line before any feature is computed, and the refused run leaves no directory.
    proc = run("stage2_classifier.py", f"stage1.checkpoint={s1 / 'last.pt'}", f"data.root={root}", *FAST[1:],
               "stage2.method=balanced_softmax", "stage2.cache_views=1", f"log_dir={tmp_path / 'bs'}", check=False)
    assert _error_line(proc) == (
        "config error: stage2.method=balanced_softmax (balanced_softmax loss): this loss uses log or inverse class "
        "counts, so every class needs a training image; classes with none: 3, 4, 5, 6, 7, ... (362 of 365): train "
        "stage 1 on data with every class, or use stage2.method=crt")
    assert not (tmp_path / "bs").exists()
    proc = run("stage1_train.py", "data.dataset=places_lt", f"data.root={root}", *FAST, "loss.name=balanced_softmax",
               f"log_dir={tmp_path / 'bs1'}", check=False)
    assert _error_line(proc).endswith("classes with none: 3, 4, 5, 6, 7, ... (362 of 365): train on data with every "
                                      "class, or use loss.name=ce or focal")
    run("stage2_classifier.py", f"stage1.checkpoint={s1 / 'last.pt'}", f"data.root={root}", *FAST[1:],
        "stage2.method=crt", "stage2.cache_views=1", "train.iterations=2", f"log_dir={s2}")
    run("stage2_classifier.py", f"log_dir={s2}", f"data.root={root}", "data.workers=1", "--test")
    report = json.loads((s2 / "test_metrics.json").read_text())
    assert len(report["per_class"]) == 365
    assert report["train_class_counts"][:4] == [6, 4, 2, 0] and sum(report["train_class_counts"]) == 12
    assert sum(map(sum, report["confusion_matrix"])) == 4


@pytest.mark.parametrize("dataset, override, reader", [
    ("folder", "data.cutout=8", "cifar"), ("folder", "data.list_dir=x", "list"),
    ("cifar10", "data.workers=2", "folder and list"), ("imagenet_lt", "data.imbalance_factor=10", "cifar and folder"),
    ("places_lt", "data.subset_draw=ldam", "cifar and folder"),
])
def test_a_key_another_kind_of_dataset_reads_is_a_config_error(tmp_path, run, dataset, override, reader):
    proc = run("stage1_train.py", f"data.dataset={dataset}", override, f"log_dir={tmp_path / 'x'}", check=False)
    line = _error_line(proc)
    assert line.startswith(f"config error: {override.split('=')[0]}=") and f"read for {reader} datasets only" in line
    assert not (tmp_path / "x").exists()


def test_an_unknown_dataset_lists_the_valid_ones(tmp_path, run):
    line = _error_line(run("stage1_train.py", "data.dataset=imagenet", f"log_dir={tmp_path / 'x'}", check=False))
    assert "data.dataset" in line and "imagenet_lt" in line and "folder" in line and "cifar100" in line


def test_bad_image_files_are_one_line_each(tmp_path, run):
    root = write_image_lists(tmp_path / "inet", {"ImageNet_LT_train.txt": [0, 1], "ImageNet_LT_val.txt": [0]})
    args = ("stage1_train.py", "data.dataset=imagenet_lt", f"data.root={root}", *FAST, "train.iterations=1")
    run(*args, f"log_dir={tmp_path / 'a'}")  # training needs no test list
    (root / "ImageNet_LT_train.txt").write_text("images/ImageNet_LT_train/0.jpg 1000\n")
    line = _error_line(run(*args, f"log_dir={tmp_path / 'b'}", check=False))
    assert line.startswith("error: ") and "ImageNet_LT_train.txt:1" in line and "1000" in line
    (root / "ImageNet_LT_train.txt").write_text("images/ImageNet_LT_train/0.jpg 0\nimages/gone.jpg 1\n")
    line = _error_line(run(*args, f"log_dir={tmp_path / 'c'}", check=False))
    assert "ImageNet_LT_train.txt:2" in line and "gone.jpg" in line
    (root / "ImageNet_LT_train.txt").write_text("images/ImageNet_LT_train/0.jpg 0\n")
    (root / "ImageNet_LT_val.txt").unlink()
    line = _error_line(run(*args, f"log_dir={tmp_path / 'd'}", check=False))
    assert "ImageNet_LT_val.txt" in line

    folder = write_image_folder(tmp_path / "f", {"train": {"a": 3, "b": 3}, "test": {"a": 1, "c": 1}})
    (folder / "train" / "b" / "0.jpg").write_bytes(b"not a jpeg")
    s1 = tmp_path / "f1"
    stage1 = ("stage1_train.py", "data.dataset=folder", f"data.root={folder}", "data.imbalance_factor=1", *FAST,
              f"log_dir={s1}")
    stray = "test/c: class 'c' has no folder in the training split"
    line = _error_line(run(*stage1, "train.iterations=2", "train.batch_size=6", check=False))
    assert line.startswith("error: ") and stray in line  # as training starts, not at the --test after it
    shutil.move(folder / "test" / "c", tmp_path / "c")
    line = _error_line(run(*stage1, "train.iterations=2", "train.batch_size=6", check=False))
    assert "cannot decode image" in line and "0.jpg" in line
    (folder / "train" / "b" / "0.jpg").unlink()
    run(*stage1, "train.iterations=1", "train.batch_size=4", "--resume")
    shutil.move(tmp_path / "c", folder / "test" / "c")  # a class folder that came after the run
    line = _error_line(run("stage1_train.py", f"log_dir={s1}", f"data.root={folder}", "data.workers=1", "--test",
                           check=False))
    assert line.startswith("error: ") and stray in line
