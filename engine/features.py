"""Features of a frozen backbone for stage 2, either cached once or computed per batch.

The stage-2 head never sees images, only (B, D) features. With the backbone frozen, computing
the features of K augmented views of the training set once and training the head on them gives
the same kind of augmented features as running the backbone every batch, at a small fraction
of the cost (bench/stage2_speed.py measures it). `LiveFeatures` keeps the per-batch path of the
BALMS code (backbone in train mode, BatchNorm statistics updating) for comparison, or with
BatchNorm in eval mode, which differs from the cache only in fresh augmentations.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from data.augment import normalize
from data.loader import epoch_generator
from engine.device import autocast
from engine.distributed import Dist, gather_rows

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@torch.no_grad()
def compute_views(model: nn.Module, images: torch.Tensor, augment: Augment | None, num_views: int,
                  mean: Sequence[float], std: Sequence[float], seed: int, stream: int, batch_size: int,
                  channels_last: bool = False, amp: str = "off", d: Dist = Dist()) -> torch.Tensor:
    """(K, N, D) fp32 features of K views of uint8 images (N, 3, H, W), BatchNorm in eval mode, on the
    model's device (images move there a batch at a time; forward passes under autocast `amp`).

    Chunk j (images j*batch_size ...) of view k is augmented with epoch_generator(seed, k * chunks + j,
    stream) (data.loader's *_STREAM constants), so the views are the same whoever computes a chunk:
    with several processes each rank computes its share of the chunks and every rank gets all of
    them. augment=None gives K identical views.
    """
    model.eval()
    device = next(model.parameters()).device
    starts = range(0, len(images), batch_size)
    mine = starts[d.shard(len(starts))]
    views = []
    for k in range(num_views):
        chunks = []
        for start in tqdm(mine, desc=f"features view {k + 1}/{num_views}", leave=False, disable=None):
            gen = epoch_generator(seed, k * len(starts) + start // batch_size, stream)
            x = images[start : start + batch_size].to(device, non_blocking=True)
            if augment is not None:
                x = augment(x, gen)
            x = normalize(x, mean, std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                chunks.append(model.forward_features(x).float())
        local = torch.cat(chunks) if chunks else torch.empty(0, model.feature_dim, device=device)
        views.append(gather_rows(local, d))
    return torch.stack(views)


class CachedFeatures:
    """Features of images by index: each draw takes one of the K cached views at random."""

    def __init__(self, views: torch.Tensor) -> None:
        self.views = views  # (K, N, D)

    def __call__(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        k = torch.randint(self.views.shape[0], (len(indices),), generator=generator)
        return self.views[k, indices]  # (B, D)


class LiveFeatures:
    """The reference path: augment the images of each batch and run the backbone on them.

    The backbone's weights stay frozen. With bn_train (the BALMS code) it runs in train mode, so
    BatchNorm uses batch statistics and updates its running averages; without, it keeps the
    stage-1 statistics (eval mode), as compute_views does.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, augment: Augment, mean: Sequence[float],
                 std: Sequence[float], channels_last: bool = False, bn_train: bool = True) -> None:
        self.model, self.images, self.augment = model, images, augment
        self.mean, self.std, self.channels_last, self.bn_train = mean, std, channels_last, bn_train

    @torch.no_grad()
    def __call__(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self.model.train(self.bn_train)
        images = self.images[indices].to(next(self.model.parameters()).device, non_blocking=True)
        x = normalize(self.augment(images, generator), self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model.forward_features(x).float()
