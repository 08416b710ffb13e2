"""Stage-1 training and evaluation speed against the bare model, on whatever device is present.

    python bench/throughput.py                          # auto device, batches 128 and 512
    python bench/throughput.py --device cpu --batch-sizes 128 --steps 10 --compile

For each batch size and each setting of the speed switches (train.amp, model.channels_last, the
loader's augmentation chunk (--augment-chunk: images per augment call; the batch size is the old
batch-by-batch path) and, with --compile, train.compile), in one run:
- train: images/s of the real stage-1 path (CIFAR-10-LT exp IF100 from $LT_DATA_ROOT, instance
  sampler, augmentation on the device (--augment: full = crop + flip + AutoAugment + Cutout 16, the
  paper's; basic = crop + flip; none = gathering and normalising only, which says what the
  augmentation itself costs), normalisation, ResNet-32 forward, cross-entropy, backward, SGD step)
  against the pure model: the same train_one_epoch on one random normalised batch already on the
  device, same batch size and precision. ratio = train / pure.
- eval: images/s of predict_logits on the CIFAR-10 test images (uint8, moved and normalised per
  batch) against forward passes on a random batch already on the device. ratio = eval / pure.
The ratios say how much the data pipeline costs; 1.0 means none. `load ms` is the host's time per
training step inside the loader (gathering, augmenting, normalising the batches): on the CPU the
augmentation itself, on a GPU only the queueing of its kernels. On a GPU, a load time close to the
gap between the real and the pure step times (batch / rate) says that the host thread, not the GPU,
limits training.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from data.augment import BatchAugment, normalize  # noqa: E402
from data.build import build_long_tail  # noqa: E402
from data.cifar import load_cifar  # noqa: E402
from data.loader import AUGMENT_CHUNK, BatchLoader  # noqa: E402
from data.samplers import build_sampler  # noqa: E402
from engine.device import autocast, check_amp, grad_scaler, resolve_device, set_tf32  # noqa: E402
from engine.loop import predict_logits, train_one_epoch  # noqa: E402
from models import build_model  # noqa: E402


PAPER_STEPS, PAPER_BATCH = 13000, 512  # the BALMS stage-1 schedule on CIFAR-LT
AUGMENTS = {  # --augment: the loader's augmentation (None: gather and normalise only)
    "full": lambda: BatchAugment(4, True, True, 16),
    "basic": lambda: BatchAugment(4, True, False, 0),
    "none": lambda: None,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def timed_iter(batches: Iterable, seconds: list[float]) -> Iterator:
    """The items of `batches`, adding the time spent producing each to seconds[0]."""
    it = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        seconds[0] += time.perf_counter() - start
        yield item


def train_rates(data, device, batch, amp, channels_last, chunk, augment, compile_model, steps,
                warmup) -> tuple[float, float, int, float]:
    """(real-path images/s, pure-model images/s, images per augmentation call, host ms per real step
    spent in the loader) of stage-1 training steps."""
    torch.manual_seed(0)
    model = build_model("resnet32", 10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    run_model = torch.compile(model) if compile_model else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    loss_fn, scaler = nn.CrossEntropyLoss(), grad_scaler(device, amp)
    sampler = build_sampler("instance", data.train_labels, 10)
    loader = BatchLoader(data.train_images.to(device), data.train_labels.to(device), batch, sampler,
                         AUGMENTS[augment](), data.mean, data.std, 0, channels_last, augment_chunk=chunk)

    load_seconds = [0.0]

    def real(n: int, epoch: int) -> int:  # n steps, running into the next epochs when one ends; images seen
        batches = itertools.chain.from_iterable(loader.epoch(e) for e in itertools.count(epoch))
        return train_one_epoch(run_model, timed_iter(islice(batches, n), load_seconds), n, loss_fn, optimizer,
                               scheduler, amp=amp, scaler=scaler, desc="real")["sums"][2]

    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def pure(n: int) -> None:
        train_one_epoch(run_model, itertools.repeat((x, y), n), n, loss_fn, optimizer, scheduler, amp=amp,
                        scaler=scaler, desc="pure")

    # A compiled model compiles again for an epoch's shorter last batch: warm up past one.
    real(max(warmup, len(loader) + 1) if compile_model else warmup, 100)
    pure(warmup)
    # Whole epochs of the real path: augmentation runs once per chunk of batches, so a window that
    # ends inside a chunk would carry all of the chunk's augmentation for part of its steps. The
    # pure model takes as many steps. (An epoch's last batch is smaller, hence the images counted.)
    steps = -(-steps // len(loader)) * len(loader)
    seen, load_seconds[0] = [], 0.0
    real_s = timed(lambda: seen.append(real(steps, 0)), device)
    pure_s = timed(lambda: pure(steps), device)
    return seen[0] / real_s, steps * batch / pure_s, loader.steps_per_chunk * batch, 1000 * load_seconds[0] / steps


def eval_rates(test_images, device, batch, amp, channels_last, mean, std, repeats) -> tuple[float, float]:
    """(predict_logits images/s on real uint8 images, pure forward images/s)."""
    model = build_model("resnet32", 10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device).eval()
    x = normalize(test_images[:batch].to(device), mean, std)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def pure() -> None:
        for _ in range(repeats * (len(test_images) // batch)):
            with autocast(device, amp):
                model(x).float()

    def real() -> None:
        for _ in range(repeats):
            predict_logits(model, test_images, batch, mean, std, channels_last, "eval", amp)

    real()  # warm-up
    pure()
    n_real = repeats * len(test_images)
    n_pure = repeats * (len(test_images) // batch) * batch
    return n_real / timed(real, device), n_pure / timed(pure, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 512])
    p.add_argument("--steps", type=int, default=10,
                   help="timed training steps per measurement, rounded up to whole epochs")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    p.add_argument("--eval-images", type=int, default=2048, help="test images per evaluation pass")
    p.add_argument("--amp", nargs="+", choices=["off", "bf16", "fp16"], help="precisions (default: all the device has)")
    p.add_argument("--augment-chunk", nargs="+", type=int, default=[AUGMENT_CHUNK],
                   help=f"images per augmentation call, rounded down to whole batches (default {AUGMENT_CHUNK}; "
                        "the batch size or less: batch by batch)")
    p.add_argument("--augment", nargs="+", choices=list(AUGMENTS), default=["full"],
                   help="the loader's augmentation: full (crop + flip + AutoAugment + Cutout 16), basic (crop + "
                        "flip), none (gather and normalise only)")
    p.add_argument("--compile", action="store_true", help="also measure train.compile=true (slow to start)")
    p.add_argument("--tf32", choices=["on", "off"], default="on", help="train.tf32 (CUDA fp32 matmuls/convolutions)")
    p.add_argument("--root", default=os.environ.get("LT_DATA_ROOT", "datasets"), help="folder with cifar-10-batches-py/")
    args = p.parse_args()
    device = resolve_device(args.device)
    set_tf32(device, args.tf32 == "on")
    data = build_long_tail("cifar10", args.root, False, 100.0, "exp", 0, 0)
    test_images = load_cifar("cifar10", args.root, "test").images[: args.eval_images]
    amps = args.amp or ["off", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    compiles = [False, True] if args.compile else [False]
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, tf32 {args.tf32}; ResNet-32, "
          f"augmentation full = crop + flip + AutoAugment + Cutout 16, basic = crop + flip; {args.steps} timed steps, "
          f"rounded up to whole epochs")
    print(f"{'batch':>5} {'amp':>5} {'NHWC':>5} {'chunk':>6} {'aug':>5} {'compile':>7} {'train/s':>9} {'pure/s':>9} "
          f"{'ratio':>6} {'load ms':>7} {'eval/s':>9} {'fwd/s':>9} {'ratio':>6}")
    best = 0.0
    settings = itertools.product(args.batch_sizes, amps, [True, False], args.augment_chunk, args.augment, compiles)
    for batch, amp, channels_last, chunk, augment, compile_model in settings:
        check_amp(device, amp)
        train, pure, per_call, load_ms = train_rates(data, device, batch, amp, channels_last, chunk, augment,
                                                     compile_model, args.steps, args.warmup)
        ev, fwd = eval_rates(test_images, device, batch, amp, channels_last, data.mean, data.std, 1)
        print(f"{batch:>5} {amp:>5} {str(channels_last):>5} {per_call:>6} {augment:>5} {str(compile_model):>7} "
              f"{train:>9.0f} {pure:>9.0f} {train / pure:>6.2f} {load_ms:>7.2f} "
              f"{ev:>9.0f} {fwd:>9.0f} {ev / fwd:>6.2f}", flush=True)
        if augment == "full":  # the paper's schedule runs with the full augmentation
            best = max(best, train if batch == PAPER_BATCH else 0.0)
    if best:
        print(f"paper stage-1 schedule ({PAPER_STEPS} x {PAPER_BATCH} images) at the best batch-{PAPER_BATCH} train "
              f"rate: {PAPER_STEPS * PAPER_BATCH / best:.0f} s of training steps (evaluation not counted)")


if __name__ == "__main__":
    main()
