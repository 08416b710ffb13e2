"""Checkpoints: round trip, atomic writes, key checks with precise messages, foreign and missing files."""
import os

import pytest
import torch
from torch import nn

from models.checkpoint import CheckpointError, load_checkpoint, load_state_checked, save_checkpoint


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_save_then_load_round_trips_tensors_and_plain_values(tmp_path):
    model = _model()
    payload = {
        "model": model.state_dict(),
        "epoch": 7,
        "step": 123,
        "config": {"train": {"lr": 0.1, "milestones": [160.0, 180.0]}, "name": "run"},
        "class_counts": [5000, 50],
    }
    path = tmp_path / "sub" / "last.pt"  # the folder is created
    save_checkpoint(path, payload)
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 7 and ckpt["step"] == 123
    assert ckpt["config"] == payload["config"]
    assert ckpt["class_counts"] == [5000, 50]
    assert ckpt["format"] == "lt-decoupled/1"
    assert set(ckpt["model"]) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["model"][k], v), k
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    load_state_checked(fresh, ckpt["model"], "model")
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_save_overwrites_an_existing_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})
    save_checkpoint(path, {"epoch": 2})
    assert load_checkpoint(path)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.arange(4.0)})

    def save_then_crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # some bytes reach the disk before the failure
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(OSError, match=r"writing it failed \(disk full\); is the disk full\? .* the previous last.pt "
                                      r"is kept") as err:
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(4)})
    assert err.value.filename == str(path)
    monkeypatch.undo()

    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1
    assert torch.equal(ckpt["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_load_state_checked_names_missing_unexpected_and_misshapen_keys():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["2.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["0.weight"] = torch.zeros(5, 3)
    with pytest.raises(CheckpointError) as err:
        load_state_checked(model, state, "stage-1 backbone")
    msg = str(err.value)
    assert "stage-1 backbone" in msg
    assert "missing keys (1): 2.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "0.weight: checkpoint (5, 3) vs model (4, 3)" in msg
    # Nothing was loaded into the model.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_load_state_checked_lists_every_missing_key():
    model = _model()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("1.")}
    with pytest.raises(CheckpointError) as err:
        load_state_checked(model, state, "model")
    msg = str(err.value)
    for key in ("1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert key in msg
    assert "unexpected" not in msg and "shape" not in msg


def test_load_state_checked_loads_a_fitting_state():
    src, dst = _model(), nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    load_state_checked(dst, src.state_dict(), "model")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_plain_torch_save_dict_is_not_our_checkpoint(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="not a checkpoint of this tool"):
        load_checkpoint(path)


def test_non_dict_and_wrong_format_files_are_rejected(tmp_path):
    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(CheckpointError):
        load_checkpoint(tensor_file)
    other_version = tmp_path / "v0.pt"
    torch.save({"format": "lt-decoupled/0", "epoch": 1}, other_version)
    with pytest.raises(CheckpointError, match="lt-decoupled/1"):
        load_checkpoint(other_version)


def test_a_file_that_is_no_torch_file_is_named_without_torchs_advice_to_unpickle_it(tmp_path):
    text = tmp_path / "README.md"
    text.write_text("# not a checkpoint\n")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(text)
    assert str(err.value) == (f"{text} cannot be read as a checkpoint (UnpicklingError); is it complete, and a .pt "
                              f"file this tool wrote (a run's best.pt or last.pt)?")


def test_a_checkpoint_the_user_may_not_read_is_a_permission_error_not_a_damaged_file(tmp_path, monkeypatch):
    """(Root reads any file, so the denial is the open's, as for a user without read permission.)"""
    from config.program import user_errors

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def denied(f, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(f))
    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(SystemExit) as exit_:
        with user_errors():
            load_checkpoint(path)
    assert exit_.value.code == f"error: {path}: Permission denied; check the path's permissions, or choose a " \
                               f"writable log_dir=... / data.root=..."


def test_missing_checkpoint_raises_file_not_found_with_the_path(tmp_path):
    path = tmp_path / "run" / "best.pt"
    with pytest.raises(FileNotFoundError) as err:
        load_checkpoint(path)
    assert str(err.value) == (f"no checkpoint at {path} ({path.parent} does not exist): train first, or give the "
                              f"path of a .pt file of a run directory")


def test_a_missing_best_pt_of_a_run_with_a_last_pt_says_why_and_names_the_last_pt(tmp_path):
    from models.checkpoint import save_checkpoint

    run = tmp_path / "run"
    save_checkpoint(run / "last.pt", {"epoch": 1})
    with pytest.raises(FileNotFoundError) as err:
        load_checkpoint(run / "best.pt")
    assert str(err.value) == (f"{run} has no best.pt (written when an epoch ends and a validation split chooses it: "
                              f"data.val_per_class > 0, or a val split); use {run / 'last.pt'}")


def test_a_checkpoint_gets_the_file_mode_of_the_umask_not_0600(tmp_path):
    import os
    import stat

    from models.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "a.pt", {"model": {}})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.pt").stat().st_mode) == 0o644


def test_a_signal_during_a_save_stays_a_signal_not_a_disk_error(tmp_path, monkeypatch):
    # torch.save turns what the file's write raised into a RuntimeError; the second Ctrl-C's
    # SystemExit must come out as itself (exit 130), the disk's OSError with its errno.
    path = tmp_path / "last.pt"
    for raised, expected in ((SystemExit(130), SystemExit), (OSError(28, "No space left on device"), OSError)):
        def write_fails(obj, f, *args, raised=raised, **kwargs):
            try:
                raise raised
            except BaseException:
                raise RuntimeError("unexpected pos 46 vs 0")

        monkeypatch.setattr(torch, "save", write_fails)
        with pytest.raises(expected) as err:
            save_checkpoint(path, {"epoch": 2})
        if expected is OSError:
            assert err.value.errno == 28 and err.value.filename == str(path)
            assert "No space left on device (no last.pt was written)" in str(err.value)
        else:
            assert err.value.code == 130
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    save_checkpoint(path, {"epoch": 1})
    monkeypatch.setattr(torch, "save", write_fails)
    with pytest.raises(OSError, match=r"No space left on device \(the previous last.pt is kept\)"):
        save_checkpoint(path, {"epoch": 2})
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_an_exception_right_after_the_temporary_file_appears_removes_it(tmp_path, monkeypatch):
    # A second Ctrl-C can land between the temporary file's creation and the write: its name is
    # known before it exists, so nothing is left behind.
    import models.checkpoint as checkpoint

    def interrupted(fd, *args, **kwargs):
        os.close(fd)
        raise SystemExit(130)

    monkeypatch.setattr(checkpoint.os, "fdopen", interrupted)
    with pytest.raises(SystemExit):
        save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_files_of_atomic_writes_are_removed_and_nothing_else(tmp_path):
    from models.checkpoint import remove_stale_temp_files

    names = [".last.pt.1a2b3c4d.tmp", ".best.pt.00ff00ff.tmp", ".metrics.jsonl.0a1b2c3d.tmp", "last.pt",
             ".notes.tmp", ".notes.draft.tmp", "metrics.jsonl"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.draft.tmp", ".notes.tmp", "last.pt",
                                                          "metrics.jsonl"]


def test_a_run_directory_given_as_a_checkpoint_names_the_checkpoints_in_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"^{run} is a directory, not a checkpoint: give a .pt file in it$"):
        load_checkpoint(run)
    save_checkpoint(run / "last.pt", {"epoch": 1})
    with pytest.raises(FileNotFoundError, match=rf"^{run} is a directory, not a checkpoint: give a .pt file in it, "
                                                rf"{run}/last.pt$"):
        load_checkpoint(run)
