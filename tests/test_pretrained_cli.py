"""Pretrained checkpoints as a user runs them: `python -m models`, and both stages with model.pretrained."""
from __future__ import annotations

import json
import socket

import pytest
import torch
import torchvision
from torchvision.models.resnet import BasicBlock

from models.download import CACHE_ENV, cache_path
from models.registry import build_model
from models.release import RELEASED_DIR
from models.zoo import PRETRAINED
from tests.conftest import REPO

pytestmark = pytest.mark.slow

TINY_STAGE2 = ("data.imbalance_factor=10", "data.val_per_class=2", "train.iterations=6", "train.batch_size=32",
               "train.warmup=0", "train.num_threads=1", "stage2.cache_views=1", "eval.batch_size=64")
# Exp IF 10 over all 60 images of each class; the head class, kept whole, gives its 2 validation images.
COUNTS = [58, 46, 35, 27, 21, 16, 12, 10, 7, 6]


def _balms_checkpoint(path, num_classes: int, seed: int = 0) -> dict:
    """Write a BALMS final_model_checkpoint.pth of a random ResNet-32; returns the model's state dict."""
    torch.manual_seed(seed)
    state = build_model("resnet32", num_classes).state_dict()
    feat = {f"module.{k}": v for k, v in state.items() if not k.startswith("head.")}
    classifier = {f"module.fc.{k[5:]}": v for k, v in state.items() if k.startswith("head.")}
    torch.save({"epoch": 200, "best_epoch": 190, "best_acc": 0.4, "centroids": None,
                "state_dict_best": {"feat_model": feat, "classifier": classifier}}, path)
    return state


def _closed_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/final_model_checkpoint.pth"


def _weights(path):
    return torch.load(path, weights_only=True)


def test_list_shows_the_registry_and_what_is_cached(tmp_path, run, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    cached = cache_path(PRETRAINED["resnet18_imagenet"].url, tmp_path)
    cached.write_bytes(b"weights")
    (tmp_path / "0123456789-other.pth.part").write_bytes(b"half")
    lines = run("-m", "models", "list").stdout.splitlines()
    assert lines[0] == f"cache: {tmp_path} (${CACHE_ENV} moves it)"
    assert lines[1].split() == ["name", "arch", "dataset", "classes", "format", "file"]
    assert lines[2].split() == ["resnet18_imagenet", "resnet18", "imagenet1k", "1000", "state_dict", str(cached)]
    assert lines[3].split() == ["resnet34_imagenet", "resnet34", "imagenet1k", "1000", "state_dict", "-"]
    assert lines[-2:] == ["other files in the cache:",
                          "  0123456789-other.pth.part  4 bytes  (partial download; fetching the same URL resumes it)"]


def test_import_converts_a_balms_checkpoint_once(tmp_path, run):
    state = _balms_checkpoint(tmp_path / "final_model_checkpoint.pth", 10)
    out = tmp_path / "balms_resnet32.pt"
    proc = run("-m", "models", "import", str(tmp_path / "final_model_checkpoint.pth"), str(out), "--arch", "resnet32")
    assert proc.stdout.strip() == (f"wrote {out}: resnet32, 10 classes, converted from the balms layout; "
                                   f"use it as model.pretrained={out}")
    imported = _weights(out)
    assert imported["model_args"] == {"name": "resnet32", "num_classes": 10, "head": "linear"}
    assert all(torch.equal(imported["model"][k], v) for k, v in state.items())


def test_offline_download_is_one_clear_error_without_traceback(tmp_path, run, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    url = _closed_url()
    proc = run("-m", "models", "fetch", url, "--timeout", "2", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: download of {url} failed: cannot reach 127.0.0.1:")
    assert line.endswith(f"pass its path (or copy it to {cache_path(url, tmp_path / 'cache')})")


@pytest.mark.parametrize("argv", [(), ("fetch",), ("nope",)])
def test_a_bad_models_command_line_is_one_line_with_exit_2(run, argv):
    proc = run("-m", "models", *argv, check=False)
    [line] = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and line.endswith("; see --help")
    assert line.startswith("python -m models: error: " if argv != ("fetch",) else "python -m models fetch: error: ")


def test_stage1_fine_tunes_from_a_pretrained_checkpoint(fake_cifar10, tmp_path, run, tiny_stage1):
    # lr 0: the weights stay where they started, so they must be the checkpoint's.
    state = _balms_checkpoint(tmp_path / "final_model_checkpoint.pth", 10)
    log_dir = tmp_path / "run"
    run("stage1_train.py", f"data.root={fake_cifar10}", f"log_dir={log_dir}", *tiny_stage1, "train.epochs=1",
        "train.warmup=0", "train.lr=0", "--pretrained",
        str(tmp_path / "final_model_checkpoint.pth"))  # = model.pretrained=...
    saved = _weights(log_dir / "last.pt")
    for key in ("conv1.weight", "layer3.4.conv2.weight", "head.weight", "head.bias"):
        assert torch.equal(saved["model"][key], state[key]), key
    assert saved["config"]["model"]["pretrained"] == str(tmp_path / "final_model_checkpoint.pth")


def test_stage1_resets_the_head_for_another_number_of_classes(fake_cifar10, tmp_path, run, tiny_stage1):
    state = _balms_checkpoint(tmp_path / "cifar100.pth", 100)
    args = ("stage1_train.py", f"data.root={fake_cifar10}", *tiny_stage1, "train.epochs=1", "train.warmup=0",
            "train.lr=0", f"model.pretrained={tmp_path / 'cifar100.pth'}")
    proc = run(*args, f"log_dir={tmp_path / 'refused'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "head.weight: checkpoint (100, 64) vs model (10, 64)" in proc.stderr
    assert "reset_head=True (model.reset_head=true) starts a new one" in proc.stderr

    run(*args, f"log_dir={tmp_path / 'run'}", "model.reset_head=true")
    saved = _weights(tmp_path / "run" / "last.pt")["model"]
    assert saved["head.weight"].shape == (10, 64)
    assert torch.equal(saved["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])


def test_stage1_cosine_head_on_a_linear_checkpoint_needs_reset_head(fake_cifar10, tmp_path, run, tiny_stage1):
    state = _balms_checkpoint(tmp_path / "final_model_checkpoint.pth", 10)
    args = ("stage1_train.py", f"data.root={fake_cifar10}", *tiny_stage1, "train.epochs=1", "train.warmup=0",
            "train.lr=0", f"model.pretrained={tmp_path / 'final_model_checkpoint.pth'}", "model.head=cosine")
    proc = run(*args, f"log_dir={tmp_path / 'refused'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "has a linear head, not the model.head=cosine asked for" in proc.stderr
    assert "model.reset_head=true for a new cosine head" in proc.stderr

    run(*args, f"log_dir={tmp_path / 'run'}", "model.reset_head=true")
    saved = _weights(tmp_path / "run" / "last.pt")
    assert saved["model_args"]["head"] == "cosine" and "head.bias" not in saved["model"]
    assert torch.equal(saved["model"]["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])


def test_stage1_offline_pretrained_url_fails_with_one_message(fake_cifar10, tmp_path, run, tiny_stage1, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    url = _closed_url()
    proc = run("stage1_train.py", f"data.root={fake_cifar10}", f"log_dir={tmp_path / 'run'}", *tiny_stage1,
               f"model.pretrained={url}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"model.pretrained={url}: download of {url} failed: cannot reach 127.0.0.1:" in proc.stderr


def test_stage2_on_a_pretrained_backbone_takes_class_counts_from_the_data(fake_cifar10, tmp_path, run):
    state = _balms_checkpoint(tmp_path / "final_model_checkpoint.pth", 10)
    log_dir = tmp_path / "s2"
    run("stage2_classifier.py", f"data.root={fake_cifar10}", f"log_dir={log_dir}", *TINY_STAGE2,
        "stage2.method=crt", f"model.pretrained={tmp_path / 'final_model_checkpoint.pth'}")
    saved = _weights(log_dir / "last.pt")
    assert saved["class_counts"] == COUNTS and saved["step"] == 6
    assert saved["model_args"] == {"name": "resnet32", "num_classes": 10, "head": "linear"}
    assert torch.equal(saved["model"]["layer3.4.conv2.weight"], state["layer3.4.conv2.weight"])
    proc = run("stage2_classifier.py", f"data.root={fake_cifar10}", f"log_dir={log_dir}", *TINY_STAGE2, "--test")
    assert "top-1" in proc.stdout


def test_stage2_accepts_an_imported_checkpoint_as_stage1_checkpoint(fake_cifar10, tmp_path, run):
    state = _balms_checkpoint(tmp_path / "final_model_checkpoint.pth", 10)
    imported = tmp_path / "imported.pt"
    run("-m", "models", "import", str(tmp_path / "final_model_checkpoint.pth"), str(imported), "--arch", "resnet32")
    log_dir = tmp_path / "s2"
    run("stage2_classifier.py", f"data.root={fake_cifar10}", f"log_dir={log_dir}", *TINY_STAGE2[:2],
        "train.num_threads=1", "eval.batch_size=64", "stage2.method=tau_norm", f"stage1.checkpoint={imported}")
    saved = _weights(log_dir / "last.pt")
    assert saved["class_counts"] == COUNTS
    assert torch.equal(saved["model"]["conv1.weight"], state["conv1.weight"])


def test_stage2_on_torchvision_weights_trains_a_new_head(fake_cifar10, tmp_path, run):
    torch.manual_seed(0)
    reference = torchvision.models.resnet.ResNet(BasicBlock, [1, 1, 1, 1])  # ResNet-10, 1000-class fc
    torch.save(reference.state_dict(), tmp_path / "resnet10.pth")
    log_dir = tmp_path / "s2"
    run("stage2_classifier.py", f"data.root={fake_cifar10}", f"log_dir={log_dir}", *TINY_STAGE2,
        "stage2.method=crt", "model.name=resnet10", f"model.pretrained={tmp_path / 'resnet10.pth'}")
    saved = _weights(log_dir / "last.pt")["model"]
    assert saved["head.weight"].shape == (10, 512)
    assert torch.equal(saved["layer4.0.downsample.0.weight"], reference.state_dict()["layer4.0.downsample.0.weight"])


@pytest.mark.parametrize("extra, message", [
    (("stage2.method=tau_norm", "model.reset_head=true"),
     "model.reset_head=true drops the head that stage2.method=tau_norm starts from"),  # tau_norm reads no init_head
    (("stage2.method=crt", "stage2.init_head=stage1", "model.reset_head=true"),
     "model.reset_head=true drops the head that stage2.method=crt (stage2.init_head=stage1) starts from"),
    (("stage1.checkpoint=a.pt",), "set stage1.checkpoint or model.pretrained, not both"),
])
def test_stage2_refuses_contradictory_backbone_settings(fake_cifar10, tmp_path, run, extra, message):
    proc = run("stage2_classifier.py", f"data.root={fake_cifar10}", f"log_dir={tmp_path / 'x'}",
               "model.pretrained=resnet18_imagenet", *extra, check=False)
    assert proc.returncode == 2 and message in proc.stderr


def test_a_released_stage1_run_gives_stage2_its_training_set_like_the_run_itself(fake_cifar10, stage1_run, tmp_path,
                                                                                  run):
    out = tmp_path / "released" / "r32.pt"
    proc = run("-m", "models", "release", str(stage1_run / "last.pt"), str(out))
    assert proc.stdout.startswith(f"wrote {out}: {out.stat().st_size} bytes, SHA-256 ")
    log_dir = tmp_path / "s2"  # no data.* key: IF 10 and 2 validation images per class come from the release
    run("stage2_classifier.py", f"data.root={fake_cifar10}", f"log_dir={log_dir}", "train.num_threads=1",
        "stage2.method=tau_norm", "--pretrained", str(out))  # tau_norm: no training, the same reading
    saved = _weights(log_dir / "last.pt")
    assert saved["class_counts"] == COUNTS and saved["stage1_checkpoint"] == str(out)
    assert saved["config"]["data"]["val_per_class"] == 2
    stage1 = _weights(stage1_run / "last.pt")["model"]
    assert torch.equal(saved["model"]["conv1.weight"], stage1["conv1.weight"].half().float())


RELEASE = "resnet32_cifar10_lt_if100_ce"
FULL_RUNS = REPO / "results/full_cifar10_lt_if100"


def _assert_reproduces(log_dir, committed_run: str, proc) -> None:
    """The run's test metrics match the committed run's: its training set, and top-1 within 0.2 points (float16
    weights: a few images of 10,000)."""
    committed = json.loads((FULL_RUNS / committed_run / "test_metrics.json").read_text())
    result = json.loads((log_dir / "test_metrics.json").read_text())
    assert result["train_class_counts"] == committed["train_class_counts"]  # the training set read from the release
    assert abs(result["top1"] - committed["top1"]) <= 0.002, proc.stdout


def test_the_shipped_release_reproduces_the_committed_stage2_result_offline(real_cifar10, tmp_path, run, monkeypatch):
    # tau_norm trains nothing: the released float16 weights alone must give the committed test accuracy.
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # nothing is downloaded
    log_dir = tmp_path / "tau_norm_on_release"
    args = ("stage2_classifier.py", "--cfg", "config/cifar10_lt/decoupled_if100/tau_norm.yaml", "stage1.checkpoint=",
            "--pretrained", RELEASE, f"data.root={real_cifar10}", f"log_dir={log_dir}")
    run(*args)
    proc = run(*args, "--test")
    _assert_reproduces(log_dir, "cifar10_lt_if100_decoupled_tau_norm", proc)
    assert not (tmp_path / "cache").exists()


def test_the_shipped_end_to_end_release_gives_its_runs_committed_test_accuracy(real_cifar10, tmp_path, run):
    # the float16 release tested as a stage-1 checkpoint
    release = RELEASED_DIR / PRETRAINED["resnet32_cifar10_lt_if100_balanced_softmax"].url
    log_dir = tmp_path / "test_of_release"
    proc = run("stage1_train.py", "--cfg", "config/cifar10_lt/methods_if100_exp/balanced_softmax.yaml", "--test",
               "--ckpt", str(release), f"data.root={real_cifar10}", f"log_dir={log_dir}")
    _assert_reproduces(log_dir, "cifar10_lt_if100_exp_balanced_softmax", proc)
