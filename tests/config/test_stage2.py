"""The checks of a stage-2 config against its method and its stage-1 run (config/stage2.py)."""
from __future__ import annotations

import pytest

from config.load import config_to_dict, load_config
from config.stage2 import check_data


def _stage1(**data) -> dict:
    cfg = load_config(None, [f"data.{k}={v}" for k, v in data.items()])
    return {"config": config_to_dict(cfg, "stage1")}


def _stage2(*overrides: str):
    return load_config(None, ["stage1.checkpoint=x.pt", *overrides])


def test_stage2_with_stage1s_augmentation_gives_no_warning():
    s1 = _stage1(autoaugment="true", cutout=16)
    assert check_data(_stage2("data.autoaugment=true", "data.cutout=16"), s1) == ""


def test_stage2_augmenting_otherwise_than_stage1_names_every_differing_key_both_ways():
    s1 = _stage1(autoaugment="true", cutout=16)
    note = check_data(_stage2("data.flip=true"), s1)
    assert note == ("stage 2 augments with data.autoaugment=false, data.cutout=0, stage 1 trained with "
                    "data.autoaugment=true, data.cutout=16: set them in the stage-2 config to train the "
                    "classifier on the views the backbone learned from")


def test_tau_norm_and_imported_backbones_are_not_compared():
    s1 = _stage1(cutout=16)
    assert check_data(_stage2("stage2.method=tau_norm"), s1) == ""  # post hoc: it draws no views
    assert check_data(_stage2(), None) == "" and check_data(_stage2(), {"model": {}}) == ""


def test_resampled_meta_set_is_refused_for_image_files():
    cfg = _stage2("stage2.method=balms", "meta_sampler.meta_split=resample", "data.dataset=folder")
    with pytest.raises(SystemExit, match="meta_split=resample draws a second long-tailed set from CIFAR's"):
        check_data(cfg, None)
    assert check_data(_stage2("stage2.method=balms", "meta_sampler.meta_split=resample"), None) == ""
