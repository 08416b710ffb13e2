"""Stage 2 as a user runs it: stage 1 -> each stage-2 method -> --test, in real processes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from data.augment import CIFAR10_MEAN, CIFAR10_STD
from data.cifar import load_cifar
from engine.loop import metrics_from_logits, predict_logits
from models import build_model
from models.checkpoint import save_checkpoint
from tests.conftest import write_fake_cifar10, write_image_folder

pytestmark = pytest.mark.slow

# No data.* keys: stage 2 reads the training set (IF 10, 2 validation images per class) from stage 1.
TINY_STAGE2 = ("train.iterations=12", "train.batch_size=32", "train.warmup=0", "train.num_threads=1",
               "stage2.cache_views=2", "eval.batch_size=64")
POSTHOC = ("train.num_threads=1", "eval.batch_size=64")


def _stage2(root, stage1_dir, log_dir, *extra):
    balms = ("meta_sampler.meta_batch_size=16",) if "stage2.method=balms" in extra else ()
    tiny = POSTHOC if "stage2.method=tau_norm" in extra else TINY_STAGE2  # tau_norm reads no schedule
    return ["stage2_classifier.py", f"data.root={root}", f"log_dir={log_dir}",
            f"stage1.checkpoint={stage1_dir / 'last.pt'}", *tiny, *balms, *extra]


@pytest.mark.parametrize("method", ["balanced_softmax", "crt", "balms", "lws", "tau_norm"])
def test_stage1_then_stage2_method_then_test_table(fake_cifar10, stage1_run, tmp_path, run, method):
    log_dir = tmp_path / method
    run(*_stage2(fake_cifar10, stage1_run, log_dir, f"stage2.method={method}"))
    assert (log_dir / "best.pt").is_file() and (log_dir / "config.yaml").is_file()
    proc = run("stage2_classifier.py", f"data.root={fake_cifar10}", f"log_dir={log_dir}", "--test")
    metrics = json.loads((log_dir / "test_metrics.json").read_text())
    assert metrics["train_class_counts"] == torch.load(stage1_run / "last.pt", weights_only=True)["class_counts"]
    assert sum(map(sum, metrics["confusion_matrix"])) == 100 and "top-1" in proc.stdout

    stage1 = torch.load(stage1_run / "last.pt", weights_only=True)["model"]
    stage2 = torch.load(log_dir / "last.pt", weights_only=True)["model"]
    assert set(stage1) == set(stage2)  # one deployable layout: backbone + plain linear head
    for key in stage1:  # the backbone is frozen and, with cached features, BN statistics too
        if not key.startswith("head."):
            assert torch.equal(stage1[key], stage2[key]), key
    lines = [json.loads(l) for l in (log_dir / "metrics.jsonl").read_text().splitlines()]
    if method == "tau_norm":  # the search, a line per tau at its grid index, then the result at step 0
        searched = [line for line in lines if "search_tau" in line]
        assert [line["step"] for line in searched] == list(range(len(searched))) and len(searched) > 1
        assert lines[-1]["step"] == 0 and lines[-1]["tau"] in [line["search_tau"] for line in searched]
        assert not any("tau" in line for line in searched)  # one value of tag "tau" at step 0 in TensorBoard
    else:
        assert lines[-1]["step"] == 12 and "val_top1" in lines[-1]
        if method == "balms":
            probs = lines[-1]["sample_probs"]
            assert len(probs) == 10 and sum(probs) == pytest.approx(1.0, abs=1e-5)
            log = (log_dir / "train.log").read_text()  # meta_sampler.meta_split=val, the default
            assert "balms: class-balanced meta batches of 16 from the val split (20 images)" in log


@pytest.mark.parametrize("method", ["tau_norm", "balanced_softmax"])
def test_resuming_a_finished_run_says_so_and_writes_nothing(fake_cifar10, stage1_run, tmp_path, run, method):
    """--resume of a finished run (tau_norm writes last.pt once, at its end; a trained head's last.pt of its last
    epoch is marked finished) trains and searches nothing, and leaves every file of the run directory as it was
    (the metric log, config.yaml, TensorBoard's events, the checkpoints), but for train.log's line about it."""
    log_dir = tmp_path / method

    def files() -> dict:
        return {p.relative_to(log_dir): (p.stat().st_mtime_ns, p.read_bytes()) for p in log_dir.rglob("*")
                if p.is_file() and p.name != "train.log"}  # which records the resume

    run(*_stage2(fake_cifar10, stage1_run, log_dir, f"stage2.method={method}"))
    before = files()
    proc = run(*_stage2(fake_cifar10, stage1_run, log_dir, f"stage2.method={method}", "--resume"))
    assert files() == before
    assert "the run is finished (epoch" in proc.stderr and "nothing left to do" in proc.stderr


@pytest.mark.parametrize("split, images", [("train", 238), ("resampled", 238)])  # val: the balms test above
def test_balms_meta_batches_come_from_the_chosen_split(fake_cifar10, stage1_run, tmp_path, run, split, images):
    # The shared stage-1 run has 2 validation images per class and trains on 238.
    log_dir = tmp_path / split
    # resample: a second draw of the rule's counts (60, 46, ..., 6) of the 60 images per class, no
    # validation image: the head class has 58 left, so 238 images again, mostly other ones.
    key = "resample" if split == "resampled" else split
    run(*_stage2(fake_cifar10, stage1_run, log_dir, "stage2.method=balms", f"meta_sampler.meta_split={key}"))
    log = (log_dir / "train.log").read_text()
    assert f"balms: class-balanced meta batches of 16 from the {split} split ({images} images)" in log


def test_naive_path_updates_batchnorm_statistics_like_the_reference(fake_cifar10, stage1_run, tmp_path, run):
    log_dir = tmp_path / "live"
    run(*_stage2(fake_cifar10, stage1_run, log_dir, "stage2.method=balms", "stage2.cache_views=0"))
    stage1 = torch.load(stage1_run / "last.pt", weights_only=True)["model"]
    stage2 = torch.load(log_dir / "last.pt", weights_only=True)["model"]
    assert torch.equal(stage1["conv1.weight"], stage2["conv1.weight"])
    assert not torch.equal(stage1["bn1.running_mean"], stage2["bn1.running_mean"])


def test_naive_path_with_eval_batchnorm_keeps_the_stage1_backbone_exactly(fake_cifar10, stage1_run, tmp_path, run):
    log_dir = tmp_path / "live_eval"
    proc = run(*_stage2(fake_cifar10, stage1_run, log_dir, "stage2.method=balms", "stage2.cache_views=0",
                        "stage2.live_bn=eval"))
    assert "features live, BatchNorm in eval mode" in proc.stderr
    stage1 = torch.load(stage1_run / "last.pt", weights_only=True)["model"]
    stage2 = torch.load(log_dir / "last.pt", weights_only=True)["model"]
    backbone = [k for k in stage1 if not k.startswith("head.")]
    assert all(torch.equal(stage1[k], stage2[k]) for k in backbone)


def test_stage2_on_a_different_training_set_is_refused(fake_cifar10, stage1_run, tmp_path, run):
    proc = run(*_stage2(fake_cifar10, stage1_run, tmp_path / "x", "data.imbalance_factor=20"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.imbalance_factor=20.0" in proc.stderr and "has data.imbalance_factor=10.0" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_stage2_on_another_copy_of_the_data_warns_that_its_images_are_not_stage1_s(stage1_run, tmp_path, run):
    other = write_fake_cifar10(tmp_path / "other", train_per_class=60, test_per_class=10, seed=1)  # other pixels
    proc = run(*_stage2(other, stage1_run, tmp_path / "x", "stage2.method=balanced_softmax"))
    assert "WARNING stage2: the training images differ from stage 1's (digest" in proc.stderr
    assert (tmp_path / "x" / "last.pt").is_file()


def test_stage2_reads_the_training_set_from_the_stage1_checkpoint(fake_cifar10, stage1_run, tmp_path, run):
    # The stage-1 run used IF 10 and 2 validation images per class; the defaults are IF 100 and none.
    log_dir = tmp_path / "s2"
    run(*_stage2(fake_cifar10, stage1_run, log_dir, "data.val_per_class=2"))  # the same value may be repeated
    s1 = torch.load(stage1_run / "last.pt", weights_only=True)
    s2 = torch.load(log_dir / "last.pt", weights_only=True)
    assert s2["class_counts"] == s1["class_counts"] and sum(s1["class_counts"]) == 238
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["data"]["imbalance_factor"] == 10.0 and saved["data"]["val_per_class"] == 2
    assert saved["model"]["name"] == "resnet32"
    # The stage-2 run directory records only what stage 2 reads.
    assert "loss" not in saved and "sampler" not in saved["data"] and "head" not in saved["model"]
    assert "mixup_alpha" not in saved["train"] and saved["meta_sampler"]["gumbel_tau"] == 1.0


def test_stage2_and_test_normalise_as_the_checkpoint_records_not_by_this_version_s_table(fake_cifar10, stage1_run,
                                                                                        tmp_path, run):
    """A checkpoint records the (mean, std) its images were normalised with; stage 2 computes the backbone's
    features with stage 1's, and --test scores with the checkpoint's, whatever NORMALIZATION says by then."""
    s1 = torch.load(stage1_run / "last.pt", weights_only=True)
    assert s1["normalization"] == {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    other = {"mean": [0.5, 0.4, 0.3], "std": [0.3, 0.2, 0.25]}  # as if the table had changed since stage 1
    (tmp_path / "s1").mkdir()
    save_checkpoint(tmp_path / "s1" / "last.pt", {**{k: v for k, v in s1.items() if k != "format"},
                                                  "normalization": other})
    log_dir = tmp_path / "s2"
    run(*_stage2(fake_cifar10, tmp_path / "s1", log_dir, "stage2.method=tau_norm"))
    s2 = torch.load(log_dir / "last.pt", weights_only=True)
    assert s2["normalization"] == other
    run("stage2_classifier.py", f"data.root={fake_cifar10}", f"log_dir={log_dir}", "--test")
    tested = json.loads((log_dir / "test_metrics.json").read_text())
    model = build_model(**s2["model_args"])
    model.load_state_dict(s2["model"])
    test = load_cifar("cifar10", fake_cifar10, "test")
    expected = metrics_from_logits(predict_logits(model, test.images, 64, other["mean"], other["std"]), test.labels,
                                   s2["class_counts"])
    assert tested["per_class"] == expected["per_class"] and tested["top1"] == expected["top1"]


def test_refused_resume_leaves_the_run_config_as_it_was(fake_cifar10, stage1_run, tmp_path, run):
    log_dir = tmp_path / "s2"
    run(*_stage2(fake_cifar10, stage1_run, log_dir))
    before = (log_dir / "config.yaml").read_text()
    proc = run(*_stage2(fake_cifar10, stage1_run, log_dir, "train.lr=0.5", "--resume"), check=False)
    assert proc.returncode == 2 and "train.lr" in proc.stderr and "Traceback" not in proc.stderr
    assert (log_dir / "config.yaml").read_text() == before


def test_stage2_in_a_stage1_run_s_directory_is_refused_as_the_other_stage_s_not_told_to_resume(fake_cifar10, stage1_run,
                                                                                                  run):
    """Without --resume the refusal used to advise --resume, which then refused the directory as stage 1's."""
    before = sorted(p.name for p in stage1_run.iterdir())
    proc = run(*_stage2(fake_cifar10, stage1_run, stage1_run), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"config error: {stage1_run} holds a stage1 run (stage1_train.py), not a stage2 one: each stage writes its "
        f"own run directory; give the stage2 run its own name=... (or log_dir=...)")
    assert sorted(p.name for p in stage1_run.iterdir()) == before


@pytest.mark.parametrize("method", ["balms", "lws"])
def test_stage2_checkpoint_holds_the_backbone_once(fake_cifar10, stage1_run, tmp_path, run, method):
    log_dir = tmp_path / method
    run(*_stage2(fake_cifar10, stage1_run, log_dir, f"stage2.method={method}"))
    ckpt = torch.load(log_dir / "last.pt", weights_only=True)
    backbone = [k for k in ckpt["model"] if not k.startswith("head.")]
    assert len(backbone) > 100 and "train_model" not in ckpt
    assert set(ckpt["head"]) == ({"weight", "bias", "scales"} if method == "lws" else {"weight", "bias"})
    tensors = sum(v.numel() for v in ckpt["model"].values()) + sum(v.numel() for v in ckpt["head"].values())
    stage1_model = torch.load(stage1_run / "last.pt", weights_only=True)["model"]
    assert tensors < 1.1 * sum(v.numel() for v in stage1_model.values())


def test_killed_stage2_run_resumes_to_the_uninterrupted_result(fake_cifar10, stage1_run, tmp_path, run, kill_run):
    # The live-feature path makes each step slow enough to be killed after its first epoch.
    args = ("stage2.method=balms", "stage2.cache_views=0", "train.iterations=40")
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(*_stage2(fake_cifar10, stage1_run, full, *args))
    assert kill_run(_stage2(fake_cifar10, stage1_run, killed, *args), killed) < 5
    run(*_stage2(fake_cifar10, stage1_run, killed, *args, "--resume"))
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 40
    for part in ("model", "head", "meta_sampler"):
        for key, tensor in a[part].items():
            assert torch.equal(tensor, b[part][key]), (part, key)


def test_stage2_epoch_whose_last_batch_has_one_sample_trains(fake_cifar10, stage1_run, tmp_path, run):
    # The shared stage-1 run has 238 training images. With batch 79 the instance sampler's epoch
    # splits into 3 batches of 79 and one of 1. main drops batches of one sample (len(b) > 1), so 3
    # batches remain, but it asks train_head_epoch for ceil(238 / 79) = 4 steps: the run must take
    # the 3 steps the batches allow.
    counts = torch.load(stage1_run / "last.pt", weights_only=True)["class_counts"]
    assert sum(counts) % 79 == 1
    log_dir = tmp_path / "s2"
    proc = run("stage2_classifier.py", f"data.root={fake_cifar10}", f"log_dir={log_dir}",
               f"stage1.checkpoint={stage1_run / 'last.pt'}", "stage2.method=balanced_softmax", "train.epochs=1",
               "train.batch_size=79", "train.warmup=0", "train.num_threads=1", "stage2.cache_views=1",
               "eval.batch_size=64", check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.load(log_dir / "last.pt", weights_only=False)["step"] == 3


def test_ldam_cosine_stage1_then_stage2_trains_and_deploys_a_linear_head(fake_cifar10, tmp_path, run, tiny_stage1):
    s1 = tmp_path / "ldam"
    ldam = ("data.val_per_class=2", "train.epochs=5", "loss.name=ldam", "loss.drw_epoch=4", "model.head=cosine")
    run("stage1_train.py", f"data.root={fake_cifar10}", f"log_dir={s1}", *tiny_stage1, *ldam)
    ckpt = torch.load(s1 / "last.pt", weights_only=True)
    assert ckpt["model_args"] == {"name": "resnet32", "num_classes": 10, "head": "cosine"}
    assert "head.bias" not in ckpt["model"]
    losses = [json.loads(l)["loss"] for l in (s1 / "metrics.jsonl").read_text().splitlines()]
    # LDAM at scale 30 learns on cosines (on a linear head here its loss stays in the tens to hundreds).
    assert losses[3] < 0.7 * losses[0]
    run("stage1_train.py", f"data.root={fake_cifar10}", f"log_dir={s1}", *tiny_stage1, *ldam, "--test")
    assert sum(map(sum, json.loads((s1 / "test_metrics.json").read_text())["confusion_matrix"])) == 100

    s2 = tmp_path / "bs"
    run(*_stage2(fake_cifar10, s1, s2, "stage2.method=balanced_softmax"))
    deployed = torch.load(s2 / "last.pt", weights_only=True)
    assert deployed["model_args"]["head"] == "linear" and deployed["model"]["head.bias"].shape == (10,)
    run(*_stage2(fake_cifar10, s1, s2, "stage2.method=balanced_softmax", "--test"))
    assert (s2 / "test_metrics.json").is_file()

    for method in ("tau_norm", "lws"):
        proc = run(*_stage2(fake_cifar10, s1, tmp_path / method, f"stage2.method={method}"), check=False)
        assert proc.returncode != 0 and "cosine head, not linear" in proc.stderr
        assert "Traceback" not in proc.stderr and "stage2.init_head=reinit" in proc.stderr
        # one line, prefixed as every error; the method reads no stage2.init_head, so it is not named as a cause
        assert proc.stderr.strip().splitlines()[-1].startswith(f"error: stage2.method={method} starts from the stage-1")


def test_stage2_balms_on_an_explicit_cpu_device_with_bf16_features(fake_cifar10, stage1_run, tmp_path, run):
    log_dir = tmp_path / "cpu"
    proc = run(*_stage2(fake_cifar10, stage1_run, log_dir, "stage2.method=balms", "train.device=cpu",
                        "train.amp=bf16"))
    assert "on cpu, features cached x2" in proc.stderr
    last = json.loads((log_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 12 and sum(last["sample_probs"]) == pytest.approx(1.0, abs=1e-5)


def test_a_head_that_diverges_ends_in_one_line_and_saves_no_nan_weights(fake_cifar10, stage1_run, tmp_path, run):
    log_dir = tmp_path / "nan"
    # The largest lr and weight decay taken: each step multiplies the weights by about 1 - lr * decay = -99.
    proc = run(*_stage2(fake_cifar10, stage1_run, log_dir, "stage2.method=crt", "train.lr=100", "train.weight_decay=1",
                        "train.iterations=40"), check=False)
    [line] = proc.stderr.strip().splitlines()[-1:]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert line.startswith("error: ") and ("became nan" in line or "NaN or infinite" in line)
    for name in ("last.pt", "best.pt"):
        if (log_dir / name).exists():
            state = torch.load(log_dir / name, weights_only=True)["model"]
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


FOLDER = ("data.image_size=16", "data.workers=0", "train.batch_size=8", "train.num_threads=1", "eval.batch_size=16",
          "model.channels_last=false", "train.warmup=0")


def test_a_fresh_start_never_trains_on_the_feature_cache_a_dead_start_left(tmp_path, run):
    """Image files keep the cached views on disk in the run directory (features_train.npy). A start that
    died before its first last.pt leaves them there; a new start in that directory, with another stage-1
    backbone and another number of views, computes its own, and --resume reuses the run's."""
    root = write_image_folder(tmp_path / "data", {"train": dict.fromkeys(("ant", "bee", "cow"), 12),
                                                  "test": dict.fromkeys(("ant", "bee", "cow"), 2)})
    for name, seed in (("s1a", 0), ("s1b", 1)):
        run("stage1_train.py", "data.dataset=folder", f"data.root={root}", "data.imbalance_factor=4", *FOLDER,
            "train.iterations=2", f"train.seed={seed}", f"log_dir={tmp_path / name}")

    def stage2(s1: str, views: int, log_dir, *extra):
        run("stage2_classifier.py", f"data.root={root}", f"stage1.checkpoint={tmp_path / s1 / 'last.pt'}", *FOLDER,
            "stage2.method=crt", f"stage2.cache_views={views}", "train.iterations=4", f"log_dir={log_dir}", *extra)

    s2, clean = tmp_path / "s2", tmp_path / "clean"
    stage2("s1a", 2, s2)
    for name in ("last.pt", "best.pt"):  # as a start killed before its first checkpoint leaves the directory
        (s2 / name).unlink(missing_ok=True)
    assert np.load(s2 / "features_train.npy").shape == (2, 21, 64)
    stage2("s1b", 1, s2)
    stage2("s1b", 1, clean)
    cache = np.load(s2 / "features_train.npy")
    assert cache.shape == (1, 21, 64) and np.array_equal(cache, np.load(clean / "features_train.npy"))
    heads = [torch.load(d / "last.pt", weights_only=True)["head"] for d in (s2, clean)]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])

    written = (s2 / "features_train.npy").stat().st_mtime_ns
    stage2("s1b", 1, s2, "--resume")
    assert (s2 / "features_train.npy").stat().st_mtime_ns == written


def test_tau_norm_refuses_to_choose_tau_by_a_shot_group_without_classes(fake_cifar10, stage1_run, tmp_path, run):
    # The fake CIFAR-10-LT keeps at most 58 images a class: no many-shot class (> 100), so every tau would tie.
    proc = run(*_stage2(fake_cifar10, stage1_run, tmp_path / "t", "stage2.method=tau_norm",
                        "train.select_metric=many"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "config error: train.select_metric=many chooses tau by a shot group without classes in this training set: "
        "set train.select_metric=top1 or a group with classes")
