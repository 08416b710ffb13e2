"""The GPU-resident CIFAR pipeline on a CUDA device (pytest -m gpu; skipped without a GPU)."""
from __future__ import annotations

import warnings
from itertools import islice

import pytest
import torch
from torch import nn

from data.augment import CIFAR10_MEAN, CIFAR10_STD, BatchAugment
from data.loader import BatchLoader
from data.samplers import build_sampler
from data.transfer import to_device
from engine.loop import train_one_epoch
from models import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _images(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 200, 32).view(1, 1, 1, 32)
    return (ramp + torch.randint(0, 56, (n, 3, 32, 32), generator=g)).clamp(0, 255).to(torch.uint8)


def _waits(fn):
    """(fn(), the messages of the waits for the GPU it made), from torch's sync debug mode."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # (The first warning says the debug mode is a prototype; the waits are "called a synchronizing ...".)
    return out, [str(w.message) for w in caught if "synchronizing CUDA operation" in str(w.message)]


def test_the_augmented_batch_on_cuda_is_the_cpu_batch():
    images = _images(256)
    aug = BatchAugment(crop_padding=4, flip=True, autoaugment=True, cutout=16)
    on_cpu = aug(images, torch.Generator().manual_seed(1))
    on_gpu = aug(images.cuda(), torch.Generator().manual_seed(1))
    assert on_gpu.device.type == "cuda"
    # Same draws, same ops; GPU float rounding may move a blended or rotated pixel by a level.
    assert ((on_gpu.cpu().int() - on_cpu.int()).abs() == 0).float().mean() > 0.99


def _loader(prefetch: bool, n: int = 1024, chunk: int = 512) -> BatchLoader:
    device = torch.device("cuda")
    images, labels = _images(n), torch.arange(n) % 10
    return BatchLoader(images.to(device), labels.to(device), 128, build_sampler("instance", labels, 10),
                       BatchAugment(4, True, True, 16), CIFAR10_MEAN, CIFAR10_STD, 0, channels_last=True,
                       augment_chunk=chunk, prefetch=prefetch)


def test_prefetched_batches_on_cuda_are_the_batches_made_in_the_training_thread():
    """The side stream's chunks, taken by the training stream after their event: the same bytes, epoch
    after epoch (the thread runs on into the next epoch's first chunk)."""
    made_ahead, in_line = _loader(True), _loader(False)
    for epoch in (0, 1, 2):
        for (xa, ya), (xb, yb) in zip(made_ahead.epoch(epoch), in_line.epoch(epoch), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("prefetch", [False, True])
def test_training_steps_on_cuda_do_not_wait_for_the_gpu(prefetch):
    """Crop, flip, AutoAugment, Cutout, normalisation, forward, backward and SGD step: the host
    queues the whole epoch without reading anything back, and waits once, at its end, for the sums
    (with prefetch, the thread that makes the chunks does not wait either)."""
    device = torch.device("cuda")
    loader = _loader(prefetch, chunk=8192)
    model = build_model("resnet32", 10).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    train_one_epoch(model, islice(loader.epoch(0), 2), 2, nn.CrossEntropyLoss(), opt, sched, amp="bf16")  # warm-up
    out, syncs = _waits(lambda: train_one_epoch(model, loader.epoch(1), len(loader), nn.CrossEntropyLoss(), opt,
                                                 sched, amp="bf16"))
    assert len(loader) == 8 and out["loss"] > 0
    assert len(syncs) == 1, syncs


def test_an_fp16_epoch_on_cuda_with_stage_1s_fused_sgd_waits_for_the_gpu_once():
    """fp16 as stage 1 runs it: a GradScaler and the fused SGD, which takes each step's overflow flag on the
    GPU (a plain SGD makes the scaler read it back, a wait a step)."""
    from engine.device import grad_scaler
    from engine.schedule import sgd_with_schedule

    device = torch.device("cuda")
    loader = _loader(False, chunk=8192)
    model = build_model("resnet32", 10).to(device).to(memory_format=torch.channels_last)
    opt, sched, _ = sgd_with_schedule(model.parameters(), len(loader), 0.05, 0.9, 5e-4, False, 3, 0, 0, "cosine",
                                      (), 0.1, fused=True)
    scaler = grad_scaler(device, "fp16")
    train_one_epoch(model, islice(loader.epoch(0), 2), 2, nn.CrossEntropyLoss(), opt, sched, amp="fp16",
                    scaler=scaler)  # warm-up: the scaler's state, cuDNN's kernels
    out, syncs = _waits(lambda: train_one_epoch(model, loader.epoch(1), len(loader), nn.CrossEntropyLoss(), opt,
                                                 sched, amp="fp16", scaler=scaler))
    assert len(loader) == 8 and out["loss"] > 0 and scaler.get_scale() > 0
    assert len(syncs) == 1, syncs


def test_evaluation_on_cuda_of_images_in_host_memory_waits_for_the_gpu_once():
    """Each batch goes over in a copy from pinned memory (the host queues the next one at once); the
    logits come back once, at the end."""
    from engine.loop import predict_logits

    model = build_model("resnet32", 10).cuda().to(memory_format=torch.channels_last)
    images = _images(1024)
    predict_logits(model, images[:256], 128, CIFAR10_MEAN, CIFAR10_STD, channels_last=True)  # warm-up
    logits, syncs = _waits(lambda: predict_logits(model, images, 128, CIFAR10_MEAN, CIFAR10_STD, channels_last=True))
    assert logits.shape == (1024, 10) and logits.device.type == "cpu"
    assert len(syncs) == 1, syncs


def test_a_stage2_head_epoch_on_cuda_waits_for_the_gpu_once():
    """Cached features on the CPU, a linear head on the GPU: each step's views and labels go over in
    pinned copies and its sums stay there; the epoch reads them back once, at its end."""
    from engine.head_loop import train_head_epoch

    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(600, 64, generator=g), torch.arange(600) % 10
    head = nn.Linear(64, 10).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batches = list(torch.randperm(600, generator=g).split(60))
    features = lambda idx, gen: to_device(feats[idx], device)  # noqa: E731  (as FeatureCache.views)
    train_head_epoch(head, opt, sched, nn.CrossEntropyLoss(), labels, features, 2, 60, g, index_batches=batches[:2])
    out, syncs = _waits(lambda: train_head_epoch(head, opt, sched, nn.CrossEntropyLoss(), labels, features, 10, 60,
                                                  g, index_batches=batches))
    assert out["steps"] == 10 and out["loss"] > 0
    assert len(syncs) == 1, syncs


@pytest.mark.parametrize("relax", ["image", "class"])
def test_a_balms_head_epoch_on_cuda_waits_for_the_gpu_once(relax):
    """The sampler on the GPU: its draws (class: uniforms from the CPU generator, copied; image: B x N uniforms
    made on the GPU from a seed of the CPU generator), the look-ahead step, the meta-gradient and both updates
    stay there; the epoch reads its sums and the sampler's class shares back once, at its end."""
    from engine.head_loop import MetaSampling, train_head_epoch
    from meta_sampler.learner import ClassSampler
    from models.losses import build_loss

    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 10
    feats = torch.randn(600, 64, generator=g).to(device)
    head = nn.Linear(64, 10).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sampler = ClassSampler(labels, 10).to(device)
    # Cached views on the device, as CachedFeatures: the indices (the meta batch's are drawn on the CPU) go over
    # first, a pinned copy; indexing a CUDA tensor with a CPU index would copy it and wait.
    features = lambda idx, gen: feats[to_device(idx, device)]  # noqa: E731
    meta = MetaSampling(sampler, torch.optim.Adam(sampler.parameters(), lr=0.05), labels, features, 32, 1.0, relax)
    loss_fn = build_loss("balanced_softmax", [60] * 10, reduction="none").to(device)
    train_head_epoch(head, opt, sched, loss_fn, labels, features, 2, 60, g, meta=meta)  # warm-up
    out, syncs = _waits(lambda: train_head_epoch(head, opt, sched, loss_fn, labels, features, 10, 60, g, meta=meta))
    assert out["steps"] == 10 and len(out["sample_probs"]) == 10
    assert len(syncs) == 1, syncs


def test_the_image_relaxation_on_cuda_draws_and_differentiates_as_the_balms_code_on_its_own_noise():
    """The B x N uniforms are made on the GPU from a seed the run's CPU generator gives: the same generator state
    gives the same draws, and the drawn images and theta's gradient are those of the BALMS code's (B, N)
    Gumbel-softmax on that noise."""
    from meta_sampler.learner import ClassSampler, image_noise
    from tests.meta_sampler.test_learner import balms_reference_draw

    counts = [40, 25, 10, 4]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(79, generator=torch.Generator().manual_seed(0))]
    sampler = ClassSampler(labels, 4, init_pow=0.5).double().cuda()
    a = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64, device="cuda")
    idx, weights = sampler.sample_images(6, torch.Generator().manual_seed(3), 0.5, chunk=200)  # rows in 3 chunks
    (a * weights).sum().backward()
    ours, sampler.theta.grad = sampler.theta.grad.clone(), None
    again, _ = sampler.sample_images(6, torch.Generator().manual_seed(3), 0.5, chunk=200)
    gen = torch.Generator().manual_seed(3)
    uniform = torch.cat([image_noise((2, 79), gen, torch.float64, torch.device("cuda")) for _ in range(3)])
    ref_idx, ref_weights = balms_reference_draw(sampler, uniform, 0.5)
    (a * ref_weights).sum().backward()
    assert torch.equal(idx, again) and torch.equal(idx, ref_idx)
    torch.testing.assert_close(ours, sampler.theta.grad, rtol=1e-8, atol=1e-10)
