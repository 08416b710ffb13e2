"""Pretrained checkpoints from the command line.

    python -m models list                          # the registry, and what is in the download cache
    python -m models fetch resnet50_imagenet       # download a registry name or URL into the cache
    python -m models import final_model_checkpoint.pth balms_resnet32.pt --arch resnet32
    python -m models release logs/<stage-1 run>/last.pt models/released/NAME.pt

`import` converts a checkpoint in any known layout (BALMS / Decoupling, MiSLAS / ARB, torchvision,
ours; models/foreign.py) into a checkpoint of this tool once. `release` writes a stage-1 run's
float16 release (models/release.py) and prints what its models/zoo.py entry takes. The cache is
$LT_PRETRAINED_CACHE, else ~/.cache/lt-decoupled/pretrained.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Sequence

from models.checkpoint import CheckpointError
from models.download import DEFAULT_TIMEOUT, CACHE_ENV, DownloadError, cache_dir, cache_path
from models.export import path_error_message
from models.pretrained import import_checkpoint, resolve
from models.release import RELEASED_DIR, write_release
from models.registry import MODELS
from models.zoo import PRETRAINED


def list_registry(args: argparse.Namespace) -> None:
    cache = cache_dir()
    print(f"cache: {cache} (${CACHE_ENV} moves it)")
    rows = [("name", "arch", "dataset", "classes", "format", "file")]
    registered = set()
    for name, e in PRETRAINED.items():
        path = RELEASED_DIR / e.url if e.shipped else cache_path(e.url, cache)
        registered.add(path.name)
        rows.append((name, e.arch, e.dataset, str(e.num_classes), e.format, str(path) if path.is_file() else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    others = sorted(p for p in cache.glob("*") if p.is_file() and p.name not in registered) if cache.is_dir() else []
    if others:
        print("other files in the cache:")
    for p in others:
        note = "partial download; fetching the same URL resumes it" if p.name.endswith(".part") else "downloaded by URL"
        print(f"  {p.name}  {p.stat().st_size} bytes  ({note})")


def fetch_source(args: argparse.Namespace) -> None:
    path, _ = resolve(args.source, timeout=args.timeout)
    print(path)


def refuse_existing(out: str) -> None:
    """OUT is written new: an argument order mixed up must not replace a run's last.pt (or the source itself)."""
    if Path(out).exists():
        raise CheckpointError(f"{out} exists: give OUT the path of a new file (nothing is overwritten)")


def import_source(args: argparse.Namespace) -> None:
    refuse_existing(args.out)
    payload = import_checkpoint(args.source, args.out, arch=args.arch, timeout=args.timeout)
    model_args = payload["model_args"]
    print(f"wrote {args.out}: {model_args['name']}, {model_args['num_classes']} classes, converted from the "
          f"{payload['layout']} layout; use it as {shlex.quote(f'model.pretrained={args.out}')}")


def release_run(args: argparse.Namespace) -> None:
    refuse_existing(args.out)
    sha256, size = write_release(args.checkpoint, args.out)
    where = Path(args.out).resolve()
    entry = (f"its models/zoo.py entry takes url {str(where.relative_to(RELEASED_DIR))!r} and that digest"
             if where.is_relative_to(RELEASED_DIR) else "to ship it, write it into models/released/")
    print(f"wrote {args.out}: {size} bytes, SHA-256 {sha256}; {entry}")


def seconds(text: str) -> float:
    """--timeout: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """A bad command line is one line, as for the entry scripts (config.cli, which models/ does not
    import, has the same class): argparse would print the whole usage first; no option is taken from an
    abbreviation."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


COMMANDS = {"list": list_registry, "fetch": fetch_source, "import": import_source, "release": release_run}
# What to do about an OSError of each command: the files it writes are OUT or the download cache.
WRITE_FIXES = {
    "list": f"point ${CACHE_ENV} at a folder you can read",
    "fetch": f"point ${CACHE_ENV} at a folder you can write",
    "import": "give OUT a path in a folder you can write",
    "release": "give OUT a path in a folder you can write",
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m models", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the registry of named checkpoints and the cache")
    fetch = sub.add_parser("fetch", help="download a registry name or URL into the cache, print its path")
    fetch.add_argument("source", help="registry name or http(s) URL (URL#sha256=<hex> to check it)")
    imp = sub.add_parser("import", help="convert a checkpoint in any known layout into one of this tool")
    imp.add_argument("source", help="registry name, http(s) URL or path")
    imp.add_argument("out", help="path of the checkpoint to write (.pt)")
    imp.add_argument("--arch", choices=sorted(MODELS),
                     help="architecture of the weights (needed for foreign layouts, which do not record it)")
    rel = sub.add_parser("release", help="write a stage-1 run's checkpoint as a float16 release")
    rel.add_argument("checkpoint", help="a stage-1 run's checkpoint (logs/<run>/last.pt)")
    rel.add_argument("out", help="path of the release to write (models/released/NAME.pt to ship it)")
    for p in (fetch, imp):
        p.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT,
                       help="seconds to wait for the server before giving up (default %(default)s)")
    args = parser.parse_args(argv)
    # A SIGTERM ends the command as a Ctrl-C does: the download's lock and part files are tidied up on the way out.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt as e:
        name = "SIGTERM" if e.args == ("SIGTERM",) else "SIGINT (Ctrl-C)"
        print(f"stopped by {name}" + ("; fetching the same source again resumes the download"
                                      if args.command in ("fetch", "import") else ""), file=sys.stderr)
        raise SystemExit(143 if name == "SIGTERM" else 130) from None
    except (DownloadError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)  # one line, and exit status 2 as for every user error
        raise SystemExit(2) from None
    except BrokenPipeError:  # `list | head`: the reader stopped reading; stop quietly, as SIGPIPE ends programs
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(128 + signal.SIGPIPE) from None
    except OSError as e:  # writing OUT or into the cache: a folder on the path is a file, permissions, a full disk
        print(f"error: {path_error_message(e)}; {WRITE_FIXES[args.command]}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


if __name__ == "__main__":
    main()
