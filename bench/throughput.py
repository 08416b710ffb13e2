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
writes, per setting, where one window of each path spends its time (every thread): the host's time in
the loader and in the prefetch thread, its waits for the device, the device's kernel time (the
loader's and the prefetch thread's shares of it), the launches per step and the allocations (cudaMalloc,
cudaFree, pinned memory) in the window, and the operators by device and by host time, so that one run
on a GPU tells a busy device from an idle one waiting for the host.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.profiling import profile_train  # noqa: E402
from bench.train_paths import AUGMENTS, timed, train_bench, train_rates  # noqa: E402
from config.program import OneLineParser, at_least, run_program, user_errors  # noqa: E402
from data.augment import normalize  # noqa: E402
from data.build import build_long_tail  # noqa: E402
from data.cifar import load_cifar  # noqa: E402
from data.loader import AUGMENT_CHUNK  # noqa: E402
from engine.device import autocast, check_amp, cpu_has_bf16, resolve_device, set_cuda_flags  # noqa: E402
from engine.loop import predict_logits  # noqa: E402
from models import build_model  # noqa: E402


PAPER_STEPS, PAPER_BATCH = 13000, 512  # the BALMS stage-1 schedule on CIFAR-LT


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


def main() -> None:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--batch-sizes", nargs="+", type=at_least(2), default=[128, 512],
                   help="training batch sizes (at least 2: BatchNorm)")
    p.add_argument("--steps", type=at_least(1), default=10,
                   help="timed training steps per measurement, rounded up to whole epochs")
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps before each measurement")
    p.add_argument("--eval-images", type=at_least(1), default=2048, help="test images per evaluation pass")
    p.add_argument("--amp", nargs="+", choices=["off", "bf16", "fp16"],
                   help="precisions (default: all the device computes in hardware; a CPU's bf16 needs AVX512-BF16 "
                        "or AMX)")
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

    def command() -> None:  # no CIFAR-10 under --root, a device or precision this machine lacks: one line, exit 2
        with user_errors():
            measure(args)
    run_program(command)


def measure(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    native_bf16 = device.type != "cpu" or cpu_has_bf16()  # emulated bf16 is several times slower than fp32
    amps = args.amp or ["off"] + (["bf16"] if native_bf16 else []) + (["fp16"] if device.type == "cuda" else [])
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
