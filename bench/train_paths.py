"""The two stage-1 training paths that bench/throughput.py times against each other: the real one (loader,
augmentation on the device, normalisation, ResNet-32 step) and the pure model on one batch already on the
device; and the timing of their windows."""
from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.profiler import record_function

from data.augment import BatchAugment
from data.loader import BatchLoader
from data.samplers import build_sampler
from engine.compiled import CompiledForBatchSizes
from engine.device import grad_scaler
from engine.loop import train_one_epoch
from engine.schedule import sgd_with_schedule
from models import build_model


AUGMENTS = {  # --augment: the loader's augmentation (None: gather and normalise only)
    "full": lambda: BatchAugment(4, True, True, 16),
    "basic": lambda: BatchAugment(4, True, False, 0),
    "none": lambda: None,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    """(seconds fn() took, the device's queued work included; its return value)."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def timed_iter(batches: Iterable, seconds: list[float], annotate: bool) -> Iterator:
    """The items of `batches`, adding the time spent producing each to seconds[0]; with `annotate`, each
    also inside a "loader" range of the profiler (a range costs a dispatcher call: only when profiling)."""
    it = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            with record_function("loader") if annotate else contextlib.nullcontext():
                item = next(it)
        except StopIteration:
            return
        seconds[0] += time.perf_counter() - start
        yield item


@dataclass
class TrainBench:
    """The two training paths of one switch setting: real(n, annotate) takes n steps of the real stage-1
    path from the epoch after the last one it touched (so that whole-epoch windows follow each other as a
    run's epochs do, and a prefetching loader stays ahead; annotate: the loader's profiler ranges) and
    returns the images seen; pure(n) takes n steps on one batch already on the device. load_seconds[0] adds
    up the host's time inside the loader."""
    real: Callable[[int, bool], int]
    pure: Callable[[int], None]
    epoch_steps: int
    images_per_call: int
    load_seconds: list[float]


def train_bench(data, device, batch, amp, channels_last, chunk, augment, prefetch, compile_model) -> TrainBench:
    torch.manual_seed(0)
    model = build_model("resnet32", 10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    run_model = CompiledForBatchSizes(model, {batch}) if compile_model else model  # as stage1_train.py
    # A constant lr, no weight decay; the SGD kernel stage1_train.py uses (fused at fp16, momentum zeroed).
    optimizer, scheduler, _ = sgd_with_schedule(
        model.parameters(), epoch_len=1, lr=0.01, momentum=0.9, weight_decay=0.0, nesterov=False, epochs=1,
        iterations=1, warmup=0, kind="step", milestones=(), gamma=1.0, fused=amp == "fp16")
    loss_fn, scaler = nn.CrossEntropyLoss(), grad_scaler(device, amp)
    sampler = build_sampler("instance", data.train_labels, 10)
    loader = BatchLoader(data.train_images.to(device), data.train_labels.to(device), batch, sampler,
                         AUGMENTS[augment](), data.mean, data.std, 0, channels_last, augment_chunk=chunk,
                         prefetch=prefetch)
    load_seconds, next_epoch = [0.0], [0]

    def real(n: int, annotate: bool = False) -> int:
        first, next_epoch[0] = next_epoch[0], next_epoch[0] + -(-n // len(loader))
        batches = itertools.chain.from_iterable(loader.epoch(e) for e in itertools.count(first))
        timed_batches = timed_iter(islice(batches, n), load_seconds, annotate)
        seen = train_one_epoch(run_model, timed_batches, n, loss_fn, optimizer, scheduler, amp=amp, scaler=scaler,
                               desc="real")["sums"][2]
        # With prefetch the next epoch's first chunk is in the making: a run would wait for what is left of it,
        # so the window does, rather than let it finish for free while the pure model is timed.
        loader.wait_ahead()
        return seen

    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def pure(n: int) -> None:
        train_one_epoch(run_model, itertools.repeat((x, y), n), n, loss_fn, optimizer, scheduler, amp=amp,
                        scaler=scaler, desc="pure")

    return TrainBench(real, pure, len(loader), loader.steps_per_chunk * batch, load_seconds)


def window_steps(steps: int, epoch_steps: int) -> int:
    """Steps of a timed window: whole epochs of the real path. Augmentation runs once per chunk of batches,
    so a window that ends inside a chunk would carry all of the chunk's augmentation for part of its steps;
    the pure model takes as many steps. (An epoch's last batch is smaller, hence the real path counts images.)"""
    return -(-steps // epoch_steps) * epoch_steps


def train_rates(b: TrainBench, device, batch, compile_model, steps, warmup,
                rounds) -> tuple[float, float, float, float, float]:
    """(real-path images/s, pure-model images/s, lowest and highest window ratio, host ms per real step spent
    in the loader) over `rounds` windows of each path, alternating, so that a drift of the machine's speed
    reaches both paths alike."""
    # A compiled model compiles in its first step, for the full batch only (engine/compiled.py).
    b.real(max(warmup, 1) if compile_model else warmup)
    b.pure(warmup)
    steps = window_steps(steps, b.epoch_steps)
    seen, real_s, pure_s, ratios = 0, 0.0, 0.0, []
    b.load_seconds[0] = 0.0
    for _ in range(rounds):
        r, n = timed(lambda: b.real(steps), device)
        p, _ = timed(lambda: b.pure(steps), device)
        seen, real_s, pure_s = seen + n, real_s + r, pure_s + p
        ratios.append((n / r) / (steps * batch / p))
    return seen / real_s, rounds * steps * batch / pure_s, min(ratios), max(ratios), \
        1000 * b.load_seconds[0] / (rounds * steps)
