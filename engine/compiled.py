"""torch.compile for the batch sizes a training run repeats."""
from __future__ import annotations

from typing import Collection

import torch
from torch import nn


class CompiledForBatchSizes(nn.Module):
    """Calls torch.compile(module) on batches of the `batch_sizes` every step has (the full batch, or its
    micro-batches), and `module` itself on any other size: an epoch's shorter last batch, once per epoch,
    which torch.compile would otherwise compile a second time (61 s on two CPU cores, after the first
    compile's 60-76 s: results/throughput_cpu_compile.txt). Both calls use the module's own parameters and
    buffers, so a step is the same either way to float precision."""

    def __init__(self, module: nn.Module, batch_sizes: Collection[int], **compile_kwargs) -> None:
        super().__init__()
        self.module = module
        self.batch_sizes = frozenset(batch_sizes)
        # In a tuple, so that nn.Module does not register the compiled wrapper (and its parameters) twice.
        self._compiled = (torch.compile(module, **compile_kwargs),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self._compiled[0] if len(x) in self.batch_sizes else self.module)(x)
