"""Pieces of stage2_classifier.py's main, in-process."""
import pytest

from config.load import load_config
from engine.distributed import Dist
from stage2_classifier import stage1_run


def test_a_pretrained_source_that_cannot_be_read_is_named_once_in_its_error(tmp_path):
    cfg = load_config(None, [f"model.pretrained={tmp_path / 'nope.pt'}"], stage="stage2")
    with pytest.raises(SystemExit) as e:
        stage1_run(cfg, Dist())
    assert e.value.code.startswith(f"error: pretrained source '{tmp_path / 'nope.pt'}' is not a registry name")
    assert e.value.code.count("nope.pt") == 1
