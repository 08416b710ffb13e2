"""torch.compile for the one batch size a training run repeats."""
from __future__ import annotations

import torch
from torch import nn


class CompiledForOneBatchSize(nn.Module):
    """Calls torch.compile(module) on batches of the size of the first batch it sees, and `module` itself
    on any other size: an epoch's shorter last batch (or its micro-batches), once per epoch, which
    torch.compile would otherwise compile a second time (52 s on two CPU cores, after the first
    compile's 68 s: results/throughput_cpu_compile.txt). Both calls use the module's own parameters and
    buffers, so a step is the same either way to float precision."""

    def __init__(self, module: nn.Module, **compile_kwargs) -> None:
        super().__init__()
        self.module = module
        # In a tuple, so that nn.Module does not register the compiled wrapper (and its parameters) twice.
        self._compiled = (torch.compile(module, **compile_kwargs),)
        self.batch_size: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_size is None:
            self.batch_size = len(x)
        return (self._compiled[0] if len(x) == self.batch_size else self.module)(x)
