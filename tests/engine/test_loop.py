"""engine.loop.train_one_epoch: gradient accumulation, mixed precision, micro-batches."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from engine.loop import micro_batch_sizes, predict_logits, train_one_epoch


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


@pytest.mark.parametrize("mixup", [0.0, 0.4])
@pytest.mark.parametrize("loss, params", [("ldam", {"drw_epoch": 0}), ("ldam", {}), ("arb", {}), ("reweight", {}),
                                          ("class_balanced", {})])
def test_accumulation_takes_the_whole_batch_s_step_with_a_weighted_loss(loss, params, mixup):
    """LDAM with DRW divides the batch's weighted loss by the batch's sum of weights, not by its number of
    images, and ARB shifts the logits by the batch's class counts: each micro-batch's loss carries its part
    of the whole batch's loss, so the step, and the reported loss, are the whole batch's."""
    from models.losses import build_loss

    loss_fn = build_loss(loss, [500, 100, 20], **params)
    loss_fn.set_epoch(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 2, 2, generator=g), torch.tensor([0] * 10 + [1] * 4 + [2] * 2)[torch.randperm(
        16, generator=g)]) for _ in range(2)]
    torch.manual_seed(0)
    whole = Tiny()
    split = copy.deepcopy(whole)
    out = []
    for model, accum in ((whole, 1), (split, 4)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        out.append(train_one_epoch(model, batches, 2, loss_fn, opt, sched, mixup_alpha=mixup,
                                   mixup_rng=np.random.default_rng(1), accum_steps=accum))
    for p, q in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert out[0]["loss"] == pytest.approx(out[1]["loss"], rel=1e-6)


@pytest.mark.parametrize("batch, accum_steps, sizes", [
    (3, 4, [3]),  # too small to split
    (7, 4, [3, 2, 2]),  # torch.chunk would cut 3, 3, 1
    (13, 4, [4, 3, 3, 3]),  # torch.chunk: 4, 4, 4, 1
    (57, 8, [8, 7, 7, 7, 7, 7, 7, 7]),  # an epoch's last 57 images of batch 512 with 8 micro-batches
    (512, 8, [64] * 8),
])
def test_no_micro_batch_has_one_image(batch, accum_steps, sizes):
    """BatchNorm cannot normalise one image in training: the micro-batches differ by at most one image."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(len(o)))
    out = _train(model, _batches(n_batches=1, batch=batch), accum_steps=accum_steps)
    assert seen == sizes and np.isfinite(out["loss"])
    assert micro_batch_sizes(batch, accum_steps) == set(sizes)  # what a compiled model compiles for


def test_an_epoch_stopped_in_its_last_step_reports_that_step_s_lr_when_resumed():
    """A run stopped by a signal in an epoch's last step resumes with no step left of it (the optimiser and
    scheduler loaded from last.pt): the epoch's metrics are the uninterrupted epoch's, lr included (the lr of
    its last step, not the next step's)."""
    def setup():
        torch.manual_seed(0)
        model = Tiny()
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))

    model, opt, sched = setup()
    whole = train_one_epoch(model, _batches(), 3, nn.CrossEntropyLoss(), opt, sched)
    model, opt, sched = setup()
    stops = iter([False, False, True])
    stopped = train_one_epoch(model, _batches(), 3, nn.CrossEntropyLoss(), opt, sched, stop=lambda: next(stops))
    saved = opt.state_dict(), sched.state_dict()
    model, opt, sched = setup()  # --resume: new ones, loaded from last.pt
    opt.load_state_dict(saved[0])
    sched.load_state_dict(saved[1])
    resumed = train_one_epoch(model, [], 0, nn.CrossEntropyLoss(), opt, sched, carry=stopped["sums"])
    assert stopped["steps"] == 3 and resumed["steps"] == 0 and whole["lr"] == 0.5 / 3
    assert {k: resumed[k] for k in ("loss", "train_acc", "lr")} == {k: whole[k] for k in ("loss", "train_acc", "lr")}


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


def test_a_loss_scaler_changes_no_step_and_grows_its_scale_after_each_finite_one():
    """scaler.step unscales the gradients (by a power of two: exactly) before the optimiser's step, and
    scaler.update doubles the scale after every finite step with growth_interval 1: 2**10 -> 2**13 in 3 steps."""
    torch.manual_seed(0)
    plain = Tiny()
    scaled = copy.deepcopy(plain)
    _train(plain, _batches())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    _train(scaled, _batches(), scaler=scaler)
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    assert scaler.get_scale() == 2.0**13


def test_under_bf16_autocast_the_loss_gets_float32_logits():
    # The loss (log-softmax, its sums) runs in fp32 whatever precision the forward pass ran in.
    class RecordingCE(nn.Module):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def forward(self, logits, labels):
            self.dtypes.append(logits.dtype)
            return nn.functional.cross_entropy(logits, labels)

    torch.manual_seed(0)
    model = Tiny()
    loss_fn = RecordingCE()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_one_epoch(model, _batches(), 3, loss_fn, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                    amp="bf16")
    assert loss_fn.dtypes == [torch.float32] * 3


def test_a_nan_loss_on_the_cpu_stops_the_epoch_before_its_optimiser_step():
    torch.manual_seed(0)
    model = Tiny()
    before = copy.deepcopy(model.state_dict())
    bad = [(torch.full((8, 3, 2, 2), float("nan")), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(FloatingPointError, match=r"^train, step 1: the loss became NaN or infinite"):
        _train(model, bad)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize("accum_steps", [1, 4])
def test_the_nan_check_reads_the_device_once_a_checked_step_whatever_its_micro_batches(monkeypatch, accum_steps):
    """On an accelerator each read waits for it: a checked step (every step on the CPU) reads its finiteness once
    after its micro-batches, not once per micro-batch (before 2026-12-07, accum_steps reads)."""
    reads, as_bool = [], torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(t.shape) or as_bool(t))
    torch.manual_seed(0)
    _train(Tiny(), _batches(n_batches=3), accum_steps=accum_steps)
    assert len(reads) == 3


def _fixed_epoch(model, batches, loss_fn, **kwargs):
    """train_one_epoch at lr 0 (plain SGD): the model the metrics are taken with is `model` throughout."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return train_one_epoch(model, batches, len(batches), loss_fn, opt,
                           torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), **kwargs)


def test_the_epoch_metrics_are_the_image_weighted_means_of_the_steps():
    """Batches of 6 and 2 images: the epoch's loss and accuracy are sums over its 8 images divided by 8, not the
    mean of the two steps' means (which differ here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    batches = [_batches(n_batches=1, batch=6, seed=1)[0], _batches(n_batches=1, batch=2, seed=2)[0]]
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(model(x), y, reduction="none").tolist() for x, y in batches]
        correct = [(model(x).argmax(1) == y).tolist() for x, y in batches]
    assert [sum(c) for c in correct] == [2, 0]  # accuracy 2 / 8 by images, (2/6 + 0/2) / 2 by steps
    step_means = [sum(v) / len(v) for v in losses]
    expected_loss = sum(losses[0] + losses[1]) / 8
    assert abs(expected_loss - sum(step_means) / 2) > 0.01  # far beyond the tolerance below
    out = _fixed_epoch(model, batches, nn.CrossEntropyLoss())
    assert out["loss"] == pytest.approx(expected_loss, rel=1e-6) and out["train_acc"] == 2 / 8
    assert isinstance(out["loss"], float) and isinstance(out["train_acc"], float) and out["steps"] == 2


def _balanced_softmax_formula(logits, y, counts):
    """Balanced softmax written out: the mean cross-entropy of logits + log(n_c)."""
    return nn.functional.cross_entropy(logits + torch.tensor(counts, dtype=torch.float32).log(), y)


@pytest.mark.parametrize("loss", ["ce", "balanced_softmax"])
def test_mixup_loss_is_lam_times_the_loss_of_y_plus_1_minus_lam_times_that_of_the_permuted_y(loss):
    """Each batch: lam ~ Beta(a, a), then a permutation, drawn in that order from mixup_rng; the images are
    lam * x + (1 - lam) * x[perm], the loss lam * L(y) + (1 - lam) * L(y[perm]) and the accuracy counts
    lam * [pred = y] + (1 - lam) * [pred = y[perm]]; all redrawn and computed here from an identical generator."""
    from models.losses import build_loss

    counts = [50, 10, 3]
    loss_fn, formula = ((nn.CrossEntropyLoss(), nn.functional.cross_entropy) if loss == "ce" else
                        (build_loss(loss, counts), lambda z, y: _balanced_softmax_formula(z, y, counts)))
    torch.manual_seed(0)
    model = Tiny()
    batches = [_batches(n_batches=1, batch=8, seed=1)[0], _batches(n_batches=1, batch=4, seed=2)[0]]
    rng, loss_sum, correct_sum, lams = np.random.default_rng(7), 0.0, 0.0, []
    for x, y in batches:
        lam = float(rng.beta(0.4, 0.4))
        perm = torch.from_numpy(rng.permutation(len(y)))
        with torch.no_grad():
            logits = model(lam * x + (1 - lam) * x[perm])
        loss_sum += len(y) * float(lam * formula(logits, y) + (1 - lam) * formula(logits, y[perm]))
        pred = logits.argmax(1)
        correct_sum += lam * float((pred == y).sum()) + (1 - lam) * float((pred == y[perm]).sum())
        lams.append(lam)
    assert all(abs(lam - 0.5) > 0.1 for lam in lams)  # swapping lam and 1 - lam would change the loss
    out = _fixed_epoch(model, batches, loss_fn, mixup_alpha=0.4, mixup_rng=np.random.default_rng(7))
    assert out["loss"] == pytest.approx(loss_sum / 12, rel=1e-6)
    assert out["train_acc"] == pytest.approx(correct_sum / 12, rel=1e-6)  # lam * count: float32


@pytest.mark.parametrize("sampler, loss, mixup_alpha, accum_steps", [
    ("instance", "ce", 0.0, 1), ("class_balanced", "arb", 0.0, 1), ("sqrt", "ldam", 0.4, 2),
    ("oversample", "class_balanced", 0.0, 2)])
def test_a_training_epoch_reads_nothing_back_from_the_device_until_it_ends(
        no_float64_on_meta, sampler, loss, mixup_alpha, accum_steps):
    """On the meta device every read of a device value on the host (item, bool, nonzero) raises, so
    an epoch of loader (each sampler's draws), crop + flip + AutoAugment + Cutout, normalisation, ResNet
    step (mixup, micro-batches), the loss and SGD that reaches its end-of-epoch sums never waited on a
    device value. (Blocking host-to-device copies also make a GPU wait; tests/test_gpu_pipeline.py
    counts those on CUDA.)"""
    from data.augment import CIFAR10_MEAN, CIFAR10_STD, BatchAugment
    from data.loader import BatchLoader
    from data.samplers import build_sampler
    from models import build_model
    from models.losses import build_loss

    labels = torch.arange(256) % 10
    images = torch.empty(256, 3, 32, 32, dtype=torch.uint8, device="meta")
    loader = BatchLoader(images, labels.to("meta"), 64, build_sampler(sampler, labels, 10),
                         BatchAugment(4, True, True, 16), CIFAR10_MEAN, CIFAR10_STD, 0, channels_last=True)
    model = build_model("resnet32", 10).to("meta")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss_fn = build_loss(loss, torch.bincount(labels, minlength=10)).to("meta")
    with pytest.raises(RuntimeError, match="meta tensor"):  # the one read: the epoch's sums at its end
        train_one_epoch(model, loader.epoch(0), len(loader), loss_fn, opt, sched, mixup_alpha=mixup_alpha,
                        mixup_rng=np.random.default_rng(0), accum_steps=accum_steps, amp="off")
    assert sched.last_epoch == len(loader) >= 4  # every step ran before the first read


def test_evaluation_makes_no_float64_tensor_on_the_device(no_float64_on_meta):
    """MPS (Apple GPUs) has no float64 (the meta device stands in for it): batches, normalisation and
    forward passes of an evaluation stay float32 there; the one copy back of the logits is their end."""
    from data.augment import CIFAR10_MEAN, CIFAR10_STD
    from models import build_model

    model = build_model("resnet32", 10).to("meta")
    images = torch.zeros(40, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(NotImplementedError, match="meta tensor"):  # the logits' copy to the host
        predict_logits(model, images, 16, CIFAR10_MEAN, CIFAR10_STD, channels_last=True)


def _fp16_epoch(fused, batches, scaler):
    """(model, optimiser, metrics, reads) of an fp16 epoch of Tiny with stage 1's SGD (momentum, weight decay,
    Nesterov) and a GradScaler on the CPU, counting the reads of a tensor's value on the host (Tensor.item)."""
    from engine.schedule import sgd_with_schedule

    torch.manual_seed(0)
    model = Tiny()
    opt, sched, _ = sgd_with_schedule(model.parameters(), len(batches), 0.5, 0.9, 5e-4, True, 1, 0, 0, "cosine",
                                      (), 0.1, fused=fused)
    reads, item = [], torch.Tensor.item

    def counted_item(t):
        reads.append(t)
        return item(t)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "item", counted_item)
        out = train_one_epoch(model, batches, len(batches), nn.CrossEntropyLoss(), opt, sched, amp="fp16",
                              scaler=scaler)
    return model, opt, out, len(reads)


def test_an_fp16_epoch_with_the_fused_sgd_reads_no_overflow_flag_back_and_takes_the_plain_steps():
    """With a plain SGD, GradScaler reads each step's overflow flag back to the host (on a GPU, a wait a
    step); the fused SGD stage 1 makes for fp16 takes the flag on the device, and the same steps."""
    plain, _, out_plain, reads_plain = _fp16_epoch(False, _batches(), torch.amp.GradScaler("cpu", init_scale=2.0**10))
    fused, _, out_fused, reads_fused = _fp16_epoch(True, _batches(), torch.amp.GradScaler("cpu", init_scale=2.0**10))
    assert reads_plain == 3 and reads_fused == 0
    for p, q in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    assert out_fused["loss"] == pytest.approx(out_plain["loss"], rel=1e-6)


@pytest.fixture
def nan_empty_like(monkeypatch):
    """torch.empty_like filled with NaN (uninitialised memory may hold anything), so that a buffer read before it
    is written shows whatever the allocator happens to hand out."""
    empty_like = torch.empty_like

    def nan_filled(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty_like", nan_filled)


# torch warns that the schedule stepped past a step the plain SGD skipped: a skipped step is what this test makes.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_after_fp16_steps_skipped_for_overflow_the_fused_sgd_takes_the_plain_steps(nan_empty_like):
    """At a scale of 2**24 the first steps' fp16 gradients overflow (max 65504) and are skipped, each halving
    the scale, as at the start of an fp16 run; the fused step must leave weights and momentum as a skipped
    plain step does (torch's fused SGD alone would take the first finite step from uninitialised momentum)."""
    _, skipped, _, _ = _fp16_epoch(True, _batches(2), torch.amp.GradScaler("cpu", init_scale=2.0**40))
    assert all(torch.equal(s["momentum_buffer"], torch.zeros_like(p)) for p, s in skipped.state.items())
    batches = _batches(8)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=1000) for _ in range(2)]
    plain, _, _, _ = _fp16_epoch(False, batches, scalers[0])
    fused, _, _, _ = _fp16_epoch(True, batches, scalers[1])
    assert 2.0**16 <= scalers[1].get_scale() <= 2.0**22 and scalers[0].get_scale() == scalers[1].get_scale()
    torch.manual_seed(0)
    for p, q, start in zip(plain.parameters(), fused.parameters(), Tiny().parameters()):
        assert torch.isfinite(q).all() and not torch.equal(q, start)
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
