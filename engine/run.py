"""What both entry scripts do around their loops: command line, run directory, logging, seeding, and --test."""
from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Collection, Iterator, Sequence

import numpy as np
import torch

from config.cli import parse_cli
from config.load import not_one_of
from config.schema import Config
from data.cifar import DatasetFormatError, DatasetNotFoundError
from engine.metrics import format_table
from models.checkpoint import CheckpointError
from models.download import DownloadError

logger = logging.getLogger(__name__)


@contextmanager
def user_errors() -> Iterator[None]:
    """Errors the user causes and can fix (missing or damaged data, a bad checkpoint, a failed
    download) end the program with their one message, which says what to do, and no traceback."""
    try:
        yield
    except (DatasetNotFoundError, DatasetFormatError, CheckpointError, DownloadError) as e:
        raise SystemExit(f"error: {e}") from None


def check_names(names: dict[str, tuple[str, Collection[str]]]) -> None:
    """Each config key that picks from a registry, {key: (value, registry)}, names an entry of it.

    Checked before any work, so that a typo ends the run with one line: the close names and all valid ones.
    """
    for key, (value, registry) in names.items():
        if value not in registry:
            raise SystemExit(f"config error: {not_one_of(key, value, sorted(registry))}")


def run_cli(description: str, main: Callable[..., dict], test: Callable[[Config, Path], dict]) -> None:
    """An entry script's command line: parse --cfg and overrides, then train (main) or --test."""
    cfg, args = parse_cli(None, description)
    with user_errors():
        if args.test:
            setup_run(cfg.run_dir, cfg.train.seed, cfg.train.num_threads)
            test(cfg, Path(args.ckpt) if args.ckpt else default_checkpoint(Path(cfg.run_dir)))
        else:
            main(cfg, resume=args.resume)


def setup_run(run_dir: str | Path, seed: int, num_threads: int) -> Path:
    """Create the run directory, log to stderr and <run_dir>/train.log, seed every RNG."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    for h in (logging.StreamHandler(sys.stderr), logging.FileHandler(run_dir / "train.log")):
        h.setFormatter(fmt)
        root.addHandler(h)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    return run_dir


def default_checkpoint(run_dir: Path) -> Path:
    """best.pt (chosen on the validation split) when the run has one, else last.pt."""
    best = run_dir / "best.pt"
    return best if best.is_file() else run_dir / "last.pt"


def report_test(metrics: dict, class_names: Sequence[str], out_path: Path, ckpt_path: Path) -> None:
    """Print the many/medium/few table and write test_metrics.json."""
    out = {"checkpoint": str(ckpt_path), "class_names": list(class_names), **metrics}
    out_path.write_text(json.dumps(out, indent=1))
    print(f"test split, checkpoint {ckpt_path}:\n{format_table(metrics, class_names)}\nwritten to {out_path}")


def trim_metrics_log(run_dir: Path, last_epoch: int) -> None:
    """On resume, drop metric lines of epochs after the checkpoint (logged before a kill)."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if json.loads(line).get("epoch", 0) <= last_epoch]
        path.write_text("".join(line + "\n" for line in keep))
