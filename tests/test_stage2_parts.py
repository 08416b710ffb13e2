"""Pieces of stage2_classifier.py's main, in-process."""
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from config.keys import ConfigError
from config.load import config_to_dict, load_config
from config.stage2 import METHODS, check_method
from data.samplers import ClassBalancedSampler, InstanceSampler, build_sampler
from engine.distributed import Dist
from engine.features import view_chunk
from models.checkpoint import CheckpointNotFoundError, save_checkpoint
import stage2_classifier
from meta_sampler.learner import ClassSampler
from models import build_model
from models.heads import tau_normalized
from stage2_classifier import meta_sampling, method_loss, new_head, stage1_run


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
        assert method.sampler == ""  # no data sampler: the meta-sampler draws the batches
    else:
        assert type(build_sampler(method.sampler, LABELS, len(COUNTS))) is sampler


@pytest.mark.parametrize("init", ["stage1", "reinit"])
def test_a_new_head_starts_from_the_stage_1_classifier_only_with_init_head_stage1(init):
    cfg = load_config(None, ["stage2.method=crt", f"stage2.init_head={init}", "stage1.checkpoint=s1/last.pt"],
                      stage="stage2")
    torch.manual_seed(0)
    stage1 = torch.nn.Linear(64, 10)
    head = new_head(cfg, METHODS["crt"], stage1, Dist())
    assert (torch.equal(head.weight, stage1.weight) and torch.equal(head.bias, stage1.bias)) == (init == "stage1")


def test_balms_takes_its_sampler_s_settings_from_the_meta_sampler_section():
    cfg = load_config(None, ["stage2.method=balms", "stage1.checkpoint=s1/last.pt", "meta_sampler.meta_split=train",
                             "meta_sampler.init_pow=0.5", "meta_sampler.lr=0.0123", "meta_sampler.relax=class",
                             "meta_sampler.meta_batch_size=7", "meta_sampler.gumbel_tau=0.7", "train.batch_size=64",
                             "train.lr=0.2"], stage="stage2")
    labels = torch.repeat_interleave(torch.arange(3), torch.tensor([6, 3, 1]))
    data = SimpleNamespace(train_labels=labels, val_labels=torch.empty(0, dtype=torch.long), class_counts=[6, 3, 1])
    meta = meta_sampling(cfg, build_model("resnet32", 3), data, lambda idx, gen: torch.zeros(len(idx), 64), Dist(),
                         None, 128)
    assert (meta.meta_batch_size, meta.gumbel_tau, meta.relax, meta.optimizer.param_groups[0]["lr"]) == \
        (7, 0.7, "class", 0.0123)
    assert torch.equal(meta.meta_labels, labels)  # meta_split=train
    torch.testing.assert_close(meta.sampler.theta, ClassSampler(labels, 3, 0.5).theta, rtol=0, atol=0)
    assert not torch.equal(meta.sampler.theta, ClassSampler(labels, 3, 0.0).theta)


def test_balms_meta_split_val_without_a_validation_split_draws_its_meta_batches_from_the_training_set(caplog):
    """meta_sampler.meta_split=val, the default, is the validation split when the run has one; a run without one
    meta-learns on its training images (as meta_split=train), never on an empty split."""
    cfg = load_config(None, ["stage2.method=balms", "stage1.checkpoint=s1/last.pt"], stage="stage2")
    assert cfg.meta_sampler.meta_split == "val"
    labels = torch.repeat_interleave(torch.arange(3), torch.tensor([6, 3, 1]))
    data = SimpleNamespace(train_labels=labels, val_labels=torch.empty(0, dtype=torch.long), class_counts=[6, 3, 1],
                           val_images=torch.empty(0, 3, 32, 32, dtype=torch.uint8))
    with caplog.at_level(logging.INFO, logger="stage2"):
        meta = meta_sampling(cfg, build_model("resnet32", 3), data, lambda idx, gen: torch.zeros(len(idx), 64),
                             Dist(), None, 128)
    assert torch.equal(meta.meta_labels, labels)
    assert "balms: class-balanced meta batches of 512 from the train split (10 images)" in caplog.messages



def test_the_cached_views_are_drawn_in_the_chunk_the_run_was_started_with(monkeypatch):
    calls = []
    monkeypatch.setattr(stage2_classifier, "compute_views", lambda *a, **k: calls.append(k) or torch.zeros(1, 4, 64))
    cfg = load_config(None, ["stage1.checkpoint=s1/last.pt", "stage2.cache_views=1", "eval.batch_size=32"],
                      stage="stage2")
    data = SimpleNamespace(mean=(0.5,) * 3, std=(0.2,) * 3)
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    for ckpt, chunk in ((None, 128), ({"view_chunk": 128, "config": {"eval": {"batch_size": 64}}}, 128),
                        ({"config": {"eval": {"batch_size": 64}}}, 64)):  # a last.pt of before 2026-12-07
        stage2_classifier.feature_source(cfg, build_model("resnet32", 3), images, data, 0, Dist(), None,
                                         view_chunk(ckpt))
        assert calls.pop()["chunk"] == chunk

def test_tau_norm_deploys_the_tau_its_search_chose(monkeypatch):
    saved = {}
    monkeypatch.setattr(stage2_classifier, "compute_views", lambda *a, **k: [torch.zeros(4, 64)])
    monkeypatch.setattr(stage2_classifier, "tau_search", lambda *a, **k: (0.3, []))
    monkeypatch.setattr(stage2_classifier, "validate", lambda *a, **k: dict.fromkeys(("top1", "many", "medium",
                                                                                        "few"), 0.5))
    monkeypatch.setattr(stage2_classifier, "end_epoch", lambda *a, **k: saved.update(a[5]))
    monkeypatch.setattr(stage2_classifier, "finish_run", lambda *a, **k: None)
    cfg = load_config(None, ["stage2.method=tau_norm", "stage1.checkpoint=s1/last.pt"], stage="stage2")
    torch.manual_seed(0)
    model = build_model("resnet32", 10)
    stage1 = model.head
    data = SimpleNamespace(val_labels=torch.zeros(4, dtype=torch.long), val_images=None, class_counts=[5] * 10,
                           mean=None, std=None)
    record = stage2_classifier.fit_tau_norm(cfg, None, None, model, data, {}, Dist())
    assert record["tau"] == saved["tau"] == 0.3 != cfg.stage2.tau_norm_tau
    torch.testing.assert_close(model.head.weight, tau_normalized(stage1, 0.3).weight, rtol=0, atol=0)


@pytest.mark.parametrize("method, keeps_head", [("tau_norm", True), ("crt", False)])
def test_a_stage_2_run_s_checkpoint_as_backbone_says_whose_head_a_method_starts_from(caplog, method, keeps_head):
    """Its backbone is stage 1's, frozen; its head is the one that run trained, which tau_norm (and lws, crt with
    init_head=stage1) would start from instead of stage 1's: a warning, the run going on. On --resume (s1 then
    this run's own last.pt, without "model") there is nothing to say."""
    cfg = load_config(None, [f"stage2.method={method}", "stage1.checkpoint=s2/last.pt"], stage="stage2")
    trained = build_model("resnet32", 3)
    saved = load_config(None, ["stage1.checkpoint=s1/last.pt", "stage2.method=balms"], stage="stage2")
    s2 = {"config": config_to_dict(saved, "stage2"), "model_args": {"name": "resnet32", "num_classes": 3},
          "class_counts": [6, 3, 1], "model": trained.state_dict()}
    with caplog.at_level(logging.WARNING, logger="stage2"):
        model, _ = stage2_classifier.build_backbone(cfg, s2, [6, 3, 1], "d", check_method(cfg), torch.device("cpu"),
                                                    Dist())
    head = ("but stage2.method=tau_norm starts from the head that run trained, not stage 1's" if keeps_head
            else "and its head is not used")
    assert caplog.messages == ["s2/last.pt is a stage-2 run's checkpoint (stage2.method=balms): its backbone is the "
                               f"frozen stage-1 one, {head}"]
    assert torch.equal(model.head.weight, trained.head.weight)
    caplog.clear()
    stage2_classifier.build_backbone(cfg, {k: v for k, v in s2.items() if k != "model"}, [6, 3, 1], "d",
                                     check_method(cfg), torch.device("cpu"), Dist())
    assert caplog.messages == []
