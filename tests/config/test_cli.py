"""The shared command line: options and overrides in any order, and user errors as one line."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import config.cli
from config.cli import check_select_metric, parse_args, parse_cli, start_run
from config.program import user_errors
from config.keys import ConfigError
from config.load import config_to_dict, load_config
from data.cifar import DatasetFormatError, DatasetNotFoundError
from engine.distributed import Dist
from engine.run_dir import RunDirError
from models.checkpoint import CheckpointError, CheckpointNotFoundError, save_checkpoint
from models.download import DownloadError
from tests.conftest import REPO


def test_options_may_come_before_between_and_after_overrides():
    cfg, args = parse_cli("stage1", "", ["train.lr=0.2", "--test", "--ckpt", "x.pt", "train.epochs=30", "--debug"])
    assert (cfg.train.lr, cfg.train.epochs) == (0.2, 30)
    assert args.test and args.debug and args.ckpt == "x.pt"
    assert parse_cli("stage1", "", ["train.lr=0.2", "--resume", "train.epochs=30"])[1].resume
    # a run's own command with --test added: --pretrained is part of its config (a stage-2 backbone's source)
    cfg, args = parse_cli("stage2", "", ["--pretrained", "r.pt", "stage1.checkpoint=", "--test"])
    assert args.test and cfg.model.pretrained == "r.pt"


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "x.pt", "train.epochs=3"], "--ckpt names the checkpoint that --test evaluates: add --test"),
    (["--test", "--resume"], "--test evaluates a checkpoint and --resume trains on: give one of them"),
])
def test_an_option_nothing_else_given_reads_is_one_line_not_ignored(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_cli("stage1", "", argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    cfg, _ = parse_cli("stage2", "", ["stage2.method=crt", "--pretrained", "r.pt", "name=run"])
    assert (cfg.model.pretrained, cfg.name, cfg.stage2.method) == ("r.pt", "run", "crt")


def test_parse_cli_checks_the_keys_against_the_running_stage():
    with pytest.raises(SystemExit, match=r"^config error: loss.name='focal' is read by stage1"):
        parse_cli("stage2", "", ["loss.name=focal"])


@pytest.mark.parametrize("error, prefix", [
    (ConfigError("bad key"), "config error: "), (DatasetNotFoundError("no data"), "error: "),
    (DatasetFormatError("bad file"), "error: "), (CheckpointError("bad ckpt"), "error: "),
    (CheckpointNotFoundError("no ckpt"), "error: "), (DownloadError("offline"), "error: "),
    (RunDirError("in use"), "error: "),
])
def test_user_errors_end_in_their_one_message_without_a_traceback(error, prefix):
    with pytest.raises(SystemExit) as exit_info:
        with user_errors():
            raise error
    assert exit_info.value.code == f"{prefix}{error}" and exit_info.value.__cause__ is None
    assert exit_info.value.__suppress_context__


def test_a_programming_error_is_not_disguised_as_a_user_error():
    with pytest.raises(KeyError):
        with user_errors():
            raise KeyError("bug")
    with pytest.raises(RuntimeError, match="CUDA error"):
        with user_errors():
            raise RuntimeError("CUDA error: an illegal memory access")


def test_a_path_through_a_symlink_loop_is_one_line_naming_it_and_the_fix(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(SystemExit) as exit_info:
        with user_errors():
            (tmp_path / "a" / "run").resolve()  # claim_run_dir's; Python 3.11 raises a RuntimeError, 3.13 ELOOP
    assert exit_info.value.code.startswith("error: ") and str(tmp_path / "a") in exit_info.value.code
    assert exit_info.value.code.endswith("; a symbolic link on that path leads back into it: fix the link, or give "
                                         "another path")


def test_a_user_error_prints_its_line_and_exits_2_but_a_bug_keeps_its_traceback(capsys):
    from config.program import exit_on_user_error

    def refused():
        raise SystemExit("error: data.root=x does not exist")

    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(refused)
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: data.root=x does not exist\n"

    def bug():
        raise KeyError("oops")

    with pytest.raises(KeyError):
        exit_on_user_error(bug)


def test_a_foreign_checkpoint_tested_in_a_run_never_overwrites_the_runs_own_report(tmp_path):
    from config.cli import report_path

    run, other = tmp_path / "run", tmp_path / "other"
    run.mkdir(), other.mkdir()
    assert report_path(run, run / "best.pt") == run / "test_metrics.json"  # nothing of its own yet
    (run / "last.pt").write_bytes(b"x")
    assert report_path(run, run / "last.pt") == run / "test_metrics.json"
    assert report_path(run, other / "best.pt") == run / "test_metrics_other_best.json"


def test_a_bad_command_line_is_one_line_naming_the_option_and_exits_2(capsys):
    from config.cli import cli_parser

    with pytest.raises(SystemExit) as exit_info:
        cli_parser("").parse_intermixed_args(["train.lr=0.1", "--bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: unrecognized arguments: --bogus; see --help" in err


def test_debug_shows_the_traceback_of_the_error_behind_the_line(capsys):
    from config.program import exit_on_user_error

    def refused():
        with user_errors():
            raise CheckpointError("x.pt is damaged")

    for debug in (False, True):
        with pytest.raises(SystemExit):
            exit_on_user_error(refused, debug=debug)
        err = capsys.readouterr().err
        assert err.endswith("error: x.pt is damaged\n")
        assert ("Traceback" in err and "models.checkpoint.CheckpointError: x.pt is damaged" in err) == debug


def test_a_user_error_is_written_to_the_open_train_log_too(tmp_path, capsys):
    import logging

    from config.program import exit_on_user_error

    def refused():
        raise SystemExit("error: the disk is full")

    handler = logging.FileHandler(tmp_path / "train.log")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(SystemExit):
            exit_on_user_error(refused)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert (tmp_path / "train.log").read_text() == "ERROR cli: error: the disk is full\n"
    assert capsys.readouterr().err == "error: the disk is full\n"  # once: stderr is not a file handler


@pytest.mark.parametrize("errno_, filename, expected", [
    (28, "/runs/a/last.pt", "/runs/a/last.pt: No space left on device; free space on that disk, then run the same "
                            "command with --resume"),
    (13, "/data/x", "/data/x: Permission denied; check the path's permissions, or choose a writable log_dir=... / "
                    "data.root=..."),
    (20, "/runs/file/x", "/runs/file/x: Not a directory; a folder on this path is a file: move it away (for the run "
                         "directory: or choose another log_dir=... / name=...)"),
    (17, "/runs/f", "/runs/f: File exists; a file stands where a folder is needed: move it away (for the run "
                    "directory: or choose another log_dir=... / name=...)"),
    (27, "/runs/a/events", "/runs/a/events: File too large; the file system refused a file that large: free space "
                           "or raise the limit (ulimit -f), then --resume"),
    (30, "/runs/a", "/runs/a: Read-only file system; that file system is read-only: choose log_dir=... on a "
                    "writable one"),
])
def test_an_os_error_is_one_line_with_the_path_and_what_to_do(errno_, filename, expected):
    import os

    with pytest.raises(SystemExit) as exit_info:
        with user_errors():
            raise OSError(errno_, os.strerror(errno_), filename)
    assert exit_info.value.code == f"error: {expected}"


def test_an_error_a_dataloader_worker_raised_is_its_own_message_not_the_worker_s_traceback():
    from torch.utils.data._utils import ExceptionWrapper  # what the DataLoader re-raises a worker's error with

    try:
        raise DatasetFormatError("/data/x.png: damaged (not a PNG)")
    except DatasetFormatError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(SystemExit) as exit_info:
        with user_errors():
            wrapped.reraise()
    assert exit_info.value.code == "error: /data/x.png: damaged (not a PNG)"


def test_a_refused_run_removes_the_directory_it_created_and_nothing_else(tmp_path):
    from config.program import nothing_left_of_a_refused_run
    from engine.run_dir import claim_run_dir, make_run_dir

    new = tmp_path / "group" / "sub" / "new"
    with pytest.raises(SystemExit):
        with nothing_left_of_a_refused_run(new):
            claim_run_dir(new)
            (new / "train.log").write_text("started\n")
            raise SystemExit("error: data.root=x does not exist")
    assert not (tmp_path / "group").exists()  # nor the parent folders it made
    claim_run_dir(new)  # claimed again by this process (a sweep's next try): made again, not taken as its own
    assert new.is_dir()
    tested = tmp_path / "tested"  # --test makes its directory without a claim (setup_run)
    with pytest.raises(SystemExit):
        with nothing_left_of_a_refused_run(tested):
            make_run_dir(tested)
            raise SystemExit("error: no checkpoint at tested/last.pt")
    assert not tested.exists()
    raced = tmp_path / "raced" / "run"  # the same command started twice: the other process made it meanwhile
    with pytest.raises(SystemExit):
        with nothing_left_of_a_refused_run(raced):
            raced.mkdir(parents=True)
            (raced / "train.log").write_text("the other run's\n")
            claim_run_dir(raced)  # found there, not made here
            raise SystemExit("error: raced is in use")
    assert (raced / "train.log").read_text() == "the other run's\n"
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(SystemExit):
        with nothing_left_of_a_refused_run(existing):
            raise SystemExit("error: refused")
    assert existing.is_dir()
    started = tmp_path / "started"  # a run that wrote its config.yaml had started: its log is kept
    with pytest.raises(SystemExit):
        with nothing_left_of_a_refused_run(started):
            started.mkdir()
            (started / "config.yaml").write_text("{}\n")
            raise SystemExit("error: the loss became NaN")
    assert (started / "config.yaml").is_file()
    stopped = tmp_path / "stopped"  # a signal's exit (a number) is not a refusal
    with pytest.raises(SystemExit):
        with nothing_left_of_a_refused_run(stopped):
            stopped.mkdir()
            raise SystemExit(143)
    assert stopped.is_dir()


def test_ctrl_c_outside_the_training_loop_is_one_line_and_exit_130(capsys):
    from config.program import exit_on_user_error

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(interrupted, resumable=True)  # the entry scripts
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == ("stopped by SIGINT (Ctrl-C); --resume continues from the last checkpoint "
                                       "written, if any\n")
    with pytest.raises(SystemExit):
        exit_on_user_error(interrupted)  # predict.py and the benches have no --resume
    assert capsys.readouterr().err == "stopped by SIGINT (Ctrl-C)\n"


# The program's first Ctrl-C stops the run, which saves and exits; the second lands while the interpreter
# shuts down (here an atexit callback sends it, as CI's test_signals did by chance 50 ms after the first).
SECOND_CTRL_C_WHILE_EXITING = """
import atexit, os, signal, sys
sys.path.insert(0, sys.argv[1])
from config.program import run_program
from engine.stopping import StopRequest


def second_ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)
    print("the exit went on after the second Ctrl-C", flush=True)


def command():
    print("the run's output")  # left in the pipe's buffer: exiting at once must not lose it
    stop = StopRequest().install()
    os.kill(os.getpid(), signal.SIGINT)
    assert stop()
    atexit.register(second_ctrl_c)
    raise SystemExit(128 + signal.SIGINT)

run_program(command)
"""


# A SIGTERM where no StopRequest listens: loading the data, computing stage 2's features, --test.
SIGTERM_AT_START = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from config.program import run_program


def command():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

run_program(command, resumable=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("world", [None, "1", "2"])
def test_a_sigterm_before_the_training_loop_is_one_line_and_exit_143_except_under_torchrun(world):
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"} | ({"WORLD_SIZE": world} if world else {})
    proc = subprocess.run([sys.executable, "-c", SIGTERM_AT_START, str(REPO)], capture_output=True, text=True,
                          timeout=60, env=env)
    if world == "2":  # torchrun stops a failed job's other workers with SIGTERM, which must end them at once
        assert (proc.returncode, proc.stderr) == (-signal.SIGTERM, "")
    else:
        assert proc.returncode == 143
        assert proc.stderr == "stopped by SIGTERM; --resume continues from the last checkpoint written, if any\n"


@pytest.mark.slow
def test_a_signal_while_the_program_exits_ends_it_at_once_with_one_line_no_traceback_and_its_output():
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout a buffered pipe
    proc = subprocess.run([sys.executable, "-c", SECOND_CTRL_C_WHILE_EXITING, str(REPO)], capture_output=True,
                          text=True, timeout=60, env=buffered)
    assert proc.returncode == 130, proc.stderr
    assert proc.stdout == "the run's output\n"
    assert proc.stderr.splitlines()[-1] == "SIGINT while exiting: stopped at once", proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("rank", [0, 1])
def test_on_resume_rank_0_alone_drops_the_metric_lines_after_last_pt(tmp_path, monkeypatch, rank):
    # Each rank rewriting metrics.jsonl could read it while another had emptied it: a two-process
    # resume lost its epoch-1 line that way. Rank 0 trims it once; the others never touch it.
    cfg, _ = parse_cli("stage1", "", [f"log_dir={tmp_path}"])
    save_checkpoint(tmp_path / "last.pt", {"config": config_to_dict(cfg, "stage1"), "epoch": 2})
    log = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)) + '{"epoch": 4, "lo'  # a kill cut 4 short
    log.write_text(text)
    before = log.stat()
    # (No process group here: rank 1 receives what rank 0 reads; tests/test_distributed_cli.py sends it.)
    monkeypatch.setattr(config.cli, "from_rank0", lambda read, d: read())
    monkeypatch.setattr(config.cli, "setup_run", lambda run_dir, *_, **__: Path(run_dir))  # no logging or seeds here
    _, ckpt = start_run(cfg, "stage1", True, Dist(rank=rank, world=2))
    assert ckpt["epoch"] == 2
    if rank:
        assert log.read_text() == text and (log.stat().st_ino, log.stat().st_mtime_ns) == (before.st_ino,
                                                                                          before.st_mtime_ns)
    else:
        assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "metrics.jsonl"]  # replaced whole


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_beside_a_best_pt_without_last_pt_says_the_run_starts_again_once_the_log_is_open(tmp_path, monkeypatch,
                                                                                                 rank):
    """Said after setup_run, so that the line has the log's format and is in train.log; by rank 0 alone."""
    cfg, _ = parse_cli("stage1", "", [f"log_dir={tmp_path}"])
    save_checkpoint(tmp_path / "best.pt", {"epoch": 7})
    events = []
    monkeypatch.setattr(config.cli, "from_rank0", lambda read, d: read())
    monkeypatch.setattr(config.cli, "setup_run", lambda run_dir, *_, **__: events.append("log open") or Path(run_dir))
    monkeypatch.setattr(config.cli.logger, "warning", lambda message, *args: events.append(message % args))
    assert start_run(cfg, "stage1", True, Dist(rank=rank, world=2)) == (tmp_path, None)
    said = f"{tmp_path} holds no last.pt to continue from: the run starts again from its first step, and its best.pt " \
           f"is replaced by this run's"
    assert events == ["log open"] + ([said] if rank == 0 else [])
    (tmp_path / "best.pt").unlink()  # nothing at all there: --resume from elsewhere named a relative log_dir
    events.clear()
    assert start_run(cfg, "stage1", True, Dist(rank=rank, world=2)) == (tmp_path, None)
    assert events == ["log open"] + ([f"--resume: {tmp_path.resolve()} holds no run to continue: a new run starts "
                                      f"there"] if rank == 0 else [])


def test_a_run_started_again_drops_the_metric_lines_and_tensorboard_events_of_the_attempt_before(tmp_path,
                                                                                                  monkeypatch):
    """An attempt killed before its first last.pt logged epochs; the run started again logs them anew (before
    2026-12-07 TensorBoard showed both attempts' events, every epoch twice)."""
    cfg, _ = parse_cli("stage1", "", [f"log_dir={tmp_path}"])
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events.out.tfevents.1.host").write_bytes(b"x")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (tmp_path / "keep.txt").write_text("the user's")
    monkeypatch.setattr(config.cli, "setup_run", lambda run_dir, *_, **__: Path(run_dir))
    assert start_run(cfg, "stage1", True, Dist()) == (tmp_path, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]



@pytest.mark.parametrize("overrides", [["train.nesterov=true", "train.momentum=0"], ["data.crop_padding=40"]])
def test_a_key_tau_norm_never_reads_is_named_as_unread_before_any_rule_on_its_value(overrides):
    """Not "out of range" first and "not read by tau_norm" after that is fixed."""
    with pytest.raises(SystemExit, match=r"^config error: (train.momentum|data.crop_padding) is read by stage2.method="
                                         r"balanced_softmax \| crt \| balms \| lws only, not by tau_norm: remove it$"):
        parse_cli("stage2", "", ["stage1.checkpoint=x.pt", "stage2.method=tau_norm", *overrides])
    with pytest.raises(SystemExit, match=r"config error: train.nesterov=true needs a momentum"):
        parse_cli("stage2", "", ["stage1.checkpoint=x.pt", "stage2.method=crt", "train.nesterov=true",
                                 "train.momentum=0"])


def test_schedule_keys_are_checked_for_a_new_run_but_a_run_started_before_the_check_still_resumes(tmp_path,
                                                                                                  monkeypatch):
    """A step-schedule milestone past the run's end is refused as a run starts, before anything is written;
    a run that holds one (started by a version without the check) resumes with its own config."""
    cfg, _ = parse_cli("stage1", "", [f"log_dir={tmp_path}", "train.schedule=step", "train.epochs=100"])
    monkeypatch.setattr(config.cli, "from_rank0", lambda read, d: read())
    monkeypatch.setattr(config.cli, "setup_run", lambda run_dir, *_, **__: Path(run_dir))  # no logging or seeds here
    with pytest.raises(ConfigError, match=r"^train.milestones=\[160.0, 180.0\] \(epochs\) holds 180, not before"):
        start_run(cfg, "stage1", False, Dist())
    assert list(tmp_path.iterdir()) == []
    save_checkpoint(tmp_path / "last.pt", {"config": config_to_dict(cfg, "stage1"), "epoch": 2})
    assert start_run(cfg, "stage1", True, Dist())[1]["epoch"] == 2
    with pytest.raises(ConfigError, match=r"^train.milestones="):  # not "already holds a run": fixed, it would be
        start_run(cfg, "stage1", False, Dist())
    # --test trains nothing: its config's schedule is not checked (a warm-up as long as the run included)
    assert parse_cli("stage1", "", [f"log_dir={tmp_path}", "train.epochs=1", "--test"])[0].train.epochs == 1

@pytest.mark.slow
def test_the_entry_scripts_start_without_importing_torchvision():
    # Its import takes about 1 s (it loads torch._dynamo): a CIFAR run, --help or a refused config would
    # pay it for nothing. It is imported where image files are decoded, AutoAugment runs, or an ImageNet
    # ResNet is built.
    probe = ("import sys, stage1_train, stage2_classifier, predict, models.__main__, bench.throughput; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout == "[]\n"


@pytest.mark.parametrize("metric, counts, has_val, error", [
    ("top1", [50, 5], False, None),
    ("few", [50, 5], True, None),
    ("many", [101, 5], True, None),
    ("many", [100, 5], True, "chooses best.pt by a shot group without classes in this training set: set "
                              "train.select_metric=top1 or a group with classes"),
    ("few", [200, 30], True, "chooses best.pt by a shot group without classes"),
    ("medium", [100, 20], False, "chooses best.pt on the validation split, and this run has none: set "
                                 "data.val_per_class (or give a val split), or leave train.select_metric out"),
])
def test_a_select_metric_that_could_never_choose_an_epoch_is_a_config_error(metric, counts, has_val, error):
    if error is None:
        check_select_metric(metric, counts, has_val)
        return
    with pytest.raises(SystemExit) as e:
        check_select_metric(metric, counts, has_val)
    assert str(e.value.code).startswith(f"config error: train.select_metric={metric} ") and error in str(e.value.code)


def test_a_resumed_run_hides_only_the_tensorboard_events_after_its_checkpoint_s_step(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(config.cli, "RunLog", lambda run_dir, purge_step=None: seen.append(purge_step))
    cfg = load_config(None, [f"log_dir={tmp_path}"], "stage1")
    config.cli.open_log(cfg, "stage1", tmp_path, Dist(), {"step": 12, "epoch": 3})
    config.cli.open_log(cfg, "stage1", tmp_path, Dist())  # a new run hides nothing
    # stopped in epoch 4's last step (4 steps an epoch): epoch 4's line, at step 16, was not logged before the stop
    # and may have been by a resume killed before its next last.pt: it is hidden too
    config.cli.open_log(cfg, "stage1", tmp_path, Dist(), {"step": 16, "epoch": 3, "epoch_step": 4})
    assert seen == [13, None, 13]


def test_only_rank_0_opens_the_metric_log_and_writes_the_config(tmp_path):
    cfg = load_config(None, [f"log_dir={tmp_path}"], "stage1")
    assert config.cli.open_log(cfg, "stage1", tmp_path, Dist(rank=1, world=2)) is None
    assert list(tmp_path.iterdir()) == []
    config.cli.open_log(cfg, "stage1", tmp_path, Dist(rank=0, world=2)).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "tb"]


@pytest.mark.parametrize("argv, message", [
    (["--cfg", "a.yaml", "--cfg", "b.yaml"], "--cfg given twice (a.yaml and b.yaml): give it once"),
    (["--test", "--ckpt", "a.pt", "--ckpt", "b.pt"], "--ckpt given twice (a.pt and b.pt): give it once"),
    (["--pretrained", "a.pt", "train.epochs=3", "--pretrained", "b.pt"], "--pretrained given twice (a.pt and b.pt)"),
    (["--pretrained", "a.pt", "model.pretrained=b.pt"],
     "--pretrained and model.pretrained=... both name the weights to start from: give one of them"),
])
def test_an_option_naming_one_file_given_twice_is_one_line_not_the_last_one_silently(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args("", argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, resumable", [(["--test"], False), ([], True), (["--resume"], True)])
def test_only_a_training_command_s_signal_line_says_that_resume_continues(argv, resumable, monkeypatch):
    import config.cli

    seen = {}
    monkeypatch.setattr(config.cli, "run_program", lambda command, debug, resumable: seen.update(r=resumable))
    monkeypatch.setattr(sys, "argv", ["stage1_train.py", *argv])
    config.cli.run_cli("stage1", "", lambda cfg, resume: {})
    assert seen == {"r": resumable}


def test_a_logit_adjustment_the_checkpoint_s_counts_cannot_take_is_a_config_error_of_test(tmp_path, monkeypatch):
    import config.cli
    from models.losses import EmptyClassError

    def refuse(*args, **kwargs):
        raise EmptyClassError("eval.logit_adjust_tau=1 subtracts tau * log(prior), and ...")
    monkeypatch.setattr(config.cli, "evaluate_checkpoint", refuse)
    cfg, _ = parse_cli("stage1", "", [f"log_dir={tmp_path}", "eval.logit_adjust_tau=1", "train.num_threads=1"])
    with pytest.raises(SystemExit) as e:
        with user_errors():
            config.cli.test(cfg, tmp_path / "last.pt")
    assert e.value.code == "config error: eval.logit_adjust_tau=1 subtracts tau * log(prior), and ..."


def test_a_path_through_a_symbolic_link_to_nothing_is_named_as_such_not_as_a_file(tmp_path, monkeypatch):
    # `logs` linked to a disk that is not mounted: mkdir says "File exists"
    (tmp_path / "logs").symlink_to(tmp_path / "unmounted")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        with user_errors():
            (tmp_path / "logs" / "run").mkdir(parents=True)
    assert e.value.code == f"error: {tmp_path / 'logs'}: a symbolic link to {tmp_path / 'unmounted'}, which does not " \
                           f"exist (a disk not mounted?)"


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_of_the_other_stage_without_a_checkpoint_yet_is_refused_and_its_logs_kept(tmp_path, monkeypatch, resume):
    """A stage-1 run killed before its first last.pt: a stage-2 run there would drop its metrics.jsonl and tb/."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.1}, "loss": {"name": "ce"}}))
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (tmp_path / "tb").mkdir()
    cfg, _ = parse_cli("stage2", "", [f"log_dir={tmp_path}", "stage1.checkpoint=x.pt"])
    monkeypatch.setattr(config.cli, "setup_run", lambda run_dir, *_, **__: Path(run_dir))
    with pytest.raises(ConfigError, match=rf"{tmp_path} holds a stage1 run \(stage1_train.py\), not a stage2 one"):
        start_run(cfg, "stage2", resume, Dist())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "metrics.jsonl", "tb"]
    cfg1, _ = parse_cli("stage1", "", [f"log_dir={tmp_path}"])  # its own stage starts it again
    assert start_run(cfg1, "stage1", True, Dist()) == (tmp_path, None)
