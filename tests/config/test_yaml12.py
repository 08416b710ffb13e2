"""Config files and overrides read numbers and booleans as YAML 1.2 does, and refuse a key written twice."""
import pytest

from config.keys import ConfigError
from config.load import load_config


def _load_file(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return load_config(path)


def test_a_leading_zero_is_decimal_not_octal(tmp_path):
    assert _load_file(tmp_path, "train:\n  epochs: 010\n").train.epochs == 10
    assert load_config(None, ["train.epochs=010"]).train.epochs == 10


@pytest.mark.parametrize("override", ["data.imbalance_factor=1:10", "train.lr=1_0.5", "train.epochs=1_000"])
def test_base_60_and_underscored_numbers_are_refused_by_name(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"config key '{key}'.*expects"):
        load_config(None, [override])


def test_a_section_written_twice_is_an_error_naming_its_line(tmp_path):
    with pytest.raises(ConfigError, match=r"exp.yaml is not valid YAML at line 4, column 1: key 'train' appears twice"):
        _load_file(tmp_path, "train:\n  lr: 0.3\ndata: {}\ntrain:\n  epochs: 7\n")
    with pytest.raises(ConfigError, match="key 'lr' appears twice"):
        _load_file(tmp_path, "train:\n  lr: 0.3\n  lr: 0.2\n")


def test_words_stay_strings_for_string_keys_and_are_booleans_for_boolean_keys(tmp_path):
    cfg = _load_file(tmp_path, "name: 2026-11-28\ntrain:\n  amp: off\ndata:\n  flip: off\n  autoaugment: yes\n")
    assert cfg.name == "2026-11-28" and cfg.train.amp == "off"
    assert cfg.data.flip is False and cfg.data.autoaugment is True
    assert load_config(None, ["data.flip=On", "train.amp=off"]).data.flip is True


def test_exponents_hex_and_infinity_read_as_yaml_1_2_numbers(tmp_path):
    cfg = _load_file(tmp_path, "train:\n  weight_decay: 1e-5\n  lr: 1.0e-02\n  seed: 0x1F\n")
    assert (cfg.train.weight_decay, cfg.train.lr, cfg.train.seed) == (1e-5, 0.01, 31)
    with pytest.raises(ConfigError, match="expects a finite number"):
        load_config(None, ["train.lr=.inf"])


def test_a_file_that_is_not_utf8_text_is_one_config_error(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"\x80\x02}q\x00(X\x05\x00\x00\x00model")
    with pytest.raises(ConfigError, match="last.pt is not a YAML text file"):
        load_config(path)


def test_a_mapping_key_yaml_cannot_hash_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"exp.yaml is not valid YAML at line 1, column 3: found unhashable key"):
        _load_file(tmp_path, "? [train, lr]\n: 0.3\n")


def test_a_control_character_is_one_line_naming_it_without_the_parser_s_stream(tmp_path):
    with pytest.raises(ConfigError) as e:
        _load_file(tmp_path, "train:\n  epochs: 3\x00\n")
    assert str(e.value).endswith("exp.yaml is not valid YAML: unacceptable character #x0000: special characters are "
                                 "not allowed") and "\n" not in str(e.value)


def test_a_merge_key_reads_its_mapping_and_the_keys_beside_it_win_while_a_repeated_key_is_still_refused(tmp_path):
    # `<<: *anchor` (YAML 1.1 merge) as PyYAML's SafeLoader read it before the repeated-key check
    tree = "_: &fast\n  epochs: 3\n  lr: 0.2\n"
    with pytest.raises(ConfigError, match=r"unknown config key '_.epochs'"):  # the anchor's own section is a key
        _load_file(tmp_path, tree + "train:\n  <<: *fast\n  lr: 0.3\n")
    from config.yaml12 import load_yaml
    assert load_yaml(tree + "train:\n  <<: *fast\n  lr: 0.3\n")["train"] == {"epochs": 3, "lr": 0.3}
    with pytest.raises(ConfigError, match="key 'lr' appears twice"):
        _load_file(tmp_path, tree + "train:\n  <<: *fast\n  lr: 0.3\n  lr: 0.4\n")


def test_nesting_past_the_recursion_limit_is_one_short_line_in_a_file_and_in_an_override(tmp_path):
    deep = "[" * 3000 + "]" * 3000
    with pytest.raises(ConfigError, match=r"exp.yaml is not valid YAML: nested too deeply"):
        _load_file(tmp_path, f"train:\n  milestones: {deep}\n")
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"train.milestones={deep}"])
    assert "nested too deeply" in str(e.value) and len(str(e.value)) < 400
