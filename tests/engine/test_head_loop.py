"""Stage-2 head loop: plain index batches and the BALMS meta-sampler path, on synthetic features."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine.head_loop
from engine.head_loop import MetaSampling, train_head_epoch
from meta_sampler.learner import ClassSampler
from models.heads import CosineLinear, ScaledLinear
from models.losses import build_loss


def _blobs(per_class=(100, 100, 100), seed=0):
    """Gaussian blobs (std 0.5) around (3, 0), (-3, 0), (0, 3): linearly separable."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    feats, labels = [], []
    for c, n in enumerate(per_class):
        feats.append(centres[c] + 0.5 * torch.randn(n, 2, generator=g))
        labels.append(torch.full((n,), c, dtype=torch.int64))
    return torch.cat(feats), torch.cat(labels)


def _constant_lr(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _batches(n, batch_size, seed):
    return list(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).split(batch_size))


def copy_params(module):
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def _plain_setup(seed=0, lr=0.5):
    torch.manual_seed(seed)
    feats, labels = _blobs()
    head = nn.Linear(2, 3)
    opt = torch.optim.SGD(head.parameters(), lr=lr)
    return feats, labels, head, opt, _constant_lr(opt)


# ---------------------------------------------------------------- plain sampling


def test_plain_sampling_learns_separable_blobs():
    feats, labels, head, opt, sched = _plain_setup()
    with torch.no_grad():
        loss_before = F.cross_entropy(head(feats), labels).item()
    records = []
    for epoch in range(5):
        records.append(train_head_epoch(head, opt, sched, nn.CrossEntropyLoss(), labels,
                                        lambda idx, gen: feats[idx], 10, 30, torch.Generator().manual_seed(epoch),
                                        index_batches=_batches(300, 30, epoch)))
    with torch.no_grad():
        logits = head(feats)
    assert F.cross_entropy(logits, labels).item() < 0.2 * loss_before
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["train_acc"] > 0.95
    assert (logits.argmax(1) == labels).float().mean().item() > 0.95


@pytest.mark.parametrize("kind", ["linear", "cosine", "lws"])
def test_a_plain_head_epoch_reads_nothing_back_from_the_device_until_it_ends(no_float64_on_meta, kind):
    """On the meta device every read of a device value on the host raises: an epoch of cached-feature
    batches, head steps (each head kind of stage 2) and their sums that reaches its end never waited for
    the device (on a GPU the losses are checked for NaN every FINITE_CHECK_EVERY steps, here more than
    the epoch has)."""
    feats, labels = _blobs()
    head = {"linear": lambda: nn.Linear(2, 3), "cosine": lambda: CosineLinear(2, 3),
            "lws": lambda: ScaledLinear(nn.Linear(2, 3))}[kind]().to("meta")
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    sched = _constant_lr(opt)
    on_meta = feats.to("meta")
    with pytest.raises(RuntimeError, match="meta tensor"):  # the one read: the epoch's sums at its end
        train_head_epoch(head, opt, sched, nn.CrossEntropyLoss(), labels, lambda idx, gen: on_meta[idx], 10, 30,
                         torch.Generator().manual_seed(0), index_batches=_batches(300, 30, 0))
    assert sched.last_epoch == 10  # every step ran before the first read


def test_plain_sampling_takes_exactly_steps_optimiser_steps():
    feats, labels, head, opt, sched = _plain_setup()
    consumed = []

    def batches():
        for b in _batches(300, 30, 0):  # 10 available
            consumed.append(b)
            yield b

    optimizer_steps = []
    opt.register_step_post_hook(lambda optimizer, args, kwargs: optimizer_steps.append(1))
    train_head_epoch(head, opt, sched, nn.CrossEntropyLoss(), labels, lambda idx, gen: feats[idx], 7, 30,
                     torch.Generator().manual_seed(0), index_batches=batches())
    assert sched.last_epoch == 7
    assert len(optimizer_steps) == 7
    assert len(consumed) == 7


def test_plain_sampling_with_fewer_batches_than_steps_is_a_clear_error():
    feats, labels, head, opt, sched = _plain_setup()
    with pytest.raises(ValueError, match="index_batches ran out before 11 steps"):
        train_head_epoch(head, opt, sched, nn.CrossEntropyLoss(), labels, lambda idx, gen: feats[idx], 11, 30,
                         torch.Generator().manual_seed(0), index_batches=_batches(300, 30, 0))


def test_plain_sampling_reports_sample_weighted_loss_and_accuracy_of_the_batches_seen():
    # lr 0: the head is fixed at w = [[1, 0], [-1, 0]], b = 0, so predictions are sign(x0).
    labels = torch.tensor([0, 0, 1, 1, 0])
    feats = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [-1.0, 0.0], [3.0, 0.0], [0.5, 0.0]])
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=0.0)
    batches = [torch.tensor([0, 1, 2]), torch.tensor([3, 4])]
    out = train_head_epoch(head, opt, _constant_lr(opt), nn.CrossEntropyLoss(), labels,
                           lambda idx, gen: feats[idx], 2, 3, torch.Generator(), index_batches=batches)
    # logits (x0, -x0); CE of a 2-class margin m = z_y - z_other is log(1 + exp(-m)).
    # samples: m = 2, -4, 2, -6, 1 -> predictions right, wrong, right, wrong, right
    per_sample = [math.log1p(math.exp(-m)) for m in (2.0, -4.0, 2.0, -6.0, 1.0)]
    assert out["loss"] == pytest.approx(sum(per_sample) / 5, rel=1e-6)
    assert out["train_acc"] == pytest.approx(3 / 5)
    assert out["lr"] == 0.0
    assert "meta_loss" not in out


def test_reported_lr_is_the_lr_of_the_last_step_taken():
    feats, labels, head, opt, _ = _plain_setup()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    out = train_head_epoch(head, opt, sched, nn.CrossEntropyLoss(), labels, lambda idx, gen: feats[idx], 4, 30,
                           torch.Generator(), index_batches=_batches(300, 30, 0))
    assert out["lr"] == pytest.approx(0.5 / 4)  # steps 0..3 use lr 0.5 / (s + 1)


def test_an_epoch_stopped_in_its_last_step_reports_that_step_s_lr_when_resumed():
    """A run stopped by a signal in an epoch's last step resumes with no step left of it (the optimiser and
    scheduler loaded from last.pt): the epoch's metrics are the uninterrupted epoch's, lr included (the lr of
    its last step, not the next step's)."""
    feats, labels, head, opt, _ = _plain_setup()
    start = copy_params(head)

    def epoch(steps, batches, sched, **kwargs):
        return train_head_epoch(head, opt, sched, nn.CrossEntropyLoss(), labels, lambda idx, gen: feats[idx], steps,
                                30, torch.Generator(), index_batches=batches, **kwargs)

    whole = epoch(4, _batches(300, 30, 0), torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1)))
    with torch.no_grad():
        for k, p in head.named_parameters():
            p.copy_(start[k])
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    stops = iter([False, False, False, True])
    stopped = epoch(4, _batches(300, 30, 0), sched, stop=lambda: next(stops))
    saved = opt.state_dict(), sched.state_dict()
    opt = torch.optim.SGD(head.parameters(), lr=0.5)  # --resume: new ones, loaded from last.pt
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    opt.load_state_dict(saved[0])
    sched.load_state_dict(saved[1])
    resumed = epoch(0, [], sched, carry=stopped["sums"])
    assert stopped["steps"] == 4 and resumed["steps"] == 0 and whole["lr"] == 0.5 / 4
    assert {k: resumed[k] for k in ("loss", "train_acc", "lr")} == {k: whole[k] for k in ("loss", "train_acc", "lr")}


def test_a_resumed_balms_epoch_counts_the_carried_sums_of_its_steps_before_the_stop():
    """carry = (loss, correct, images, meta loss) sums of the steps taken before a stop: an epoch resumed with no
    step left reports them as they are, meta loss included."""
    feats, labels = _blobs(per_class=(60, 20, 10))
    head = nn.Linear(2, 3)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    sampler = ClassSampler(labels, 3)
    features = lambda idx, gen: feats[idx]  # noqa: E731
    meta = MetaSampling(sampler, torch.optim.Adam(sampler.parameters(), lr=0.05), labels, features, 6, 1.0)
    loss_fn = build_loss("balanced_softmax", [60, 20, 10], reduction="none")
    out = train_head_epoch(head, opt, _constant_lr(opt), loss_fn, labels, features, 0, 8, torch.Generator(),
                           meta=meta, carry=(3.0, 6.0, 8, 10.0))
    assert (out["loss"], out["train_acc"], out["meta_loss"], out["sums"]) == (0.375, 0.75, 1.25, [3.0, 6.0, 8, 10.0])


@pytest.mark.parametrize("which", ["both", "neither"])
def test_giving_both_or_neither_of_index_batches_and_meta_raises(which):
    feats, labels, head, opt, sched = _plain_setup()
    sampler = ClassSampler(labels, 3)
    meta = MetaSampling(sampler, torch.optim.Adam(sampler.parameters(), lr=0.05), labels,
                        lambda idx, gen: feats[idx], 6, 1.0)
    kwargs = {"index_batches": _batches(300, 30, 0), "meta": meta} if which == "both" else {}
    with pytest.raises(ValueError, match="exactly one"):
        train_head_epoch(head, opt, sched, nn.CrossEntropyLoss(), labels, lambda idx, gen: feats[idx], 1, 30,
                         torch.Generator(), **kwargs)
    assert sched.last_epoch == 0


# ---------------------------------------------------------------- BALMS meta-sampling


def test_a_balms_epoch_with_the_sampler_on_the_device_reads_nothing_back_until_it_ends(no_float64_on_meta):
    """As the plain epoch above, with the BALMS path: class and image draws (uniforms from the CPU
    generator, copied over), features, labels, the look-ahead step through higher, the meta-gradient,
    the sampler's and the head's updates all stay on the device; every step runs before the first read."""
    feats, labels = _blobs()
    head = nn.Linear(2, 3).to("meta")
    opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
    sched = _constant_lr(opt)
    sampler = ClassSampler(labels, 3).to("meta")
    on_meta = feats.to("meta")
    features = lambda idx, gen: on_meta[idx]  # noqa: E731
    meta = MetaSampling(sampler, torch.optim.Adam(sampler.parameters(), lr=0.05), labels, features, 16, 1.0)
    loss_fn = build_loss("balanced_softmax", [100, 100, 100], reduction="none").to("meta")
    with pytest.raises(RuntimeError, match="meta tensor"):  # the one read: the epoch's sums at its end
        train_head_epoch(head, opt, sched, loss_fn, labels, features, 10, 30, torch.Generator().manual_seed(0),
                         meta=meta)
    assert sched.last_epoch == 10


def test_meta_sampling_returns_finite_meta_loss_and_updates_theta_and_head():
    torch.manual_seed(0)
    counts = [300, 15]
    feats, labels = _blobs(per_class=(300, 15, 0))
    head = nn.Linear(2, 2)
    head_before = copy_params(head)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    sched = _constant_lr(opt)
    sampler = ClassSampler(labels, 2)
    theta_before = sampler.theta.detach().clone()
    features = lambda idx, gen: feats[idx]  # noqa: E731
    meta = MetaSampling(sampler, torch.optim.Adam(sampler.parameters(), lr=0.05), labels, features, 16, 1.0)
    loss_fn = build_loss("balanced_softmax", counts, reduction="none")

    out = train_head_epoch(head, opt, sched, loss_fn, labels, features, 5, 32, torch.Generator().manual_seed(1),
                           meta=meta)

    assert set(out) == {"loss", "train_acc", "lr", "meta_loss", "sample_probs", "steps", "sums"}
    assert out["sample_probs"] == pytest.approx(sampler.class_probs().tolist()) and len(out["sample_probs"]) == 2
    assert math.isfinite(out["meta_loss"]) and out["meta_loss"] > 0
    assert math.isfinite(out["loss"])
    assert sched.last_epoch == 5
    assert not torch.equal(sampler.theta.detach(), theta_before)
    assert any(not torch.equal(p, head_before[k]) for k, p in head.named_parameters())


def test_the_epoch_meta_loss_is_the_image_weighted_mean_of_the_steps_meta_losses(monkeypatch):
    recorded = []

    def recording_meta_step(*args, **kwargs):
        out = real_meta_step(*args, **kwargs)
        recorded.append(out["meta_loss"].item())
        return out

    real_meta_step = engine.head_loop.meta_step
    monkeypatch.setattr(engine.head_loop, "meta_step", recording_meta_step)
    torch.manual_seed(0)
    feats, labels = _blobs(per_class=(60, 20, 10))
    head = nn.Linear(2, 3)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    sampler = ClassSampler(labels, 3)
    features = lambda idx, gen: feats[idx]  # noqa: E731
    meta = MetaSampling(sampler, torch.optim.Adam(sampler.parameters(), lr=0.05), labels, features, 6, 1.0)
    loss_fn = build_loss("balanced_softmax", [60, 20, 10], reduction="none")
    out = train_head_epoch(head, opt, _constant_lr(opt), loss_fn, labels, features, 3, 8,
                           torch.Generator().manual_seed(2), meta=meta)
    # Every BALMS step has batch_size images, so the image-weighted mean is the mean over the 3 steps.
    assert len(recorded) == 3 and len(set(recorded)) == 3
    assert out["meta_loss"] == pytest.approx(sum(recorded) / 3, rel=1e-6)


# ---------------------------------------------------------------- training accuracy: before the step


def _wrong_head() -> nn.Linear:
    """Classes 0 and 1 at features (1, 0) and (0, 1); the head swaps them, so every prediction is wrong."""
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0, 5.0], [5.0, 0.0]]))
        head.bias.zero_()
    return head


@pytest.mark.parametrize("path", ["plain", "balms"])
def test_training_accuracy_is_that_of_the_head_before_its_step_on_both_paths(path):
    # One SGD step at lr 100 turns every prediction right; the accuracy reported is the pre-step 0.
    feats = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
    labels = torch.tensor([0] * 4 + [1] * 4)
    features = lambda idx, gen: feats[idx]  # noqa: E731
    head = _wrong_head()
    opt = torch.optim.SGD(head.parameters(), lr=100.0)
    gen = torch.Generator().manual_seed(0)
    if path == "plain":
        out = train_head_epoch(head, opt, _constant_lr(opt), nn.CrossEntropyLoss(), labels, features, 1, 8, gen,
                               index_batches=[torch.arange(8)])
    else:
        sampler = ClassSampler(labels, 2)
        meta = MetaSampling(sampler, torch.optim.Adam(sampler.parameters(), lr=0.05), labels, features, 4, 1.0)
        out = train_head_epoch(head, opt, _constant_lr(opt), build_loss("balanced_softmax", [4, 4], reduction="none"),
                               labels, features, 1, 8, gen, meta=meta)
    idx = torch.arange(8)
    if path == "balms":  # the same draw again: the batch the step was taken on
        redraw = torch.Generator().manual_seed(0)
        again = ClassSampler(labels, 2)
        idx = again.draw_images(again.sample_classes(8, redraw, 1.0)[0], redraw)
    assert out["train_acc"] == 0.0
    with torch.no_grad():
        assert (head(feats[idx]).argmax(1) == labels[idx]).all()  # the step fixed the batch's predictions


@pytest.mark.parametrize("path", ["plain", "balms"])
def test_a_loss_that_is_no_longer_finite_stops_the_head_loop(path):
    feats, labels, head, opt, sched = _plain_setup()
    broken = lambda idx, gen: feats[idx] * float("inf")  # noqa: E731  (inf features: nan logits)
    kwargs = {"index_batches": _batches(300, 30, 0)}
    loss_fn = nn.CrossEntropyLoss()
    if path == "balms":
        sampler = ClassSampler(labels, 3)
        adam = torch.optim.Adam(sampler.parameters(), lr=0.05)
        kwargs = {"meta": MetaSampling(sampler, adam, labels, broken, 6, 1.0)}
        loss_fn = build_loss("balanced_softmax", [100, 100, 100], reduction="none")
    with pytest.raises(FloatingPointError, match=r"^head, step 1: the head's loss became NaN or infinite"):
        train_head_epoch(head, opt, sched, loss_fn, labels, broken, 3, 30, torch.Generator().manual_seed(0), **kwargs)


def test_a_meta_loss_that_is_no_longer_finite_stops_the_balms_loop_naming_the_meta_sampler_keys():
    feats, labels, head, opt, sched = _plain_setup()
    sampler = ClassSampler(labels, 3)
    broken_meta = lambda idx, gen: feats[idx] * float("inf")  # noqa: E731  (the meta batch only)
    meta = MetaSampling(sampler, torch.optim.Adam(sampler.parameters(), lr=0.05), labels, broken_meta, 6, 1.0)
    loss_fn = build_loss("balanced_softmax", [100, 100, 100], reduction="none")
    with pytest.raises(FloatingPointError,
                       match=r"step 1: the head's meta loss became .* or meta_sampler.lr, or raise "
                             r"meta_sampler.gumbel_tau$"):
        train_head_epoch(head, opt, sched, loss_fn, labels, lambda idx, gen: feats[idx], 3, 30,
                         torch.Generator().manual_seed(0), meta=meta)


def test_balms_meta_batches_are_class_balanced_draws_from_the_meta_split(monkeypatch):
    """The meta split (90/5/5 images) is not the training set: each meta batch holds its features and labels
    (meta feature i is (7, i), and 7 appears in no training feature), about a third of each class."""
    batches = []
    step = engine.head_loop.meta_step

    def recorded(*args, **kwargs):  # args[7], args[8]: the meta batch's features and labels
        batches.append((args[7].clone(), args[8].clone()))
        return step(*args, **kwargs)
    monkeypatch.setattr(engine.head_loop, "meta_step", recorded)
    torch.manual_seed(0)
    labels = torch.repeat_interleave(torch.arange(3), torch.tensor([60, 20, 10]))
    feats = torch.randn(len(labels), 2)
    meta_labels = torch.repeat_interleave(torch.arange(3), torch.tensor([90, 5, 5]))
    meta_feats = torch.stack([torch.full((100,), 7.0), torch.arange(100.0)], 1)
    head = nn.Linear(2, 3)
    opt = torch.optim.SGD(head.parameters(), lr=0.01)
    sampler = ClassSampler(labels, 3)
    meta = MetaSampling(sampler, torch.optim.Adam(sampler.parameters(), lr=0.01), meta_labels,
                        lambda idx, gen: meta_feats[idx], 200, 1.0)
    train_head_epoch(head, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                     build_loss("balanced_softmax", [60, 20, 10], reduction="none"), labels,
                     lambda idx, gen: feats[idx], 3, 16, torch.Generator().manual_seed(0), meta=meta)
    x, y = (torch.cat(parts) for parts in zip(*batches))
    assert len(batches) == 3 and (x[:, 0] == 7.0).all() and torch.equal(y, meta_labels[x[:, 1].long()])
    assert torch.bincount(y, minlength=3).min() > 120  # 600 draws, 200 a class (uniform over images: ~540/30/30)
