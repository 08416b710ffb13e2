"""Learning-rate schedule: linear warm-up, cosine to zero, step milestones, validation, LambdaLR wiring."""
import math

import pytest
import torch

from engine.schedule import build_scheduler, lr_factor, sgd_with_schedule

W, TOTAL = 4, 20  # 4 warm-up steps, then 16 cosine steps


@pytest.mark.parametrize("kind", ["cosine", "step"])
def test_warmup_rises_linearly_from_one_over_w_to_one(kind):
    assert [lr_factor(s, TOTAL, W, kind) for s in range(W)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_starts_at_one_after_warmup_and_is_half_at_midpoint():
    assert lr_factor(W, TOTAL, W, "cosine") == pytest.approx(1.0)
    assert lr_factor(W + 8, TOTAL, W, "cosine") == pytest.approx(0.5)  # 8 of 16 post-warm-up steps


def test_cosine_reaches_zero_at_the_end_and_stays_there():
    assert lr_factor(TOTAL, TOTAL, W, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(TOTAL + 5, TOTAL, W, "cosine") == pytest.approx(0.0, abs=1e-12)
    # Last step: progress 15/16, factor (1 + cos(15 pi / 16)) / 2 = 0.0096074...
    assert lr_factor(TOTAL - 1, TOTAL, W, "cosine") == pytest.approx(0.009607359798384785)


def test_cosine_without_warmup_starts_at_one():
    assert lr_factor(0, 10, 0, "cosine") == 1.0
    assert lr_factor(5, 10, 0, "cosine") == pytest.approx(0.5)


def test_step_schedule_multiplies_by_gamma_at_each_milestone():
    f = [lr_factor(s, TOTAL, 2, "step", milestones=[5, 8], gamma=0.1) for s in range(TOTAL)]
    assert f[:2] == pytest.approx([0.5, 1.0])
    assert f[2:5] == pytest.approx([1.0, 1.0, 1.0])
    assert f[5:8] == pytest.approx([0.1, 0.1, 0.1])
    assert f[8:] == pytest.approx([0.01] * (TOTAL - 8))


def test_step_schedule_uses_the_given_gamma():
    assert lr_factor(9, TOTAL, 0, "step", milestones=[3, 6], gamma=0.5) == pytest.approx(0.25)


def test_unknown_schedule_lists_valid_schedules():
    with pytest.raises(ValueError, match=r"unknown schedule 'linear'.*cosine, step"):
        lr_factor(0, TOTAL, W, "linear")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="cosine, step"):
        build_scheduler(opt, TOTAL, W, "linear")


def _lr_after(k: int, kind: str, **kw) -> float:
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.2, momentum=0.9)
    sched = build_scheduler(opt, TOTAL, W, kind, **kw)
    for _ in range(k):
        param.grad = torch.ones(2)
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


@pytest.mark.parametrize("k, expected", [
    (0, 0.05), (1, 0.1), (3, 0.2), (4, 0.2),
    (12, 0.1),  # cosine midpoint: 0.2 * 0.5
    (8, 0.2 * 0.5 * (1 + math.cos(math.pi * 4 / 16))),
    (20, 0.0),
])
def test_build_scheduler_sets_lr_to_peak_times_factor_after_k_steps(k, expected):
    assert _lr_after(k, "cosine") == pytest.approx(expected, abs=1e-12)


def test_build_scheduler_step_kind_applies_milestones_and_gamma():
    assert _lr_after(6, "step", milestones=[6, 10], gamma=0.5) == pytest.approx(0.1)
    assert _lr_after(10, "step", milestones=[6, 10], gamma=0.5) == pytest.approx(0.05)


def test_warmup_from_half_the_peak_is_the_balms_schedule_from_0_05_to_0_1():
    # train.lr=0.1, warmup_start=0.5, 4 warm-up steps: 0.0625, 0.075, 0.0875, 0.1, then cosine from 0.1.
    lrs = [0.1 * lr_factor(s, TOTAL, W, "cosine", warmup_start=0.5) for s in range(W + 1)]
    assert lrs == pytest.approx([0.0625, 0.075, 0.0875, 0.1, 0.1], rel=1e-12)
    assert lr_factor(W + 8, TOTAL, W, "cosine", warmup_start=0.5) == pytest.approx(0.5)  # the cosine is unchanged


def _schedule_lrs(epochs: int, iterations: int, warmup: float, milestones: list[float]) -> tuple[list[float], int]:
    """Each step's lr of sgd_with_schedule's run (epochs of 5 steps, or iterations), peak 0.1, gamma 0.1."""
    opt, sched, steps = sgd_with_schedule([torch.nn.Parameter(torch.zeros(1))], epoch_len=5, lr=0.1, momentum=0.9,
                                          weight_decay=0.0, nesterov=False, epochs=epochs, iterations=iterations,
                                          warmup=warmup, kind="step", milestones=milestones, gamma=0.1)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs, steps


STEP_LRS = [0.02, 0.04, 0.06, 0.08, 0.1] + [0.1] * 5 + [0.01] * 10  # 5 warm-up steps, x0.1 from step 10


def test_warmup_and_milestones_count_epochs_of_the_epoch_length():
    lrs, steps = _schedule_lrs(epochs=4, iterations=0, warmup=1, milestones=[2])  # 1 and 2 epochs of 5 steps
    assert steps == 20
    assert lrs == pytest.approx(STEP_LRS, rel=1e-12)


def test_warmup_and_milestones_count_steps_when_the_run_counts_iterations():
    lrs, steps = _schedule_lrs(epochs=1, iterations=20, warmup=5, milestones=[10])  # epochs is then ignored
    assert steps == 20
    assert lrs == pytest.approx(STEP_LRS, rel=1e-12)


def test_fractional_epochs_of_warmup_round_to_whole_steps():
    lrs, _ = _schedule_lrs(epochs=4, iterations=0, warmup=0.36, milestones=[1.94])  # 1.8 -> 2 steps, 9.7 -> 10
    assert lrs[:3] == pytest.approx([0.05, 0.1, 0.1], rel=1e-12)
    assert lrs[9:11] == pytest.approx([0.1, 0.01], rel=1e-12)


@pytest.mark.parametrize("saved_fused, fused", [(False, True), (True, False)])
def test_a_resumed_optimiser_keeps_its_own_kernel_and_steps_with_the_scaler(saved_fused, fused):
    """An fp16 run's last.pt from before its SGD was fused (and the reverse) resumes: the loaded param groups
    would say which kernel the saving run used, but GradScaler hands the overflow flag only to an optimiser
    made fused, and a plain step given one fails."""
    from engine.schedule import sgd_with_schedule

    def make(fused):
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 2)
        return layer, sgd_with_schedule(layer.parameters(), 5, 0.1, 0.9, 1e-4, False, 2, 0, 1, "cosine", (), 0.1,
                                        fused=fused)[0]

    def step(layer, opt, scaler):
        scaler.scale(layer(torch.ones(3, 4)).pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()

    layer, saved = make(saved_fused)
    step(layer, saved, torch.amp.GradScaler("cpu"))
    layer, opt = make(fused)
    opt.load_state_dict(saved.state_dict())
    assert [g["fused"] for g in opt.param_groups] == [fused or None]
    before = layer.weight.detach().clone()
    step(layer, opt, torch.amp.GradScaler("cpu"))
    assert not torch.equal(before, layer.weight)


def test_a_fused_sgd_starts_and_resumes_with_zeroed_momentum_until_a_step_is_taken():
    """Loaded from a plain SGD's checkpoint of a run whose steps were all skipped (no momentum yet), the fused
    optimiser's buffers are zeros again, never the uninitialised ones its own first step would make."""
    from engine.schedule import sgd_with_schedule

    layer = torch.nn.Linear(4, 2)
    fresh = sgd_with_schedule(layer.parameters(), 5, 0.1, 0.9, 0.0, False, 2, 0, 0, "step", (), 0.1, fused=True)[0]
    plain = sgd_with_schedule(layer.parameters(), 5, 0.1, 0.9, 0.0, False, 2, 0, 0, "step", (), 0.1)[0]
    assert all(not s for s in plain.state.values())
    fresh.load_state_dict(plain.state_dict())
    assert [fresh.state[p]["momentum_buffer"].tolist() for p in layer.parameters()] == [[[0.0] * 4] * 2, [0.0] * 2]
