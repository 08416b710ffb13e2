"""Stage 1 as a user runs it: real processes on a tiny dataset in the official format."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _args(root, log_dir, *extra):
    return ["stage1_train.py", f"data.root={root}", f"log_dir={log_dir}", *extra]


def test_tiny_run_writes_run_directory_and_test_table(fake_cifar10, tmp_path, run, tiny_stage1):
    log_dir = tmp_path / "run"
    run(*_args(fake_cifar10, log_dir, *tiny_stage1, "data.val_per_class=2"))
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "train.log"):
        assert (log_dir / name).is_file(), name
    assert any((log_dir / "tb").iterdir())
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 3 and saved["data"]["val_per_class"] == 2
    lines = [json.loads(l) for l in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    assert {"loss", "lr", "train_acc", "val_top1", "val_many", "val_medium", "val_few"} <= set(lines[0])
    assert all(l["train_seconds"] > 0 for l in lines)

    proc = run(*_args(fake_cifar10, log_dir, *tiny_stage1, "data.val_per_class=2", "--test"))
    assert "top-1" in proc.stdout and "best.pt" in proc.stdout
    metrics = json.loads((log_dir / "test_metrics.json").read_text())
    # 58 images per class remain after the hold-out; exp IF10 over 10 classes.
    assert metrics["train_class_counts"] == [int(58 * 0.1 ** (i / 9)) for i in range(10)]
    assert metrics["many"] is None  # no class has more than 100 training images
    cm = metrics["confusion_matrix"]
    assert len(cm) == 10 and sum(map(sum, cm)) == 100
    assert metrics["top1"] == pytest.approx(sum(cm[c][c] for c in range(10)) / 100)
    assert metrics["per_class"] == pytest.approx([cm[c][c] / sum(cm[c]) for c in range(10)])
    assert "-" in proc.stdout.splitlines()[2]  # the absent many-shot group prints as "-"


def test_existing_run_is_not_overwritten_without_resume(fake_cifar10, tmp_path, run, tiny_stage1):
    log_dir = tmp_path / "run"
    run(*_args(fake_cifar10, log_dir, *tiny_stage1, "train.epochs=1", "train.warmup=0"))
    proc = run(*_args(fake_cifar10, log_dir, *tiny_stage1, "train.epochs=1", "train.warmup=0"), check=False)
    assert proc.returncode != 0 and "--resume" in proc.stderr


def test_unknown_key_fails_before_training_with_suggestion(tmp_path, run):
    proc = run("stage1_train.py", f"log_dir={tmp_path / 'x'}", "train.epoch=3", check=False)
    [line] = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and line.startswith("config error: unknown config key 'train.epoch'")
    assert "did you mean train.epochs" in line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("override, new", [("sampler.lr=0.1", "meta_sampler.lr"), ("sampler.tau=2", "meta_sampler.gumbel_tau"),
                                           ("loss.tau=1", "loss.logit_adjust_tau"),
                                           ("eval.posthoc_tau=1", "eval.logit_adjust_tau"),
                                           ("stage2.tau=0.5", "stage2.tau_norm_tau"),
                                           ("stage2.tau_grid=[0.5]", "stage2.tau_norm_grid")])
def test_a_renamed_key_fails_naming_its_new_name(tmp_path, run, override, new):
    proc = run("stage1_train.py", f"log_dir={tmp_path / 'x'}", override, check=False)
    [line] = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and f"'{override.split('=')[0]}'" in line and f"was renamed: use {new}" in line


@pytest.mark.parametrize("override", ["meta_sampler.lr=0.1", "stage2.method=balms", "stage1.checkpoint=x.pt"])
def test_a_key_only_stage2_reads_is_refused_by_stage1(tmp_path, run, override):
    proc = run("stage1_train.py", f"log_dir={tmp_path / 'x'}", override, check=False)
    [line] = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and line.startswith(f"config error: {override.split('=')[0]}=")
    assert "stage2_classifier.py" in line and not (tmp_path / "x").exists()


def test_test_before_any_checkpoint_is_one_line(fake_cifar10, tmp_path, run):
    proc = run(*_args(fake_cifar10, tmp_path / "empty", "--test"), check=False)
    [line] = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and line.startswith("error: no checkpoint at") and "last.pt" in line


def test_test_takes_the_dataset_from_the_checkpoint_not_the_config(fake_cifar10, tmp_path, run, tiny_stage1):
    # A CIFAR-10 checkpoint tested from a command whose config names CIFAR-100 (absent here) is
    # scored on CIFAR-10's test split, the one it was trained for.
    log_dir = tmp_path / "run"
    run(*_args(fake_cifar10, log_dir, *tiny_stage1, "train.epochs=1", "train.warmup=0"))
    other = tmp_path / "other"
    run(*_args(fake_cifar10, other, "data.dataset=cifar100", "--test", "--ckpt", str(log_dir / "last.pt")))
    metrics = json.loads((other / "test_metrics.json").read_text())
    assert metrics["class_names"][0] == "airplane" and len(metrics["per_class"]) == 10


def test_options_and_overrides_mix_in_any_order(fake_cifar10, tmp_path, run, tiny_stage1):
    log_dir = tmp_path / "run"
    run("stage1_train.py", f"data.root={fake_cifar10}", *tiny_stage1, "train.epochs=1", "train.warmup=0", "--resume",
        f"log_dir={log_dir}")
    proc = run("stage1_train.py", f"data.root={fake_cifar10}", "--test", "--ckpt", str(log_dir / "last.pt"),
               f"log_dir={log_dir}", "eval.batch_size=64")
    assert "top-1" in proc.stdout and (log_dir / "test_metrics.json").is_file()


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path, run):
    proc = run("stage1_train.py", f"data.root={tmp_path / 'nowhere'}", f"log_dir={tmp_path / 'x'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: CIFAR-10 not found: looked in {tmp_path / 'nowhere' / 'cifar-10-batches-py'}")
    assert "data.download=true" in last and "LT_DATA_ROOT" in last


def test_killed_run_resumes_to_the_uninterrupted_result(fake_cifar10, tmp_path, run, kill_run, tiny_stage1):
    args = (*tiny_stage1, "train.epochs=6", "train.mixup_alpha=0.2", "data.autoaugment=true", "data.cutout=8")
    full = tmp_path / "full"
    run(*_args(fake_cifar10, full, *args))

    killed = tmp_path / "killed"
    assert kill_run(_args(fake_cifar10, killed, *args), killed) < 6
    run(*_args(fake_cifar10, killed, *args, "--resume"))
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 6 and a["step"] == b["step"]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    full_log = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [l["loss"] for l in full_log] == [l["loss"] for l in resumed_log]


def test_resume_with_a_different_config_names_the_differing_keys(fake_cifar10, tmp_path, run, tiny_stage1):
    log_dir = tmp_path / "run"
    run(*_args(fake_cifar10, log_dir, *tiny_stage1, "train.epochs=1", "train.warmup=0"))
    proc = run(*_args(fake_cifar10, log_dir, *tiny_stage1, "train.epochs=1", "train.warmup=0", "train.lr=0.2",
                      "--resume"), check=False)
    assert proc.returncode != 0 and "train.lr" in proc.stderr


def test_loss_parameter_the_loss_does_not_take_is_an_error(fake_cifar10, tmp_path, run, tiny_stage1):
    proc = run(*_args(fake_cifar10, tmp_path / "x", *tiny_stage1, "loss.name=ce", "loss.beta=0.99"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: loss.name=ce: unknown param 'beta'")
    assert "label_smoothing" in proc.stderr


def test_end_to_end_loss_with_parameters_and_progressive_sampler_train(fake_cifar10, tmp_path, run, tiny_stage1):
    log_dir = tmp_path / "ldam"
    run(*_args(fake_cifar10, log_dir, *tiny_stage1, "loss.name=ldam", "loss.drw_epoch=1", "data.sampler=progressive"))
    lines = [json.loads(l) for l in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(math.isfinite(l["loss"]) for l in lines)
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["loss"]["drw_epoch"] == 1 and saved["data"]["sampler"] == "progressive"


def test_posthoc_logit_adjustment_changes_test_predictions_toward_the_tail(fake_cifar10, tmp_path, run, tiny_stage1):
    log_dir = tmp_path / "run"
    run(*_args(fake_cifar10, log_dir, *tiny_stage1))
    run(*_args(fake_cifar10, log_dir, *tiny_stage1, "--test"))
    plain = json.loads((log_dir / "test_metrics.json").read_text())["confusion_matrix"]
    run(*_args(fake_cifar10, log_dir, *tiny_stage1, "eval.logit_adjust_tau=2.0", "--test"))
    adjusted = json.loads((log_dir / "test_metrics.json").read_text())["confusion_matrix"]
    # Subtracting tau * log prior favours rare classes: the tail (last 5 classes) gets more predictions.
    tail_predictions = lambda cm: sum(row[c] for row in cm for c in range(5, 10))
    assert tail_predictions(adjusted) > tail_predictions(plain)


def test_sigmoid_bias_init_on_a_cosine_head_is_refused(fake_cifar10, tmp_path, run, tiny_stage1):
    proc = run(*_args(fake_cifar10, tmp_path / "x", *tiny_stage1, "loss.name=class_balanced", "loss.variant=sigmoid",
                      "model.head=cosine"), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "initialises the classifier's bias" in proc.stderr and "model.head=linear" in proc.stderr


def test_unknown_registry_names_fail_in_one_line_with_the_close_valid_ones(fake_cifar10, tmp_path, run):
    for override, expected in [
        ("model.head=cosin", "cosine, linear (did you mean cosine?)"),
        ("loss.name=balanced", "arb, balanced_softmax, ce, class_balanced, focal, ldam, logit_adjust, reweight"),
        ("data.sampler=random", "class_balanced, instance, oversample, progressive, sqrt, undersample"),
        ("model.name=resnet33", "resnet10, resnet101, resnet152, resnet18, resnet32, resnet34, resnet50"),
    ]:
        proc = run(*_args(fake_cifar10, tmp_path / "x", override), check=False)
        [line] = proc.stderr.strip().splitlines()
        key, value = override.split("=")
        assert proc.returncode == 2 and line.startswith(f"config error: {key}={value!r} is not one of"), line
        assert expected in line, line
    assert not (tmp_path / "x").exists()  # nothing was started


def test_explicit_cpu_device_with_bf16_and_accumulation_trains_and_tests(fake_cifar10, tmp_path, run, tiny_stage1):
    log_dir = tmp_path / "run"
    proc = run(*_args(fake_cifar10, log_dir, *tiny_stage1, "data.val_per_class=2", "train.device=cpu",
                      "train.amp=bf16", "train.accum_steps=2"))
    assert "on cpu (amp bf16)" in proc.stderr
    lines = [json.loads(l) for l in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(math.isfinite(l["loss"]) for l in lines)
    run(*_args(fake_cifar10, log_dir, "train.device=cpu", "train.amp=bf16", "--test"))
    assert sum(map(sum, json.loads((log_dir / "test_metrics.json").read_text())["confusion_matrix"])) == 100


@pytest.mark.parametrize("override, message", [
    ("train.amp=fp16", "train.amp=fp16 needs a CUDA device (this run is on cpu); use train.amp=bf16"),
    ("train.device=tpu", "train.device='tpu' is not one of auto, cpu, cuda, cuda:N, mps"),
])
def test_a_device_or_precision_this_machine_lacks_is_one_line(fake_cifar10, tmp_path, run, override, message):
    proc = run(*_args(fake_cifar10, tmp_path / "x", "train.device=cpu", override), check=False)
    [line] = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and line == f"error: {message}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_on_a_machine_without_one_says_to_use_the_cpu(fake_cifar10, tmp_path, run):
    proc = run(*_args(fake_cifar10, tmp_path / "x", "train.device=cuda"), check=False)
    [line] = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "no CUDA device is visible here; use train.device=cpu" in line


def test_a_compiled_model_trains_and_saves_the_plain_model_layout(fake_cifar10, tmp_path, run, tiny_stage1):
    # torch.compile wraps the model (keys "_orig_mod.*"); checkpoints must keep the plain layout.
    log_dir = tmp_path / "compiled"
    run(*_args(fake_cifar10, log_dir, *tiny_stage1, "train.epochs=2", "train.compile=true", "train.device=cpu"),
        timeout=600)
    ckpt = torch.load(log_dir / "last.pt", weights_only=True)
    assert "conv1.weight" in ckpt["model"] and not any(k.startswith("_orig_mod") for k in ckpt["model"])
    lines = [json.loads(l) for l in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(l["loss"]) for l in lines)
    run(*_args(fake_cifar10, log_dir, "--test"))
    assert (log_dir / "test_metrics.json").is_file()


@pytest.mark.parametrize("overrides, message", [
    (("data.val_per_class=60",), "data.val_per_class=60 would hold out every training image of class 'airplane' "
                                 "(60 images): set it below 60"),
    (("data.val_per_class=55", "data.imbalance_factor=10"),
     "data.imbalance_factor=10 with 5 images per class (after data.val_per_class=55) leaves class 'horse' with no "
     "training image: lower data.imbalance_factor or data.val_per_class"),
])
def test_a_split_that_leaves_a_class_without_training_images_is_one_line(fake_cifar10, tmp_path, run, overrides,
                                                                          message):
    proc = run("stage1_train.py", f"data.root={fake_cifar10}", *overrides, f"log_dir={tmp_path / 'x'}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: {message}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_saves_last_pt_and_resume_reaches_the_uninterrupted_weights(
        fake_cifar10, tmp_path, run, tiny_stage1, signum):
    args = (*tiny_stage1, "train.epochs=6", "train.mixup_alpha=0.2", "data.autoaugment=true", "data.cutout=8")
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run(*_args(fake_cifar10, full, *args))
    proc = subprocess.Popen([sys.executable, *_args(fake_cifar10, stopped, *args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (stopped / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(0.05)  # into the next epoch
    proc.send_signal(signum)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signum, stderr
    assert f"stopped by {signal.Signals(signum).name} at step" in stderr and "--resume continues" in stderr
    saved = torch.load(stopped / "last.pt", weights_only=True)
    assert saved["step"] < torch.load(full / "last.pt", weights_only=True)["step"]
    run(*_args(fake_cifar10, stopped, *args, "--resume"))
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (full, stopped))
    assert a["epoch"] == b["epoch"] == 6 and a["step"] == b["step"]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
