"""Batches of images decoded from files in DataLoader worker processes, for data too big to hold
in memory (ImageNet-LT, Places-LT, iNaturalist, image folders).

`StreamLoader` has `BatchLoader`'s interface: `epoch(e)` yields (images, labels) on the device,
`len()` is the number of steps. The sampler draws the epoch's order in the main process with the
(seed, epoch) generator, exactly as for the in-memory loader, and then, from the same generator,
one augmentation seed per sample, so a sample's crop and jitter depend on (seed, epoch, position)
alone, not on which worker decodes it, how many workers there are, or how many ranks share it. The workers stay
alive across epochs; a batch sampler whose epoch is set before each pass feeds them.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from data.loader import check_batch_size, epoch_generator, epoch_steps, rank_share

_SEED_BOUND = 2**62  # per-sample seeds are drawn in [0, 2^62)
WORKER_GRACE_S = 60.0  # a worker's life after a SIGTERM it outlives (see keep_working_on_sigterm)


def keep_working_on_sigterm(worker_id: int) -> None:
    """worker_init_fn of every DataLoader of image files. A SIGTERM to all of a job's processes (a scheduler
    stopping the job, `kill -TERM -PGID`) killed the workers at once (torch's handler), and the main process, which
    finishes its step to save last.pt, failed on 'worker killed by signal' instead. A worker now goes on and stops
    when the main process shuts the loader down; a second SIGTERM (the main process's, for a worker that does not
    stop) or WORKER_GRACE_S after the first ends it."""
    signal.signal(signal.SIGTERM, _outlive_first_sigterm)


def _outlive_first_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    timer = threading.Timer(WORKER_GRACE_S, os._exit, (0,))
    timer.daemon = True  # a worker shut down before then exits without waiting for it
    timer.start()


class EpochBatches:
    """The (index, seed) batches of one epoch of a sampler, re-drawn by set_epoch; with several
    processes each rank takes its contiguous share of every global batch (as BatchLoader)."""

    def __init__(self, sampler, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.sampler, self.batch_size, self.seed = sampler, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return epoch_steps(self.sampler.num_samples, self.batch_size, self.world)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = epoch_generator(self.seed, self.epoch)
        order = self.sampler.indices(self.epoch, gen)
        seeds = torch.randint(0, _SEED_BOUND, (len(order),), generator=gen)
        for step in range(len(self)):
            span = slice(step * self.batch_size, (step + 1) * self.batch_size)
            idx, sd = order[span], seeds[span]
            idx, sd = rank_share(idx, self.rank, self.world), rank_share(sd, self.rank, self.world)
            yield list(zip(idx.tolist(), sd.tolist()))


class StreamLoader:
    """Training batches from `dataset` (an ImageFileDataset, indexed by (index, seed)), decoded and
    augmented in `workers` processes (0: in this process), moved to `device`."""

    def __init__(self, dataset: Dataset, batch_size: int, sampler, seed: int, workers: int,
                 device: torch.device, channels_last: bool = False, rank: int = 0, world: int = 1) -> None:
        check_batch_size(batch_size, world)
        self.batches = EpochBatches(sampler, batch_size, seed, rank, world)
        self.device, self.channels_last = device, channels_last
        self.loader = DataLoader(dataset, batch_sampler=self.batches, num_workers=workers,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                 prefetch_factor=4 if workers > 0 else None, worker_init_fn=keep_working_on_sigterm)

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.batches.set_epoch(epoch)
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)
