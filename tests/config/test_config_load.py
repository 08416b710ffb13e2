"""Config loading: defaults, YAML then overrides, type coercion and strictness, helpful errors, round trips."""
import re
from pathlib import Path

import pytest

from config.keys import ConfigError, flatten
from config.load import check_schedule_keys, config_to_dict, load_config
from config.schema import CHOICES, Config
from tests.conftest import REPO


def _yaml(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_no_file_and_no_overrides_give_the_schema_and_the_run_dir_follows_name_unless_log_dir_is_set():
    assert load_config() == Config()
    assert load_config(None, ["name=exp1"]).run_dir == "logs/exp1"
    assert load_config(None, ["name=exp1", "log_dir=/tmp/elsewhere"]).run_dir == "/tmp/elsewhere"


def test_yaml_keys_apply_then_overrides_win(tmp_path):
    path = _yaml(tmp_path, "name: from_yaml\ntrain:\n  epochs: 30\n  lr: 0.05\ndata:\n  imbalance_factor: 50\n")
    cfg = load_config(path, ["train.epochs=7", "name=from_cli"])
    assert cfg.train.epochs == 7  # override beats the file
    assert cfg.name == "from_cli"
    assert cfg.train.lr == 0.05  # file beats the default 0.1
    assert cfg.data.imbalance_factor == 50.0
    assert cfg.train.batch_size == 128  # untouched default


def test_later_override_of_the_same_key_wins():
    assert load_config(None, ["train.epochs=3", "train.epochs=9"]).train.epochs == 9


def test_nested_dotted_override_sets_only_that_key():
    cfg = load_config(None, ["data.sampler=class_balanced", "model.channels_last=false"])
    assert cfg.data.sampler == "class_balanced"
    assert cfg.model.channels_last is False
    assert cfg.data.dataset == "cifar10"


def test_int_value_for_float_key_becomes_float():
    cfg = load_config(None, ["train.lr=1", "data.imbalance_factor=10"])
    assert type(cfg.train.lr) is float and cfg.train.lr == 1.0
    assert type(cfg.data.imbalance_factor) is float and cfg.data.imbalance_factor == 10.0


def test_exponent_notation_for_float_key_is_parsed(tmp_path):
    # YAML 1.1 reads `1e-3` (no dot) as a string; float keys must still accept it.
    assert load_config(None, ["train.weight_decay=1e-3"]).train.weight_decay == 0.001
    assert load_config(_yaml(tmp_path, "train:\n  weight_decay: 2e-4\n")).train.weight_decay == 0.0002


def test_bool_key_rejects_integer_one():
    with pytest.raises(ConfigError, match=r"data\.flip.*bool"):
        load_config(None, ["data.flip=1"])


def test_bool_key_accepts_true_and_false():
    assert load_config(None, ["data.flip=false"]).data.flip is False
    assert load_config(None, ["data.autoaugment=true"]).data.autoaugment is True


@pytest.mark.parametrize("value", ["3.5", "abc", "true"])
def test_int_key_rejects_non_integers_naming_key_value_and_type(value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"train.epochs={value}"])
    msg = str(err.value)
    assert "train.epochs" in msg and "int" in msg and value.lower() in msg.lower()


def test_list_of_float_key_parses_list_and_coerces_items():
    milestones = load_config(None, ["train.schedule=step", "train.milestones=[10,20]"]).train.milestones
    assert milestones == [10.0, 20.0]
    assert all(type(m) is float for m in milestones)


def test_list_of_float_key_rejects_a_scalar_and_a_bad_item():
    with pytest.raises(ConfigError, match="train.milestones"):
        load_config(None, ["train.milestones=10"])
    with pytest.raises(ConfigError, match=r"train\.milestones\[1\]"):
        load_config(None, ["train.milestones=[10,abc]"])


def test_str_key_given_a_number_becomes_a_string():
    assert load_config(None, ["name=123"]).name == "123"
    assert load_config(None, ["name=1.5"]).name == "1.5"


def test_str_key_keeps_the_exact_spelling_of_a_numeric_value():
    # `name=007` names a run "007"; parsing it as the YAML int 7 first loses the spelling.
    assert load_config(None, ["name=007"]).name == "007"
    assert load_config(None, ["name=1.10"]).name == "1.10"


def test_unknown_key_suggests_closest_valid_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epoch=3"])
    msg = str(err.value)
    assert "'train.epoch'" in msg and "did you mean" in msg and "train.epochs" in msg


def test_bare_leaf_key_suggests_its_full_dotted_key():
    with pytest.raises(ConfigError, match=r"did you mean.*train\.epochs"):
        load_config(None, ["epochs=3"])


def test_misplaced_leaf_key_suggests_the_section_that_has_it():
    with pytest.raises(ConfigError, match=r"did you mean.*train\.batch_size"):
        load_config(None, ["data.batch_size=3"])


def test_setting_a_whole_section_is_an_error():
    with pytest.raises(ConfigError, match="section"):
        load_config(None, ["train=3"])


@pytest.mark.parametrize("item", ["train.epochs", "=3"])
def test_malformed_override_is_an_error(item):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, [item])


def test_override_value_that_is_not_valid_yaml_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="train.milestones"):
        load_config(None, ["train.milestones=[10,"])


def test_missing_yaml_file_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as err:
        load_config(missing)
    assert str(missing) in str(err.value)


def test_yaml_that_is_not_a_mapping_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_yaml(tmp_path, "- train.epochs\n- 3\n"))


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(_yaml(tmp_path, "")) == Config()


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = _yaml(tmp_path, "train:\n  epoch: 3\n", name="typo.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "train.epochs" in str(err.value)


def test_lt_data_root_env_var_sets_default_data_root(monkeypatch):
    monkeypatch.setenv("LT_DATA_ROOT", "/shared/datasets")
    assert Config().data.root == "/shared/datasets"
    assert load_config(None, ["data.root=/elsewhere"]).data.root == "/elsewhere"
    monkeypatch.delenv("LT_DATA_ROOT")
    assert Config().data.root == "datasets"


@pytest.mark.parametrize("key, bad", [("train.select_metric", "top5"), ("data.profile", "linear"),
                                      ("train.schedule", "poly"), ("stage2.init_head", "random"),
                                      ("data.subset_draw", "numpy")])
def test_closed_set_key_with_another_value_is_an_error_listing_the_valid_values(key, bad):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={bad}"])
    assert key in str(e.value) and repr(bad) in str(e.value)
    for valid in CHOICES[key]:
        assert valid in str(e.value)


def test_closed_set_values_are_checked_in_yaml_files_too(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  select_metric: few_shot\n")
    with pytest.raises(ConfigError, match="train.select_metric='few_shot' is not one of top1, many, medium, few"):
        load_config(path)


@pytest.mark.parametrize("item", ["train.lr=nan", "train.lr=.inf", "data.imbalance_factor=inf", "train.warmup=-inf"])
def test_a_float_key_refuses_nan_and_infinity(item):
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=f"config key '{key}' .* expects a finite number"):
        load_config(None, [item])


@pytest.mark.parametrize("text, message", [
    ("train:\n  lr: 0.1\ntrain.lr: 0.2\n", "train.lr is given twice (as nested and as dotted keys): keep one"),
    ("train: &x {lr: *x}\n", "train.lr holds itself (a YAML alias inside its own anchor): write its keys out"),
    ("train: {lr: {}}\n", "config key 'train.lr' (in {path}) expects float, got {{}} (dict)"),
])
def test_a_yaml_key_given_twice_inside_itself_or_as_an_empty_mapping_is_one_error(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="^" + re.escape(message.format(path=path)) + "$"):
        load_config(path)
    path.write_text("train: {}\n")  # an empty section sets nothing
    assert load_config(path) == load_config(None)


def test_the_ldam_draw_takes_a_32_bit_subset_seed_and_the_torch_draw_a_64_bit_one():
    assert load_config(None, ["data.subset_seed=4294967296"]).data.subset_seed == 2**32
    with pytest.raises(ConfigError, match=r"^data.subset_seed=4294967296 is out of range: it must be < 2\*\*32"):
        load_config(None, ["data.subset_seed=4294967296", "data.subset_draw=ldam"])


def test_an_integer_past_a_float_s_range_for_a_float_key_is_refused_in_a_short_line(tmp_path):
    """A 400-digit number (float() overflows on it) for a float key, in an override or the YAML file."""
    digits = "1" * 400
    path = tmp_path / "big.yaml"
    path.write_text(f"train:\n  lr: {digits}\n")
    for args in ((None, [f"data.imbalance_factor={digits}"]), (path, [])):
        with pytest.raises(ConfigError, match=r"expects a finite number, got 1{24}\.\.\. \(400 characters\)$"):
            load_config(*args)


def test_an_override_of_up_to_40_characters_with_its_quotes_is_named_whole_and_a_longer_one_cut_with_its_length():
    with pytest.raises(ConfigError, match=r"^config key 'data.flip' \(override 'data.flip=y{28}'\) expects bool"):
        load_config(None, ["data.flip=" + "y" * 28])  # 38 characters, 40 quoted
    with pytest.raises(ConfigError, match=r"^config key 'data.flip' \(override 'data.flip=y{13}\.\.\. "
                                          r"\(39 characters\)\) expects bool"):
        load_config(None, ["data.flip=" + "y" * 29])


@pytest.mark.parametrize("override, rule", [
    ("train.lr=-0.1", ">= 0"), ("train.batch_size=1", ">= 2"), ("train.batch_size=0", ">= 2"),
    ("train.epochs=0", ">= 1"), ("train.iterations=-1", ">= 0"), ("data.imbalance_factor=0.5", ">= 1"),
    ("eval.batch_size=0", ">= 1"), ("data.val_per_class=-1", ">= 0"), ("meta_sampler.gumbel_tau=0", "> 0"),
    ("train.accum_steps=0", ">= 1"), ("stage2.cache_views=-2", ">= 0"), ("data.workers=-1", ">= 0"),
    ("train.seed=-1", ">= 0"), ("train.seed=4294967296", "< 2**32"),
    ("data.subset_seed=18446744073709551616", "< 2**64"),
    ("train.num_threads=2147483648", "< 2**31"), ("train.epochs=99999999999999999999", "< 2**31"),
    ("data.crop_padding=100000", "<= 32 (the CIFAR image side"), ("data.cutout=33", "<= 32 (the CIFAR image side"),
    ("data.image_size=60000", "<= 4096 (pixels a side"), ("train.batch_size=65537", "<= 65536 (images per step"),
    ("meta_sampler.meta_batch_size=1000000000", "<= 65536 (images per meta step"),
    ("train.momentum=1", "< 1 (the share of each update the next one keeps"), ("train.momentum=5", "< 1 (the share"),
    ("train.warmup_start=1.5", "<= 1 (a fraction of train.lr"),
    ("train.dist_timeout_s=100000000", "<= 31536000 (seconds, a year"),  # 1e14 was an OverflowError (torchrun)
    # 1e300 ended in torch's "value cannot be converted to type float without overflow"
    ("train.lr=1000", "<= 100 (the linear scaling rule"), ("train.weight_decay=2", "<= 1 (L2 factor"),
    ("meta_sampler.lr=1000", "<= 100 (Adam's step"), ("train.lr=101", "<= 100"),
])
def test_a_value_out_of_its_range_is_one_error_naming_key_value_and_range(override, rule):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(f"{key}=") and value in str(err.value) and f"it must be {rule}" in str(err.value)


def test_the_largest_learning_rates_and_weight_decay_are_taken():
    cfg = load_config(None, ["train.lr=100", "train.weight_decay=1", "meta_sampler.lr=100"], stage="stage2")
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.meta_sampler.lr) == (100, 1, 100)


def test_a_padding_and_cutout_of_the_whole_cifar_side_and_an_image_size_of_4096_are_taken():
    data = load_config(None, ["data.crop_padding=32", "data.cutout=32", "data.image_size=4096"]).data
    assert (data.crop_padding, data.cutout, data.image_size) == (32, 32, 4096)


def test_nesterov_without_momentum_is_refused():
    with pytest.raises(ConfigError, match=r"^train.nesterov=true needs a momentum, and train.momentum=0 has none"):
        load_config(None, ["train.nesterov=true", "train.momentum=0"])
    assert load_config(None, ["train.nesterov=true"]).train.nesterov


def test_a_momentum_just_below_1_is_taken():
    assert load_config(None, ["train.momentum=0.999"]).train.momentum == 0.999


def test_batches_of_65536_images_are_taken():
    cfg = load_config(None, ["train.batch_size=65536", "meta_sampler.meta_batch_size=65536"], stage="stage2")
    assert (cfg.train.batch_size, cfg.meta_sampler.meta_batch_size) == (65536, 65536)


@pytest.mark.parametrize("grid", ["[]", "[-1.0, 2]"])
def test_a_tau_grid_without_a_tau_or_with_a_negative_one_is_refused(grid):
    with pytest.raises(ConfigError, match=r"stage2.tau_norm_grid=.* must list at least one tau, each >= 0"):
        load_config(None, [f"stage2.tau_norm_grid={grid}"])


def test_a_tau_past_10_is_refused_alone_or_in_the_grid():
    """w / ||w||^1e30 deployed an all-zero head, finite, so the NaN guard said nothing."""
    with pytest.raises(ConfigError, match=r"^stage2.tau_norm_grid=\[0.5, 1e\+30\] holds 1e\+30: each tau must be <= "
                                          r"10 \(the exponent of each class weight's norm"):
        load_config(None, ["stage2.tau_norm_grid=[0.5, 1e30]"])
    with pytest.raises(ConfigError, match=r"^stage2.tau_norm_tau=10.5 is out of range: it must be <= 10"):
        load_config(None, ["stage2.tau_norm_tau=10.5"])
    cfg = load_config(None, ["stage2.tau_norm_grid=[0, 10]", "stage2.tau_norm_tau=10"])
    assert (cfg.stage2.tau_norm_grid, cfg.stage2.tau_norm_tau) == ([0.0, 10.0], 10.0)


def test_an_empty_name_is_refused_unless_log_dir_names_the_run():
    with pytest.raises(ConfigError, match="name is empty"):
        load_config(None, ["name="])
    assert load_config(None, ["name=", "log_dir=runs/x"]).run_dir == "runs/x"


@pytest.mark.parametrize("name", ["..", ".", "a/../b", "a//b", "/tmp/run", "a\\b"])
def test_a_name_that_is_not_a_folder_under_logs_is_refused_pointing_to_log_dir(name):
    """name=.. would write the run into the working directory, name=/tmp/run anywhere: a path is log_dir's."""
    with pytest.raises(ConfigError, match="^" + re.escape(f"name={name!r} is not a folder under logs/") + ".*log_dir="):
        load_config(None, [f"name={name}"])
    assert load_config(None, [f"name={name}", "log_dir=runs/x"]).run_dir == "runs/x"  # name then names nothing


def test_a_name_of_nested_folders_under_logs_is_a_run_directory_there():
    assert load_config(None, ["name=group/run-1"]).run_dir == "logs/group/run-1"


@pytest.mark.parametrize("name", ["tab\there", "\udcff"])  # \udcff: the byte 0xff of an argv not in UTF-8
def test_a_name_or_log_dir_with_characters_that_are_not_printable_is_refused(name):
    with pytest.raises(ConfigError, match="holds characters that are not printable text"):
        load_config(None, [f"name={name}"])
    assert load_config(None, ["name=run-1.b_ü"]).run_dir == "logs/run-1.b_ü"
    # a log_dir of such bytes wrote config.yaml, then TensorBoard failed with a UnicodeEncodeError traceback
    with pytest.raises(ConfigError, match=r"^log_dir=.* holds characters that are not printable text"):
        load_config(None, [f"log_dir=/tmp/{name}"])
    assert load_config(None, ["log_dir=/tmp/runs ü/1"]).run_dir == "/tmp/runs ü/1"


@pytest.mark.parametrize("overrides, message", [
    (["train.epochs=5"], r"train.warmup=5 \(epochs\) is not shorter than the run \(train.epochs=5\)"),
    (["train.iterations=100", "train.warmup=100"],
     r"train.warmup=100 \(steps\) is not shorter than the run \(train.iterations=100\)"),
])
def test_a_warmup_as_long_as_the_run_is_refused_naming_both_keys(overrides, message):
    with pytest.raises(ConfigError, match=message + ": lower train.warmup"):
        check_schedule_keys(load_config(None, overrides))
    check_schedule_keys(load_config(None, ["train.epochs=5", "train.warmup=0"]))
    check_schedule_keys(load_config(None, ["train.iterations=100", "train.warmup=99"]))


def test_the_default_milestones_are_not_taken_as_steps_of_a_run_counted_in_steps():
    with pytest.raises(ConfigError, match=r"^train.milestones keeps its default \[160.0, 180.0\], epochs of a "
                                          r"200-epoch run, but train.iterations=2000 counts steps: set "
                                          r"train.milestones in steps \(e.g. \[1600, 1800\]\)$"):
        check_schedule_keys(load_config(None, ["train.schedule=step", "train.iterations=2000"]))
    check_schedule_keys(load_config(None, ["train.schedule=step", "train.iterations=2000", "train.milestones=[160]"]))


@pytest.mark.parametrize("overrides, message", [
    (["train.schedule=step", "train.epochs=100"], r"train.milestones=\[160.0, 180.0\] \(epochs\) holds 180, not before "
     r"the run's end \(train.epochs=100\): the lr would never decay there"),
    (["train.schedule=step", "train.iterations=500", "train.milestones=[100,500]"],
     r"train.milestones=\[100.0, 500.0\] \(steps\) holds 500, not before the run's end \(train.iterations=500\)"),
])
def test_a_step_schedule_milestone_at_or_past_the_run_s_end_is_refused(overrides, message):
    with pytest.raises(ConfigError, match="^" + message):
        check_schedule_keys(load_config(None, overrides))
    check_schedule_keys(load_config(None, ["train.schedule=step", "train.epochs=181"]))
    check_schedule_keys(load_config(None, ["train.schedule=step", "train.iterations=501",
                                           "train.milestones=[100,500]"]))


@pytest.mark.parametrize("override", ["train.milestones=[10,20]", "train.gamma=0.1"])
def test_step_schedule_keys_given_with_the_cosine_schedule_are_refused_but_a_file_s_are_not(override, tmp_path):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}=.* is read by train.schedule=step only; train.schedule="
                                          "cosine does not use it: remove it, or set train.schedule=step"):
        check_schedule_keys(load_config(None, [override]))  # train.gamma=0.1 is the default: given, it does nothing
    arb = REPO / "config/cifar10_lt/methods_if100_exp/arb.yaml"  # step, milestones [160], as bench/methods_table runs
    check_schedule_keys(load_config(arb, ["train.schedule=cosine"]))
    path = tmp_path / "config.yaml"  # such a run's saved config
    path.write_text("train:\n  schedule: cosine\n  milestones: [160]\n  gamma: 0.1\n")
    check_schedule_keys(load_config(path))


def test_a_warmup_start_given_without_a_warmup_is_refused_but_a_file_s_is_not():
    with pytest.raises(ConfigError, match=r"^train.warmup_start=0.5 is read only with a warm-up; train.warmup=0 has "
                                          r"none: remove it, or set train.warmup"):
        check_schedule_keys(load_config(None, ["train.warmup=0", "train.warmup_start=0.5"]))
    check_schedule_keys(load_config(REPO / "config/cifar10_lt/stage1_softmax.yaml", ["train.warmup=0"]))  # sets 0.5
    check_schedule_keys(load_config(None, ["train.warmup=1", "train.warmup_start=1"]))


def test_train_epochs_given_on_the_command_line_beside_iterations_is_refused_but_a_file_s_epochs_are_not(tmp_path):
    with pytest.raises(ConfigError, match=r"^train.epochs=3 has no effect: train.iterations=50 sets the run's length"):
        load_config(None, ["train.epochs=3", "train.iterations=50"])  # either order
    with pytest.raises(ConfigError, match=r"^train.epochs=1 has no effect: train.iterations=13000"):
        load_config(REPO / "config/cifar10_lt/stage1_softmax.yaml", ["train.epochs=1"])
    path = tmp_path / "run_config.yaml"  # a run's saved config holds both keys; iterations counts
    path.write_text("train:\n  epochs: 20\n  iterations: 100\n  warmup: 0\n")
    assert (load_config(path).train.iterations, load_config(path, ["train.iterations=0"]).train.epochs) == (100, 20)
    assert load_config(REPO / "config/cifar10_lt/demo_stage1.yaml", ["train.iterations=50"]).train.iterations == 50
    assert load_config(None, ["train.epochs=30", "train.iterations=0"]).train.epochs == 30


def test_the_overridden_keys_are_recorded_but_are_no_config_key_of_their_own():
    cfg = load_config(None, ["train.lr=0.1", "data.flip=true"])
    assert cfg.overridden == {"train.lr", "data.flip"} and cfg == load_config(None, ["train.lr=0.1"])
    assert "overridden" not in config_to_dict(cfg) and "overridden" not in flatten(config_to_dict(cfg))
    with pytest.raises(ConfigError, match=r"^unknown config key 'overridden' \(override 'overridden=\[\]'\)"):
        load_config(None, ["overridden=[]"])


def test_an_override_s_key_is_recorded_without_the_spaces_around_it():
    # else " data.sampler =instance", at its default, would slip past stage 2's check of unread keys
    assert load_config(None, [" data.flip =true"]).overridden == {"data.flip"}
    with pytest.raises(ConfigError, match=r"^data.sampler='instance' is read by stage1 \(stage1_train.py\) only"):
        load_config(None, ["data.sampler =instance"], stage="stage2")


def test_a_tilde_in_log_dir_stage1_checkpoint_and_the_cfg_path_is_the_home_folder(tmp_path, monkeypatch):
    # `key=~/x` reaches the program unexpanded (no shell expands a ~ after =), and YAML never expands it
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "exp.yaml").write_text("log_dir: ~/runs/a\n")
    cfg = load_config("~/exp.yaml", ["stage1.checkpoint=~/s1/last.pt"], "stage2")
    assert (cfg.log_dir, cfg.run_dir, cfg.stage1.checkpoint) == (f"{tmp_path}/runs/a", f"{tmp_path}/runs/a",
                                                                 f"{tmp_path}/s1/last.pt")


def test_an_empty_lt_data_root_is_the_default_data_folder_not_the_working_directory(monkeypatch):
    monkeypatch.setenv("LT_DATA_ROOT", "")
    assert load_config(None, []).data.root == "datasets"
