"""`python -m models` and the stages as a user runs them: a bad pin or an unwritable path is one line, exit 2."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from models.checkpoint import save_checkpoint
from models.download import CACHE_ENV
from models.registry import build_model
from tests.conftest import REPO

pytestmark = pytest.mark.slow

# Port 9 (discard): nothing is downloaded from it, as the pin is refused first.
URL = "http://127.0.0.1:9/r.pt"
PIN_FIX = (f"of {URL} is not a SHA-256 digest (8 to 64 hex digits); pin the file with #sha256=<its digest as "
           f"sha256sum prints it, or the first 8 or more hex digits>, or leave the pin off to download it unchecked")


def _one_error_line(proc) -> str:
    """The one stderr line of a user error: exit status 2, no traceback."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_fetch_of_a_url_with_a_malformed_pin_is_one_line_naming_the_pin_and_the_fix(tmp_path, run, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    proc = run("-m", "models", "fetch", f"{URL}#sha256=abc", check=False)
    assert _one_error_line(proc) == f"error: the pin #sha256=abc {PIN_FIX}"
    assert proc.stdout == "" and not (tmp_path / "cache").exists()


def test_fetch_of_a_path_with_a_pin_is_one_line(tmp_path, run, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    line = _one_error_line(run("-m", "models", "fetch", "x.pt#sha256=abc", check=False))
    assert line.startswith("error: pretrained source 'x.pt#sha256=abc' is not a registry name (")


def test_stage1_with_a_malformed_pin_is_one_line(fake_cifar10, tmp_path, run, tiny_stage1, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    proc = run("stage1_train.py", f"data.root={fake_cifar10}", f"log_dir={tmp_path / 'run'}", *tiny_stage1,
               "--pretrained", f"{URL}#sha256=xyz", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == f"error: model.pretrained={URL}#sha256=xyz: the pin #sha256=xyz {PIN_FIX}"


@pytest.mark.parametrize("out, problem", [("file/x.pt", "file: a file stands where a folder is needed"),
                                          ("file/sub/x.pt", "file/sub: a folder on this path is a file")])
def test_import_to_a_path_through_a_file_is_one_line_naming_it_and_the_fix(out, problem, tmp_path, run):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ours.pt", {"model": build_model("resnet32", 10).state_dict(),
                                           "model_args": {"name": "resnet32", "num_classes": 10},
                                           "class_counts": None, "class_names": None, "config": None})
    (tmp_path / "file").write_text("a file, not a folder")
    proc = run("-m", "models", "import", str(tmp_path / "ours.pt"), str(tmp_path / out), check=False)
    assert _one_error_line(proc) == f"error: {tmp_path}/{problem}; give OUT a path in a folder you can write"
    assert (tmp_path / "file").read_text() == "a file, not a folder"


def test_fetch_into_a_cache_under_a_file_is_one_line_naming_it_and_the_fix(tmp_path, run, monkeypatch):
    (tmp_path / "file").write_text("a file, not a folder")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "file" / "cache"))
    proc = run("-m", "models", "fetch", f"{URL}#sha256=0676ba61", check=False)
    assert _one_error_line(proc) == (f"error: {tmp_path}/file/cache: a folder on this path is a file; point "
                                     f"${CACHE_ENV} at a folder you can write")


@pytest.mark.parametrize("command", ["import", "release"])
def test_import_and_release_never_overwrite_an_existing_out(command, tmp_path, run):
    # Arguments swapped by mistake (`release out.pt logs/run/last.pt`) must not replace a run's last.pt.
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ours.pt", {"model": build_model("resnet32", 10).state_dict(),
                                           "model_args": {"name": "resnet32", "num_classes": 10},
                                           "class_counts": [5] * 10, "class_names": None, "config": {}})
    (tmp_path / "last.pt").write_bytes(b"a run's checkpoint")
    proc = run("-m", "models", command, str(tmp_path / "ours.pt"), str(tmp_path / "last.pt"), check=False)
    assert _one_error_line(proc) == f"error: {tmp_path}/last.pt exists: give OUT the path of a new file (nothing " \
                                    f"is overwritten)"
    assert (tmp_path / "last.pt").read_bytes() == b"a run's checkpoint"


@pytest.mark.parametrize("url, reason", [("http://127.0.0.1:9/my model.pt", "URL can't contain control characters"),
                                         ("http://127.0.0.1:80a/x.pt", "nonnumeric port: '80a'"),
                                         ("http://[::1", "Invalid IPv6 URL")])
def test_a_malformed_url_is_one_line_naming_it(url, reason, tmp_path, run, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    line = _one_error_line(run("-m", "models", "fetch", url, check=False))
    assert line.startswith(f"error: {url!r} is not a valid URL (") and reason in line


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "1e309", "soon"])
def test_a_timeout_that_is_not_a_positive_finite_number_of_seconds_is_refused(timeout, run):
    line = _one_error_line(run("-m", "models", "fetch", "resnet50_imagenet", "--timeout", timeout, check=False))
    assert line == (f"python -m models fetch: error: argument --timeout: must be a number of seconds above 0, got "
                    f"'{timeout}'; see --help")


@pytest.mark.parametrize("sig, status, name", [(signal.SIGTERM, 143, "SIGTERM"),
                                              (signal.SIGINT, 130, "SIGINT (Ctrl-C)")])
def test_a_signal_during_a_download_is_one_line_and_leaves_no_lock_file(sig, status, name, silent_url, tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "models", "fetch", silent_url], cwd=REPO, text=True,
                            env={**os.environ, CACHE_ENV: str(cache)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(3000):  # the lock is taken just before the request, which the server never answers
        if list(cache.glob("*.lock")) or proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status and "Traceback" not in err, err
    assert err.splitlines()[-1] == f"stopped by {name}; fetching the same source again resumes the download"
    assert not list(cache.glob("*.lock"))


def test_a_listing_read_by_a_reader_that_stops_ends_quietly_as_sigpipe_would(tmp_path):
    # Output beyond the pipe's 64 KB (2000 lines, about 95 KB), not only stdout's 8 KB buffer: with 300 lines (14 KB)
    # the pipe could take all of it before the reader's close, and the program rightly exited 0 (a flaky failure).
    for i in range(2000):
        (tmp_path / f"file_{i}.pt").write_text("x")
    proc = subprocess.Popen([sys.executable, "-m", "models", "list"], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, CACHE_ENV: str(tmp_path)})
    assert proc.stdout.readline().startswith("cache: ")  # `| head -1`
    proc.stdout.close()
    assert proc.wait(timeout=60) == 128 + signal.SIGPIPE and proc.stderr.read() == ""
