"""One epoch of augmented, normalised batches from a dataset held in memory as uint8 tensors.

No worker processes: the images are already decoded, and gathering + batched augmentation costs
far less than the network's steps on them. Augmentation runs on whole chunks of an epoch's batches
(AUGMENT_CHUNK images per call) rather than batch by batch: on a GPU each call is a few hundred
small kernel launches whatever its size, and per batch of 512 those launches cost the host as much
time as the ResNet-32 step itself. All randomness of an epoch comes from one generator seeded by
(seed, epoch), so an epoch is the same whether or not the run was resumed.
"""
from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from data.augment import normalize
from data.prefetch import prefetched
from data.transfer import to_device


# The independent random streams of a run, each seeded by (seed, epoch or view, stream), so that no
# two uses draw correlated numbers and a run with seed s shares no stream with a run of seed s + k.
DATA_STREAM = 0  # data order and augmentation of a training epoch
MIXUP_STREAM = 1  # stage 1: mixup's lambda and pairing (a numpy generator of the same seed sequence)
VIEW_STREAM = 2  # stage 2: augmentation of the cached views of the training set
META_VIEW_STREAM = 3  # stage 2: augmentation of the cached views of the BALMS meta split
SHARD_AUGMENT_STREAM = 4  # + rank: augmentation of one rank's share of each batch (several processes)

# Images augmented (and normalised) per call, rounded down to whole batches, at least one: 8192
# CIFAR images are 25 MB of uint8 and 100 MB once normalised to float32.
AUGMENT_CHUNK = 8192


def epoch_generator(seed: int, epoch: int, stream: int = DATA_STREAM) -> torch.Generator:
    """A generator for epoch (or view) `epoch` of stream `stream` of a run seeded `seed`,
    independent of every other (seed, epoch, stream)."""
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Batches in an epoch of num_samples: a trailing batch of one sample is dropped (BatchNorm
    cannot train on it, and a one-sample step is noise), unless it is the epoch's only batch."""
    steps = math.ceil(num_samples / batch_size)
    return steps - 1 if num_samples % batch_size == 1 and steps > 1 else steps


def epoch_steps(num_samples: int, batch_size: int, world: int = 1) -> int:
    """Steps of a training epoch: steps_per_epoch in one process; with several, only full global
    batches (every rank takes an equal share of each)."""
    return max(1, num_samples // batch_size) if world > 1 else steps_per_epoch(num_samples, batch_size)


def rank_share(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch, the same size on every rank (DDP's gradient mean
    weights the ranks alike): a batch that does not split evenly, the only one of a training set smaller
    than the batch, leaves its last images out."""
    if world == 1:
        return batch
    per_rank = len(batch) // world
    return batch[rank * per_rank:(rank + 1) * per_rank]


def check_batch_size(batch_size: int, world: int) -> None:
    """At least 2 images per process in each batch: BatchNorm in training mode cannot normalise one."""
    if batch_size < 2 * world:
        raise ValueError(f"batch size must be at least 2 per process for BatchNorm, got {batch_size} "
                         f"for {world} process(es)")


class BatchLoader:
    """Yields (images float32 (B, 3, H, W) normalised, labels int64 (B,)) for one epoch.

    `sampler.indices(epoch, generator)` chooses which images an epoch visits, `augment(images,
    generator)` transforms a uint8 batch (None for evaluation); it is called once per chunk of
    consecutive batches of about `augment_chunk` images, and the batches are views of the chunk.
    A trailing batch of one image is dropped: BatchNorm in training mode cannot normalise a single sample.

    With `prefetch`, each next chunk is made in a background thread (on its own CUDA stream) while
    the caller trains on the current one (data.prefetch), running on from an epoch's last chunk into
    the next epoch's first, so that consecutive epoch(e), epoch(e + 1) calls keep it busy; the batches
    are the same either way.

    With world > 1 processes every rank draws the same epoch and takes its contiguous share of
    each batch of batch_size (the global batch), so the ranks' shares are disjoint and together
    are the single-process batch; the epoch has only full batches, and each rank augments its
    share with its own generator (SHARD_AUGMENT_STREAM + rank).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        sampler,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int,
        channels_last: bool = False,
        rank: int = 0,
        world: int = 1,
        augment_chunk: int = AUGMENT_CHUNK,
        prefetch: bool = False,
    ) -> None:
        check_batch_size(batch_size, world)
        self.steps_per_chunk = max(1, augment_chunk // batch_size)
        self.prefetch = prefetch
        # The chunk maker holds no reference to the loader: a dropped loader closes its prefetch thread.
        self._chunks = _ChunkMaker(images, labels, batch_size, sampler, augment, tuple(mean), tuple(std), seed,
                                   channels_last, rank, world, self.steps_per_chunk)
        self._next: tuple[int, Iterator] | None = None  # (epoch, its chunks and all later epochs') made ahead
        self._made_ahead = threading.Event()  # set while the prefetch thread has made the chunk ahead
        self._made_ahead.set()

    def __len__(self) -> int:
        return self._chunks.steps()

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        chunks = self._chunks_from(epoch)
        count = len(self._chunks.firsts())
        for k in range(count):
            x, labels, sizes = next(chunks)
            if k == count - 1:  # the stream now stands at the next epoch, however much of this one is used
                self._next = (epoch + 1, chunks)
            yield from zip(x.split(sizes), labels.split(sizes))

    def _chunks_from(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        """The chunks of `epoch` and the epochs after it: the stream made ahead when it stands there,
        else a new one (the old one, dropped, stops its thread)."""
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == epoch:
            return ahead[1]
        chunks = itertools.chain.from_iterable(map(self._chunks, itertools.count(epoch)))
        if not self.prefetch:
            return chunks
        self._made_ahead = threading.Event()  # the old stream's thread may still set its own
        self._made_ahead.set()  # until the stream starts (prefetched clears it then)
        return prefetched(chunks, self._chunks.images.device, self._made_ahead)

    def wait_ahead(self, timeout: float | None = None) -> bool:
        """Wait until the prefetch thread has made the chunk it is making ahead (at once without prefetch, or
        before the stream has started); False if `timeout` seconds passed first. bench/train_paths.py: a timed
        window ends when a run's next epoch could start, as a run pays for that chunk's unfinished part."""
        return self._made_ahead.wait(timeout)


@dataclass(frozen=True, eq=False)
class _ChunkMaker:
    """The chunks of an epoch of BatchLoader: (images (n, 3, H, W) float32 normalised, labels (n,), the
    sizes of the n images' batches), each of up to steps_per_chunk batches."""
    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int
    sampler: object
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int
    channels_last: bool
    rank: int
    world: int
    steps_per_chunk: int

    def steps(self) -> int:
        return epoch_steps(self.sampler.num_samples, self.batch_size, self.world)

    def firsts(self) -> range:
        """The first step of each chunk of an epoch."""
        return range(0, self.steps(), self.steps_per_chunk)

    def __call__(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        gen = epoch_generator(self.seed, epoch)
        order = to_device(self.sampler.indices(epoch, gen), self.images.device)  # one copy per epoch
        aug_gen = gen if self.world == 1 else epoch_generator(self.seed, epoch, SHARD_AUGMENT_STREAM + self.rank)
        steps = self.steps()
        for first in self.firsts():
            shares = [self._share(order, step) for step in range(first, min(first + self.steps_per_chunk, steps))]
            idx = torch.cat(shares)
            x = self.images[idx]
            if self.augment is not None:
                x = self.augment(x, aug_gen)
            x = normalize(x, self.mean, self.std)
            if self.channels_last:  # slices of an NHWC chunk along the batch stay NHWC
                x = x.contiguous(memory_format=torch.channels_last)
            # Shapes are known on the host: no wait for the device.
            yield x, self.labels[idx], [len(share) for share in shares]

    def _share(self, order: torch.Tensor, step: int) -> torch.Tensor:
        """The dataset indices this rank trains on at `step`: its contiguous share of the global batch."""
        return rank_share(order[step * self.batch_size : (step + 1) * self.batch_size], self.rank, self.world)
