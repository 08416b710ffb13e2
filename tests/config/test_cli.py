"""The shared command line: options and overrides in any order, and user errors as one line."""
import pytest

from config.cli import parse_cli, user_errors
from config.load import ConfigError
from data.cifar import DatasetFormatError, DatasetNotFoundError
from engine.run import RunDirError
from models.checkpoint import CheckpointError, CheckpointNotFoundError
from models.download import DownloadError


def test_options_may_come_before_between_and_after_overrides():
    cfg, args = parse_cli("stage1", "", ["train.lr=0.2", "--test", "--ckpt", "x.pt", "train.epochs=3", "--resume"])
    assert (cfg.train.lr, cfg.train.epochs) == (0.2, 3)
    assert args.test and args.resume and args.ckpt == "x.pt"
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


def test_a_user_error_prints_its_line_and_exits_2_but_a_bug_keeps_its_traceback(capsys):
    from config.cli import exit_on_user_error

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
