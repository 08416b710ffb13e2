"""engine.distributed on two real gloo processes: sharding, gathering, BatchNorm over the global batch."""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from engine.device import DeviceError
from engine.distributed import (Dist, GlobalBatchNorm2d, check_same_on_ranks, gather_rows, init_distributed,
                                  sum_over_ranks, sync_batchnorm)
from engine.loop import evaluate, predict_all_ranks, train_one_epoch
from models import build_model


def _join(rank: int, store: str) -> None:
    """Join the two-process gloo group through a file, not a port: a free port picked here could be taken by
    another test's job before the workers bind it (xdist runs two at a time)."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))


def _batch():
    """8 images of 16 x 16 (ResNet-32 pools whatever size it is given; float64 convolutions are slow)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


def _resnet32_float64() -> nn.Module:
    """ResNet-32 in float64: fp32 convolution algorithms (oneDNN's or not, by CPU) already move a fresh
    ResNet-32's gradients by up to 2e-3 of the largest, too close to the 1e-2 a BatchNorm of half the
    batch moves them; in float64 the two ranks are 3e-8 apart (GlobalBatchNorm2d's one-pass variance)."""
    torch.manual_seed(0)
    return build_model("resnet32", 10).double()


def _worker(rank: int, store: str, out: str) -> None:
    _join(rank, store)
    torch.set_num_threads(1)
    d = Dist(rank, 2)
    model = sync_batchnorm(_resnet32_float64(), torch.device("cpu"))
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = _batch()
    x = x.double()
    nn.functional.cross_entropy(ddp(x[d.shard(8)]), y[d.shard(8)]).backward()
    rows = gather_rows(torch.arange(7.0)[d.shard(7)][:, None] * 10, d)  # shards of 4 and 3 rows
    sums = sum_over_ranks([1.0, float(rank)], d)
    check_same_on_ranks({"head": model.head}, d)  # the same weights on both: no error
    head = nn.Linear(2, 2)
    nn.init.constant_(head.weight, float(rank))
    try:
        check_same_on_ranks({"head": head}, d)
        differ = ""
    except RuntimeError as e:
        differ = str(e)
    if rank == 1:
        torch.save({"grads": {k: p.grad for k, p in model.named_parameters()}, "rows": rows, "sums": sums,
                    "running_mean": model.bn1.running_mean.clone(), "running_var": model.bn1.running_var.clone(),
                    "global_bn": sum(isinstance(m, GlobalBatchNorm2d) for m in model.modules()), "differ": differ}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_with_global_batchnorm_take_the_gradient_of_the_whole_batch(tmp_path):
    reference = _resnet32_float64()
    x, y = _batch()
    nn.functional.cross_entropy(reference(x.double()), y).backward()
    out = tmp_path / "rank1.pt"
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2)
    got = torch.load(out)
    assert got["global_bn"] == 31  # every BatchNorm of ResNet-32
    for name, p in reference.named_parameters():
        assert (got["grads"][name] - p.grad).abs().max() <= 1e-6 * p.grad.abs().max(), name
    torch.testing.assert_close(got["running_mean"], reference.bn1.running_mean.float(), rtol=1e-6, atol=1e-9)
    # the running variance is the whole batch's unbiased one (n / (n - 1) over all 8 x 16 x 16 values)
    torch.testing.assert_close(got["running_var"], reference.bn1.running_var.float(), rtol=1e-6, atol=1e-9)
    assert got["rows"].flatten().tolist() == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0] and got["sums"] == [2.0, 1.0]
    assert got["differ"] == ("rank 1's head differ from rank 0's by up to 1: the ranks no longer train the same "
                             "model")


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


MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class _Images(torch.utils.data.Dataset):
    """An image-file dataset's items: (normalised image, label)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return (self.images[i].float() / 255 - MEAN[0]) / STD[0], 0


def _one_image_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    return model, torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)


def _evaluate_worker(rank: int, store: str, out: str, files: bool) -> None:
    _join(rank, store)
    torch.set_num_threads(1)
    d = Dist(rank, 2)
    model, images = _one_image_setup()
    split = _Images(images) if files else images
    logits = predict_all_ranks(model, split, 8, MEAN, STD, d=d)
    top1 = evaluate(model, split, torch.tensor([1]), [200, 50, 5], 8, MEAN, STD, d=d)["top1"]
    torch.save({"logits": logits, "top1": top1}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("files", [False, True], ids=["uint8 images", "image files"])
def test_two_ranks_evaluating_one_image_give_the_single_process_logits(tmp_path, files):
    """Rank 1's shard of one image is empty: its (0, 3) logits have the width rank 0's have, so the
    gather does not abort and both ranks get the single-process logits."""
    model, images = _one_image_setup()
    single = predict_all_ranks(model, _Images(images) if files else images, 8, MEAN, STD)
    out = tmp_path / "rank"
    mp.spawn(_evaluate_worker, args=(str(tmp_path / "store"), str(out), files), nprocs=2)
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}")
        assert got["logits"].shape == (1, 3) and torch.equal(got["logits"], single)
        assert got["top1"] == float(single.argmax(1) == 1)


def _weighted_setup(loss_name: str, params: dict):
    """A model without BatchNorm, a batch-dependent loss and two global batches of 16 (10/4/2 images a class)."""
    from models.losses import build_loss

    loss_fn = build_loss(loss_name, [500, 100, 20], **params)
    loss_fn.set_epoch(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 12, generator=g),
                torch.tensor([0] * 10 + [1] * 4 + [2] * 2)[torch.randperm(16, generator=g)]) for _ in range(2)]
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)), loss_fn, batches


def _train_weighted(model, loss_fn, batches, d: Dist) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return train_one_epoch(model, batches, len(batches), loss_fn, opt, sched, d=d)


def _weighted_worker(rank: int, store: str, out: str, loss_name: str, params: dict) -> None:
    _join(rank, store)
    torch.set_num_threads(1)
    d = Dist(rank, 2)
    model, loss_fn, batches = _weighted_setup(loss_name, params)
    ddp = nn.parallel.DistributedDataParallel(model)
    shares = [(x[d.shard(16)], y[d.shard(16)]) for x, y in batches]  # as the loaders share a global batch
    metrics = _train_weighted(ddp, loss_fn, shares, d)
    torch.save({"weights": [p.detach() for p in model.parameters()], "loss": metrics["loss"]}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("loss_name, params", [("ldam", {"drw_epoch": 0}), ("arb", {})])
def test_two_ranks_take_the_one_process_step_of_a_loss_that_looks_at_the_whole_batch(tmp_path, loss_name, params):
    """LDAM with DRW divides by the batch's sum of weights and arb shifts by the batch's class counts: each
    rank's half alone would give another loss, and DDP's mean of the two another step, than one process."""
    model, loss_fn, batches = _weighted_setup(loss_name, params)
    single = _train_weighted(model, loss_fn, batches, Dist())
    out = tmp_path / "rank"
    mp.spawn(_weighted_worker, args=(str(tmp_path / "store"), str(out), loss_name, params), nprocs=2)
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}")
        for p, q in zip(model.parameters(), got["weights"]):
            torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-6)
        assert got["loss"] == pytest.approx(single["loss"], rel=1e-5)


def _download_worker(rank: int, store: str, folder: str) -> None:
    """Each rank 'downloads' unless the file is there, as load_cifar(download=True) does, taking 0.5 s to write."""
    import time
    from pathlib import Path

    from engine.distributed import local_rank0_first
    _join(rank, store)

    def make() -> str:
        archive = Path(folder) / "archive"
        if archive.exists():
            return archive.read_text()
        (Path(folder) / f"downloaded_by_{rank}").touch()
        time.sleep(0.5)
        archive.write_text(f"from rank {rank}")
        return archive.read_text()
    assert local_rank0_first(make, Dist(rank=rank, world=2, local_rank=rank)) == "from rank 0"
    dist.destroy_process_group()


def test_a_download_is_made_by_a_machine_s_local_rank_0_before_its_other_ranks_look(tmp_path):
    """data.download under torchrun: every process fetched the archive into the same folder at once."""
    (tmp_path / "data").mkdir()
    mp.spawn(_download_worker, args=(str(tmp_path / "store"), str(tmp_path / "data")), nprocs=2)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["archive", "downloaded_by_0"]
