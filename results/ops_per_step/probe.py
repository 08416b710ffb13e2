"""Operators dispatched per training step: the real stage-1 path (loader + train_one_epoch) against
the bare model (train_one_epoch on one random batch), ResNet-32 at batch 512, NHWC, on the CPU.
On a GPU each operator is at least one kernel launch queued by the host thread.

    PYTHONPATH=. .venv/bin/python results/ops_per_step/probe.py > results/ops_per_step/ops_per_step.txt
"""
import collections
import itertools

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from data.augment import BatchAugment
from data.build import build_long_tail
from data.loader import BatchLoader
from data.samplers import build_sampler
from engine.loop import train_one_epoch
from models import build_model


class Count(TorchDispatchMode):
    """Counts every operator dispatched inside the `with` block, by name (`ops`, a Counter); also used by
    results/host_time/probe.py."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    data = build_long_tail("cifar10", "datasets", False, 100.0, "exp", 0, 0)
    batch = 512
    model = build_model("resnet32", 10).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loader = BatchLoader(data.train_images, data.train_labels, batch, build_sampler("instance", data.train_labels, 10),
                         BatchAugment(4, True, True, 16), data.mean, data.std, 0, True)
    n = len(loader)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    train_one_epoch(model, loader.epoch(0), n, nn.CrossEntropyLoss(), opt, sched)  # first calls build cached tables
    with Count() as pure:
        train_one_epoch(model, itertools.repeat((x, y), n), n, nn.CrossEntropyLoss(), opt, sched)
    with Count() as real:
        train_one_epoch(model, loader.epoch(1), n, nn.CrossEntropyLoss(), opt, sched)
    with Count() as load:
        for _ in loader.epoch(2):
            pass
    per_step = {name: sum(c.ops.values()) / n for name, c in (("bare", pure), ("real", real), ("loader", load))}
    bare, real_path, loader_only = per_step["bare"], per_step["real"], per_step["loader"]
    print(f"CIFAR-10-LT IF100, batch {batch}: {n} steps per epoch; operators per step: "
          f"bare model {bare:.1f}, real path {real_path:.1f}, the loader alone {loader_only:.1f}")
    reads = "aten._local_scalar_dense"
    print(f"reads of a device value ({reads}) per epoch: bare", pure.ops[reads], "real", real.ops[reads],
          "(on the CPU the loss is checked every step; every 50 on a GPU)")
    print("real - bare, most frequent:", (real.ops - pure.ops).most_common(12))


if __name__ == "__main__":
    main()
