"""Training and evaluation loops shared by both stages: plain functions that return metric dicts."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from data.augment import normalize
from data.stream import keep_working_on_sigterm
from data.transfer import to_device, widest_float
from engine.device import autocast, grad_scaler
from engine.distributed import Dist, gather_equal, gather_rows, sum_over_ranks
from engine.metrics import summarize

FINITE_CHECK_EVERY = 50  # steps between NaN/inf loss checks on an accelerator (each one waits for it)


def finite_check_interval(device: torch.device) -> int:
    """Steps between the loss's NaN/inf checks: every step on the CPU (reading a value costs nothing
    there), every FINITE_CHECK_EVERY steps on an accelerator, where each read waits for it."""
    return 1 if device.type == "cpu" else FINITE_CHECK_EVERY


def last_step_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    """The lr of the last optimiser step taken, which an epoch reports. The optimiser holds the next step's
    (the scheduler has stepped past it): an epoch resumed after a stop in its last step takes no step, and
    must report the lr the uninterrupted epoch did. A LambdaLR (every run's schedule) gives it back; before
    any step, or with another scheduler, the optimiser's lr."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and scheduler.last_epoch > 0:
        return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch - 1)  # as LambdaLR computes it
    return optimizer.param_groups[0]["lr"]


def micro_batches(batch: int, accum_steps: int) -> int:
    """How many micro-batches a batch of `batch` images is split into (tensor_split: sizes differ by at most
    one): accum_steps, but none of fewer than two images, which BatchNorm cannot normalise in training."""
    return max(1, min(accum_steps, batch // 2))


def micro_batch_sizes(batch: int, accum_steps: int) -> set[int]:
    """The sizes of the micro-batches of a batch of `batch` images (one size, or two a single image apart)."""
    parts = micro_batches(batch, accum_steps)
    return {batch // parts, -(-batch // parts)}


def micro_batch_loss(loss_fn: nn.Module, logits: torch.Tensor, labels: torch.Tensor,
                     batch_labels: torch.Tensor) -> torch.Tensor:
    """The part of the batch's loss (labels batch_labels) that a micro-batch (logits, labels) carries, so that
    the parts add up to the batch's loss: the loss's own micro_batch_loss (models.losses_base.LongTailLoss; LDAM
    with DRW divides by the batch's sum of weights), else (a mean over the images, e.g. nn.CrossEntropyLoss)
    the micro-batch's loss times its share of the images."""
    part = getattr(loss_fn, "micro_batch_loss", None)
    if part is not None:
        return part(logits, labels, batch_labels)
    return loss_fn(logits, labels) * (len(labels) / len(batch_labels))


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_steps: int,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    mixup_alpha: float = 0.0,
    mixup_rng: np.random.Generator | None = None,
    accum_steps: int = 1,
    amp: str = "off",
    scaler: torch.amp.GradScaler | None = None,
    desc: str = "train",
    d: Dist = Dist(),
    stop: Callable[[], bool] | None = None,
    carry: Sequence[float] = (0.0, 0.0, 0),
) -> dict[str, float]:
    """One pass over `batches` (on the model's device), one optimiser and scheduler step per batch.

    With mixup_alpha > 0 each batch is mixed with a permutation of itself by lam ~ Beta(a, a)
    and the loss is lam * L(y_a) + (1 - lam) * L(y_b), which composes with any loss.
    accum_steps > 1 splits each batch into that many micro-batches whose gradients add up to the
    batch's (each micro-batch's loss is its part of the batch's, micro_batch_loss) before the one
    optimiser step: the same update at a fraction of the activation memory, except that BatchNorm
    sees each micro-batch alone. A loss that looks at the whole batch (LDAM's DRW weight sum, arb's
    class counts: loss_fn.batch_dependent) gets its labels, under torchrun every rank's, so that the
    step is the one-process batch's there too. amp (off | bf16 | fp16) runs the
    forward pass under autocast; the loss is computed in fp32; fp16 needs `scaler`.
    Returns the mean loss, the training accuracy (w.r.t. the mixed targets), the last lr and the
    number of steps taken; with several processes, over the images of all ranks; and this rank's raw
    sums, which a run stopped mid-epoch saves and gives back as `carry` when it resumes. When `stop()`
    turns true, the epoch ends after the step in progress.
    """
    model.train()
    device = next(model.parameters()).device
    scaler = scaler or grad_scaler(device, "off")
    # Running sums stay on the device: no step waits for the GPU to read them back. The loss is
    # checked for NaN/inf every finite_check_interval steps.
    check_every = finite_check_interval(device)
    # carry: the (loss, correct, images) sums of the steps a stopped run took of this epoch already.
    # (torch.full fills on the device; torch.tensor(v, device=cuda) would copy from the host and wait.)
    wide = widest_float(device)
    total_loss = torch.full((), float(carry[0]), dtype=wide, device=device)
    total_correct = torch.full((), float(carry[1]), dtype=wide, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    total_seen, steps, lr = int(carry[2]), 0, last_step_lr(optimizer, scheduler)
    for step, (x, y) in enumerate(tqdm(batches, total=num_steps, desc=desc, leave=False, disable=None)):
        lr = optimizer.param_groups[0]["lr"]
        lam, y_b = 1.0, y
        if mixup_alpha > 0:
            lam = float(mixup_rng.beta(mixup_alpha, mixup_alpha))
            perm = to_device(torch.from_numpy(mixup_rng.permutation(len(y))), y.device)
            x, y_b = lam * x + (1 - lam) * x[perm], y[perm]
        optimizer.zero_grad(set_to_none=True)
        # A loss that looks at the whole batch gets every rank's labels (the same multiset for the mixed
        # targets), and each rank's part, times the ranks that DDP's gradient mean divides by, adds up to the
        # one-process batch's loss.
        whole = gather_equal(y, d) if d.world > 1 and getattr(loss_fn, "batch_dependent", False) else None
        batch_y, batch_yb, ranks = (y, y_b, 1) if whole is None else (whole, whole, d.world)
        parts = micro_batches(len(y), accum_steps)
        for xs, ya, yb in zip(x.tensor_split(parts), y.tensor_split(parts), y_b.tensor_split(parts)):
            with autocast(device, amp):
                logits = model(xs)
            logits = logits.float()
            loss = micro_batch_loss(loss_fn, logits, ya, batch_y) * ranks  # its part of the batch's loss
            if mixup_alpha > 0:
                loss = lam * loss + (1 - lam) * micro_batch_loss(loss_fn, logits, yb, batch_yb) * ranks
            finite &= torch.isfinite(loss)
            scaler.scale(loss).backward()
            pred = logits.argmax(1)
            total_correct += lam * (pred == ya).sum() + (1 - lam) * (pred == yb).sum()
            total_loss += loss.detach() * len(y)
        if (step + 1) % check_every == 0 and not finite:  # one read of the device for the step's micro-batches
            raise FloatingPointError(f"{desc}, step {step + 1}: the loss became NaN or infinite (lr {lr:.4g}); "
                                     "nothing of this epoch was saved: lower train.lr or check the data")
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total_seen += len(y)
        steps = step + 1
        if stop is not None and stop():
            break
    # The epoch's one wait for the device: its sums and finiteness, read back together.
    loss_sum, correct_sum, all_finite = torch.stack([total_loss, total_correct, finite.to(wide)]).tolist()
    if not all_finite:
        raise FloatingPointError(f"{desc}: the loss became NaN or infinite in the epoch's last {check_every} steps "
                                 f"(lr {lr:.4g}); nothing of this epoch was saved: lower train.lr or check the data")
    sums = [loss_sum, correct_sum, total_seen]
    total_loss, total_correct, total_seen = sum_over_ranks(sums, d)
    return {"loss": total_loss / max(1, total_seen), "train_acc": total_correct / max(1, total_seen), "lr": lr,
            "steps": steps, "sums": sums}


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor | Dataset,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    channels_last: bool = False,
    desc: str = "eval",
    amp: str = "off",
    workers: int = 0,
) -> torch.Tensor:
    """(N, C) fp32 logits on the CPU, model in eval mode, in order, of uint8 images (N, 3, H, W)
    (normalised here with mean/std) or of an image-file Dataset of (normalised image, label) items
    (decoded and transformed in `workers` processes).

    Each batch moves to the model's device (a no-op for images already there; to a GPU in a copy from
    pinned memory, which the host does not wait for: CUDA may stage a copy from pageable memory only
    after the forward passes queued before it, which keeps the host from running ahead) and runs under
    autocast with amp (off | bf16 | fp16).
    """
    model.eval()
    device = next(model.parameters()).device
    if isinstance(images, torch.Tensor):
        batches = (normalize(to_device(images[start : start + batch_size], device), mean, std)
                   for start in range(0, len(images), batch_size))
    else:
        batches = (x for x, _ in DataLoader(images, batch_size=batch_size, num_workers=workers,
                                            pin_memory=device.type == "cuda", worker_init_fn=keep_working_on_sigterm))
    batches = tqdm(batches, total=-(-len(images) // batch_size), desc=desc, leave=False, disable=None)
    out = forward_each(model, batches, device, channels_last, amp)
    return torch.cat(out).cpu() if out else torch.empty(0)


def forward_each(fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor], device: torch.device,
                 channels_last: bool, amp: str) -> list[torch.Tensor]:
    """fp32 fn(x) of each batch x, moved to `device` (NHWC with channels_last), under autocast `amp`."""
    out = []
    for x in batches:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out.append(fn(x).float())
    return out


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor, train_counts: Sequence[int],
                        confusion: bool = False) -> dict:
    """top1 / many / medium / few / per_class (and with `confusion`, confusion_matrix) of argmax predictions."""
    return summarize(logits.argmax(1), labels, train_counts, confusion)


def predict_all_ranks(model: nn.Module, images: torch.Tensor | Dataset, batch_size: int, mean: Sequence[float],
                      std: Sequence[float], channels_last: bool = False, desc: str = "eval", amp: str = "off",
                      d: Dist = Dist(), workers: int = 0) -> torch.Tensor:
    """predict_logits of all the images; with several processes each rank predicts its shard and the
    logits are gathered in order, so every rank gets the single-process (N, C) logits."""
    shard = d.shard(len(images))
    rows = shard.stop - shard.start
    # A rank whose shard is empty (fewer images than processes) predicts the first image and keeps none of
    # its logits: its (0, C) rows then have the others' width, which gather_rows needs (an empty 1-D tensor
    # would make gloo abort on a size mismatch). The model alone knows C.
    if rows == 0 and len(images):
        shard = slice(0, 1)
    mine = images[shard] if isinstance(images, torch.Tensor) else Subset(images, range(shard.start, shard.stop))
    logits = predict_logits(model, mine, batch_size, mean, std, channels_last, desc, amp, workers)
    return gather_rows(logits[:rows], d)


def evaluate(model: nn.Module, images: torch.Tensor | Dataset, labels: torch.Tensor, train_counts: Sequence[int],
             batch_size: int, mean: Sequence[float], std: Sequence[float], channels_last: bool = False,
             desc: str = "val", amp: str = "off", d: Dist = Dist(), workers: int = 0) -> dict:
    """Metrics (engine.metrics.summarize) of the model on uint8 images (N, 3, H, W) or an image-file
    Dataset, with labels (N,), the same on every rank (predict_all_ranks)."""
    logits = predict_all_ranks(model, images, batch_size, mean, std, channels_last, desc, amp, d, workers)
    return metrics_from_logits(logits, labels.cpu(), train_counts)
