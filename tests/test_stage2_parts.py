"""Pieces of stage2_classifier.py's main, in-process."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from config.load import ConfigError, config_to_dict, load_config
from config.stage2 import check_method
from data.samplers import ClassBalancedSampler, InstanceSampler, build_sampler
from engine.distributed import Dist
from models.checkpoint import CheckpointNotFoundError, save_checkpoint
from stage2_classifier import method_loss, stage1_run


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


COUNTS = torch.tensor([6, 3, 1])
LABELS = torch.tensor([0] * 6 + [1] * 3 + [2])


@pytest.mark.parametrize("name, prior, sampler", [
    ("crt", False, ClassBalancedSampler),  # Kang et al. 2020: cross-entropy on class-balanced batches
    ("lws", False, ClassBalancedSampler),  # the same, learning only the head's per-class scales
    ("balanced_softmax", True, InstanceSampler),  # Ren et al. 2020: the log-prior loss on the natural batches
    ("balms", True, None),  # the same loss per image, on the batches the meta-sampler draws
])
def test_each_method_retrains_the_head_with_its_paper_s_loss_and_sampler(name, prior, sampler):
    cfg = load_config(None, [f"stage2.method={name}", "stage1.checkpoint=s1/last.pt"], stage="stage2")
    method = check_method(cfg)
    loss = method_loss(cfg, method, SimpleNamespace(class_counts=COUNTS.tolist(), val_labels=torch.empty(0)),
                       torch.device("cpu"))
    logits, labels = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 2, 1])
    expected = F.cross_entropy(logits + COUNTS.log() if prior else logits, labels, reduction="none")
    per_image = method.kind == "meta"  # the meta step weighs each image's loss by its sampling weight
    torch.testing.assert_close(loss(logits, labels), expected if per_image else expected.mean(), rtol=0, atol=1e-6)
    if sampler is None:
        assert method.kind == "meta"
    else:
        assert type(build_sampler(method.sampler, LABELS, len(COUNTS))) is sampler
