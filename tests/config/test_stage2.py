"""The checks of a stage-2 config against its method and its stage-1 run (config/stage2.py)."""
from __future__ import annotations

import pytest

from config.keys import ConfigError
from config.load import check_schedule_keys, config_to_dict, load_config
from config.stage2 import (check_data, check_method, check_tau_norm_keys, check_training_set,
                           with_stage1_training_set)


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


@pytest.mark.parametrize("key", ["train.lr=0.5", "train.iterations=100", "train.epochs=30", "stage2.cache_views=1",
                                 "train.batch_size=64", "stage2.live_bn=eval", "data.cutout=8", "data.autoaugment=true",
                                 "data.flip=false", "data.crop_padding=2"])
def test_tau_norm_trains_nothing_so_a_schedule_view_or_augmentation_key_set_for_it_is_an_error(key):
    with pytest.raises(SystemExit, match=rf"config error: {key.split('=')[0]} is read by stage2.method="
                                         rf"balanced_softmax \| crt \| balms \| lws only, not by tau_norm: remove it"):
        check_method(_stage2("stage2.method=tau_norm", key))
    check_method(_stage2("stage2.method=crt", "stage2.cache_views=0", key))  # a trained method reads it


def test_live_batchnorm_is_refused_with_cached_views_which_never_read_it():
    with pytest.raises(SystemExit, match=r"^config error: stage2.live_bn is read with stage2.cache_views=0 only \(the "
                                         r"backbone on every batch\); the 2 cached views are computed in eval mode"):
        check_method(_stage2("stage2.method=balms", "stage2.cache_views=2", "stage2.live_bn=eval"))
    check_method(_stage2("stage2.method=balms", "stage2.cache_views=0", "stage2.live_bn=eval"))
    with pytest.raises(SystemExit, match=r"^config error: stage2.live_bn is read with stage2.cache_views=0 only"):
        check_method(_stage2("stage2.cache_views=2", "stage2.live_bn=train"))  # given at its default: unread too


def test_a_meta_sampler_key_is_refused_for_a_method_other_than_balms():
    with pytest.raises(SystemExit, match=r"^config error: meta_sampler.lr is read by stage2.method=balms only, not by "
                                         r"crt: remove it$"):
        check_method(_stage2("stage2.method=crt", "meta_sampler.lr=0.1"))
    check_method(_stage2("stage2.method=balms", "meta_sampler.lr=0.1"))


def test_a_stage_2_warm_up_as_long_as_its_run_is_refused_as_the_run_starts():
    cfg = load_config(None, ["stage1.checkpoint=x.pt", "stage2.method=balms", "train.epochs=5"], stage="stage2")
    check_method(cfg)
    with pytest.raises(ConfigError, match=r"^train.warmup=5 \(epochs\) is not shorter than the run \(train.epochs=5\)"):
        check_schedule_keys(cfg)  # by config.cli.start_run, for a new run


def test_tau_norm_refuses_the_tau_key_it_would_not_read():
    check_tau_norm_keys(_stage2("stage2.method=tau_norm", "stage2.tau_norm_grid=[0.5,1.0]"), has_val=True)
    check_tau_norm_keys(_stage2("stage2.method=tau_norm", "stage2.tau_norm_tau=0.3"), has_val=False)
    with pytest.raises(SystemExit, match=r"stage2.tau_norm_tau is tau_norm's tau without a validation split; this "
                                         r"run has one"):
        check_tau_norm_keys(_stage2("stage2.method=tau_norm", "stage2.tau_norm_tau=0.3"), has_val=True)
    with pytest.raises(SystemExit, match=r"stage2.tau_norm_grid is searched on the validation split, and this run "
                                         r"has none: tau is stage2.tau_norm_tau"):
        check_tau_norm_keys(_stage2("stage2.method=tau_norm", "stage2.tau_norm_grid=[0.5,1.5]"), has_val=False)
    with pytest.raises(SystemExit, match=r"stage2.tau_norm_grid is searched on the validation split"):
        check_tau_norm_keys(_stage2("stage2.method=tau_norm", "stage2.tau_norm_grid=[0.3]"), has_val=False)


def test_the_backbone_on_every_batch_is_refused_for_image_files_before_the_run():
    with pytest.raises(SystemExit, match=r"^config error: stage2.cache_views=0 runs the backbone on in-memory images; "
                                         r"data.dataset=folder streams image files: set stage2.cache_views to 1"):
        check_data(_stage2("stage2.cache_views=0", "data.dataset=folder"), None)
    assert check_data(_stage2("stage2.cache_views=0"), None) == ""  # CIFAR in memory


def test_stage2_trains_on_the_images_stage1_drew_and_refuses_another_draw():
    s1 = {**_stage1(subset_draw="ldam", subset_seed=3), "model_args": {"name": "resnet32"}}
    data = with_stage1_training_set(_stage2(), s1).data
    assert (data.subset_draw, data.subset_seed) == ("ldam", 3)
    with pytest.raises(SystemExit, match="data.subset_draw='ldam', but the stage-1 run x.pt has "
                                         "data.subset_draw='torch'"):
        with_stage1_training_set(_stage2("data.subset_draw=ldam"), {**s1, **_stage1()})


def test_stage2_takes_the_dataset_and_model_of_its_stage1_run_and_refuses_others():
    s1 = {**_stage1(dataset="cifar100"), "model_args": {"name": "resnet56"}}
    cfg = with_stage1_training_set(_stage2(), s1)
    assert (cfg.data.dataset, cfg.model.name) == ("cifar100", "resnet56")
    with pytest.raises(SystemExit, match="^config error: data.dataset='folder', but the stage-1 run x.pt has "
                                         "data.dataset='cifar100': stage 2 reads it from the checkpoint"):
        with_stage1_training_set(_stage2("data.dataset=folder"), s1)
    with pytest.raises(SystemExit, match="^config error: model.name='resnet110', but the stage-1 run x.pt has "
                                         "model.name='resnet56': stage 2 reads it from the checkpoint"):
        with_stage1_training_set(_stage2("model.name=resnet110"), s1)


def test_stage2_on_other_images_than_stage1_s_warns_and_on_other_counts_stops(caplog):
    s1 = {"class_counts": [5, 2], "train_digest": "0123abcd"}
    check_training_set(s1, [5, 2], "0123abcd")
    check_training_set({"class_counts": [5, 2]}, [5, 2], "4567ef01")  # a release, or a run from before digests
    assert caplog.records == []
    check_training_set(s1, [5, 2], "4567ef01")
    assert [r.getMessage() for r in caplog.records] == [
        "the training images differ from stage 1's (digest 4567ef01, stage 1's 0123abcd), though their class counts "
        "match: the head trains on other images than the backbone learned from; point data.root at the copy of the "
        "dataset stage 1 trained on"]
    with pytest.raises(SystemExit, match=r"training set differs from stage 1's \(\[5, 1\] vs \[5, 2\]\)"):
        check_training_set(s1, [5, 1], "0123abcd")


@pytest.mark.parametrize("override, recorded", [("data.imbalance_factor=100", "10.0"),
                                                ("data.val_per_class=0", "20"), ("data.dataset=cifar10", "'cifar100'")])
def test_a_training_set_key_given_at_its_default_on_the_command_line_must_match_stage1_too(override, recorded):
    """The user asked for IF 100 (the default) and stage 1 trained at IF 10: refused, not trained at IF 10. In a
    file, the default value still reads as unset (a saved config holds every key)."""
    s1 = {**_stage1(imbalance_factor=10, val_per_class=20, dataset="cifar100"), "model_args": {"name": "resnet32"}}
    key = override.split("=")[0]
    with pytest.raises(SystemExit, match=rf"^config error: {key}=\S+, but the stage-1 run x.pt has {key}="
                                         rf"{recorded}: stage 2 reads it from the checkpoint; remove {key} from the "
                                         r"command line$"):
        with_stage1_training_set(_stage2(override), s1)
    assert with_stage1_training_set(_stage2(), s1).data.imbalance_factor == 10


def test_tau_norm_names_the_schedule_key_it_does_not_read_before_any_warm_up_rule():
    """A short train.epochs is refused as unread by tau_norm, not as shorter than the default warm-up."""
    cfg = load_config(None, ["stage1.checkpoint=x.pt", "stage2.method=tau_norm", "train.epochs=3"], stage="stage2")
    with pytest.raises(SystemExit, match=r"^config error: train.epochs is read by stage2.method=balanced_softmax \| "
                                         r"crt \| balms \| lws only, not by tau_norm: remove it$"):
        check_method(cfg)
    trained = load_config(None, ["stage1.checkpoint=x.pt", "train.epochs=3"], stage="stage2")
    check_method(trained)
    with pytest.raises(ConfigError, match=r"train.warmup=5 \(epochs\) is not shorter than the run \(train.epochs=3\)"):
        check_schedule_keys(trained)


def test_a_training_set_key_the_stage_2_file_sets_against_stage_1_is_to_be_removed_from_that_file(tmp_path):
    (tmp_path / "s2.yaml").write_text("stage1:\n  checkpoint: x.pt\ndata:\n  imbalance_factor: 50\n")
    with pytest.raises(SystemExit, match=r"data.imbalance_factor=50.0, but the stage-1 run x.pt has data.imbalance_"
                                         r"factor=10.0: stage 2 reads it from the checkpoint; remove "
                                         r"data.imbalance_factor from the stage-2 config$"):
        with_stage1_training_set(load_config(tmp_path / "s2.yaml", []), {**_stage1(imbalance_factor=10),
                                                                            "model_args": {"name": "resnet32"}})
