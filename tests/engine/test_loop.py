"""engine.loop.train_one_epoch: gradient accumulation, mixed precision, micro-batches."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from engine.loop import train_one_epoch


class Tiny(nn.Module):
    """A model without BatchNorm: accumulating micro-batches must give exactly the whole batch's step."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.body(x)


def _batches(n_batches=3, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 2, 2, generator=g), torch.randint(0, 3, (batch,), generator=g))
            for _ in range(n_batches)]


def _train(model, batches, **kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return train_one_epoch(model, batches, len(batches), nn.CrossEntropyLoss(), opt, sched, **kwargs)


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_accumulated_micro_batches_take_the_same_step_as_the_whole_batch(mixup):
    torch.manual_seed(0)
    whole, split = Tiny(), None
    split = copy.deepcopy(whole)
    a = _train(whole, _batches(), mixup_alpha=mixup, mixup_rng=np.random.default_rng(1))
    b = _train(split, _batches(), mixup_alpha=mixup, mixup_rng=np.random.default_rng(1), accum_steps=4)
    for p, q in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["train_acc"] == pytest.approx(b["train_acc"])


def test_a_batch_too_small_to_split_is_not_cut_into_one_image_micro_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3))
    out = _train(model, _batches(n_batches=1, batch=3), accum_steps=4)  # BatchNorm fails on one image
    assert np.isfinite(out["loss"])


def test_bf16_autocast_on_the_cpu_trains_with_bf16_forward_and_fp32_weights():
    torch.manual_seed(0)
    model = Tiny()
    seen = []
    model.body[1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = copy.deepcopy(model.state_dict())
    out = _train(model, _batches(), amp="bf16")
    assert seen == [torch.bfloat16] * 3 and np.isfinite(out["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
