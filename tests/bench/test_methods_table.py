"""bench/methods_table.py: the config each method runs on the short schedule."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.methods_table import method_config, train_and_test
from data.build import build_long_tail
from data.loader import steps_per_epoch
from tests.conftest import write_fake_cifar10

LDAM = Path("config/cifar10_lt/methods_if100_exp/ldam_drw.yaml")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_fake_cifar10(tmp_path_factory.mktemp("data"), train_per_class=500, test_per_class=2)


@pytest.mark.parametrize("overrides, batch, iterations, val", [
    ([], 128, 60, 20),
    (["train.batch_size=512"], 512, 60, 20),  # 4x the epochs of batch 128
    (["train.iterations=90", "train.batch_size=256", "data.val_per_class=5"], 256, 90, 5),
])
def test_ldam_defers_reweighting_to_80_percent_of_the_epochs_of_the_run_with_the_users_overrides(
        root, tmp_path, overrides, batch, iterations, val):
    cfg = method_config(LDAM, 60, tmp_path, [f"data.root={root}", *overrides])
    assert (cfg.train.batch_size, cfg.train.iterations, cfg.data.val_per_class) == (batch, iterations, val)
    n = len(build_long_tail("cifar10", root, False, 100.0, "exp", 0, val).train_labels)  # instance sampler: N an epoch
    epochs = math.ceil(iterations / steps_per_epoch(n, batch))
    assert epochs > 5 and cfg.loss.drw_epoch == int(0.8 * epochs)
    assert Path(cfg.run_dir) == tmp_path / "ldam_drw"


def test_a_users_drw_epoch_wins_and_a_method_without_drw_gets_none(root, tmp_path):
    cfg = method_config(LDAM, 60, tmp_path, [f"data.root={root}", "loss.drw_epoch=2", "train.batch_size=512"])
    assert cfg.loss.drw_epoch == 2
    ce = method_config(LDAM.with_name("ce.yaml"), 60, tmp_path, [f"data.root={root}", "train.batch_size=512"])
    assert ce.loss.drw_epoch is None and ce.train.batch_size == 512


def test_a_tested_run_of_other_settings_is_refused_not_tabulated_as_this_one(root, tmp_path):
    ce = LDAM.with_name("ce.yaml")
    small = [f"data.root={root}", "train.batch_size=64", "train.num_threads=1", "eval.batch_size=64"]
    first = train_and_test(method_config(ce, 2, tmp_path, small))
    # the same settings, another thread count (a setting of the machine): read back, nothing trained
    assert train_and_test(method_config(ce, 2, tmp_path, [*small, "train.num_threads=2"])) == first
    with pytest.raises(SystemExit) as e:
        train_and_test(method_config(ce, 3, tmp_path, small))
    assert e.value.code == (f"error: {tmp_path / 'ce'} holds the tested run of other settings (train.iterations "
                            f"differ): its figures are not this table's; give --out another folder, or delete the run "
                            f"to train it again")
