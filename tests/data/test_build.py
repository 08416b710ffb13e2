"""data.build: the long-tailed counts of a training set whose copy lacks a class."""
import shutil

import pytest
import torch

from data.build import build_long_tail, build_meta_resample, long_tail_subset, rule_counts, training_digest
from data.cifar import DatasetFormatError, load_cifar
from data.long_tail import second_draw
from tests.conftest import write_fake_cifar10

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.parametrize("imbalance_factor", [1.0, 10.0])
def test_a_copy_without_images_of_a_class_is_one_error_naming_the_class(imbalance_factor):
    labels = torch.arange(9).repeat(5)  # classes 0-8, five images each: no 'truck'
    with pytest.raises(DatasetFormatError, match=r"^class 'truck' has no training image: .* check the training "
                                                 r"data \(data.root\)$"):
        rule_counts(labels, NAMES, imbalance_factor, "exp")
    # with every class present, the reference rule's counts (n_max 50, IF 10)
    assert rule_counts(torch.arange(10).repeat(50), NAMES, 10.0, "exp") == [50, 38, 29, 23, 17, 13, 10, 8, 6, 5]


def test_the_cifar_training_digest_follows_the_images_and_their_order_not_the_folder(fake_cifar10, tmp_path):
    lt = build_long_tail("cifar10", fake_cifar10, False, 10, "exp", 0, 0)
    assert lt.train_digest == training_digest(lt.train_labels.numpy().tobytes(), lt.train_images.numpy().tobytes())
    moved = shutil.copytree(fake_cifar10, tmp_path / "moved")
    assert build_long_tail("cifar10", moved, False, 10, "exp", 0, 0).train_digest == lt.train_digest
    assert build_long_tail("cifar10", fake_cifar10, False, 10, "exp", 0, 0, subset_draw="ldam").train_digest \
        != lt.train_digest  # the same counts, other images
    other = write_fake_cifar10(tmp_path / "other", train_per_class=60, test_per_class=10, seed=1)
    assert build_long_tail("cifar10", other, False, 10, "exp", 0, 0).train_digest != lt.train_digest


def test_balms_s_resampled_meta_set_is_the_second_draw_seeded_one_past_the_training_draw(fake_cifar10):
    """The training set's own seed would give mostly the training images again."""
    full = load_cifar("cifar10", fake_cifar10, "train")
    _, val = long_tail_subset(full.labels, full.class_names, 10, "exp", 5, 2, "torch")
    counts = rule_counts(full.labels, full.class_names, 10, "exp")
    images, labels = build_meta_resample("cifar10", fake_cifar10, False, 10, "exp", 5, 2, "torch")
    meta = second_draw(full.labels, counts, val, 6)
    assert torch.equal(images, full.images[meta]) and torch.equal(labels, full.labels[meta])
    assert not torch.equal(meta, second_draw(full.labels, counts, val, 5))


@pytest.mark.parametrize("draw", ["torch", "ldam"])
def test_balms_s_resampled_meta_set_never_holds_a_validation_image_of_either_draw(fake_cifar10, draw):
    full = load_cifar("cifar10", fake_cifar10, "train")
    _, val = long_tail_subset(full.labels, full.class_names, 10, "exp", 0, 2, draw)
    images, labels = build_meta_resample("cifar10", fake_cifar10, False, 10, "exp", 0, 2, draw)
    as_rows = {bytes(i.numpy()) for i in full.images[val]}
    assert not as_rows & {bytes(i.numpy()) for i in images}
    other_draw = {"torch": "ldam", "ldam": "torch"}[draw]
    other = long_tail_subset(full.labels, full.class_names, 10, "exp", 0, 2, other_draw)[1]
    assert not torch.equal(val, other)  # the two draws hold out other images: the test tells them apart
