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
