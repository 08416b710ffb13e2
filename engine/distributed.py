"""Many processes (torchrun): rank, world, device, gathering, and BatchNorm over the global batch.

`init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
and is a no-op in a single process, so the entry scripts run the same code either way and pass
the resulting `Dist` and device down as plain arguments.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn  # differentiable collectives
from torch import nn

from data.cifar import DatasetFormatError
from engine.device import DeviceError, resolve_device

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run directory, logs and checkpoints."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of n items (the first n % world ranks get one more)."""
        per, extra = divmod(n, self.world)
        start = self.rank * per + min(self.rank, extra)
        return slice(start, start + per + (self.rank < extra))


def launched_world() -> int:
    """The number of processes torchrun started (its WORLD_SIZE; 1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_name: str, timeout_s: float) -> tuple[Dist, torch.device]:
    """(Dist, device) of this process. Under torchrun: one process per rank, the process group up
    (nccl on CUDA, gloo on CPU) with collectives that fail after timeout_s instead of hanging when a
    rank dies; on CUDA each rank takes cuda:LOCAL_RANK."""
    world = launched_world()
    if world == 1:
        return Dist(), resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if device_name not in ("auto", "cuda"):
            raise DeviceError(f"train.device={device_name} under torchrun: use train.device=cuda, and each rank "
                              f"takes cuda:LOCAL_RANK (CUDA_VISIBLE_DEVICES chooses the GPUs)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise DeviceError(f"train.device={device_name}: several processes run on CUDA (nccl) or the CPU (gloo) only")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    logger.info("rank %d of %d on %s", rank, world, device)
    return Dist(rank, world, local_rank), device


def shutdown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """nccl moves GPU tensors only, gloo CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(local: torch.Tensor, d: Dist) -> torch.Tensor:
    """Every rank's rows (n_r, ...), concatenated in rank order, on every rank (on local's device)."""
    if d.world == 1:
        return local
    via = _collective_device()
    sizes = [torch.zeros(1, dtype=torch.int64, device=via) for _ in range(d.world)]
    dist.all_gather(sizes, torch.tensor([len(local)], device=via))
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=via)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(d.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(local.device)


def gather_equal(local: torch.Tensor, d: Dist) -> torch.Tensor:
    """Every rank's equal-sized share (n, ...), concatenated in rank order, on every rank; unlike gather_rows,
    nothing is read back, so a training step may call it without waiting for the device."""
    if d.world == 1:
        return local
    via = _collective_device()
    whole = torch.empty((d.world * len(local), *local.shape[1:]), dtype=local.dtype, device=via)
    dist.all_gather_into_tensor(whole, local.to(via).contiguous())
    return whole.to(local.device)


def check_same_on_ranks(modules: dict[str, nn.Module], d: Dist) -> None:
    """Stop with an error naming the rank whose tensors differ from rank 0's (modules meant to stay
    identical, e.g. stage 2's head and meta-sampler, which every rank trains the same way)."""
    if d.world == 1:
        return
    flat = torch.cat([t.detach().double().flatten().to(_collective_device())
                      for m in modules.values() for t in m.state_dict().values()])
    parts = [torch.empty_like(flat) for _ in range(d.world)]
    dist.all_gather(parts, flat)
    for rank, part in enumerate(parts[1:], start=1):
        if not torch.equal(part, parts[0]):
            raise RuntimeError(f"rank {rank}'s {', '.join(modules)} differ from rank 0's by up to "
                               f"{float((part - parts[0]).abs().max()):.3g}: the ranks no longer train the same model")


def local_rank0_first(make: Callable[[], T], d: Dist) -> T:
    """make() on each machine's local rank 0 first, then on its other ranks: what make() downloads into a folder
    (data.download) is fetched once per machine, not by every process into the same files at once."""
    if d.world == 1:
        return make()
    if d.local_rank == 0:
        value = make()
        dist.barrier()
        return value
    dist.barrier()
    return make()


def check_same_data(summary: Callable[[], str], what: str, d: Dist) -> None:
    """Each rank reads the data at its own data.root: stop every rank with one error naming the first rank whose
    summary() of it (sizes and digest; made only with several processes) differs from rank 0's, before another
    copy of the dataset hangs the job in mismatched collectives (other lengths) or trains it on a mix of two
    datasets (other pixels)."""
    if d.world == 1:
        return
    summaries: list = [None] * d.world
    dist.all_gather_object(summaries, summary())
    for rank, theirs in enumerate(summaries[1:], start=1):
        if theirs != summaries[0]:
            raise DatasetFormatError(f"rank {rank} reads another {what} than rank 0 ({theirs}; rank 0: "
                                     f"{summaries[0]}): every process reads its own data.root, so each machine "
                                     f"needs the same copy of the dataset there")


def sum_over_ranks(values: list[float], d: Dist) -> list[float]:
    """Each value summed over all ranks (float64)."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def from_rank0(read: Callable[[], T], d: Dist) -> T:
    """read() run on rank 0 alone, its value (or the error it raised) on every rank.

    For what the run directory holds (the checkpoint to resume, the one to test, a stage-1 run's): rank 0
    writes it, so on machines without a shared disk only rank 0's has it, and a rank that read its own copy
    would start over while the others resume. The value travels pickled (a checkpoint's tensors on the CPU).
    """
    if d.world == 1:
        return read()
    box: list = [None]
    if d.is_main:
        try:
            box[0] = (read(), None)
        except (SystemExit, Exception) as e:  # a user error (no checkpoint, a damaged one): every rank stops with it
            box[0] = (None, e)
    dist.broadcast_object_list(box, src=0)
    value, error = box[0]
    if error is not None:
        raise error
    return value


def from_rank0_tensor(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Rank 0's `t` (same shape and dtype on every rank) on every rank, on t's device."""
    if d.world == 1:
        return t
    via = t.to(_collective_device()).contiguous()
    dist.broadcast(via, src=0)
    return via.to(t.device)


def broadcast_module(module: nn.Module, d: Dist) -> None:
    """Every tensor of module (parameters and buffers, e.g. BatchNorm statistics) set to rank 0's."""
    if d.world > 1:
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all ranks.

    torch.nn.SyncBatchNorm does this on GPUs only; this one all-reduces (sum x, sum x^2, count) per
    channel through a differentiable all_reduce, so it also runs on the CPU (gloo) and its
    gradients are those of BatchNorm over the whole global batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        c = x.shape[1]
        xd = x.double()  # float64: var = E[x^2] - E[x]^2 cancels digits in float32
        count = torch.full((1,), xd.numel() // c, dtype=xd.dtype, device=x.device)
        stats = dist_fn.all_reduce(torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp(min=0)  # biased, as BatchNorm normalises
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * mean.float())
            self.running_var.mul_(1 - m).add_(m * (var * n / (n - 1)).float())
        # Normalised in float64 too: in float32 this composed backward loses about 1e-3 of the
        # gradient through deep residual stacks, where torch's fused BatchNorm loses 1e-6.
        y = ((xd - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]).to(x.dtype)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of model normalised over the global batch: torch's SyncBatchNorm on CUDA,
    GlobalBatchNorm2d elsewhere; parameters and running statistics are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlobalBatchNorm2d):
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats, device=child.weight.device)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model
