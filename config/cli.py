"""The command line both entry scripts share: --cfg YAML, key=value overrides, --test, --ckpt, --resume, --pretrained."""
from __future__ import annotations

import argparse
from typing import Sequence

from config.load import ConfigError, load_config
from config.schema import Config


def parse_cli(argv: Sequence[str] | None, description: str) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", help="experiment YAML (only what differs from config/schema.py)")
    parser.add_argument("--test", action="store_true", help="evaluate a checkpoint on the test split and exit")
    parser.add_argument("--ckpt", help="checkpoint for --test (default: the run's best.pt, else last.pt)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the run directory from its last.pt (starts fresh if there is none)")
    parser.add_argument("--pretrained", metavar="NAME|URL|PATH",
                        help="start from these weights: same as model.pretrained=... (python -m models list)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=30")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"model.pretrained={args.pretrained}"] if args.pretrained else [])
    try:
        return load_config(args.cfg, overrides), args
    except ConfigError as e:  # a user's typo: one line that says what to fix, no traceback
        raise SystemExit(f"config error: {e}") from None
