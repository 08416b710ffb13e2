"""Long-tailed subsets of a balanced labelled set, and per-class count bookkeeping.

The CIFAR-LT protocol (Cui et al. 2019, Cao et al. 2019) keeps ``n_i`` training images of
class ``i``, where ``n_i`` follows an exponential or step profile with imbalance factor
IF = n_max / n_min. Draws are seeded so a subset is reproducible from (counts, seed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _exp_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    # Written exactly as in the reference implementations so the rounding matches them.
    return [int(n_max * (1 / imbalance_factor) ** (i / (num_classes - 1))) for i in range(num_classes)]


def _step_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    head = num_classes // 2  # the LDAM code's img_max * imb_factor, imb_factor = 1 / IF: the same rounding
    return [n_max] * head + [int(n_max * (1 / imbalance_factor))] * (num_classes - head)


PROFILES: dict[str, Callable[[int, int, float], list[int]]] = {
    "exp": _exp_counts,
    "step": _step_counts,
}


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float, profile: str) -> list[int]:
    """Images to keep per class (class 0 is the head) for the given profile and IF."""
    if profile not in PROFILES:
        raise ValueError(f"unknown long-tail profile {profile!r}; valid profiles: {sorted(PROFILES)}")
    if n_max < 1:
        raise ValueError(f"n_max must be at least 1, got {n_max}")
    if num_classes < 2:
        raise ValueError(f"a long-tailed profile needs at least 2 classes, got num_classes={num_classes}")
    if imbalance_factor < 1:
        raise ValueError(
            f"imbalance_factor is n_max / n_min and must be >= 1 (1 = balanced), got {imbalance_factor}"
        )
    return PROFILES[profile](n_max, num_classes, imbalance_factor)


def _check_labels(labels: torch.Tensor) -> None:
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be a 1-D integer tensor, got dtype {labels.dtype} and shape {tuple(labels.shape)}"
        )
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be non-negative class indices, found {int(labels.min())}")


Shuffle = Callable[[torch.Tensor], torch.Tensor]  # one class's ascending indices -> a permutation of them


def _torch_shuffle(seed: int, generator: torch.Generator) -> Shuffle:
    return lambda members: members[torch.randperm(members.numel(), generator=generator)]


def _seeded_shuffle(seed: int) -> Shuffle:
    """The torch draw with a generator of its own, seeded with `seed`."""
    return _torch_shuffle(seed, torch.Generator().manual_seed(seed))


def _ldam_shuffle(seed: int, generator: torch.Generator) -> Shuffle:
    """The LDAM-DRW code's draw (imbalance_cifar.py): numpy's legacy generator seeded once with `seed`
    (its `rand_number`, 0), then each class's indices, in class order, shuffled in place by it."""
    rng = np.random.RandomState(seed)

    def shuffle(members: torch.Tensor) -> torch.Tensor:
        order = members.numpy().copy()
        rng.shuffle(order)
        return torch.from_numpy(order)
    return shuffle


# data.subset_draw: which images of each class the long-tailed set keeps (the first counts[c] of a shuffle)
SUBSET_DRAWS: dict[str, Callable[[int, torch.Generator], Shuffle]] = {
    "torch": _torch_shuffle,  # this tool's: a torch generator seeded with the seed
    "ldam": _ldam_shuffle,  # the LDAM-DRW (and LDAM-based) code's images exactly, on the official files
}


def _draw_per_class(
    labels: torch.Tensor, counts: Sequence[int], shuffle: Shuffle
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each class c, split its indices into the first counts[c] of `shuffle`'s order and the rest."""
    drawn, rest = [], []
    for c, wanted in enumerate(counts):
        members = torch.nonzero(labels == c).flatten()
        if wanted < 0:
            raise ValueError(f"class {c}: asked for {wanted} images, counts must be >= 0")
        if wanted > members.numel():
            raise ValueError(
                f"class {c}: asked for {wanted} images but only {members.numel()} are available; "
                f"lower n_max / the counts or hold out fewer images"
            )
        order = shuffle(members)
        drawn.append(order[:wanted])
        rest.append(order[wanted:])
    empty = torch.empty(0, dtype=torch.int64)
    drawn_all = torch.cat([empty, *drawn]).sort().values
    rest_all = torch.cat([empty, *rest]).sort().values
    return drawn_all, rest_all


def long_tail_split(labels: torch.Tensor, counts: Sequence[int], val_per_class: int,
                    seed: int, draw: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) sorted int64 indices into ``labels``: a seeded draw of counts[c] images of each
    class c (the reference rule's long-tailed training set; `draw` names a SUBSET_DRAWS entry), and
    ``val_per_class`` images of each class taken from the images that draw left out. A class with fewer
    left over (a head class, whose draw keeps all its images) takes the rest of its validation images
    from its drawn ones, so its training count is counts[c] minus that shortfall; every other class
    trains on exactly counts[c]."""
    _check_labels(labels)
    if labels.numel() and int(labels.max()) >= len(counts):
        raise ValueError(f"labels contain class {int(labels.max())} but counts has only {len(counts)} entries; "
                         f"pass one count per class")
    if draw not in SUBSET_DRAWS:
        raise ValueError(f"unknown subset draw {draw!r}; valid draws: {sorted(SUBSET_DRAWS)}")
    generator = torch.Generator().manual_seed(seed)  # also draws the validation images, for either draw
    drawn, spare = _draw_per_class(labels, counts, SUBSET_DRAWS[draw](seed, generator))
    # debug: the dataset builders log the split they make of it (and BALMS's meta set draws again)
    logger.debug("long-tailed subset: kept %d of %d images", drawn.numel(), labels.numel())
    if val_per_class == 0:
        return drawn, torch.empty(0, dtype=torch.int64)
    val = []
    for c in range(len(counts)):
        spare_c = spare[labels[spare] == c]
        spare_c = spare_c[torch.randperm(spare_c.numel(), generator=generator)][:val_per_class]
        drawn_c = drawn[labels[drawn] == c]
        short = drawn_c[torch.randperm(drawn_c.numel(), generator=generator)][:val_per_class - spare_c.numel()]
        val += [spare_c, short]
    val_all = torch.cat(val).sort().values
    return drawn[~torch.isin(drawn, val_all)], val_all  # a drawn image taken for validation leaves training


def second_draw(labels: torch.Tensor, counts: Sequence[int], exclude: torch.Tensor, seed: int) -> torch.Tensor:
    """Sorted int64 indices of an independent seeded draw of counts[c] images of each class c from the
    images not in ``exclude`` (the validation images): the BALMS code's CIFAR meta set, a second
    long-tailed draw of the training split, so most meta images of a medium or tail class are images
    its training draw left out. A class with fewer images left gives all of them."""
    _check_labels(labels)
    pool = torch.ones(labels.numel(), dtype=torch.bool)
    pool[exclude] = False
    candidates = torch.nonzero(pool).flatten()
    available = torch.bincount(labels[candidates], minlength=len(counts)).tolist()
    wanted = [min(n, a) for n, a in zip(counts, available)]
    drawn, _ = _draw_per_class(labels[candidates], wanted, _seeded_shuffle(seed))
    return candidates[drawn]


def hold_out_per_class(labels: torch.Tensor, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (remaining, held_out) with exactly ``per_class`` held out of each class that
    has images (a split list may skip a class number: it gives none).

    Every class with images must have at least ``per_class``. Both outputs are sorted int64 tensors.
    """
    _check_labels(labels)
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    if per_class == 0 or labels.numel() == 0:
        return torch.arange(labels.numel(), dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    wanted = [per_class if n else 0 for n in torch.bincount(labels.long()).tolist()]
    held_out, remaining = _draw_per_class(labels, wanted, _seeded_shuffle(seed))
    return remaining, held_out


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    """Number of images of each class 0..num_classes-1."""
    _check_labels(labels)
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"labels contain class {int(labels.max())} but num_classes={num_classes}")
    return torch.bincount(labels.long(), minlength=num_classes).tolist()


def few_classes(classes: Sequence[int], shown: int = 5) -> str:
    """The first `shown` class indices of a list, and "..." past them: a message about the 995 empty
    classes of a split list stays one readable line."""
    return ", ".join(map(str, classes[:shown])) + (", ..." if len(classes) > shown else "")


def shot_groups(train_counts: Sequence[int], many_above: int = 100, few_below: int = 20) -> dict[str, list[int]]:
    """Class indices split by training count: many (> many_above), few (< few_below), medium (the rest)."""
    if few_below > many_above:
        raise ValueError(f"few_below ({few_below}) must not exceed many_above ({many_above})")
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(train_counts):
        if n > many_above:
            groups["many"].append(c)
        elif n < few_below:
            groups["few"].append(c)
        else:
            groups["medium"].append(c)
    return groups
