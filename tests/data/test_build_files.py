"""data.build_files: the splits of image-folder and split-list datasets, on tiny real JPEG files."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from torchvision.transforms import v2

from data.augment import CIFAR10_MEAN, CIFAR10_STD
from data.build import recorded_normalization
from data.build_files import DATASET_KINDS, FILE_DATASETS, build_file_data, data_record, read_test_split
from data.cifar import DatasetFormatError
from data.image_files import IMAGENET_MEAN, IMAGENET_STD, INAT_MEAN, INAT_STD, decode_rgb
from data.image_lists import LIST_DATASETS, read_folder_split
from data.long_tail import hold_out_per_class, long_tail_counts, long_tail_split
from tests.conftest import write_image_folder, write_image_lists

CLASSES = ("ant", "bee", "cow", "dog")


def _folder(tmp_path, train=12, test=3, val=0):
    counts = {"train": dict.fromkeys(CLASSES, train), "test": dict.fromkeys(CLASSES, test)}
    if val:
        counts["val"] = dict.fromkeys(CLASSES, val)
    return write_image_folder(tmp_path / "folder", counts)


def test_every_dataset_name_has_a_kind():
    assert set(DATASET_KINDS) == {"cifar10", "cifar100", *FILE_DATASETS}
    assert {DATASET_KINDS[n] for n in LIST_DATASETS} == {"list"} and DATASET_KINDS["folder"] == "folder"


def test_a_balanced_folder_becomes_a_long_tail_with_validation_from_the_images_it_left_out(tmp_path):
    root = _folder(tmp_path)
    data = build_file_data("folder", root, "", 4.0, "exp", 0, 2, 16)
    assert long_tail_counts(12, 4, 4.0, "exp") == [12, 7, 4, 3]  # the rule on all 12 images per class
    expected = [10, 7, 4, 3]  # the head class keeps all 12: its 2 validation images come out of them
    assert data.class_counts == expected
    assert data.class_names == list(CLASSES)
    assert torch.equal(data.val_labels, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert torch.bincount(data.train_labels).tolist() == expected
    held = set(map(str, data.val_images.images.paths))
    assert not held & set(map(str, data.train_images.images.paths))  # validation images are never trained on
    assert data.mean == IMAGENET_MEAN
    x, y = data.train_images[(0, 123)]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0



def test_a_relative_home_or_symlinked_root_reads_the_same_images_with_the_same_digest(tmp_path, monkeypatch):
    root = _folder(tmp_path, train=5)
    absolute = build_file_data("folder", root, "", 2.0, "exp", 0, 0, 16)
    (tmp_path / "link").symlink_to(root, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for given in ("folder", "./link", "~/folder"):
        data = build_file_data("folder", given, "", 2.0, "exp", 0, 0, 16)
        assert data.train_digest == absolute.train_digest, given
        assert data.train_images.images.paths == absolute.train_images.images.paths, given


@pytest.mark.parametrize("dataset", ["folder", "places_lt", "inat2018"])
def test_data_flip_reaches_the_training_images_transform_of_every_image_file_dataset(tmp_path, dataset):
    if dataset == "folder":
        root = _folder(tmp_path, train=5)
    else:
        files = {"places_lt": ("Places_LT_train.txt", "Places_LT_val.txt"), "inat2018": ("iNaturalist18_train.txt",)}
        root = write_image_lists(tmp_path / dataset, {name: [0, 0, 1] for name in files[dataset]})
    for flip in (True, False):
        data = build_file_data(dataset, root, "", 1.0 if dataset == "folder" else 100.0, "exp", 0, 0, 16, flip=flip)
        flips = [t for t in data.train_images.transform.transforms if isinstance(t, v2.RandomHorizontalFlip)]
        assert len(flips) == flip, (dataset, flip)


def test_a_split_list_of_absolute_paths_outside_the_resolved_root_is_read_and_digested(tmp_path):
    root = write_image_lists(tmp_path / "real root", {"Places_LT_train.txt": [0, 0, 1], "Places_LT_val.txt": [0, 1]})
    (tmp_path / "link").symlink_to(root, target_is_directory=True)
    for name in ("Places_LT_train.txt", "Places_LT_val.txt"):  # absolute paths through the link
        lines = (root / name).read_text().splitlines()
        (root / name).write_text("".join(f"{tmp_path / 'link'}/{line}\n" for line in lines))
    data = build_file_data("places_lt", tmp_path / "link", "", 100.0, "exp", 0, 0, 16)  # was a ValueError traceback
    assert data.class_counts[:2] == [2, 1] and len(data.train_digest) > 0
    assert build_file_data("places_lt", tmp_path / "link", "", 100.0, "exp", 0, 0, 16).train_digest == \
        data.train_digest

def test_imbalance_one_keeps_every_image_and_a_val_folder_is_the_validation_split(tmp_path):
    root = _folder(tmp_path, train=5, val=2)
    data = build_file_data("folder", root, "", 1.0, "exp", 0, 0, 16)
    assert data.class_counts == [5, 5, 5, 5]
    assert len(data.val_labels) == 8 and all(p.parts[-3] == "val" for p in data.val_images.images.paths)
    with pytest.raises(DatasetFormatError, match="is the validation split; data.val_per_class=2"):
        build_file_data("folder", root, "", 1.0, "exp", 0, 2, 16)


def test_split_lists_are_used_as_published_with_their_validation_list(tmp_path):
    labels = [0] * 5 + [1] * 3 + [7]
    root = write_image_lists(tmp_path / "pl", {"Places_LT_train.txt": labels, "Places_LT_val.txt": [0, 1, 7],
                                               "Places_LT_test.txt": [0, 7]})
    data = build_file_data("places_lt", root, "", 100.0, "exp", 0, 0, 16)
    assert len(data.class_counts) == 365
    assert data.class_counts[:8] == [5, 3, 0, 0, 0, 0, 0, 1] and sum(data.class_counts) == 9
    assert data.val_labels.tolist() == [0, 1, 7]
    assert read_test_split("places_lt", root, "", data.class_names).labels.tolist() == [0, 7]
    with pytest.raises(DatasetFormatError, match="has a validation list; data.val_per_class=1"):
        build_file_data("places_lt", root, "", 100.0, "exp", 0, 1, 16)


def test_lists_read_from_list_dir_and_inat_holds_validation_out_of_train(tmp_path):
    lists = tmp_path / "lists"
    root = write_image_lists(tmp_path / "inat", {"iNaturalist18_train.txt": [0, 0, 0, 1, 1, 1],
                                                 "iNaturalist18_val.txt": [0, 1]})
    lists.mkdir()
    for f in root.glob("*.txt"):
        f.rename(lists / f.name)
    data = build_file_data("inat2018", root, lists, 1.0, "exp", 0, 1, 16)
    assert data.class_counts[:2] == [2, 2] and data.val_labels.tolist() == [0, 1]
    assert build_file_data("inat2018", root, lists, 1.0, "exp", 0, 0, 16).val_images is None
    assert read_test_split("inat2018", root, lists, data.class_names).labels.tolist() == [0, 1]  # its test list


@pytest.mark.parametrize("seed", [1, 2])
def test_a_list_without_a_validation_list_holds_out_the_images_data_subset_seed_picks(tmp_path, seed):
    root = write_image_lists(tmp_path / "inat", {"iNaturalist18_train.txt": [0, 0, 0, 1, 1, 1],
                                                 "iNaturalist18_val.txt": [0, 1]})
    every = build_file_data("inat2018", root, "", 1.0, "exp", seed, 0, 16).train_images.images
    held = hold_out_per_class(every.labels, 1, seed)[1]  # seeds 1 and 2 hold out other images than seed 0
    data = build_file_data("inat2018", root, "", 1.0, "exp", seed, 1, 16)
    assert data.val_images.images.paths == [every.paths[i] for i in held.tolist()]


@pytest.mark.parametrize("dataset, lists, jitter, stats", [
    ("inat2018", {"iNaturalist18_train.txt": [0, 1], "iNaturalist18_val.txt": [0, 1]}, False, (INAT_MEAN, INAT_STD)),
    ("imagenet_lt", {"ImageNet_LT_train.txt": [0, 1], "ImageNet_LT_val.txt": [0, 1], "ImageNet_LT_test.txt": [0, 1]},
     True, (IMAGENET_MEAN, IMAGENET_STD)),
    ("places_lt", {"Places_LT_train.txt": [0, 1], "Places_LT_val.txt": [0, 1], "Places_LT_test.txt": [0, 1]},
     True, (IMAGENET_MEAN, IMAGENET_STD)),
])
def test_inaturalist_trains_without_colour_jitter_on_its_own_statistics_as_the_decoupling_code(
        tmp_path, dataset, lists, jitter, stats):
    root = write_image_lists(tmp_path / dataset, lists)
    data = build_file_data(dataset, root, "", 1.0, "exp", 0, 0, 16)
    train = data.train_images.transform.transforms
    assert any(isinstance(t, v2.ColorJitter) for t in train) is jitter
    assert (data.mean, data.std) == stats
    for transform in (train, data.val_images.transform.transforms if data.val_images else ()):
        normalize = [t for t in transform if isinstance(t, v2.Normalize)]
        assert all((n.mean, n.std) == (list(stats[0]), list(stats[1])) for n in normalize)


def test_a_recorded_normalisation_normalises_every_split_and_is_what_the_checkpoint_record_reads_back(tmp_path):
    root = write_image_lists(tmp_path / "inat", {"iNaturalist18_train.txt": [0, 0, 1, 1, 1],
                                                 "iNaturalist18_val.txt": [0, 1]})
    other = ((0.5, 0.4, 0.3), (0.3, 0.2, 0.25))
    data = build_file_data("inat2018", root, "", 1.0, "exp", 0, 1, 16, normalization=other)
    assert (data.mean, data.std) == other
    for transform in (data.train_images.transform.transforms, data.val_images.transform.transforms):
        assert [(n.mean, n.std) for n in transform if isinstance(n, v2.Normalize)] == [tuple(map(list, other))]
    record = data_record(data)
    assert record["normalization"] == {"mean": [0.5, 0.4, 0.3], "std": [0.3, 0.2, 0.25]}
    assert recorded_normalization(record, "inat2018") == other
    assert recorded_normalization({}, "inat2018") == (INAT_MEAN, INAT_STD)  # a checkpoint from before the record
    assert recorded_normalization({}, "cifar10") == (tuple(CIFAR10_MEAN), tuple(CIFAR10_STD))


def test_a_folder_without_test_images_is_one_error_at_test_time(tmp_path):
    root = write_image_folder(tmp_path / "f", {"train": dict.fromkeys(CLASSES, 2)})
    with pytest.raises(DatasetFormatError, match="test does not exist: put the test images in test/<class>/"):
        read_test_split("folder", root, "", list(CLASSES))


def test_a_test_class_folder_the_training_split_lacks_is_refused_when_the_training_set_is_built(tmp_path):
    """Not only at the --test after the run: a stray test/<class> is found before any training."""
    root = write_image_folder(tmp_path / "f", {"train": {"ant": 2, "bee": 2}, "test": {"ant": 1, "yak": 1}})
    with pytest.raises(DatasetFormatError, match=rf"^{root.resolve() / 'test' / 'yak'}: class 'yak' has no folder "
                                                 r"in the training split; rename it to a training class or remove it"):
        build_file_data("folder", root, "", 1.0, "exp", 0, 0, 16)
    shutil.rmtree(root / "test" / "yak")
    assert build_file_data("folder", root, "", 1.0, "exp", 0, 0, 16).class_names == ["ant", "bee"]


def test_a_test_folder_without_any_image_is_refused_when_the_training_set_is_built(tmp_path):
    root = write_image_folder(tmp_path / "f", {"train": {"ant": 2, "bee": 2}})
    (root / "test" / "ant").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match=rf"^{root.resolve() / 'test'}: no class folder holds images"):
        build_file_data("folder", root, "", 1.0, "exp", 0, 0, 16)


def test_a_hold_out_or_imbalance_that_empties_a_class_is_one_error_naming_the_keys(tmp_path):
    root = _folder(tmp_path, train=6)
    with pytest.raises(DatasetFormatError, match=r"data.val_per_class=6 would hold out every training image of "
                                                 r"class 'ant' \(6 images\): set it below 6"):
        build_file_data("folder", root, "", 1.0, "exp", 0, 6, 16)
    with pytest.raises(DatasetFormatError, match=r"data.imbalance_factor=100 with 6 images in the smallest full "
                                                 r"class leaves class 'cow' with no training image: lower "
                                                 r"data.imbalance_factor$"):
        build_file_data("folder", root, "", 100.0, "exp", 0, 2, 16)


def test_a_one_class_folder_takes_no_imbalance_factor_and_says_so(tmp_path):
    root = write_image_folder(tmp_path / "f", {"train": {"ant": 6}, "test": {"ant": 2}})
    assert build_file_data("folder", root, "", 1.0, "exp", 0, 0, 16).class_counts == [6]
    with pytest.raises(DatasetFormatError, match=r"data.imbalance_factor=10 needs at least 2 classes, the training "
                                                 r"data has 1: set data.imbalance_factor=1$"):
        build_file_data("folder", root, "", 10.0, "exp", 0, 0, 16)


def test_the_training_digest_of_image_files_names_them_relative_to_the_root(tmp_path):
    here = _folder(tmp_path / "here")
    data = build_file_data("folder", here, "", 4.0, "exp", 0, 0, 16)
    assert data_record(data)["train_digest"] == data.train_digest
    there = shutil.copytree(here, tmp_path / "there")
    assert build_file_data("folder", there, "", 4.0, "exp", 0, 0, 16).train_digest == data.train_digest
    assert build_file_data("folder", here, "", 4.0, "exp", 1, 0, 16).train_digest != data.train_digest  # other files


def test_a_file_name_that_is_not_utf_8_is_read_and_digested_by_its_bytes(tmp_path):
    """An old archive's Latin-1 name (caf\xe9.jpg) comes from the file system as a surrogate, which str.encode
    refuses; the digest takes the name's own bytes."""
    root = _folder(tmp_path, train=3)
    latin1 = root / "train" / "ant" / os.fsdecode(b"caf\xe9.jpg")
    shutil.copy(root / "train" / "ant" / "0.jpg", latin1)
    data = build_file_data("folder", root, "", 1.0, "exp", 0, 0, 16)
    assert latin1 in data.train_images.images.paths and data.class_counts == [4, 3, 3, 3]
    assert torch.equal(decode_rgb(latin1), decode_rgb(root / "train" / "ant" / "0.jpg"))  # and decoded (read_file
    x, y = data.train_images[(data.train_images.images.paths.index(latin1), 0)]  # refused its name)
    assert x.shape == (3, 16, 16) and y == 0
    os.rename(latin1, root / "train" / "ant" / "cafe.jpg")
    assert build_file_data("folder", root, "", 1.0, "exp", 0, 0, 16).train_digest != data.train_digest


def test_a_folder_s_long_tail_keeps_the_files_its_subset_draw_keeps(tmp_path):
    root = _folder(tmp_path)
    every = read_folder_split(root, "train")
    for draw in ("torch", "ldam"):
        data = build_file_data("folder", root, "", 4.0, "exp", 5, 0, 16, subset_draw=draw)
        kept = long_tail_split(every.labels, long_tail_counts(12, 4, 4.0, "exp"), 0, 5, draw)[0]
        assert data.train_images.images.paths == [every.paths[i] for i in kept.tolist()]
