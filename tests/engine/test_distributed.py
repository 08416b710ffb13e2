"""engine.distributed on two real gloo processes: sharding, gathering, BatchNorm over the global batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from engine.device import DeviceError
from engine.distributed import (Dist, GlobalBatchNorm2d, gather_rows, init_distributed, sum_over_ranks,
                                  sync_batchnorm)
from models import build_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    d = Dist(rank, 2)
    torch.manual_seed(0)
    model = sync_batchnorm(build_model("resnet32", 10), torch.device("cpu"))
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = _batch()
    nn.functional.cross_entropy(ddp(x[d.shard(8)]), y[d.shard(8)]).backward()
    rows = gather_rows(torch.arange(7.0)[d.shard(7)][:, None] * 10, d)  # shards of 4 and 3 rows
    sums = sum_over_ranks([1.0, float(rank)], d)
    if rank == 1:
        torch.save({"grads": {k: p.grad for k, p in model.named_parameters()}, "rows": rows, "sums": sums,
                    "running_mean": model.bn1.running_mean.clone(),
                    "global_bn": sum(isinstance(m, GlobalBatchNorm2d) for m in model.modules())}, out)
    dist.destroy_process_group()


def test_two_ranks_with_global_batchnorm_take_the_gradient_of_the_whole_batch(tmp_path):
    torch.manual_seed(0)
    reference = build_model("resnet32", 10)
    x, y = _batch()
    nn.functional.cross_entropy(reference(x), y).backward()
    out = tmp_path / "rank1.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2)
    got = torch.load(out)
    assert got["global_bn"] == 31  # every BatchNorm of ResNet-32
    for name, p in reference.named_parameters():  # fp32 noise of one model is about 3e-6 of the largest
        assert (got["grads"][name] - p.grad).abs().max() <= 2e-5 * p.grad.abs().max(), name
    torch.testing.assert_close(got["running_mean"], reference.bn1.running_mean, rtol=1e-5, atol=1e-6)
    assert got["rows"].flatten().tolist() == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0] and got["sums"] == [2.0, 1.0]


@pytest.mark.parametrize("n, world", [(7, 2), (10, 3), (2, 4)])
def test_shards_are_contiguous_disjoint_and_cover_everything(n, world):
    shards = [list(range(n))[Dist(r, world).shard(n)] for r in range(world)]
    assert sum(shards, []) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_in_one_process_nothing_is_gathered_and_batchnorm_is_plain():
    local = torch.arange(5.0)
    assert gather_rows(local, Dist()) is local and sum_over_ranks([3.0], Dist()) == [3.0]
    bn = GlobalBatchNorm2d(3).train()
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(bn(x), nn.BatchNorm2d(3).train()(x))


def test_several_processes_on_mps_are_refused_before_any_process_group(monkeypatch):
    """The collective backends move CUDA (nccl) and CPU (gloo) tensors: under torchrun, train.device=mps
    stops with a line naming the devices that work, before the process group would wait for other ranks."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DeviceError, match="several processes run on CUDA \\(nccl\\) or the CPU \\(gloo\\) only"):
        init_distributed("mps", 5.0)
    assert not dist.is_initialized()
