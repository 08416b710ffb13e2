"""Per-epoch index samplers for long-tailed training (instance, class-balanced, re-sampling).

The dataset lives in memory, so a sampler only decides which dataset indices one epoch
visits and in what order. Each sampler exposes ``num_samples`` (the epoch length, from
which the training loop derives its steps per epoch) and
``indices(epoch, generator) -> LongTensor (num_samples,)``; all randomness comes from the
generator, so the same generator state gives the same epoch.

Class-probability samplers first draw a class, then an image uniformly within it (with
replacement). The within-class draw is O(1) per sample: indices are sorted by label once,
and class c occupies ``sorted_indices[offsets[c] : offsets[c] + n_c]``.
Classes with no images get probability 0 (a warning is logged).
"""

from __future__ import annotations

import abc
import inspect
import logging
from typing import Any

import torch

from data.long_tail import few_classes

logger = logging.getLogger(__name__)


class EpochSampler(abc.ABC):
    """Base class: validates labels and builds the per-class index table.

    Attributes: ``labels`` (N,) int64 on CPU, ``class_counts`` (C,) int64, ``sorted_indices``
    (N,) dataset indices grouped by class, ``class_offsets`` (C,) start of each class group.
    """

    num_samples: int

    def __init__(self, labels: torch.Tensor, num_classes: int) -> None:
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.dtype != torch.int64:
            raise ValueError("labels must be a 1-D int64 tensor of class indices, one per dataset image")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if labels.numel() == 0:
            raise ValueError("labels is empty: every class has 0 images, so there is nothing to sample")
        labels = labels.detach().cpu()
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}) for num_classes={num_classes}, found [{low}, {high}]"
            )
        self.labels = labels
        self.num_classes = num_classes
        self.class_counts = torch.bincount(labels, minlength=num_classes)
        self.sorted_indices = torch.argsort(labels, stable=True)
        self.class_offsets = torch.cumsum(self.class_counts, 0) - self.class_counts

    @abc.abstractmethod
    def indices(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        """Dataset indices for one epoch, a LongTensor of shape (num_samples,)."""

    def _warn_empty_classes(self) -> None:
        empty = torch.nonzero(self.class_counts == 0).flatten().tolist()
        if empty:
            logger.warning("%s: classes %s (%d of %d) have no images and will never be sampled",
                           type(self).__name__, few_classes(empty), len(empty), self.class_counts.numel())

    def _within_class_draw(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """For each class in ``classes`` (B,), a uniformly drawn dataset index of that class (B,)."""
        # float64 uniforms in [0, 1): u * n_c < n_c for any realistic n_c, so floor stays in range.
        u = torch.rand(classes.numel(), dtype=torch.float64, generator=generator)
        rank = (u * self.class_counts[classes].to(torch.float64)).long()
        return self.sorted_indices[self.class_offsets[classes] + rank]

    def _grouped_random_order(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Dataset indices grouped by class, shuffled within each class, and each one's rank in its class (N,), (N,)."""
        perm = torch.randperm(self.labels.numel(), generator=generator)
        grouped = perm[torch.argsort(self.labels[perm], stable=True)]
        rank = torch.arange(grouped.numel()) - self.class_offsets[self.labels[grouped]]
        return grouped, rank


def _check_epoch(epoch: int) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0 (0 = first epoch), got {epoch!r}")


class InstanceSampler(EpochSampler):
    """Every image once per epoch, in a random order (num_samples = N)."""

    def __init__(self, labels: torch.Tensor, num_classes: int) -> None:
        super().__init__(labels, num_classes)
        self.num_samples = labels.numel()

    def indices(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        _check_epoch(epoch)
        return torch.randperm(self.num_samples, generator=generator)


class _ClassProbabilitySampler(EpochSampler):
    """Draw N times: a class from ``class_probabilities(epoch)``, then an image uniformly within it."""

    def __init__(self, labels: torch.Tensor, num_classes: int) -> None:
        super().__init__(labels, num_classes)
        self.num_samples = labels.numel()
        self._warn_empty_classes()

    @abc.abstractmethod
    def class_probabilities(self, epoch: int) -> torch.Tensor:
        """(C,) float64 class probabilities for this epoch, 0 for empty classes, summing to 1."""

    def indices(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        _check_epoch(epoch)
        probs = self.class_probabilities(epoch)
        classes = torch.multinomial(probs, self.num_samples, replacement=True, generator=generator)
        return self._within_class_draw(classes, generator)


class ClassBalancedSampler(_ClassProbabilitySampler):
    """Each draw picks a non-empty class uniformly, then an image within it."""

    def class_probabilities(self, epoch: int) -> torch.Tensor:
        present = (self.class_counts > 0).to(torch.float64)
        return present / present.sum()


class SqrtSampler(_ClassProbabilitySampler):
    """Class probability proportional to sqrt(n_c) (Mahajan et al. 2018; Kang et al. 2020)."""

    def class_probabilities(self, epoch: int) -> torch.Tensor:
        root = self.class_counts.to(torch.float64).sqrt()
        return root / root.sum()


class ProgressiveSampler(_ClassProbabilitySampler):
    """Kang et al. 2020: p_c(t) = (1 - t/T) * n_c / N + (t/T) / C, t = epoch, T = total_epochs.

    With empty classes the uniform term spreads over the non-empty classes only. An epoch past T
    (a run resumed under more processes, whose epochs are shorter, runs more of them) is class-balanced.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int, total_epochs: int) -> None:
        if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
            raise ValueError(f"total_epochs must be an int >= 1 (the T of the schedule), got {total_epochs!r}")
        super().__init__(labels, num_classes)
        self.total_epochs = total_epochs

    def class_probabilities(self, epoch: int) -> torch.Tensor:
        alpha = min(epoch / self.total_epochs, 1.0)
        counts = self.class_counts.to(torch.float64)
        present = (counts > 0).to(torch.float64)
        return (1.0 - alpha) * counts / counts.sum() + alpha * present / present.sum()


class OversampleSampler(EpochSampler):
    """Every non-empty class repeated up to n_max images per epoch, then shuffled.

    A class with n_c images contributes floor(n_max / n_c) full copies plus a fresh random
    subset (without replacement) of the remaining n_max mod n_c, so each image appears
    k or k + 1 times. num_samples = (number of non-empty classes) * n_max.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int) -> None:
        super().__init__(labels, num_classes)
        self._warn_empty_classes()
        present = self.class_counts > 0
        n_max = int(self.class_counts.max())
        self.copies = torch.where(present, n_max // self.class_counts.clamp(min=1), 0)  # (C,)
        self.remainder = torch.where(present, n_max - self.copies * self.class_counts, 0)  # (C,)
        self.num_samples = int(present.sum()) * n_max

    def indices(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        _check_epoch(epoch)
        full = torch.repeat_interleave(torch.arange(self.labels.numel()), self.copies[self.labels])
        grouped, rank = self._grouped_random_order(generator)
        extra = grouped[rank < self.remainder[self.labels[grouped]]]
        epoch_multiset = torch.cat([full, extra])
        return epoch_multiset[torch.randperm(epoch_multiset.numel(), generator=generator)]


class UndersampleSampler(EpochSampler):
    """Every non-empty class cut to n_min images (a fresh random subset each epoch), then shuffled.

    n_min is the smallest non-empty class; num_samples = (number of non-empty classes) * n_min.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int) -> None:
        super().__init__(labels, num_classes)
        self._warn_empty_classes()
        present = self.class_counts > 0
        self.n_min = int(self.class_counts[present].min())
        self.num_samples = int(present.sum()) * self.n_min

    def indices(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        _check_epoch(epoch)
        grouped, rank = self._grouped_random_order(generator)
        kept = grouped[rank < self.n_min]
        return kept[torch.randperm(kept.numel(), generator=generator)]


SAMPLERS: dict[str, type[EpochSampler]] = {
    "instance": InstanceSampler,
    "class_balanced": ClassBalancedSampler,
    "sqrt": SqrtSampler,
    "progressive": ProgressiveSampler,
    "oversample": OversampleSampler,
    "undersample": UndersampleSampler,
}


def build_sampler(name: str, labels: torch.Tensor, num_classes: int, **params: Any) -> EpochSampler:
    """Build the sampler registered as ``name`` over ``labels`` (N,) int64.

    Raises ValueError for an unknown name, an unknown parameter or a missing required one.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {sorted(SAMPLERS)}")
    cls = SAMPLERS[name]
    signature = inspect.signature(cls.__init__)
    own = {k: p for k, p in signature.parameters.items() if k not in ("self", "labels", "num_classes")}
    for param in params:
        if param not in own:
            raise ValueError(f"unknown param {param!r} for sampler {name!r}; valid params: {list(own)}")
    missing = [k for k, p in own.items() if p.default is inspect.Parameter.empty and k not in params]
    if missing:
        raise ValueError(f"sampler {name!r} needs param(s) {missing}")
    return cls(labels, num_classes, **params)
