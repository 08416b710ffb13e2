"""engine/compiled.py: torch.compile for the full batch, the module itself for any other size."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.compiled import CompiledForBatchSizes
from engine.loop import train_one_epoch


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def _epoch(model: nn.Module, params: nn.Module, batches) -> dict:
    opt = torch.optim.SGD(params.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return train_one_epoch(model, batches, len(batches), nn.CrossEntropyLoss(), opt, sched)


def test_batches_of_another_size_run_uncompiled_one_graph_is_compiled_and_training_is_the_plain_modules():
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):  # counts the graphs torch.compile makes; runs them as they are
        graphs.append(gm)
        return gm.forward

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (8, 8, 5)]
    plain, net = _net(), _net()
    wrapped = CompiledForBatchSizes(net, {8}, backend=backend)
    # A run resumed before an epoch's last step starts with the short batch: it runs eagerly, then the full
    # batches compile; the next epoch's full batches reuse the graph, its short one runs eagerly again.
    epochs = [batches[2:], batches]
    losses = [_epoch(wrapped, net, epoch)["loss"] for epoch in epochs]
    assert len(graphs) == 1
    ref = [_epoch(plain, plain, epoch)["loss"] for epoch in epochs]
    assert losses == pytest.approx(ref, abs=1e-6)
    for (name, a), b in zip(net.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_only_the_listed_batch_sizes_go_through_the_compiled_module(monkeypatch):
    calls = []

    def compiled(module, **kwargs):  # stands in for torch.compile: what it wraps records each batch it gets
        return lambda x: (calls.append(len(x)), module(x))[1]
    monkeypatch.setattr(torch, "compile", compiled)
    wrapped = CompiledForBatchSizes(nn.Linear(2, 2), {4, 2})
    for n in (4, 3, 2, 1, 4):
        assert wrapped(torch.zeros(n, 2)).shape == (n, 2)
    assert calls == [4, 2, 4]


def test_the_wrapper_registers_the_module_once():
    net = _net()
    wrapped = CompiledForBatchSizes(net, {8}, backend="eager")
    assert list(wrapped.parameters()) == list(net.parameters())
    assert list(wrapped.state_dict()) == [f"module.{k}" for k in net.state_dict()]
