"""Host time per training step: the bare ResNet-32 step against the loader's share of a step, each at a size
where the CPU's arithmetic is small, so that what is timed is the host's work per operator (Python,
dispatcher, autograd) that a GPU step also costs the host thread before its kernels are queued.

The loader runs as in a real run (16 batches per augmentation call, crop + flip + AutoAugment + Cutout 16,
normalisation, NHWC) on batches of 32 images from an epoch of 800 (25 steps: chunks of 16 and 9 batches, as
batches of 512 of the 12,406 images of CIFAR-10-LT IF100 in chunks of 8192; 512 images per call are enough
for every AutoAugment op to have images, so a call dispatches the same operators), cut to their top-left
8 x 8 pixels so that the arithmetic is small; its time still includes that arithmetic, an overestimate of
the host's share. The bare step is train_one_epoch on one batch of 2 random 8 x 8 images. One thread,
nothing else running.

    PYTHONPATH=. .venv/bin/python results/host_time/probe.py > results/host_time/host_time.txt
"""
import itertools
import time

import torch
from torch import nn

from data.augment import BatchAugment
from data.build import build_long_tail
from data.loader import BatchLoader
from data.samplers import build_sampler
from engine.loop import train_one_epoch
from models import build_model
from results.ops_per_step.probe import Count

STEPS = 650  # 26 epochs of 25 steps
ROUNDS = 3


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = build_long_tail("cifar10", "datasets", False, 100.0, "exp", 0, 0)
    model = build_model("resnet32", 10).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    images, labels = data.train_images[:800, :, :8, :8].contiguous(), data.train_labels[:800]
    sampler = build_sampler("instance", labels, 10)
    loader = BatchLoader(images, labels, 32, sampler, BatchAugment(4, True, True, 16),
                         data.mean, data.std, 0, True, augment_chunk=512)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1])
    epochs = itertools.count()

    def bare(n: int) -> None:
        train_one_epoch(model, itertools.repeat((x, y), n), n, nn.CrossEntropyLoss(), opt, sched)

    def load(n: int) -> None:
        for _ in itertools.islice(itertools.chain.from_iterable(map(loader.epoch, epochs)), n):
            pass

    bare(50), load(64)  # warm-up: the loader's cached tables, the allocator
    with Count() as bare_ops:
        bare(STEPS)
    with Count() as load_ops:
        load(STEPS)
    bare_n, load_n = sum(bare_ops.ops.values()) / STEPS, sum(load_ops.ops.values()) / STEPS
    print(f"# torch {torch.__version__}, 1 thread; {STEPS} steps per window, {ROUNDS} windows of each in turn")
    print(f"operators per step: bare step {bare_n:.1f}, loader {load_n:.1f} ({100 * load_n / bare_n:.1f} %)")
    for r in range(ROUNDS):
        times = {}
        for name, fn in (("bare", bare), ("load", load)):
            start = time.perf_counter()
            fn(STEPS)
            times[name] = (time.perf_counter() - start) / STEPS
        print(f"window {r}: bare step {1e3 * times['bare']:.2f} ms ({1e6 * times['bare'] / bare_n:.1f} us per "
              f"operator), loader {1e3 * times['load']:.3f} ms per step ({1e6 * times['load'] / load_n:.1f} us per "
              f"operator), loader / bare {times['load'] / times['bare']:.3f}")


if __name__ == "__main__":
    main()
