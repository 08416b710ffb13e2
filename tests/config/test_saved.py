"""A run's saved config: dumped and loaded back equal, rebuilt with the same checks, compared key by key."""
import shlex

import pytest

from config.keys import ConfigError
from config.load import config_to_dict, load_config
from config.saved import check_resume, config_diff, config_from_dict, dump_config
from config.schema import Config


def test_dump_then_load_round_trips_to_an_equal_config(tmp_path):
    cfg = load_config(None, [
        "name=123", "train.epochs=3", "train.warmup=1", "train.lr=0.025", "train.weight_decay=1e-5",
        "train.schedule=step", "train.milestones=[1.5,2]",
        "data.flip=false", "data.imbalance_factor=50", "model.channels_last=false", "log_dir=runs/x",
    ])
    path = tmp_path / "dumped.yaml"
    dump_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert again.name == "123"  # a numeric-looking string stays a string
    assert again.train.weight_decay == 1e-5


def test_config_from_dict_rebuilds_and_checks():
    cfg = config_from_dict({"train": {"epochs": 5}, "data": {"imbalance_factor": 10}})
    assert cfg.train.epochs == 5 and cfg.data.imbalance_factor == 10.0
    assert cfg.train.lr == 0.1
    full = load_config(None, ["train.lr=0.3", "data.sampler=sqrt"])
    assert config_from_dict(config_to_dict(full)) == full
    with pytest.raises(ConfigError, match="saved config"):
        config_from_dict({"train": {"epoch": 5}})


def test_config_diff_lists_exactly_the_differing_dotted_keys():
    a = config_to_dict(Config())
    b = config_to_dict(load_config(None, ["train.lr=0.2", "data.flip=false", "train.gamma=0.5", "train.schedule=step"]))
    assert config_diff(a, b) == ["data.flip", "train.gamma", "train.lr", "train.schedule"]
    assert config_diff(a, config_to_dict(Config())) == []
    # A key one side lacks (a stage's saved config holds only what it reads) counts as its default.
    assert config_diff({"train": {"epochs": 1}, "data": {"flip": False}}, {"train": {"epochs": 1}}) == ["data.flip"]
    assert config_diff({"train": {"epochs": 1}}, {"train": {"epochs": 1}, "data": {"flip": True}}) == []


def test_config_diff_ignores_a_key_added_since_the_run_while_it_holds_its_default():
    # A run saved before stage2.live_bn existed resumes under the new schema, unless the key is changed.
    saved = config_to_dict(Config())
    del saved["stage2"]["live_bn"]
    assert config_diff(saved, config_to_dict(Config())) == []
    assert config_diff(saved, config_to_dict(load_config(None, ["stage2.live_bn=eval"]))) == ["stage2.live_bn"]


@pytest.mark.parametrize("saved_stage, resumed_as", [("stage1", "stage2"), ("stage2", "stage1")])
def test_resuming_a_run_directory_of_the_other_stage_is_refused_as_such(saved_stage, resumed_as):
    saved = config_to_dict(Config(), saved_stage)
    with pytest.raises(ConfigError) as e:
        check_resume(saved, Config(), resumed_as, "logs/x/config.yaml")
    script = {"stage1": "stage1_train.py", "stage2": "stage2_classifier.py"}[saved_stage]
    assert str(e.value).startswith(f"--resume: logs/x holds a {saved_stage} run ({script}), not a {resumed_as} "
                                   f"one: each stage writes its own run directory")
    check_resume(saved, Config(), saved_stage, "logs/x/config.yaml")  # its own stage: the same config resumes


@pytest.mark.parametrize("key", ["train.save_every_s=60", "train.device=cpu", "data.workers=3", "data.prefetch=true",
                                 "eval.logit_adjust_tau=1.0", "train.num_threads=2", "train.dist_timeout_s=30"])
def test_resume_accepts_a_setting_of_the_machine_or_of_saving_changed_since_the_run_started(key):
    saved = config_to_dict(load_config(None, [], "stage1"), "stage1")
    check_resume(saved, load_config(None, [key], "stage1"), "stage1", "logs/x/config.yaml")
    with pytest.raises(ConfigError):  # a setting of the training itself is refused
        check_resume(saved, load_config(None, ["train.lr=0.2"], "stage1"), "stage1", "logs/x/config.yaml")


def test_the_resume_command_a_refusal_suggests_is_quoted_for_the_shell():
    saved = config_to_dict(load_config(None, ["train.milestones=[100, 150]", "train.schedule=step"], "stage1"),
                           "stage1")
    with pytest.raises(ConfigError) as e:
        check_resume(saved, load_config(None, ["train.lr=0.2"], "stage1"), "stage1", "/tmp/my runs/é/config.yaml")
    command = str(e.value).split("resume with the run's own config: ")[1]
    assert shlex.split(command)[:5] == ["python", "stage1_train.py", "--cfg", "/tmp/my runs/é/config.yaml", "--resume"]
    assert "log_dir=/tmp/my runs/é" in shlex.split(command)


def test_resume_accepts_another_spelling_of_the_stage_1_checkpoint_and_refuses_another_file(tmp_path, monkeypatch):
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "last.pt").write_bytes(b"x")
    (tmp_path / "other.pt").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "s1")
    monkeypatch.chdir(tmp_path)
    saved = config_to_dict(load_config(None, ["stage1.checkpoint=s1/last.pt"], "stage2"), "stage2")
    for spelling in (tmp_path / "s1" / "last.pt", "./s1/../s1/last.pt", "link/last.pt"):
        check_resume(saved, load_config(None, [f"stage1.checkpoint={spelling}"], "stage2"), "stage2",
                     "logs/x/config.yaml")
    with pytest.raises(ConfigError, match=r"stage1.checkpoint \(the run's s1/last.pt, now other.pt\)"):
        check_resume(saved, load_config(None, ["stage1.checkpoint=other.pt"], "stage2"), "stage2", "logs/x/config.yaml")
    (tmp_path / "s1" / "last.pt").unlink()  # gone: no file to compare, so the spelling must be the run's
    with pytest.raises(ConfigError, match="stage1.checkpoint"):
        check_resume(saved, load_config(None, [f"stage1.checkpoint={tmp_path}/s1/last.pt"], "stage2"), "stage2",
                     "logs/x/config.yaml")


def test_a_refused_resume_shows_a_float_key_as_given_not_with_a_trailing_point_zero():
    saved = config_to_dict(load_config(None, ["train.warmup=800", "train.iterations=1000"], "stage1"), "stage1")
    with pytest.raises(ConfigError, match=r"at train.warmup \(the run's 800, now 2\); resume"):
        check_resume(saved, load_config(None, ["train.warmup=2", "train.iterations=1000"], "stage1"), "stage1",
                     "logs/x/config.yaml")
    with pytest.raises(ConfigError, match=r"at train.lr \(the run's 0.1, now 0.1000001\), train.weight_decay "
                                          r"\(the run's 0.0005, now 0.00051234567\); resume"):  # all digits
        check_resume(saved, load_config(None, ["train.warmup=800", "train.iterations=1000", "train.lr=0.1000001",
                                               "train.weight_decay=0.00051234567"], "stage1"), "stage1",
                     "logs/x/c.yaml")
