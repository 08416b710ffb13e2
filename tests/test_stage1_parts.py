"""Pieces of stage1_train.py's main, in-process."""
import signal

import pytest
import torch

import config.cli
from config.load import load_config
from data.cifar import load_cifar
from data.long_tail import long_tail_counts, long_tail_split
from engine.distributed import Dist
from engine.run import Progress
from models import build_model
from models.losses import build_loss
import stage1_train
from stage1_train import build_criterion, build_data, check_global_batch, main, parameter_groups
from tests.conftest import write_image_folder


def test_a_bias_the_class_balanced_sigmoid_loss_sets_is_kept_out_of_weight_decay():
    model = build_model("resnet32", num_classes=10)
    counts = [500, 300, 200, 100, 60, 40, 20, 10, 8, 5]
    groups = parameter_groups(model, build_loss("class_balanced", counts, variant="sigmoid"))
    assert len(groups) == 2 and groups[1] == {"params": [model.head.bias], "weight_decay": 0.0}
    assert len(groups[0]["params"]) == len(list(model.parameters())) - 1
    optimizer = torch.optim.SGD(groups, lr=0.1, weight_decay=5e-4)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0]
    plain = parameter_groups(model, build_loss("ce", counts))
    assert len(plain) == 1 and len(plain[0]["params"]) == len(list(model.parameters()))


def test_progressive_sampler_spans_the_epochs_a_run_under_several_processes_takes(fake_cifar10, monkeypatch):
    # Several processes keep only full global batches, so their epochs are shorter (240 images at
    # batch 64: 3 steps, against 4 in one process) and 40 iterations take 14 epochs, not 10: the
    # schedule's T must be 14, or its last epochs would run past T. (No process group here: the ranks' comparison
    # of their data is left out.)
    monkeypatch.setattr(config.cli, "check_same_data", lambda *args: None)
    overrides = [f"data.root={fake_cifar10}", "data.imbalance_factor=10", "data.sampler=progressive",
                 "train.batch_size=64", "train.iterations=40", "train.device=cpu"]
    cfg = load_config(None, overrides, "stage1")
    for world, epochs in ((1, 10), (2, 14)):
        _, loader = build_data(cfg, torch.device("cpu"), Dist(rank=0, world=world))
        assert Progress("top1").final_epoch(40, len(loader)) == epochs
        balanced = loader._chunks.sampler.class_probabilities(epochs)
        assert torch.allclose(balanced, torch.full((10,), 0.1, dtype=torch.float64))
        assert not torch.allclose(loader._chunks.sampler.class_probabilities(epochs - 1), balanced)
        for _ in loader.epoch(epochs - 1):
            pass


@pytest.mark.parametrize("draw", ["torch", "ldam"])
def test_stage1_trains_on_the_images_its_subset_draw_keeps(fake_cifar10, draw):
    cfg = load_config(None, [f"data.root={fake_cifar10}", "data.imbalance_factor=10", f"data.subset_draw={draw}",
                             "data.subset_seed=2"], "stage1")
    data, _ = build_data(cfg, torch.device("cpu"), Dist(rank=0, world=1))
    full = load_cifar("cifar10", fake_cifar10, "train")
    counts = long_tail_counts(int(full.labels.bincount().min()), 10, 10, "exp")
    kept = long_tail_split(full.labels, counts, 0, 2, draw)[0]
    assert torch.equal(data.train_images, full.images[kept]) and torch.equal(data.train_labels, full.labels[kept])



@pytest.mark.parametrize("flip", [True, False])
def test_data_flip_reaches_an_image_folder_s_training_transform(tmp_path, flip):
    root = write_image_folder(tmp_path / "f", {"train": {"a": 4, "b": 4}, "test": {"a": 1, "b": 1}})
    cfg = load_config(None, ["data.dataset=folder", f"data.root={root}", "data.imbalance_factor=1",
                             f"data.flip={str(flip).lower()}", "data.image_size=16", "data.workers=0"], "stage1")
    data, _ = build_data(cfg, torch.device("cpu"), Dist(rank=0, world=1))
    kinds = [type(t).__name__ for t in data.train_images.transform.transforms]
    assert ("RandomHorizontalFlip" in kinds) == flip

def test_a_run_in_process_gives_the_signals_back_when_it_ends(fake_cifar10, tmp_path, tiny_stage1):
    # bench/sweep.py runs several stage-1 mains in one process: a Ctrl-C between two of them must stop it.
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    cfg = load_config(None, [f"data.root={fake_cifar10}", f"log_dir={tmp_path / 'run'}", *tiny_stage1,
                             "train.epochs=2"], "stage1")
    main(cfg)
    assert (tmp_path / "run" / "last.pt").is_file()
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.parametrize("batch, world, sizes", [(15, 2, "14 or 16"), (6, 4, "8"), (30, 8, "24 or 32")])
def test_a_global_batch_the_processes_cannot_share_names_the_batches_they_can(batch, world, sizes):
    check_global_batch(2 * world, world)
    with pytest.raises(SystemExit, match=rf"train.batch_size={batch} \(the global batch\) must split evenly over the "
                                         rf"{world} processes, at least 2 images each: use train.batch_size={sizes}, "):
        check_global_batch(batch, world)


def test_the_loss_keys_of_the_config_reach_the_loss():
    cfg = load_config(None, ["loss.name=focal", "loss.gamma=2.5", "loss.form=sigmoid"], "stage1")
    loss = build_criterion(cfg, [500, 300, 200, 100, 60, 40, 20, 10, 8, 5], build_model("resnet32", 10), True)
    assert (loss.gamma, loss.form) == (2.5, "sigmoid")


def test_mixup_alpha_and_accumulation_steps_reach_the_training_loop(fake_cifar10, tmp_path, tiny_stage1, monkeypatch):
    seen = []
    loop = stage1_train.train_one_epoch

    def spy(*args, **kwargs):  # (model, batches, steps, loss_fn, optimizer, scheduler, mixup_alpha, rng, accum_steps)
        seen.append((args[6], args[8]))
        return loop(*args, **kwargs)
    monkeypatch.setattr(stage1_train, "train_one_epoch", spy)
    main(load_config(None, [f"data.root={fake_cifar10}", f"log_dir={tmp_path / 'run'}", *tiny_stage1, "train.epochs=1",
                            "train.warmup=0", "train.accum_steps=2", "train.mixup_alpha=0.3"], "stage1"))
    assert seen == [(0.3, 2)]


def test_a_selection_metric_without_a_validation_split_is_refused_before_training(fake_cifar10, tmp_path, tiny_stage1):
    cfg = load_config(None, [f"data.root={fake_cifar10}", f"log_dir={tmp_path / 'run'}", *tiny_stage1,
                             "train.select_metric=few", "data.val_per_class=0"], "stage1")
    with pytest.raises(SystemExit, match="^config error: train.select_metric=few chooses best.pt on the validation "
                                         "split, and this run has none"):
        main(cfg)
    assert not (tmp_path / "run" / "last.pt").exists()
