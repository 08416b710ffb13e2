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

from tests.conftest import REPO, wait_for_checkpoint

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
    # Exp IF 10 over all 60 images of a class; the head class, kept whole, gives its 2 validation images.
    expected = [n - 2 if n == 60 else n for n in (int(60 * 0.1 ** (i / 9)) for i in range(10))]
    assert metrics["train_class_counts"] == expected
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


def test_test_takes_the_dataset_from_the_checkpoint_not_the_config(fake_cifar10, tmp_path, run, tiny_stage1):
    # A CIFAR-10 checkpoint tested from a command whose config names CIFAR-100 (absent here) is
    # scored on CIFAR-10's test split, the one it was trained for.
    log_dir = tmp_path / "run"
    run(*_args(fake_cifar10, log_dir, *tiny_stage1, "train.epochs=1", "train.warmup=0"))
    other = tmp_path / "other"
    run(*_args(fake_cifar10, other, "data.dataset=cifar100", "--test", "--ckpt", str(log_dir / "last.pt")))
    metrics = json.loads((other / "test_metrics.json").read_text())
    assert metrics["class_names"][0] == "airplane" and len(metrics["per_class"]) == 10


def test_a_select_metric_naming_a_group_without_classes_is_refused_before_the_run(fake_cifar10, tmp_path, run,
                                                                                   tiny_stage1):
    # The fake CIFAR-10-LT keeps at most 58 images a class: no many-shot class, so best.pt would never be written.
    proc = run(*_args(fake_cifar10, tmp_path / "run", *tiny_stage1, "data.val_per_class=2", "train.select_metric=many"),
               check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "config error: train.select_metric=many chooses best.pt by a shot group without classes")
    assert not (tmp_path / "run").exists()


def test_options_and_overrides_mix_in_any_order(fake_cifar10, tmp_path, run, tiny_stage1):
    log_dir = tmp_path / "run"
    run("stage1_train.py", f"data.root={fake_cifar10}", *tiny_stage1, "train.epochs=1", "train.warmup=0", "--resume",
        f"log_dir={log_dir}")
    log = (log_dir / "train.log").read_text()
    proc = run("stage1_train.py", f"data.root={fake_cifar10}", "--test", "--ckpt", str(log_dir / "nope.pt"),
               f"log_dir={log_dir}", check=False)
    assert proc.returncode == 2 and f"no checkpoint at {log_dir / 'nope.pt'}" in proc.stderr
    proc = run("stage1_train.py", f"data.root={fake_cifar10}", "--test", "--ckpt", str(log_dir / "last.pt"),
               f"log_dir={log_dir}", "eval.batch_size=64")
    assert "top-1" in proc.stdout and (log_dir / "test_metrics.json").is_file()
    assert (log_dir / "train.log").read_text() == log  # --test, refused or not, leaves the training's log as it was


def test_resuming_a_finished_run_says_so_and_writes_nothing(fake_cifar10, tmp_path, run, tiny_stage1):
    """The last epoch's last.pt is marked finished: --resume (here with a thread count and a checkpoint interval
    it accepts as another machine's) trains nothing and rewrites nothing, config.yaml and TensorBoard included
    (train.log records it)."""
    log_dir = tmp_path / "run"

    def files() -> dict:
        return {p.relative_to(log_dir): (p.stat().st_mtime_ns, p.read_bytes()) for p in log_dir.rglob("*")
                if p.is_file() and p.name != "train.log"}  # which records the resume

    run(*_args(fake_cifar10, log_dir, *tiny_stage1, "data.val_per_class=2"))
    assert torch.load(log_dir / "last.pt", weights_only=True)["finished"] is True
    before = files()
    proc = run(*_args(fake_cifar10, log_dir, *tiny_stage1, "data.val_per_class=2", "train.num_threads=2",
                      "train.save_every_s=30", "--resume"))
    assert files() == before
    assert "the run is finished (epoch 3); nothing left to do" in proc.stderr
    last_line = (log_dir / "train.log").read_text().splitlines()[-1]
    assert last_line.endswith("the run is finished (epoch 3); nothing left to do")


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


def test_end_to_end_loss_with_parameters_and_progressive_sampler_train(fake_cifar10, tmp_path, run, tiny_stage1):
    log_dir = tmp_path / "ldam"
    run(*_args(fake_cifar10, log_dir, *tiny_stage1, "loss.name=ldam", "loss.drw_epoch=1", "data.sampler=progressive"))
    lines = [json.loads(l) for l in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(math.isfinite(l["loss"]) for l in lines)
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["loss"]["drw_epoch"] == 1 and saved["data"]["sampler"] == "progressive"


def test_an_undersampled_epoch_is_logged_with_the_images_it_draws(fake_cifar10, tmp_path, run, tiny_stage1):
    # exp IF 10 over 60 images a class: 240 training images, the smallest class 6, so 10 x 6 drawn an epoch
    log_dir = tmp_path / "under"
    run(*_args(fake_cifar10, log_dir, *tiny_stage1, "data.sampler=undersample", "train.epochs=2", "train.warmup=0"))
    log = (log_dir / "train.log").read_text()
    assert "data.sampler=undersample draws 60 images an epoch" in log and "240 training images, 2 steps/epoch" in log


def test_posthoc_logit_adjustment_changes_test_predictions_toward_the_tail(fake_cifar10, tmp_path, run, tiny_stage1):
    log_dir = tmp_path / "run"
    run(*_args(fake_cifar10, log_dir, *tiny_stage1))
    run(*_args(fake_cifar10, log_dir, *tiny_stage1, "--test"))
    plain = json.loads((log_dir / "test_metrics.json").read_text())
    proc = run(*_args(fake_cifar10, log_dir, *tiny_stage1, "eval.logit_adjust_tau=10.0", "--test"))
    adjusted = json.loads((log_dir / "test_metrics.json").read_text())
    # the report says which logits it scored
    assert (plain["logit_adjust_tau"], adjusted["logit_adjust_tau"]) == (0.0, 10.0)
    assert "logits adjusted post hoc by tau = 10" in proc.stdout
    plain, adjusted = plain["confusion_matrix"], adjusted["confusion_matrix"]
    # Subtracting tau * log prior favours rare classes: the tail (last 5 classes) gets more predictions. At
    # tau = 10 the tail's logits gain 13 to 23 over the head class's (counts 60 ... 6); at tau = 2, on some
    # machines' rounding, no argmax of this sharp 3-epoch model moved into the tail.
    tail_predictions = lambda cm: sum(row[c] for row in cm for c in range(5, 10))
    assert tail_predictions(adjusted) > tail_predictions(plain)


def test_explicit_cpu_device_with_bf16_and_accumulation_trains_and_tests(fake_cifar10, tmp_path, run, tiny_stage1):
    log_dir = tmp_path / "run"
    # two epochs: on a CPU without bf16 instructions PyTorch emulates bf16, 9x slower than fp32
    proc = run(*_args(fake_cifar10, log_dir, *tiny_stage1, "data.val_per_class=2", "train.device=cpu",
                      "train.amp=bf16", "train.accum_steps=2", "train.epochs=2", "train.warmup=0"))
    assert "on cpu (amp bf16)" in proc.stderr
    lines = [json.loads(l) for l in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(l["loss"]) for l in lines)
    run(*_args(fake_cifar10, log_dir, "train.device=cpu", "train.amp=bf16", "--test"))
    assert sum(map(sum, json.loads((log_dir / "test_metrics.json").read_text())["confusion_matrix"])) == 100


def test_a_compiled_model_trains_compiles_once_and_saves_the_plain_model_layout(fake_cifar10, tmp_path, run,
                                                                               tiny_stage1, monkeypatch):
    # The compiled wrapper has its own keys ("module.*", torch.compile's "_orig_mod.*"); checkpoints keep the
    # plain layout.
    log_dir = tmp_path / "compiled"
    # Batch 64 of the 240 training images: three full batches, compiled once, and a last one of 48, which
    # runs the plain module (engine/compiled.py) instead of compiling a second graph. torch logs each
    # recompilation when TORCH_LOGS says so, which it reads at import: a cold process.
    monkeypatch.setenv("TORCH_LOGS", "recompiles")
    proc = run(*_args(fake_cifar10, log_dir, *tiny_stage1, "train.epochs=2", "train.batch_size=64",
                      "train.compile=true", "train.device=cpu"), timeout=600, cold=True)
    assert "Recompiling" not in proc.stderr, proc.stderr[-2000:]
    ckpt = torch.load(log_dir / "last.pt", weights_only=True)
    assert "conv1.weight" in ckpt["model"] and not any(k.startswith("_orig_mod") for k in ckpt["model"])
    lines = [json.loads(l) for l in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(l["loss"]) for l in lines)
    run(*_args(fake_cifar10, log_dir, "--test"))
    assert (log_dir / "test_metrics.json").is_file()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_saves_last_pt_and_resume_reaches_the_uninterrupted_weights(
        fake_cifar10, tmp_path, run, tiny_stage1, signum):
    args = (*tiny_stage1, "train.epochs=6", "train.mixup_alpha=0.2", "data.autoaugment=true", "data.cutout=8")
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run(*_args(fake_cifar10, full, *args))
    _stop_resume_and_compare(run, _args(fake_cifar10, stopped, *args), full, stopped, signum)


def test_prefetch_trains_the_weights_of_a_run_without_it_and_stops_and_resumes(fake_cifar10, tmp_path, run,
                                                                               tiny_stage1):
    """data.prefetch=true augments the next chunk in a background thread: the same batches, so the
    same weights as a run without it, also when a signal stops it mid-run and --resume continues."""
    args = (*tiny_stage1, "train.epochs=6", "train.mixup_alpha=0.2", "data.autoaugment=true", "data.cutout=8")
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run(*_args(fake_cifar10, full, *args))
    _stop_resume_and_compare(run, _args(fake_cifar10, stopped, *args, "data.prefetch=true"), full, stopped,
                             signal.SIGTERM)


def _stop_resume_and_compare(run, argv, full, stopped, signum) -> None:
    """Run argv (into `stopped`), send `signum` after its first checkpoint, check the one-line stop, resume,
    and check that it ends with the weights of the uninterrupted run in `full`."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wait_for_checkpoint(stopped, proc)
    time.sleep(0.05)  # into the next epoch
    proc.send_signal(signum)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signum, stderr
    assert f"stopped by {signal.Signals(signum).name} at step" in stderr and "--resume continues" in stderr
    saved = torch.load(stopped / "last.pt", weights_only=True)
    assert saved["step"] < torch.load(full / "last.pt", weights_only=True)["step"]
    run(*argv, "--resume")
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (full, stopped))
    assert a["epoch"] == b["epoch"] == 6 and a["step"] == b["step"]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
