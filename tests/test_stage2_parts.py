"""Pieces of stage2_classifier.py's main, in-process."""
import pytest

from config.load import ConfigError, config_to_dict, load_config
from engine.distributed import Dist
from models.checkpoint import CheckpointNotFoundError, save_checkpoint
from stage2_classifier import stage1_run


def test_a_pretrained_source_that_cannot_be_read_is_named_once_in_its_error(tmp_path):
    cfg = load_config(None, [f"model.pretrained={tmp_path / 'nope.pt'}"], stage="stage2")
    with pytest.raises(SystemExit) as e:
        stage1_run(cfg, Dist(), resume=False)
    assert e.value.code.startswith(f"error: pretrained source '{tmp_path / 'nope.pt'}' is not a registry name")
    assert e.value.code.count("nope.pt") == 1


def test_resume_reads_what_stage_1_gave_from_the_run_s_last_pt_and_refuses_a_stage_1_run_directory(tmp_path):
    """--resume takes the training set, architecture and class counts from the run's own last.pt (the stage-1
    file named in the config need not exist any more); a run directory of stage 1 is refused as such."""
    run = tmp_path / "run"
    run.mkdir()
    stage2 = load_config(None, [f"log_dir={run}", "stage1.checkpoint=/gone/last.pt", "data.imbalance_factor=50"],
                         stage="stage2")
    record = {"config": config_to_dict(stage2, "stage2"), "model_args": {"name": "resnet32", "num_classes": 10,
              "head": "linear"}, "class_counts": [5] * 10, "model": {}, "step": 3}
    save_checkpoint(run / "last.pt", record)
    assert stage1_run(stage2, Dist(), resume=True) == {k: record[k] for k in ("config", "model_args", "class_counts")}
    # a new run in that directory (no --resume) reads the stage-1 file
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint at /gone/last.pt \\(/gone does not exist\\)"):
        stage1_run(stage2, Dist(), resume=False)
    save_checkpoint(run / "last.pt", {**record, "config": config_to_dict(load_config(None, []), "stage1")})
    with pytest.raises(ConfigError, match=f"^--resume: {run} holds a stage1 run \\(stage1_train.py\\), not a stage2"):
        stage1_run(stage2, Dist(), resume=True)
