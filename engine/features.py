"""Features of a frozen backbone for stage 2, either cached once or computed per batch.

The stage-2 head never sees images, only (B, D) features. With the backbone frozen, computing
the features of K augmented views of the training set once and training the head on them gives
the same kind of augmented features as running the backbone every batch, at a small fraction
of the cost (bench/stage2_speed.py measures it). `LiveFeatures` keeps the per-batch path of the
BALMS code (backbone in train mode, BatchNorm statistics updating) for comparison, or with
BatchNorm in eval mode, which differs from the cache only in fresh augmentations.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.augment import normalize
from data.loader import META_VIEW_STREAM, VIEW_STREAM, epoch_generator
from data.stream import keep_working_on_sigterm
from data.transfer import to_device
from engine.device import DeviceError
from engine.loop import forward_each
from engine.distributed import Dist, from_rank0_tensor, gather_rows, sum_over_ranks

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
logger = logging.getLogger(__name__)


# Images augmented with one generator in compute_views: the unit of the views' seeding, fixed so that the views do
# not depend on the forward batch size (this was eval.batch_size, whose default is 128, before 2026-12-07).
VIEW_CHUNK = 128


def view_chunk(ckpt: dict | None) -> int:
    """The chunk a stage-2 run draws its views' augmentation in: VIEW_CHUNK, except for a run whose last.pt (written
    before 2026-12-07) records none, which drew them in chunks of its eval.batch_size and resumes on those views."""
    if ckpt is None:
        return VIEW_CHUNK
    return ckpt.get("view_chunk") or ckpt["config"].get("eval", {}).get("batch_size", VIEW_CHUNK)


def _rebatch(chunks: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """The rows of `chunks` ((n_i, ...) tensors) in order, as batches of batch_size rows (the last one shorter)."""
    pending: list[torch.Tensor] = []
    held = 0
    for x in chunks:
        pending.append(x)
        held += len(x)
        while held >= batch_size:
            rows = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield rows[:batch_size]
            pending, held = [rows[batch_size:]], held - batch_size
    if held:
        yield torch.cat(pending)


def _view_chunk(images: torch.Tensor, augment: Augment | None, mean: Sequence[float], std: Sequence[float],
                device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """A chunk of uint8 images on `device`, augmented (unless augment is None) and normalised."""
    x = images.to(device, non_blocking=True)
    return normalize(augment(x, generator) if augment is not None else x, mean, std)


def memory_bytes(device: torch.device) -> int | None:
    """All the memory of `device` (a CUDA device's own, else the host's RAM), or None where it cannot be asked."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def check_cache_fits(shape: tuple[int, int, int], device: torch.device, host_half: bool = False,
                     disk: Path | None = None) -> None:
    """Refuse, before hours of computing end in an out-of-memory error, K views of N x D features (`shape`) that
    compute_views cannot hold: fp32 on `device`, or with host_half float16 on the host, which disk_views then
    writes to a file under `disk` (the rank that writes). The views are held twice over while they are stacked."""
    k, n, d = shape
    size, where = (k * n * d * 2, torch.device("cpu")) if host_half else (k * n * d * 4, device)
    what = f"stage2.cache_views={k} makes {k} x {n} x {d} features, {size / 1e9:.1f} GB"
    memory = memory_bytes(where)
    if memory is not None and 2 * size > memory:
        raise DeviceError(f"{what}, held twice while they are stacked: more than the {memory / 1e9:.1f} GB of "
                          f"{'host memory' if where.type == 'cpu' else where}: lower stage2.cache_views "
                          f"(0 = the backbone on every batch)")
    free = shutil.disk_usage(disk).free if disk is not None else size
    if size > free:
        raise DeviceError(f"{what} on disk: more than the {free / 1e9:.1f} GB free under {disk}: free space or "
                          f"lower stage2.cache_views")


@torch.no_grad()
def compute_views(model: nn.Module, images: torch.Tensor | Dataset, augment: Augment | None, num_views: int,
                  mean: Sequence[float], std: Sequence[float], seed: int, stream: int, batch_size: int,
                  channels_last: bool = False, amp: str = "off", d: Dist = Dist(), workers: int = 0,
                  host_half: bool = False, chunk: int = VIEW_CHUNK) -> torch.Tensor:
    """(K, N, D) fp32 features of K views of uint8 images (N, 3, H, W) or of an image-file Dataset
    (indexed by (index, seed), its own transform augmenting), BatchNorm in eval mode, on the model's
    device (a batch at a time; forward passes under autocast `amp`). host_half: float16 on the host
    instead, each view moved there as soon as it is computed, so the device holds one view at a time
    (disk_views; iNaturalist's 437,513 images at D = 2048 take 3.6 GB a view in fp32).

    Uint8 images: chunk j (images j*chunk ...) of view k is augmented with epoch_generator(seed,
    k * chunks + j, stream) (data.loader's *_STREAM constants), then forwarded batch_size images at a time, so
    that batch_size (eval.batch_size, a speed setting) never changes the views. Image files: sample i of view k gets
    the i-th seed drawn from epoch_generator(seed, k, stream), decoded in `workers` processes. Either
    way the views are the same whoever computes a part: with several processes each rank computes its
    share and every rank gets all of it. augment=None gives K identical views of uint8 images.
    """
    model.eval()
    device = next(model.parameters()).device

    def features(batches) -> torch.Tensor:
        out = forward_each(model.forward_features, batches, device, channels_last, amp)
        return torch.cat(out) if out else torch.empty(0, model.feature_dim, device=device)

    views = []
    for k in range(num_views):
        desc = f"features view {k + 1}/{num_views}"
        if isinstance(images, torch.Tensor):
            starts = range(0, len(images), chunk)
            mine = starts[d.shard(len(starts))]
            chunks = (_view_chunk(images[start : start + chunk], augment, mean, std, device,
                                  epoch_generator(seed, k * len(starts) + start // chunk, stream))
                      for start in tqdm(mine, desc=desc, leave=False, disable=None))
            local = features(_rebatch(chunks, batch_size))
        else:
            shard = d.shard(len(images))
            sample_seeds = torch.randint(0, 2**62, (len(images),), generator=epoch_generator(seed, k, stream))
            items = list(zip(range(shard.start, shard.stop), sample_seeds[shard].tolist()))
            batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
            loader = DataLoader(images, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda",
                                worker_init_fn=keep_working_on_sigterm)
            local = features(tqdm((x for x, _ in loader), total=len(batches), desc=desc, leave=False, disable=None))
        view = gather_rows(local, d)
        views.append(view.to("cpu", torch.float16) if host_half else view)
    return torch.stack(views)


# The views of image-file datasets live on disk in the run directory, as features_<name>.npy, by view stream.
CACHE_NAMES = {VIEW_STREAM: "train", META_VIEW_STREAM: "meta"}


def cache_path(run_dir: Path, stream: int) -> Path:
    return run_dir / f"features_{CACHE_NAMES[stream]}.npy"


def drop_feature_caches(run_dir: Path, writes: bool) -> None:
    """A new run computes its own cached views: those a start that died before its first last.pt left in the
    run directory (maybe of another backbone, number of views or seed) are removed, never trained on. (Rank 0,
    writes, removes them before it asks whether every rank has them: every rank then computes, as disk_views
    needs.)"""
    for stream in CACHE_NAMES if writes else ():
        cache_path(run_dir, stream).unlink(missing_ok=True)


def disk_views(path: Path, compute: Callable[[], torch.Tensor], writes: bool, shape: tuple[int, int, int],
               d: Dist = Dist()) -> torch.Tensor:
    """(K, N, D) = `shape` float16 views memory-mapped from the .npy file `path`, for training sets whose features
    do not fit on the device: computed by `compute` (compute_views with host_half, so that the device
    holds one view at a time) and written once (atomically, by the rank that `writes`), read back
    without recomputing when the run resumes. A file that is not such an array (cut short, emptied, another
    array) is computed again, with a warning: it is a cache, and a short file mapped as it is would read as zeros.
    Every rank computes when any rank lacks a usable file, since computing takes collectives."""
    problem = cache_problem(path, shape)
    if problem and path.exists():
        logger.warning("the feature cache %s %s: computing it again", path, problem)
    if sum_over_ranks([1.0 if problem else 0.0], d)[0]:
        views = compute().to("cpu", torch.float16).numpy()
        if not writes:
            return torch.from_numpy(views)
        tmp = path.with_name(path.stem + ".partial.npy")
        np.save(tmp, views)
        os.replace(tmp, path)
    # copy-on-write: a writable array for torch.from_numpy that never writes to the file
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def cache_problem(path: Path, shape: tuple[int, int, int]) -> str | None:
    """What keeps the .npy file `path` from being the float16 (K, N, D) = `shape` views (None: nothing)."""
    try:
        with path.open("rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":
            return "is empty" if not magic else "is not a .npy file"
        cached = np.load(path, mmap_mode="r")  # a file shorter than its header says fails here
    except FileNotFoundError:
        return "does not exist"
    except (OSError, ValueError, EOFError) as e:
        return f"cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if cached.dtype != np.float16 or cached.shape != tuple(shape):
        return f"holds a {cached.dtype} array of shape {cached.shape}, not float16 {tuple(shape)}"
    return None


class CachedFeatures:
    """Features of images by index: each draw takes one of the K cached views at random."""

    def __init__(self, views: torch.Tensor, device: torch.device | None = None) -> None:
        self.views = views  # (K, N, D): fp32 on the device, or fp16 memory-mapped from disk (disk_views)
        self.device = device or views.device

    def __call__(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        k = torch.randint(self.views.shape[0], (len(indices),), generator=generator)
        if self.views.device.type == "cpu":  # memory-mapped views: indices drawn on a GPU come back (a wait)
            indices = indices.cpu()
        else:
            k, indices = to_device(k, self.views.device), to_device(indices, self.views.device)
        return to_device(self.views[k, indices], self.device).float()  # (B, D)


class LiveFeatures:
    """The reference path: augment the images of each batch and run the backbone on them.

    The backbone's weights stay frozen. With bn_train (the BALMS code) it runs in train mode, so
    BatchNorm uses batch statistics and updates its running averages; without, it keeps the
    stage-1 statistics (eval mode), as compute_views does. Its forward pass runs under autocast
    with amp (off | bf16 | fp16), as compute_views's; the features come back in fp32. Under torchrun every
    rank runs the whole batch (BatchNorm's batch statistics are the one-process ones) and takes rank 0's
    features: ranks with other thread counts (machines with other numbers of cores) compute them a few ulp
    apart, and the head, which every rank trains alike, must stay identical.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, augment: Augment, mean: Sequence[float],
                 std: Sequence[float], channels_last: bool = False, bn_train: bool = True, amp: str = "off",
                 d: Dist = Dist()) -> None:
        self.model, self.images, self.augment, self.d = model, images, augment, d
        self.mean, self.std, self.channels_last, self.bn_train, self.amp = mean, std, channels_last, bn_train, amp

    @torch.no_grad()
    def __call__(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self.model.train(self.bn_train)
        images = self.images[to_device(indices, self.images.device)].to(next(self.model.parameters()).device,
                                                                         non_blocking=True)
        x = normalize(self.augment(images, generator), self.mean, self.std)
        features = forward_each(self.model.forward_features, (x,), x.device, self.channels_last, self.amp)[0]
        return from_rank0_tensor(features, self.d)  # (B, D)
