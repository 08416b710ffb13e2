"""Downloads against a real HTTP server on 127.0.0.1: cache, resume, checksum, HTTP errors, timeouts, locking."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import pytest

import models.download
from models.download import CACHE_ENV, DownloadError, cache_dir, cache_path, fetch

PAYLOAD = hashlib.sha256(b"checkpoint").digest() * 80_000  # 2.56 MB: three 1 MiB read chunks
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def _part(url, cache):
    dest = cache_path(url, cache)
    return dest.with_name(dest.name + ".part")


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_lands_in_the_cache_and_a_second_call_does_not_download(serve, tmp_path):
    srv = serve(PAYLOAD)
    path = fetch(srv.url, DIGEST, cache=tmp_path)
    assert path == cache_path(srv.url, tmp_path) and path.read_bytes() == PAYLOAD
    assert _files(tmp_path) == [path.name]  # no .part left behind
    assert fetch(srv.url, DIGEST, cache=tmp_path) == path
    assert srv.ranges == [None]  # one request in all


def test_partial_download_resumes_from_where_it_stopped(serve, tmp_path):
    srv = serve(PAYLOAD)
    part = _part(srv.url, tmp_path)
    part.write_bytes(PAYLOAD[:1_000_000])
    path = fetch(srv.url, DIGEST, cache=tmp_path)
    assert srv.ranges == ["bytes=1000000-"]
    assert srv.bytes_sent == len(PAYLOAD) - 1_000_000
    assert path.read_bytes() == PAYLOAD and not part.exists()


def test_server_ignoring_range_gives_the_whole_file_once(serve, tmp_path):
    srv = serve(PAYLOAD)
    srv.honour_range = False
    part = _part(srv.url, tmp_path)
    part.write_bytes(b"stale bytes that must not stay in front")
    assert fetch(srv.url, DIGEST, cache=tmp_path).read_bytes() == PAYLOAD
    assert srv.bytes_sent == len(PAYLOAD)


def test_part_longer_than_the_file_is_discarded_and_downloaded_again(serve, tmp_path):
    srv = serve(PAYLOAD)
    _part(srv.url, tmp_path).write_bytes(PAYLOAD + b"junk")  # the server answers 416 to its Range
    assert fetch(srv.url, DIGEST, cache=tmp_path).read_bytes() == PAYLOAD
    assert srv.ranges == [f"bytes={len(PAYLOAD) + 4}-", None]


def test_dropped_connection_keeps_the_part_and_the_next_call_resumes_it(serve, tmp_path):
    srv = serve(PAYLOAD)
    srv.cut_after = 700_000
    with pytest.raises(DownloadError, match="stopped after 700000 bytes .*run the same command again to resume"):
        fetch(srv.url, DIGEST, cache=tmp_path)
    assert _files(tmp_path) == [_part(srv.url, tmp_path).name]
    srv.cut_after = None
    assert fetch(srv.url, DIGEST, cache=tmp_path).read_bytes() == PAYLOAD
    assert srv.ranges == [None, "bytes=700000-"]


def test_a_206_answer_that_restarts_at_byte_0_replaces_the_part_instead_of_extending_it(serve, tmp_path):
    srv = serve(PAYLOAD)
    srv.restart_as_206 = True
    _part(srv.url, tmp_path).write_bytes(PAYLOAD[:700_000])
    assert fetch(srv.url, DIGEST, cache=tmp_path).read_bytes() == PAYLOAD
    assert srv.ranges == ["bytes=700000-"]


@pytest.mark.parametrize("wrong", [(600_000, len(PAYLOAD)), (0, 100_000)])  # before the part's end; from 0, cut short
def test_a_206_answer_of_other_bytes_than_asked_is_never_stored_as_the_file(serve, tmp_path, wrong):
    """A 206 that neither continues the part nor holds the whole file: the part is dropped and the file asked
    for whole; answered so again, the download fails, leaving nothing (unpinned, it would have been cached)."""
    srv = serve(PAYLOAD)
    srv.wrong_range = wrong
    _part(srv.url, tmp_path).write_bytes(PAYLOAD[:700_000])
    with pytest.raises(DownloadError, match=f"^download of {srv.url} failed: the server sent a part of the file that "
                                            f"was not asked for \\(Content-Range 'bytes {wrong[0]}-"):
        fetch(srv.url, None, cache=tmp_path)
    assert srv.ranges == ["bytes=700000-", None] and _files(tmp_path) == []
    srv.wrong_range = None
    assert fetch(srv.url, None, cache=tmp_path).read_bytes() == PAYLOAD


def test_a_connection_closed_one_byte_short_keeps_the_part_to_resume(serve, tmp_path):
    srv = serve(PAYLOAD)
    srv.cut_after = len(PAYLOAD) - 1
    with pytest.raises(DownloadError, match=f"stopped after {len(PAYLOAD) - 1} bytes .*run the same command again"):
        fetch(srv.url, None, cache=tmp_path)
    assert _files(tmp_path) == [_part(srv.url, tmp_path).name]


def test_an_unpinned_download_is_logged_with_its_digest_to_pin_it_and_a_pinned_one_is_not(serve, tmp_path, caplog):
    srv = serve(PAYLOAD)
    fetch(srv.url, None, cache=tmp_path)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{srv.url} was not checked (no SHA-256 given); its SHA-256 is {DIGEST}: pin it by appending "
        f"#sha256={DIGEST} to the URL"]
    caplog.clear()
    fetch(srv.url, DIGEST, cache=tmp_path / "pinned")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_wrong_sha256_is_a_clear_error_and_leaves_nothing_in_the_cache(serve, tmp_path):
    srv = serve(PAYLOAD)
    with pytest.raises(DownloadError) as err:
        fetch(srv.url, "0" * 64, cache=tmp_path)
    msg = str(err.value)
    assert f"its SHA-256 is {DIGEST}, expected {'0' * 64}" in msg
    assert "the file was deleted" in msg and "pass its path" in msg
    assert _files(tmp_path) == []


def test_digest_prefix_as_torchvision_publishes_it_is_accepted(serve, tmp_path):
    srv = serve(PAYLOAD)
    assert fetch(srv.url, DIGEST[:8], cache=tmp_path).read_bytes() == PAYLOAD


def test_cached_file_that_no_longer_matches_is_downloaded_again(serve, tmp_path):
    srv = serve(PAYLOAD)
    dest = cache_path(srv.url, tmp_path)
    dest.write_bytes(b"damaged on disk")
    assert fetch(srv.url, DIGEST, cache=tmp_path).read_bytes() == PAYLOAD
    assert srv.ranges == [None]


def test_http_404_names_the_status_and_what_to_do(serve, tmp_path):
    srv = serve(PAYLOAD)
    url = srv.url.replace("ckpt.pth", "missing.pth")
    with pytest.raises(DownloadError) as err:
        fetch(url, DIGEST, cache=tmp_path)
    assert str(err.value).startswith(f"download of {url} failed: HTTP 404 Not Found; the file is not at that address")
    assert _files(tmp_path) == []


def test_http_500_says_the_server_failed_and_to_try_again_later(serve, tmp_path):
    srv = serve(PAYLOAD)
    srv.fail_with = 500
    with pytest.raises(DownloadError, match=r"failed: HTTP 500 Internal Server Error; the server failed: try again "):
        fetch(srv.url, DIGEST, cache=tmp_path)


def test_a_416_to_a_request_without_range_is_an_http_error_not_a_restart(serve, tmp_path):
    srv = serve(b"")  # the server answers 416 to any request for an empty file
    with pytest.raises(DownloadError, match=r"failed: HTTP 416 Requested Range Not Satisfiable; the file is not at"):
        fetch(srv.url, DIGEST, cache=tmp_path)


def test_server_that_never_answers_times_out_with_a_clear_error(silent_url, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        fetch(silent_url, DIGEST, cache=tmp_path, timeout=0.3)
    assert time.monotonic() - start < 5
    host = silent_url.split("/")[2]
    assert f"failed: no answer from {host} within 0.3 s. Check the network" in str(err.value)
    assert "download the file on a machine with network and pass its path" in str(err.value)
    assert _files(tmp_path) == []


def test_unreachable_host_says_so_and_how_to_work_offline(closed_url, tmp_path):
    with pytest.raises(DownloadError) as err:
        fetch(closed_url, DIGEST, cache=tmp_path, timeout=2)
    assert f"cannot reach {closed_url.split('/')[2]} (" in str(err.value)
    assert f"or copy it to {cache_path(closed_url, tmp_path)}" in str(err.value)


def test_cache_dir_follows_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_dir().parts[-3:] == (".cache", "lt-decoupled", "pretrained")


def test_two_urls_with_the_same_file_name_get_different_cache_files(tmp_path):
    a = cache_path("https://a.example/final_model_checkpoint.pth", tmp_path)
    b = cache_path("https://b.example/final_model_checkpoint.pth", tmp_path)
    assert a != b and a.name.endswith("-final_model_checkpoint.pth")


def test_malformed_sha256_is_a_download_error_naming_the_digest_and_the_fix_before_any_download(tmp_path):
    # DownloadError, which the command lines print as one line (a ValueError was a traceback there).
    with pytest.raises(DownloadError) as err:
        fetch("http://127.0.0.1:9/x.pth", "XYZ", cache=tmp_path)
    assert str(err.value) == ("SHA-256 'XYZ' for http://127.0.0.1:9/x.pth is not 8 to 64 hex digits: give the file's "
                              "digest as sha256sum prints it, or its first 8 or more hex digits")
    assert list(tmp_path.iterdir()) == []


def test_a_digest_of_seven_hex_digits_is_too_short_to_pin_a_file(tmp_path):
    with pytest.raises(DownloadError, match=r"^SHA-256 '0676ba6' for .* is not 8 to 64 hex digits"):
        fetch("http://127.0.0.1:9/x.pth", "0676ba6", cache=tmp_path)


def test_an_upper_case_digest_pins_the_file_as_the_lower_case_one(serve, tmp_path):
    srv = serve(PAYLOAD)
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert fetch(srv.url, digest.upper()[:16], cache=tmp_path).read_bytes() == PAYLOAD


# fetch() in a fresh process, logging to stderr. It loads download.py alone: the models package
# imports torch, seconds per process.
FETCH_IN_A_PROCESS = """
import importlib.util, logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
spec = importlib.util.spec_from_file_location("download", sys.argv[1])
download = importlib.util.module_from_spec(spec)
spec.loader.exec_module(download)
print(download.fetch(sys.argv[2], sys.argv[3], cache=sys.argv[4]))
"""
WAITING = "waiting for another process that is downloading"


def _hold_answers_until(srv, ready, limit: float) -> None:
    """The server answers each request only once ready() (or after `limit` seconds)."""
    class Held(srv.RequestHandlerClass):
        def do_GET(self) -> None:
            deadline = time.monotonic() + limit
            while not ready() and time.monotonic() < deadline:
                time.sleep(0.01)
            super().do_GET()

    srv.RequestHandlerClass = Held


def test_two_processes_fetching_one_url_download_it_once_while_the_second_waits(serve, tmp_path):
    srv = serve(PAYLOAD)
    logs = [tmp_path / f"stderr{i}" for i in range(2)]
    # The first request is held until the other process logs that it waits: the two overlap for sure.
    _hold_answers_until(srv, lambda: any(WAITING in log.read_text() for log in logs if log.exists()), limit=20)
    cache = tmp_path / "cache"
    args = [sys.executable, "-c", FETCH_IN_A_PROCESS, models.download.__file__, srv.url, DIGEST, str(cache)]
    procs = []
    for log in logs:
        with open(log, "w") as stderr:
            procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True))
    printed = [p.communicate(timeout=30)[0].strip() for p in procs]
    dest = cache_path(srv.url, cache)
    assert [p.returncode for p in procs] == [0, 0], [log.read_text() for log in logs]
    assert printed == [str(dest)] * 2
    assert srv.ranges == [None] and srv.bytes_sent == len(PAYLOAD)  # one download in all
    assert sum(WAITING in log.read_text() for log in logs) == 1
    assert dest.read_bytes() == PAYLOAD and _files(cache) == [dest.name]  # no .part, no .lock


def test_a_cache_folder_given_with_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(CACHE_ENV, "~/cache")
    assert cache_dir() == tmp_path / "cache"
