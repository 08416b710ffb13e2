"""Both stages and --test on a CUDA device, in real processes (pytest -m gpu; skipped without a GPU)."""
from __future__ import annotations

import json

import pytest
import torch

from models.checkpoint import load_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_stage1_then_balms_then_test_on_cuda(fake_cifar10, tmp_path, run, tiny_stage1, amp):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    common = (f"data.root={fake_cifar10}", "train.device=cuda", f"train.amp={amp}")
    proc = run("stage1_train.py", *common, f"log_dir={s1}", *tiny_stage1, "data.val_per_class=2",
               "data.autoaugment=true", "data.cutout=8", "train.accum_steps=2", "data.prefetch=true",
               "train.cudnn_benchmark=true")
    assert "on cuda:0" in proc.stderr
    run("stage2_classifier.py", *common, f"log_dir={s2}", f"stage1.checkpoint={s1 / 'last.pt'}",
        "stage2.method=balms", "train.iterations=12", "train.batch_size=32", "train.num_threads=1",
        "stage2.cache_views=2", "meta_sampler.meta_batch_size=16")
    run("stage2_classifier.py", *common, f"log_dir={s2}", "--test")
    metrics = json.loads((s2 / "test_metrics.json").read_text())
    assert sum(map(sum, metrics["confusion_matrix"])) == 100
    # Saved from the GPU, read on any machine: load_checkpoint maps every tensor to the CPU.
    assert load_checkpoint(s2 / "last.pt")["model"]["head.weight"].device.type == "cpu"
