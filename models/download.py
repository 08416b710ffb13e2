"""Checkpoint downloads into a cache: resumable, SHA-256 checked, moved into place atomically.

    path = fetch("https://download.pytorch.org/models/resnet50-0676ba61.pth", sha256="0676ba61")

The file grows as `<cache>/<name>.part` (a later call resumes it with an HTTP Range request) and is
renamed to `<cache>/<name>` only once its digest matches, so the cache never holds a damaged
checkpoint; a download whose digest does not match is deleted. The cache is $LT_PRETRAINED_CACHE,
else ~/.cache/lt-decoupled/pretrained. Every failure is one DownloadError saying what to do.

Processes that fetch one URL at once take turns: each holds an exclusive flock on `<cache>/<name>.lock`
around check, download and rename, so a second one waits, then finds the finished file. The holder
removes the lock file when done (a waiter whose lock file was removed locks the new one), so the
cache holds no lock files between downloads. Locks are advisory (fcntl: Linux and macOS).
"""
from __future__ import annotations

import fcntl
import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

logger = logging.getLogger(__name__)

CACHE_ENV = "LT_PRETRAINED_CACHE"
DEFAULT_TIMEOUT = 30.0  # seconds without a byte from the server before a download gives up
CHUNK_BYTES = 1 << 20
# A full digest, or the leading hex digits a source publishes (torchvision: 8 in the file name).
SHA256_HEX = re.compile(r"[0-9a-f]{8,64}")


class DownloadError(OSError):
    """A download that failed; the message names the URL, the cause and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lt-decoupled" / "pretrained").expanduser()


def cache_path(url: str, cache: Path) -> Path:
    """<cache>/<10 hex digits of sha256(url)>-<file name>: two URLs never share a cache file."""
    name = Path(urllib.parse.urlsplit(url).path).name or "checkpoint"
    return Path(cache) / f"{hashlib.sha256(url.encode()).hexdigest()[:10]}-{name}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, sha256: str | None = None, cache: str | Path | None = None,
          timeout: float = DEFAULT_TIMEOUT) -> Path:
    """The cached file of `url`, downloaded first unless already cached (and matching `sha256`).

    sha256=None accepts any content (the digest is logged so that it can be pinned); a `sha256` that is
    not 8 to 64 hex digits is a DownloadError before anything is downloaded.
    """
    # A DownloadError, not a ValueError: the command lines print it as one line (the digest is the user's
    # #sha256= pin, or a models/zoo.py entry).
    if sha256 is not None and not SHA256_HEX.fullmatch(sha256.lower()):
        raise DownloadError(f"SHA-256 {sha256!r} for {url} is not 8 to 64 hex digits: give the file's digest as "
                            f"sha256sum prints it, or its first 8 or more hex digits")
    sha256 = sha256.lower() if sha256 is not None else None  # digests are printed in either case
    cache = Path(cache) if cache is not None else cache_dir()
    try:
        dest = cache_path(url, cache)
    except ValueError as e:  # urlsplit: an unclosed [ of an IPv6 host
        raise _invalid_url(url, e) from None
    if _cached(dest, sha256):  # dest only ever appears whole (os.replace): no lock needed to read it
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(dest, url):
        if _cached(dest, sha256):  # another process downloaded it while this one waited
            return dest
        if dest.is_file():
            logger.warning("cached %s does not have SHA-256 %s; downloading it again", dest, sha256)
            dest.unlink()
        part = dest.with_name(dest.name + ".part")
        _download(url, part, timeout)
        digest = file_sha256(part)
        if sha256 is not None and not digest.startswith(sha256):
            part.unlink()
            raise DownloadError(f"download of {url} failed: its SHA-256 is {digest}, expected {sha256}...; the file "
                                f"was deleted. The transfer was damaged or the file on the server changed: run "
                                f"again, and if it fails again download the file by hand, check it, and pass its path")
        if sha256 is None:
            logger.warning("%s was not checked (no SHA-256 given); its SHA-256 is %s: pin it by appending "
                           "#sha256=%s to the URL", url, digest, digest)
        os.replace(part, dest)
    return dest


def _cached(dest: Path, sha256: str | None) -> bool:
    return dest.is_file() and (sha256 is None or file_sha256(dest).startswith(sha256))


@contextmanager
def _locked(dest: Path, url: str) -> Iterator[None]:
    """Hold an exclusive flock on <dest>.lock, waiting while another process holds it."""
    lock = dest.with_name(dest.name + ".lock")
    while (fd := _lock(lock, url)) is None:
        pass
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # before unlocking, so that a waiter sees that its file is gone
        os.close(fd)


def _lock(lock: Path, url: str) -> int | None:
    """A descriptor holding the flock of `lock`, or None when its holder removed the file meanwhile."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that is downloading %s (it holds %s)", url, lock)
            fcntl.flock(fd, fcntl.LOCK_EX)
        held = _same_file(fd, lock)  # a lock on a removed file guards nothing: open the new one
    finally:
        if not held:
            os.close(fd)
    return fd if held else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _download(url: str, part: Path, timeout: float) -> None:
    """Append the rest of `url` to `part`, or write all of it when there is no part or Range is ignored."""
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "lt-decoupled"} | ({"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part is not a prefix the server can continue: start over
            part.unlink()
            return _download(url, part, timeout)
        hint = ("the file is not at that address or not open to everyone: check the URL (or its entry in "
                "models/zoo.py), or download it in a browser and pass its path" if e.code < 500 else
                "the server failed: try again later, or download the file by hand and pass its path")
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}; {hint}") from None
    except OSError as e:  # URLError (DNS, refused, unreachable) and TimeoutError before the response
        raise _unreachable(url, getattr(e, "reason", e), timeout, part) from None
    except (http.client.InvalidURL, ValueError) as e:  # a space, a bad port or host (UnicodeError is a ValueError)
        raise _invalid_url(url, e) from None
    with response:
        first = _range_start(response.headers.get("Content-Range", ""), have) if response.status == 206 else 0
        if first is None:
            if have:  # neither the rest of the part nor the whole file: start over without Range
                part.unlink()
                return _download(url, part, timeout)
            raise DownloadError(f"download of {url} failed: the server sent a part of the file that was not asked "
                                f"for (Content-Range {response.headers.get('Content-Range')!r}); try again later, "
                                f"or download the file by hand and pass its path")
        resumed = have > 0 and first == have
        length = response.headers.get("Content-Length")
        start = have if resumed else 0
        received = 0
        try:
            with open(part, "ab" if resumed else "wb") as f, \
                    tqdm(total=None if length is None else start + int(length), initial=start, unit="B",
                         unit_scale=True, unit_divisor=1024, desc=part.name.removesuffix(".part"),
                         disable=None) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            # http.client ends a read early without an error when the server closes the connection.
            if length is not None and received < int(length):
                raise ConnectionError(f"the server closed the connection {int(length) - received} bytes short")
        except (OSError, http.client.HTTPException) as e:  # timeout or dropped connection mid-file
            raise DownloadError(f"download of {url} stopped after {part.stat().st_size} bytes "
                                f"({type(e).__name__}: {e}); run the same command again to resume it") from None


def _range_start(content_range: str, have: int) -> int | None:
    """Where a 206 answer's bytes start, when they run from `have` (the rest of the part) or from 0 to the file's
    end; None for any other range ("bytes 100-199/1000", a missing or malformed header), which would store a
    damaged file as whole."""
    found = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range.strip())
    if not found:
        return None
    start, end, total = found.groups()
    if int(start) not in (have, 0) or (total != "*" and int(end) + 1 != int(total)):
        return None
    return int(start)


def _invalid_url(url: str, e: Exception) -> DownloadError:
    return DownloadError(f"{url!r} is not a valid URL ({e}): check it, or download the file by hand and pass its path")


def _unreachable(url: str, reason: object, timeout: float, part: Path) -> DownloadError:
    host = urllib.parse.urlsplit(url).netloc
    cause = (f"no answer from {host} within {timeout:g} s" if isinstance(reason, TimeoutError)
             else f"cannot reach {host} ({reason})")
    dest = part.with_name(part.name.removesuffix(".part"))
    return DownloadError(f"download of {url} failed: {cause}. Check the network (and https_proxy if you use "
                         f"one) and run again, or download the file on a machine with network and pass its "
                         f"path (or copy it to {dest})")
