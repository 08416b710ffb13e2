"""End-to-end on the real CIFAR-10 copy under $LT_DATA_ROOT: LT counts, test split, three training steps.

Skipped when the data is absent, except under CI (CI set), where missing data is a failure.
"""
import math
from pathlib import Path

import pytest
import torch

from data.augment import BatchAugment
from data.build import build_long_tail
from data.cifar import load_cifar
from data.loader import BatchLoader
from data.samplers import build_sampler
from models.losses import build_loss
from models.registry import build_model
from tests.data.test_long_tail import ldam_code_keeps

LT_COUNTS_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.fixture(scope="module")
def root(real_cifar10) -> Path:
    return real_cifar10


@pytest.fixture(scope="module")
def lt(root):
    return build_long_tail("cifar10", root, False, 100, "exp", 0, 0)


def test_the_ldam_draw_of_the_cifar10_files_keeps_the_ldam_code_s_images(root):
    full = load_cifar("cifar10", root, "train")
    lt = build_long_tail("cifar10", root, False, 100, "exp", 0, 0, subset_draw="ldam")
    kept = torch.tensor(ldam_code_keeps(full.labels.numpy(), LT_COUNTS_IF100, 0))
    assert torch.equal(lt.train_labels, full.labels[kept]) and torch.equal(lt.train_images, full.images[kept])


def test_cifar10_lt_if100_exp_has_the_reference_counts(lt):
    assert lt.class_counts == LT_COUNTS_IF100
    assert sum(lt.class_counts) == 12406
    assert lt.train_images.shape == (12406, 3, 32, 32) and lt.train_images.dtype == torch.uint8
    assert torch.bincount(lt.train_labels, minlength=10).tolist() == LT_COUNTS_IF100
    assert lt.val_images.shape[0] == 0
    assert lt.class_names[0] == "airplane" and lt.class_names[9] == "truck"


def test_cifar10_test_split_has_1000_images_per_class(root):
    test = load_cifar("cifar10", root, "test")
    assert test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10


def test_three_real_batches_train_resnet32_with_finite_loss(lt):
    before_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: threads add overhead; also immune to busy cores
    try:
        torch.manual_seed(0)
        model = build_model("resnet32", 10).to(memory_format=torch.channels_last).train()
        loss_fn = build_loss("ce", lt.class_counts)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        sampler = build_sampler("instance", lt.train_labels, 10)
        loader = BatchLoader(lt.train_images, lt.train_labels, 64, sampler, BatchAugment(4, True, True, 16),
                             lt.mean, lt.std, seed=0, channels_last=True)
        assert len(loader) == math.ceil(12406 / 64)
        steps = 0
        for x, y in loader.epoch(0):
            assert x.shape == (64, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
            before = [p.detach().clone() for p in model.parameters()]
            loss = loss_fn(model(x), y)
            assert torch.isfinite(loss), loss
            assert 0.5 < loss.item() < 20.0  # roughly ln(10) = 2.3 for a fresh 10-class model
            opt.zero_grad()
            loss.backward()
            opt.step()
            changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
            assert all(changed), f"{changed.count(False)} parameter tensors did not move"
            assert all(torch.isfinite(p).all() for p in model.parameters())
            steps += 1
            if steps == 3:
                break
        assert steps == 3
    finally:
        torch.set_num_threads(before_threads)
