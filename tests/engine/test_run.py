"""engine.run: best/last checkpoints at the end of each epoch, resume, the end of a run."""
import json
import signal

import pytest
import torch
from torch import nn

from engine.distributed import Dist
from engine.run import Progress, end_epoch, finished_run, restore, trim_metrics_log
from engine.run_dir import RunDirError
from engine.stopping import StopRequest, stop_run
from engine.runlog import RunLog
from models.checkpoint import CheckpointError, save_checkpoint


def _val(top1, few=None):
    return {"top1": top1, "many": top1, "medium": top1, "few": few}


def test_best_pt_is_written_only_when_the_selected_metric_improves(tmp_path):
    runlog, progress = RunLog(tmp_path), Progress("top1")
    written = []
    for epoch, top1 in enumerate([0.3, 0.5, 0.4], start=1):
        progress.epoch, progress.step = epoch, 10 * epoch
        end_epoch(tmp_path, runlog, progress, {"loss": 1.0 / epoch}, _val(top1), {"payload": epoch}, 3)
        written.append(torch.load(tmp_path / "best.pt", weights_only=True)["payload"])
    runlog.close()
    assert written == [1, 2, 2]  # epoch 3 (0.4) did not beat epoch 2 (0.5)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["payload"] == 3 and last["epoch"] == 3 and last["step"] == 30
    assert last["best"] == {"metric": "top1", "value": 0.5, "epoch": 2}
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(l["step"], l["epoch"], l["val_top1"]) for l in lines] == [(10, 1, 0.3), (20, 2, 0.5), (30, 3, 0.4)]


def test_without_validation_only_last_pt_is_written_and_a_metric_with_no_classes_is_never_best(tmp_path):
    runlog = RunLog(tmp_path)
    end_epoch(tmp_path, runlog, Progress("top1", epoch=1, step=5), {}, None, {}, 1)
    assert (tmp_path / "last.pt").is_file() and not (tmp_path / "best.pt").exists()
    end_epoch(tmp_path / "few", RunLog(tmp_path / "few"), Progress("few", epoch=1), {}, _val(0.5, few=None), {}, 1)
    assert not (tmp_path / "few" / "best.pt").exists()


def test_last_pt_waits_save_every_s_between_writes_but_the_last_epoch_always_writes_it(tmp_path, monkeypatch):
    clock = [100.0]  # time.monotonic() as end_epoch sees it, in seconds
    monkeypatch.setattr("engine.run.time.monotonic", lambda: clock[0])
    runlog, progress = RunLog(tmp_path), Progress("top1", saved_at=100.0)  # the run started at t=100
    saved = []
    for epoch, now in enumerate([130.0, 159.9, 160.0, 170.0, 175.0], start=1):
        clock[0] = now
        progress.epoch, progress.step = epoch, 10 * epoch
        end_epoch(tmp_path, runlog, progress, {}, None, {"payload": epoch}, 5, save_every_s=60.0)
        saved.append(torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] if (tmp_path / "last.pt").exists()
                     else None)
    runlog.close()
    # 60 s after the start (epoch 3), then not before 220 s, except the run's last epoch (5).
    assert saved == [None, None, 3, 3, 5]
    # a metric line for every epoch, whether it wrote last.pt or not
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5


def test_save_every_s_of_zero_writes_last_pt_after_every_epoch(tmp_path, monkeypatch):
    monkeypatch.setattr("engine.run.time.monotonic", lambda: 0.0)  # no time passes at all
    runlog, progress = RunLog(tmp_path), Progress("top1", saved_at=0.0)
    for epoch in (1, 2):
        progress.epoch = epoch
        end_epoch(tmp_path, runlog, progress, {}, None, {}, 3)
        assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == epoch
    runlog.close()


def test_a_run_is_finished_when_its_last_pt_says_so_or_is_a_tau_norm_checkpoint_from_before_the_mark(tmp_path):
    """end_epoch marks a run's last.pt "finished"; a tau_norm last.pt (written once, at its end, with its tau)
    of a version before that mark is finished too; a trained run's last.pt without the mark resumes."""
    assert finished_run({"epoch": 1, "tau": 1.1}, tmp_path, Dist())  # an older tau_norm checkpoint
    assert finished_run({"epoch": 3, "finished": True}, tmp_path, Dist())
    assert not finished_run({"epoch": 2, "finished": False}, tmp_path, Dist())
    assert not finished_run({"epoch": 2}, tmp_path, Dist()) and not finished_run(None, tmp_path, Dist())


def test_restore_loads_every_state_and_returns_the_progress_leaving_the_log_to_the_writing_rank(tmp_path):
    model, other = nn.Linear(3, 2), nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2, "step": 20,
            "best": {"metric": "few", "value": 0.25, "epoch": 1}, "class_counts": [5, 2]}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)))
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    progress = restore(ckpt, {"model": other, "optimizer": other_opt}, tmp_path, [5, 2], epoch_len=10, train_digest="d")
    assert progress == Progress("few", epoch=2, step=20, best_value=0.25, best_epoch=1, epoch_step=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert other_opt.state_dict()["state"][0]["momentum_buffer"].shape == (2, 3)
    # every rank restores; the log is trimmed once, by rank 0 in config.cli.start_run
    assert [json.loads(l)["epoch"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_resumed_run_keeps_a_best_pt_written_after_its_last_pt_until_an_epoch_beats_it(tmp_path, monkeypatch):
    clock = [60.0]  # time.monotonic() as end_epoch sees it: 60 s after the start, then no more time passes
    monkeypatch.setattr("engine.run.time.monotonic", lambda: clock[0])
    runlog, progress = RunLog(tmp_path), Progress("top1", saved_at=0.0)
    for epoch, top1 in enumerate([0.3, 0.5, 0.8], start=1):  # last.pt at epoch 1 only, best.pt at each
        progress.epoch, progress.step = epoch, 10 * epoch
        end_epoch(tmp_path, runlog, progress, {}, _val(top1), {"model": nn.Linear(3, 2).state_dict(),
                                                                "class_counts": [5, 2], "payload": epoch},
                  5, save_every_s=60.0)
    runlog.close()  # killed here: last.pt is epoch 1's (best 0.3), best.pt epoch 3's (0.8)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["best"]["value"] == 0.3
    progress = restore(ckpt, {"model": nn.Linear(3, 2)}, tmp_path, [5, 2], epoch_len=10, train_digest="d")
    assert (progress.epoch, progress.best_value, progress.best_epoch) == (1, 0.8, 3)
    runlog = RunLog(tmp_path)
    # the resumed epoch 2 (0.6) beats last.pt's 0.3, not best.pt's 0.8; the resumed epoch 3 (0.85) beats both
    for epoch, top1, best_payload in [(2, 0.6, 3), (3, 0.85, 13)]:
        progress.epoch = epoch
        end_epoch(tmp_path, runlog, progress, {}, _val(top1), {"payload": 10 + epoch}, 5, save_every_s=60.0)
        assert torch.load(tmp_path / "best.pt", weights_only=True)["payload"] == best_payload
    runlog.close()
    assert progress.as_checkpoint()["best"] == {"metric": "top1", "value": 0.85, "epoch": 3}


def test_a_best_pt_left_by_an_earlier_attempt_in_the_directory_is_not_the_resumed_run_s_best(tmp_path):
    """An attempt killed before its first last.pt left best.pt (0.9); the run started again there is stopped inside
    its first epoch (last.pt: no best yet) and resumed: its first epoch's 0.2 is its best.pt, not the stale 0.9."""
    earlier = Progress("top1", epoch=7, step=70, best_value=0.9, best_epoch=7)
    save_checkpoint(tmp_path / "best.pt", {"model": {}, **earlier.as_checkpoint()})
    restarted = Progress("top1", step=3, epoch_step=3)  # its own run_id
    assert restarted.run_id != earlier.run_id and len(restarted.run_id) == 16
    ckpt = {"model": nn.Linear(3, 2).state_dict(), "class_counts": [5, 2], **restarted.as_checkpoint()}
    progress = restore(ckpt, {"model": nn.Linear(3, 2)}, tmp_path, [5, 2], epoch_len=10, train_digest="d")
    assert (progress.best_value, progress.best_epoch, progress.run_id) == (None, None, restarted.run_id)
    progress.epoch, progress.step = 1, 10
    end_epoch(tmp_path, RunLog(tmp_path), progress, {}, _val(0.2), {"payload": 1}, 5)
    assert torch.load(tmp_path / "best.pt", weights_only=True)["best"] == {"metric": "top1", "value": 0.2, "epoch": 1}
    # a run of its own: the best.pt it wrote counts on its next resume, also when higher than last.pt's record
    ckpt = {**ckpt, **progress.as_checkpoint(), "best": {"metric": "top1", "value": 0.1, "epoch": 1}}
    assert restore(ckpt, {"model": nn.Linear(3, 2)}, tmp_path, [5, 2], 10, train_digest="d").best_value == 0.2


@pytest.mark.parametrize("saved, epoch_len, expected", [
    ({"epoch_step": 3}, 10, 3),  # a run stopped 3 steps into its epoch
    ({"epoch_step": 0}, 7, 0),  # an epoch's end, whatever the epoch length now
    ({}, 7, 0),  # written before epoch_step existed, at an epoch's end (no epoch_sums)
    ({"epoch_sums": [1.0, 1.0, 4]}, 8, 4)])  # ... stopped mid-epoch: step 20 - 2 epochs x 8
def test_restore_gives_the_steps_taken_of_the_epoch_in_progress(tmp_path, saved, epoch_len, expected):
    ckpt = {"model": nn.Linear(3, 2).state_dict(), "epoch": 2, "step": 20, "best": {"metric": "top1", "value": None,
                                                                                    "epoch": None},
            "class_counts": [5, 2], **saved}
    progress = restore(ckpt, {"model": nn.Linear(3, 2)}, tmp_path, [5, 2], epoch_len, train_digest="d")
    assert progress.epoch_step == expected


@pytest.mark.parametrize("epoch, step, epoch_step, expected", [
    (0, 0, 0, 3),  # a new run: 25 steps of 10 are 3 epochs, the last of 5 steps
    (1, 10, 0, 3),  # resumed at an epoch's end
    (1, 14, 4, 3),  # resumed 4 steps into epoch 2
    (2, 24, 0, 3),  # 2 epochs of 12 (one process) done, then 10 per epoch: 1 left, cut to 1 step
    (2, 12, 0, 4),  # 2 epochs of 6 done: 13 steps left, an epoch of 10 and one of 3 added
    (3, 25, 0, 3)])  # done
def test_the_final_epoch_reaches_the_schedule_s_total_steps_whatever_the_epochs_before_took(
        epoch, step, epoch_step, expected):
    assert Progress("top1", epoch=epoch, step=step, epoch_step=epoch_step).final_epoch(25, 10) == expected



@pytest.mark.parametrize("step, epoch_step, expected", [
    (4, 4, 6),  # resumed 4 steps into an epoch of 10
    (22, 2, 3),  # 3 steps left of the run: the epoch is cut to them
    (11, 11, 0),  # one process took all 11 steps of its epoch, stopped after the last; several take 10 an epoch
])
def test_the_steps_of_the_epoch_in_progress_are_what_is_left_of_it_and_never_negative(step, epoch_step, expected):
    assert Progress("top1", epoch=1, step=step, epoch_step=epoch_step).steps_this_epoch(25, 10) == expected

def test_restore_from_a_checkpoint_without_a_state_it_needs_says_to_start_a_new_run(tmp_path):
    ckpt = {"model": nn.Linear(3, 2).state_dict(), "epoch": 1, "step": 1, "best": {}, "class_counts": [5, 2]}
    with pytest.raises(CheckpointError, match="holds no head.*start a new run"):
        restore(ckpt, {"model": nn.Linear(3, 2), "head": nn.Linear(3, 2)}, tmp_path, [5, 2], 1, train_digest="d")


def test_resume_on_another_training_set_names_both_class_counts(tmp_path):
    ckpt = {"model": nn.Linear(3, 2).state_dict(), "epoch": 1, "step": 1, "best": {}, "class_counts": [5, 2]}
    with pytest.raises(RunDirError, match=r"class counts \[5, 1\], the run's \[5, 2\]: point data.root at the copy"):
        restore(ckpt, {"model": nn.Linear(3, 2)}, tmp_path, [5, 1], 1, train_digest="d")


def test_resume_on_other_images_with_the_same_class_counts_names_both_digests(tmp_path):
    ckpt = {"model": nn.Linear(3, 2).state_dict(), "epoch": 1, "step": 1, "class_counts": [5, 2],
            "best": {"metric": "top1", "value": None, "epoch": None}, "train_digest": "0123abcd"}
    with pytest.raises(RunDirError, match=r"these training images \(digest 4567ef01\) are not the run's "
                                          r"\(0123abcd\), though their class counts are: point data.root at the copy"):
        restore(ckpt, {"model": nn.Linear(3, 2)}, tmp_path, [5, 2], 1, train_digest="4567ef01")
    assert restore(ckpt, {"model": nn.Linear(3, 2)}, tmp_path, [5, 2], 1, train_digest="0123abcd").step == 1


def test_weights_that_are_no_longer_finite_stop_the_run_before_anything_is_saved(tmp_path):
    runlog, progress = RunLog(tmp_path), Progress("top1", epoch=1, step=1)
    good = {"w": torch.ones(2)}
    end_epoch(tmp_path, runlog, progress, {}, _val(0.5), {"model": good}, 2)
    progress.epoch, progress.step = 2, 2
    # Integer buffers (BatchNorm's batch count) are skipped; the first tensor that went bad is named.
    model = {"a": torch.ones(2), "count": torch.tensor(3), "w": torch.tensor([1.0, float("nan")]),
             "v": torch.tensor([float("inf")])}
    # --resume refuses another train.lr: the advice is a new run, from the last good weights if wanted
    with pytest.raises(FloatingPointError, match=r"epoch 2 \(w and 1 more\); nothing of this epoch was saved: lower "
                                                 r"train.lr in a new run \(--resume keeps the run's settings\), which "
                                                 r"may start from the last good weights: model.pretrained=<the run's "
                                                 r"last.pt>$"):
        end_epoch(tmp_path, runlog, progress, {}, _val(0.9), {"model": model}, 2)
    for name in ("last.pt", "best.pt"):
        saved = torch.load(tmp_path / name, weights_only=True)
        assert saved["epoch"] == 1 and torch.equal(saved["model"]["w"], good["w"])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1



def test_a_stop_after_a_step_that_left_the_weights_not_finite_keeps_the_last_good_last_pt(tmp_path):
    runlog, progress = RunLog(tmp_path), Progress("top1", epoch=1, step=4)
    end_epoch(tmp_path, runlog, progress, {}, None, {"model": {"w": torch.ones(2)}}, 3)
    progress.step = 6  # two steps into epoch 2, the second one diverged with a finite loss
    with pytest.raises(FloatingPointError, match=r"epoch 2 \(w and 0 more\); nothing of this epoch was saved"):
        stop_run(tmp_path, runlog, progress, {"model": {"w": torch.tensor([1.0, float("inf")])}}, signal.SIGTERM)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["step"] == 4 and torch.equal(saved["model"]["w"], torch.ones(2))
    with pytest.raises(SystemExit) as stopped:  # finite weights: saved, and the signal's exit status
        stop_run(tmp_path, runlog, progress, {"model": {"w": torch.full((2,), 3.0)}}, signal.SIGTERM)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 6

def test_a_tied_validation_score_keeps_the_earlier_best_epoch(tmp_path):
    progress = Progress("top1", epoch=3, best_value=0.5, best_epoch=2)
    end_epoch(tmp_path, None, progress, {}, {"top1": 0.5, "many": 0.6, "medium": 0.5, "few": 0.4}, {}, 10)
    assert (progress.best_value, progress.best_epoch) == (0.5, 2)
    end_epoch(tmp_path, None, progress, {}, {"top1": 0.51, "many": 0.6, "medium": 0.5, "few": 0.4}, {}, 10)
    assert (progress.best_value, progress.best_epoch) == (0.51, 3)


def test_a_stop_request_gives_the_signals_back_to_the_handlers_it_found():
    # A sweep runs several runs in one process: between them a Ctrl-C must reach Python's own handler,
    # not a finished run's, which would only set a flag nothing reads any more.
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stop = StopRequest().install()
    assert signal.getsignal(signal.SIGINT) == stop._handle and signal.getsignal(signal.SIGTERM) == stop._handle
    stop.uninstall()
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_repeated_sigterm_still_lets_the_step_finish_and_save_and_a_ctrl_c_after_a_signal_stops_at_once():
    """Schedulers may send SIGTERM more than once before their SIGKILL: each must leave the run to save last.pt."""
    stop = StopRequest().install()
    try:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
        assert stop() and stop.signum == signal.SIGTERM
        with pytest.raises(SystemExit) as exit_:
            signal.raise_signal(signal.SIGINT)
        assert exit_.value.code == 130
    finally:
        stop.uninstall()


def test_trimming_the_metrics_log_keeps_the_checkpoint_s_epoch_and_drops_later_and_cut_lines(tmp_path):
    """A resume from epoch 2's checkpoint keeps lines up to epoch 2 (and those without an epoch), drops epoch 3's
    and a line a kill cut short; a log with nothing to drop is left untouched."""
    lines = ['{"epoch": 1, "loss": 2.0}', '{"note": "no epoch"}', '{"epoch": 2, "loss": 1.5}',
             '{"epoch": 3, "loss": 1.2}', '{"epoch": 4, "lo']
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    trim_metrics_log(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:3]
    before = (tmp_path / "metrics.jsonl").stat().st_ino  # a rewrite replaces the file whole: another inode
    trim_metrics_log(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").stat().st_ino == before
    with (tmp_path / "metrics.jsonl").open("ab") as f:  # bytes that are no text, as a damaged disk block leaves
        f.write(b"\xff\xfe\x00garbage\n")
    trim_metrics_log(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:3]
