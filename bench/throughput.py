"""Stage-1 training and evaluation speed against the bare model, on whatever device is present.

    python bench/throughput.py                          # auto device, batches 128 and 512
    python bench/throughput.py --device cpu --batch-sizes 128 --steps 10 --compile

For each batch size and each setting of the speed switches (train.amp, model.channels_last, the
loader's augmentation chunk (--augment-chunk: images per augment call; the batch size is the old
batch-by-batch path), data.prefetch (--prefetch: the next chunk made in a background thread) and, with
--compile, train.compile), in one run (the process-wide CUDA flags --tf32 and --cudnn-benchmark hold
for the whole run and are named in its first line):
- train: images/s of the real stage-1 path (CIFAR-10-LT exp IF100 from $LT_DATA_ROOT, instance
  sampler, augmentation on the device (--augment: full = crop + flip + AutoAugment + Cutout 16, the
  paper's; basic = crop + flip; none = gathering and normalising only, which says what the
  augmentation itself costs), normalisation, ResNet-32 forward, cross-entropy, backward, SGD step)
  against the pure model: the same train_one_epoch on one random normalised batch already on the
  device, same batch size and precision. ratio = train / pure, over --rounds windows of each path
  taken in turn (so that the machine's drift reaches both alike); range: the lowest and highest
  ratio of one window pair.
- eval: images/s of predict_logits on the CIFAR-10 test images (uint8, moved and normalised per
  batch) against forward passes on a random batch already on the device. ratio = eval / pure.
The ratios say how much the data pipeline costs; 1.0 means none. `load ms` is the host's time per
training step inside the loader (gathering, augmenting, normalising the batches): on the CPU the
augmentation itself, on a GPU only the queueing of its kernels; with prefetch, only the wait for the
thread that makes the chunks. On a GPU, a load time close to the gap between the real and the pure
step times (batch / rate) says that the host thread, not the GPU, limits training. --profile DIR
writes, per setting, where one window of each path spends its time: the host's time in the loader,
the device's kernel time (the loader's share of it) and the operators by time, so that one run on a
GPU tells a busy device from an idle one waiting for the host (the profiler records the operators of
the training thread only: with prefetch, the chunks' work is not in the loader's share).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from config.cli import OneLineParser, user_errors  # noqa: E402
from data.augment import BatchAugment, normalize  # noqa: E402
from data.build import build_long_tail  # noqa: E402
from data.cifar import load_cifar  # noqa: E402
from data.loader import AUGMENT_CHUNK, BatchLoader  # noqa: E402
from data.samplers import build_sampler  # noqa: E402
from engine.device import autocast, check_amp, grad_scaler, resolve_device, set_cuda_flags  # noqa: E402
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
    run_model = torch.compile(model) if compile_model else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
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
        return train_one_epoch(run_model, timed_batches, n, loss_fn, optimizer, scheduler, amp=amp, scaler=scaler,
                               desc="real")["sums"][2]

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
    # A compiled model compiles again for an epoch's shorter last batch: warm up past one.
    b.real(max(warmup, b.epoch_steps + 1) if compile_model else warmup)
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


def launched_us(event) -> float:
    """Microseconds of device work launched inside a profiled host event and its children (a range's own
    span on the device, listed among its kernels under its own name, not counted)."""
    own = sum(k.duration for k in event.kernels if k.name != event.name)
    return own + sum(launched_us(child) for child in event.cpu_children)


def profile_train(b: TrainBench, device, steps, path: Path) -> None:
    """Write where one window of each path spends its time to `path` (torch.profiler): per step the wall
    time, the host's time in the loader, the device's kernel time (a GPU) with the loader's share of it,
    then the operators by self device time (on the CPU: self host time)."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps = window_steps(steps, b.epoch_steps)
    lines = []
    for name, fn in (("real", lambda: b.real(steps, True)), ("pure", lambda: b.pure(steps))):
        with profile(activities=activities) as prof:
            wall, _ = timed(fn, device)
        # Device work: kernels and copies, not the spans of record_function ranges (user annotations), as
        # the profiler's own table totals them.
        kernels = sum(e.self_device_time_total for e in prof.events()
                      if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False))
        loader = [e for e in prof.events() if e.name == "loader" and e.device_type == DeviceType.CPU]
        lines.append(f"{name}: {steps} steps; per step (ms): wall {1000 * wall / steps:.2f} under the profiler, "
                     f"host in the loader {sum(e.cpu_time_total for e in loader) / 1000 / steps:.2f}, "
                     f"device kernels {kernels / 1000 / steps:.2f} (the loader's "
                     f"{sum(map(launched_us, loader)) / 1000 / steps:.2f})")
        lines.append(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                               row_limit=25))
    path.write_text("\n".join(lines) + "\n")


def eval_rates(test_images, device, batch, amp, channels_last, mean, std, repeats) -> tuple[float, float]:
    """(predict_logits images/s on real uint8 images, pure forward images/s)."""
    model = build_model("resnet32", 10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device).eval()
    x = normalize(test_images[:batch].to(device), mean, std)  # fewer images than a batch: all of them
    passes = repeats * max(1, len(test_images) // batch)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def pure() -> None:
        for _ in range(passes):
            with autocast(device, amp):
                model(x).float()

    def real() -> None:
        for _ in range(repeats):
            predict_logits(model, test_images, batch, mean, std, channels_last, "eval", amp)

    real()  # warm-up
    pure()
    n_real = repeats * len(test_images)
    n_pure = passes * len(x)
    return n_real / timed(real, device)[0], n_pure / timed(pure, device)[0]


def at_least(low: int) -> Callable[[str], int]:
    """argparse type: an int >= low."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"  # argparse names the type in its message for a non-number
    return parse


def main() -> None:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--batch-sizes", nargs="+", type=at_least(2), default=[128, 512],
                   help="training batch sizes (at least 2: BatchNorm)")
    p.add_argument("--steps", type=at_least(1), default=10,
                   help="timed training steps per measurement, rounded up to whole epochs")
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps before each measurement")
    p.add_argument("--eval-images", type=at_least(1), default=2048, help="test images per evaluation pass")
    p.add_argument("--amp", nargs="+", choices=["off", "bf16", "fp16"], help="precisions (default: all the device has)")
    p.add_argument("--augment-chunk", nargs="+", type=at_least(1), default=[AUGMENT_CHUNK],
                   help=f"images per augmentation call, rounded down to whole batches (default {AUGMENT_CHUNK}; "
                        "the batch size or less: batch by batch)")
    p.add_argument("--augment", nargs="+", choices=list(AUGMENTS), default=["full"],
                   help="the loader's augmentation: full (crop + flip + AutoAugment + Cutout 16), basic (crop + "
                        "flip), none (gather and normalise only)")
    p.add_argument("--prefetch", nargs="+", choices=["off", "on"], default=["off", "on"],
                   help="data.prefetch: the loader makes the next chunk in a background thread (its own CUDA stream)")
    p.add_argument("--compile", action="store_true", help="also measure train.compile=true (slow to start)")
    p.add_argument("--tf32", choices=["on", "off"], default="on", help="train.tf32 (CUDA fp32 matmuls/convolutions)")
    p.add_argument("--cudnn-benchmark", choices=["on", "off"], default="off",
                   help="train.cudnn_benchmark (CUDA: cuDNN's autotuner picks the convolution algorithms)")
    p.add_argument("--root", default=os.environ.get("LT_DATA_ROOT", "datasets"),
                   help="folder with cifar-10-batches-py/")
    p.add_argument("--rounds", type=at_least(1), default=3,
                   help="timed windows of each training path, alternating real and pure (range: the lowest and "
                        "highest window ratio)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="also profile one window of each path per setting into DIR/<setting>.txt: host time in the "
                        "loader, device kernel time, the operators by time")
    args = p.parse_args()
    with user_errors():  # no CIFAR-10 under --root, a device or precision this machine lacks: one line
        measure(args)


def measure(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    amps = args.amp or ["off", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    for amp in amps:  # before any row: a precision the device lacks is refused at once
        check_amp(device, amp)
    set_cuda_flags(device, args.tf32 == "on", args.cudnn_benchmark == "on")
    data = build_long_tail("cifar10", args.root, False, 100.0, "exp", 0, 0)
    test_images = load_cifar("cifar10", args.root, "test").images[: args.eval_images]
    compiles = [False, True] if args.compile else [False]
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, tf32 {args.tf32}, "
          f"cudnn benchmark {args.cudnn_benchmark}; "
          f"ResNet-32, augmentation full = crop + flip + AutoAugment + Cutout 16, basic = crop + flip; "
          f"{args.steps} timed steps, rounded up to whole epochs, {args.rounds} windows of each path in turn")
    print(f"{'batch':>5} {'amp':>5} {'NHWC':>5} {'chunk':>6} {'aug':>5} {'pf':>3} {'compile':>7} {'train/s':>9} "
          f"{'pure/s':>9} {'ratio':>6} {'range':>9} {'load ms':>7} {'eval/s':>9} {'fwd/s':>9} {'ratio':>6}")
    best = 0.0
    settings = itertools.product(args.batch_sizes, amps, [True, False], args.augment_chunk, args.augment,
                                 args.prefetch, compiles)
    for batch, amp, channels_last, chunk, augment, prefetch, compile_model in settings:
        b = train_bench(data, device, batch, amp, channels_last, chunk, augment, prefetch == "on", compile_model)
        train, pure, low, high, load_ms = train_rates(b, device, batch, compile_model, args.steps, args.warmup,
                                                      args.rounds)
        ev, fwd = eval_rates(test_images, device, batch, amp, channels_last, data.mean, data.std, 1)
        print(f"{batch:>5} {amp:>5} {str(channels_last):>5} {b.images_per_call:>6} {augment:>5} {prefetch:>3} "
              f"{str(compile_model):>7} {train:>9.0f} {pure:>9.0f} {train / pure:>6.2f} {f'{low:.2f}-{high:.2f}':>9} "
              f"{load_ms:>7.2f} {ev:>9.0f} {fwd:>9.0f} {ev / fwd:>6.2f}", flush=True)
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            name = (f"b{batch}_{amp}_{'nhwc' if channels_last else 'nchw'}_c{b.images_per_call}_{augment}"
                    f"{'_prefetch' if prefetch == 'on' else ''}")
            profile_train(b, device, args.steps, args.profile / f"{name}{'_compiled' if compile_model else ''}.txt")
        if augment == "full":  # the paper's schedule runs with the full augmentation
            best = max(best, train if batch == PAPER_BATCH else 0.0)
    if best:
        print(f"paper stage-1 schedule ({PAPER_STEPS} x {PAPER_BATCH} images) at the best batch-{PAPER_BATCH} train "
              f"rate: {PAPER_STEPS * PAPER_BATCH / best:.0f} s of training steps (evaluation not counted)")


if __name__ == "__main__":
    main()
