"""Host-to-device copies that never make the host wait for the GPU."""
from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`, copied without blocking (the tensor itself when it is there already).

    On CUDA the copy starts from pinned memory: a non-blocking copy from pageable memory may wait
    for the stream's queued work first (CUDA stages it through a pinned buffer), which drains the
    GPU's queue behind the host. pin_memory() takes its buffer from PyTorch's caching host
    allocator, which keeps it until the copy is done.
    """
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


# Device types without float64: Apple's MPS (the tests add the meta device, their stand-in for it).
NO_FLOAT64 = frozenset({"mps"})


def widest_float(device: torch.device) -> torch.dtype:
    """The float dtype for running sums and exact draws on `device`: float64, except where the device
    has none (there float32: an epoch's sums keep about 7 significant digits)."""
    return torch.float32 if device.type in NO_FLOAT64 else torch.float64
