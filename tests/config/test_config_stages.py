"""Which stage reads which key, renamed keys, and the config a stage saves."""
import dataclasses
import re
import typing

import pytest
import yaml

from config.keys import ConfigError, renamed
from config.load import config_to_dict, load_config
from config.schema import stage_of
from config.readers import check_dataset_keys, check_drw_epoch, check_loss_keys
from config.saved import check_resume, config_diff, config_from_dict
from config.schema import RENAMED, STAGE_KEYS, Config, LossConfig
from models.losses import LOSSES, loss_params


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


def test_every_stage_key_entry_names_a_real_key_or_section():
    sections = _sections()
    for entry in STAGE_KEYS:
        section, _, leaf = entry.partition(".")
        assert section in sections, entry
        assert not leaf or leaf in {f.name for f in dataclasses.fields(sections[section])}, entry


def _schema_field(key: str) -> bool:
    """Whether a dotted key (a section or a section's key) names a field of Config."""
    node = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = typing.get_type_hints(node)[part]
    return True


def test_every_new_name_exists_and_no_old_name_does():
    assert _schema_field("meta_sampler") and _schema_field("loss.logit_adjust_tau") and not _schema_field("loss.x")
    for old, new in RENAMED.items():
        assert _schema_field(new), new  # a misspelt new name fails here
        assert not _schema_field(old), old  # an old name still in the schema would shadow its rename
        assert renamed(old) == new
        script = {"meta_sampler": "stage2_classifier.py", "stage2": "stage2_classifier.py", "loss": "stage1_train.py"}
        owner = f" (read by {script[new.split('.')[0]]} only)" if new.split(".")[0] in script else ""
        message = f"config key '{old}' (override '{old}=1') was renamed: use {new}{owner}"
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            load_config(None, [f"{old}=1"])
    assert renamed("sampler.lr") == "meta_sampler.lr" and renamed("train.lr") is None


@pytest.mark.parametrize("old, new", [("sampler.meta_split=train", "meta_sampler.meta_split"),
                                      ("sampler.tau=0.5", "meta_sampler.gumbel_tau"),
                                      ("loss.tau=1", "loss.logit_adjust_tau")])
def test_an_old_key_in_an_override_or_a_yaml_fails_naming_the_new_one(tmp_path, old, new):
    with pytest.raises(ConfigError, match=f"was renamed: use {new}"):
        load_config(None, [old])
    key, value = old.split("=")
    section, leaf = key.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"{section}:\n  {leaf}: {value}\n")
    with pytest.raises(ConfigError, match=f"'{key}' \\(in {path}\\) was renamed: use {new}"):
        load_config(path)


def test_a_config_saved_under_the_old_names_is_read_with_the_new_ones():
    saved = {"sampler": {"lr": 0.05, "tau": 0.5}, "eval": {"posthoc_tau": 1.0}, "stage2": {"tau_grid": [0.5]}}
    cfg = config_from_dict(saved)
    assert (cfg.meta_sampler.lr, cfg.meta_sampler.gumbel_tau) == (0.05, 0.5)
    assert cfg.eval.logit_adjust_tau == 1.0 and cfg.stage2.tau_norm_grid == [0.5]
    assert config_diff(saved, config_to_dict(cfg)) == []


@pytest.mark.parametrize("override, reader, other", [("meta_sampler.lr=0.1", "stage2", "stage1"),
                                                     ("stage2.method=balms", "stage2", "stage1"),
                                                     ("loss.name=focal", "stage1", "stage2"),
                                                     ("data.sampler=sqrt", "stage1", "stage2"),
                                                     ("train.mixup_alpha=1", "stage1", "stage2"),
                                                     ("model.head=cosine", "stage1", "stage2")])
def test_a_key_set_for_the_other_stage_names_the_stage_that_reads_it(override, reader, other):
    assert load_config(None, [override], stage=reader)  # the reading stage takes it
    with pytest.raises(ConfigError) as e:
        load_config(None, [override], stage=other)
    key = override.split("=")[0]
    assert str(e.value).startswith(f"{key}=") and f"read by {reader}" in str(e.value) and "remove it" in str(e.value)


def test_a_config_file_of_the_other_stage_says_which_script_runs_it(tmp_path):
    stage2_yaml = tmp_path / "s2.yaml"
    stage2_yaml.write_text("stage1:\n  checkpoint: logs/x/last.pt\nstage2:\n  method: crt\n")
    with pytest.raises(ConfigError) as e:
        load_config(stage2_yaml, stage="stage1")
    assert str(e.value) == (f"{stage2_yaml} is a stage2 config (it sets stage1.checkpoint, read by "
                            f"stage2_classifier.py "
                            f"only): run it with python stage2_classifier.py --cfg {stage2_yaml}")
    stage1_yaml = tmp_path / "s1.yaml"
    stage1_yaml.write_text("train:\n  epochs: 30\nloss:\n  name: focal\n")
    with pytest.raises(ConfigError, match=rf"^{stage1_yaml} is a stage1 config \(it sets loss.name, read by "
                                          rf"stage1_train.py only\): run it with python stage1_train.py"):
        load_config(stage1_yaml, stage="stage2")
    with pytest.raises(ConfigError, match=r"^loss.name='focal' is read by stage1 .*: remove it$"):  # an override
        load_config(None, ["loss.name=focal"], stage="stage2")
    mixed = tmp_path / "mixed.yaml"  # a stage-2 config with one stray stage-1 key: not "a stage1 config"
    mixed.write_text("stage2:\n  method: crt\nloss:\n  name: focal\n")
    with pytest.raises(ConfigError, match=rf"^loss.name='focal' is read by stage1 .*: remove it from {mixed}$"):
        load_config(mixed, stage="stage2")


def test_a_key_of_the_other_stage_at_its_default_is_no_error_in_a_file_and_shared_keys_are_read_by_both(tmp_path):
    """A file may hold the other stage's keys at their defaults (a whole config); shared keys are anyone's."""
    path = tmp_path / "both.yaml"
    path.write_text("meta_sampler: {lr: 0.01}\nloss: {name: ce}\n")
    for stage in ("stage1", "stage2"):
        load_config(path, ["train.lr=0.3", "data.imbalance_factor=10", "eval.logit_adjust_tau=1"], stage=stage)
    assert stage_of("train.lr") is None and stage_of("loss.beta") == "stage1" and stage_of("stage2.method") == "stage2"


@pytest.mark.parametrize("override, reader, other", [("meta_sampler.lr=0.01", "stage2", "stage1"),
                                                     ("loss.name=ce", "stage1", "stage2"),
                                                     ("data.sampler=instance", "stage1", "stage2")])
def test_a_key_of_the_other_stage_given_on_the_command_line_at_its_default_is_refused(override, reader, other):
    """The user who types it believes it does something: the default value is as unread as any other."""
    load_config(None, [override], stage=reader)
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=\S+ is read by {reader} .* {other} .*: remove it$"):
        load_config(None, [override], stage=other)


LOSS_TAKES = {name: loss_params(name) for name in LOSSES}


def test_every_loss_key_is_a_parameter_of_some_loss_and_every_parameter_but_reduction_a_loss_key():
    keys = {f.name for f in dataclasses.fields(LossConfig)} - {"name"}
    params = {p for takes in LOSS_TAKES.values() for p in takes} - {"reduction"}  # reduction: set by the code
    assert keys == params


@pytest.mark.parametrize("overrides, message", [
    (["loss.gamma=2"], "loss.gamma=2.0 is read by loss.name=class_balanced or focal only; loss.name=ce does not "
                       "use it (it reads loss.label_smoothing): remove it"),
    (["loss.name=balanced_softmax", "loss.label_smoothing=0.1"],
     "loss.label_smoothing=0.1 is read by loss.name=ce only; loss.name=balanced_softmax does not use it (it reads "
     "no loss.* key): remove it"),
    (["loss.name=focal", "loss.gamma=2", "loss.beta=0.99"],
     "loss.beta=0.99 is read by loss.name=class_balanced only; loss.name=focal does not use it (it reads "
     "loss.gamma, loss.form): remove it")])
def test_a_loss_key_the_chosen_loss_does_not_take_names_the_losses_that_do(overrides, message):
    with pytest.raises(ConfigError) as e:
        check_loss_keys(load_config(None, overrides, stage="stage1"), LOSS_TAKES)
    assert str(e.value) == message


@pytest.mark.parametrize("overrides", [[], ["loss.name=focal", "loss.gamma=2", "loss.form=sigmoid"],
                                       ["loss.name=class_balanced", "loss.variant=focal", "loss.gamma=0.5"],
                                       ["loss.name=ldam", "loss.drw_epoch=160"], ["train.lr=0.2"]])
def test_loss_keys_the_chosen_loss_takes_pass(overrides):
    check_loss_keys(load_config(None, overrides, stage="stage1"), LOSS_TAKES)


def test_a_key_the_stage_never_reads_is_named_as_such_before_any_rule_on_its_value():
    with pytest.raises(ConfigError, match=r"^train.accum_steps=0 is read by stage1 \(stage1_train.py\) only"):
        load_config(None, ["stage1.checkpoint=x.pt", "train.accum_steps=0"], stage="stage2")
    with pytest.raises(ConfigError, match=r"^train.accum_steps=0 is out of range"):
        load_config(None, ["train.accum_steps=0"], stage="stage1")


def test_a_drw_epoch_past_the_run_s_last_epoch_is_refused_naming_the_run_s_epochs():
    cfg = load_config(None, ["loss.name=ldam", "loss.drw_epoch=200"], stage="stage1")
    with pytest.raises(ConfigError) as e:
        check_drw_epoch(cfg, 200)
    assert str(e.value) == ("loss.drw_epoch=200 is not an epoch of the run (0 to 199): its re-weighting would never "
                            "start; set it below 200 (LDAM-DRW: 160 of 200 epochs), or remove it")
    check_drw_epoch(cfg, 201)  # the last epoch, 0-based
    check_drw_epoch(load_config(None, ["loss.name=ldam"], stage="stage1"), 1)  # no re-weighting


def test_a_stage_saves_only_the_keys_it_reads_and_they_rebuild_the_same_config():
    cfg = load_config(None, ["train.lr=0.3", "stage2.method=balms", "meta_sampler.lr=0.02"], stage="stage2")
    saved = config_to_dict(cfg, "stage2")
    assert "loss" not in saved and "sampler" not in saved["data"] and "mixup_alpha" not in saved["train"]
    assert saved["meta_sampler"]["lr"] == 0.02 and saved["train"]["lr"] == 0.3
    assert config_from_dict(saved) == cfg
    stage1 = config_to_dict(load_config(None, ["loss.name=focal"], stage="stage1"), "stage1")
    assert stage1["loss"]["name"] == "focal" and "stage2" not in stage1 and "meta_sampler" not in stage1


def test_resume_check_names_the_differing_keys_and_the_run_config():
    saved = config_to_dict(load_config(None, ["train.lr=0.3"]), "stage1")
    check_resume(saved, load_config(None, ["train.lr=0.3"]), "stage1", "logs/x/config.yaml")
    with pytest.raises(ConfigError) as e:
        check_resume(saved, load_config(None, ["train.epochs=30"]), "stage1", "logs/x/config.yaml")
    assert str(e.value) == ("--resume with a config that differs from the run's at train.epochs (the run's 200, now "
                            "30), train.lr (the run's 0.3, now 0.1); resume with the run's own config: python "
                            "stage1_train.py --cfg logs/x/config.yaml --resume log_dir=logs/x")


def test_a_balms_run_saved_before_the_relaxation_key_reads_as_the_class_relaxation_it_drew_with(tmp_path):
    new = config_to_dict(load_config(None, ["stage2.method=balms"], stage="stage2"), "stage2")
    assert new["meta_sampler"]["relax"] == "image"  # the default: BALMS's own
    old = {**new, "meta_sampler": {k: v for k, v in new["meta_sampler"].items() if k != "relax"}}
    assert config_from_dict(old).meta_sampler.relax == "class"
    check_resume(old, load_config(None, ["stage2.method=balms", "meta_sampler.relax=class"], stage="stage2"), "stage2",
                 "x.yaml")
    run = tmp_path / "moved_run"  # the run's config.yaml, which lacks the key, in a directory moved since
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError) as e:
        check_resume(old, load_config(None, ["stage2.method=balms", "data.root=/data/here"], stage="stage2"), "stage2",
                     run / "config.yaml")
    assert "at meta_sampler.relax (the run's class, now image);" in str(e.value)
    command = str(e.value).split("resume with the run's own config: ")[1]
    assert command == (f"python stage2_classifier.py --cfg {run / 'config.yaml'} --resume log_dir={run} "
                       f"data.root=/data/here meta_sampler.relax=class")
    cfg = load_config(run / "config.yaml", command.split(" --resume ")[1].split(), stage="stage2")
    check_resume(old, cfg, "stage2", run / "config.yaml")  # the command it gives resumes the run
    assert cfg.run_dir == str(run) and cfg.data.root == "/data/here"
    crt = config_to_dict(load_config(None, ["stage2.method=crt"], stage="stage2"), "stage2")
    crt["meta_sampler"].pop("relax")  # another method's run: nothing to read differently
    check_resume(crt, load_config(None, ["stage2.method=crt"], stage="stage2"), "stage2", "x.yaml")


def test_a_yaml_syntax_error_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  epochs: 3\n lr: [0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path} is not valid YAML at line") and "unicode string" not in str(e.value)


def test_resume_accepts_another_place_of_the_data_or_the_run_directory_but_no_other_change():
    saved = config_to_dict(load_config(None, ["data.root=/data/cifar", "train.lr=0.3", "name=a"]), "stage1")
    for root in ("/data/cifar/", "/mnt/copy/cifar", "../cifar"):  # class counts are checked on restore instead
        check_resume(saved, load_config(None, [f"data.root={root}", "train.lr=0.3"]), "stage1", "x.yaml")
    check_resume(saved, load_config(None, ["log_dir=/moved/run", "train.lr=0.3", "data.root=/data/cifar"]), "stage1",
                 "x.yaml")
    with pytest.raises(ConfigError, match=r"differs from the run's at train.lr \(the run's 0.3, now 0.2\);"):
        check_resume(saved, load_config(None, ["data.root=/data/cifar/", "train.lr=0.2"]), "stage1", "x.yaml")


def test_resume_on_another_machine_may_change_device_threads_downloads_timeout_checkpoint_interval_and_evaluation():
    saved = config_to_dict(load_config(None, ["train.num_threads=1", "data.workers=2"]), "stage1")
    check_resume(saved, load_config(None, ["train.num_threads=16", "data.workers=8", "train.dist_timeout_s=60",
                                           "train.save_every_s=60", "train.device=cpu", "train.cudnn_benchmark=true",
                                           "data.download=true", "eval.batch_size=64", "eval.logit_adjust_tau=1"]),
                 "stage1", "x.yaml")
    # numerics are the run's
    with pytest.raises(ConfigError, match=r"differs from the run's at train.amp \(the run's off, now bf16\);"):
        check_resume(saved, load_config(None, ["train.num_threads=16", "train.amp=bf16"]), "stage1", "x.yaml")


@pytest.mark.parametrize("dataset", ["imagenet_lt", "places_lt", "inat2018"])
def test_a_subset_seed_is_refused_for_a_split_list_that_holds_no_validation_images_out(dataset):
    # The lists are used as published; the seed picks only the images data.val_per_class holds out (inat2018).
    cfg = load_config(None, [f"data.dataset={dataset}", "data.subset_seed=7"], "stage1")
    with pytest.raises(ConfigError, match=rf"^data.subset_seed=7 picks the validation images .*data.dataset="
                                          rf"{dataset} holds none out .*: remove it"):
        check_dataset_keys(cfg, "list")
    check_dataset_keys(load_config(None, [f"data.dataset={dataset}"], "stage1"), "list")
    check_dataset_keys(load_config(None, ["data.dataset=inat2018", "data.val_per_class=2", "data.subset_seed=7"],
                                   "stage1"), "list")
    check_dataset_keys(load_config(None, ["data.dataset=folder", "data.subset_seed=7"], "stage1"), "folder")
