"""What both entry scripts share at their top: the command line (--cfg YAML, key=value overrides,
--test, --ckpt, --resume, --pretrained, --debug), the start of a run (start_processes, start_run), and
what --test runs, which is the same for both stages. How a program ends on an error: config/program.py."""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch
import yaml

from config.keys import ConfigError
from config.load import check_names, check_schedule_keys, load_config
from config.program import OneLineParser, nothing_left_of_a_refused_run, run_program, user_errors
from config.readers import check_dataset_keys
from config.saved import check_resume, check_stage_of_run, dump_config
from config.schema import Config
from config.stage2 import check_method_keys
from data.build import LongTailData, Normalization
from data.build_files import DATASET_KINDS, FileData, build_training_set
from data.long_tail import shot_groups
from engine.device import check_amp, set_cuda_flags
from engine.distributed import Dist, check_same_data, from_rank0, init_distributed, local_rank0_first, shutdown
from engine.evaluate import evaluate_checkpoint, write_test_report
from engine.run import trim_metrics_log
from engine.run_dir import RunDirError, claim_run_dir, default_checkpoint, resume_checkpoint, setup_run
from engine.runlog import RunLog
from models.checkpoint import remove_stale_temp_files
from models.losses import EmptyClassError

logger = logging.getLogger("cli")


class Once(argparse.Action):
    """An option that names one thing (a file, weights): given twice, one of the two would be dropped unsaid."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}): give it once")
        setattr(namespace, self.dest, values)


def cli_parser(description: str) -> argparse.ArgumentParser:
    parser = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", action=Once, help="experiment YAML (only what differs from config/schema.py)")
    parser.add_argument("--test", action="store_true", help="evaluate a checkpoint on the test split and exit")
    parser.add_argument("--ckpt", action=Once, help="checkpoint for --test (default: the run's best.pt, else last.pt)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the run directory from its last.pt (starts fresh if there is none)")
    parser.add_argument("--pretrained", action=Once, metavar="NAME|URL|PATH",
                        help="start from these weights: same as model.pretrained=... (python -m models list)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error too")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=30")
    return parser


def config_of(args: argparse.Namespace, stage: str) -> Config:
    overrides = list(args.overrides) + ([f"model.pretrained={args.pretrained}"] if args.pretrained else [])
    with user_errors():
        return load_config(args.cfg, overrides, stage, check_method_keys if stage == "stage2" else None)


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options and overrides (in any order); an option no other one given reads is an error."""
    parser = cli_parser(description)
    args = parser.parse_intermixed_args(argv)
    if args.ckpt and not args.test:
        parser.error("--ckpt names the checkpoint that --test evaluates: add --test, or drop --ckpt")
    if args.test and args.resume:
        parser.error("--test evaluates a checkpoint and --resume trains on: give one of them")
    if args.pretrained and any(o.split("=", 1)[0].strip() == "model.pretrained" for o in args.overrides):
        parser.error("--pretrained and model.pretrained=... both name the weights to start from: give one of them")
    return args


def parse_cli(stage: str, description: str, argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """The config of a `stage` run (stage1 | stage2) and the parsed options; overrides and options mix freely."""
    args = parse_args(description, argv)
    return config_of(args, stage), args


def start_processes(cfg: Config) -> tuple[Dist, torch.device]:
    """The first step of both stages' main: this process's rank (torchrun) and device, checked against
    the precision asked for."""
    ranks, device = init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    check_amp(device, cfg.train.amp)
    set_cuda_flags(device, cfg.train.tf32, cfg.train.cudnn_benchmark)
    return ranks, device


def start_run(cfg: Config, stage: str, resume: bool, ranks: Dist) -> tuple[Path, dict | None]:
    """The run directory (rank 0 claims it while its run lasts and writes it, every RNG seeded) and the last.pt
    to resume from (None for a new run; a run is never overwritten), whose config must be this one. Rank 0
    reads last.pt and sends it to the others: on machines without a shared disk only rank 0's holds the
    run directory."""
    check_names({"data.dataset": (cfg.data.dataset, DATASET_KINDS)})
    check_dataset_keys(cfg, DATASET_KINDS[cfg.data.dataset])
    def read() -> dict | None:  # before the log opens: a refusal writes nothing
        claim_run_dir(Path(cfg.run_dir))  # one writer: a second run there stops here
        try:
            ckpt = resume_checkpoint(Path(cfg.run_dir), resume)
        except RunDirError:  # a run there: of the other stage (its config.yaml says), --resume would not help
            saved = {} if resume else _saved_config(Path(cfg.run_dir))
            if saved:
                check_stage_of_run(saved, stage, cfg.run_dir, resume=False)
            raise
        saved = _saved_config(Path(cfg.run_dir)) if ckpt is None else {}  # the other stage's start, no checkpoint
        if saved:  # yet: its metric log and events are not this stage's to drop
            check_stage_of_run(saved, stage, cfg.run_dir, resume=resume)
        return ckpt
    if not resume:  # a new run (else refused as such): its config's errors before the run directory's
        check_schedule_keys(cfg)
    ckpt = from_rank0(read, ranks)
    if ckpt is not None:
        check_resume(ckpt["config"], cfg, stage, Path(cfg.run_dir) / "config.yaml")
    elif resume:  # --resume with nothing to resume: a new run too
        check_schedule_keys(cfg)
    run_dir = setup_run(cfg.run_dir, cfg.train.seed, cfg.train.num_threads, writes=ranks.is_main)
    if ranks.is_main:
        if ckpt is None and resume and (run_dir / "best.pt").is_file():  # said once the log is open: train.log has it
            logger.warning("%s holds no last.pt to continue from: the run starts again from its first step, and "
                           "its best.pt is replaced by this run's", run_dir)
        elif ckpt is None and resume:  # a run's config.yaml given from elsewhere names a log_dir relative to there
            logger.warning("--resume: %s holds no run to continue: a new run starts there", run_dir.resolve())
        remove_stale_temp_files(run_dir)  # of checkpoint and metric-log writes a kill interrupted
        if ckpt is None:  # a start killed before its first last.pt may have logged epochs: they are redone
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(run_dir / "tb", ignore_errors=True)  # its TensorBoard events too
        else:  # lines of epochs after last.pt (logged before a kill) are redone too
            trim_metrics_log(run_dir, ckpt["epoch"])
    return run_dir, ckpt


def _saved_config(run_dir: Path) -> dict:
    """A run directory's config.yaml as written, {} where it is missing or unreadable (a refusal reads it)."""
    try:
        tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return tree if isinstance(tree, dict) else {}


def training_set(cfg: Config, ranks: Dist, normalization: Normalization | None) -> LongTailData | FileData:
    """The run's training set and validation split (data.*; `normalization`: a recorded one, else the dataset's),
    the same on every rank: each reads its own data.root, so another copy on one machine is one error here."""
    d = cfg.data

    def build() -> LongTailData | FileData:
        return build_training_set(d.dataset, d.root, d.list_dir, d.download, d.imbalance_factor, d.profile,
                                  d.subset_seed, d.val_per_class, d.image_size, normalization, d.subset_draw, d.flip)
    data = local_rank0_first(build, ranks) if d.download else build()  # one download per machine
    check_same_data(lambda: f"{len(data.train_labels)} training images, {len(data.val_labels)} validation, digest "
                            f"{data.train_digest}", "training set", ranks)
    return data


def open_log(cfg: Config, stage: str, run_dir: Path, ranks: Dist, ckpt: dict | None = None) -> RunLog | None:
    """Rank 0 writes the resolved config.yaml (the keys `stage` reads) and opens the metric log, which
    for a resumed run (ckpt) hides the TensorBoard events logged after its checkpoint; the other ranks
    write nothing (None)."""
    if not ranks.is_main:
        return None
    dump_config(cfg, run_dir / "config.yaml", stage)
    # From the step after the last epoch last.pt closed: a run stopped in an epoch's last step saved step (e + 1) L
    # before logging epoch e + 1 at that step, which a resume killed before its next last.pt may have logged.
    purge = ckpt["step"] - ckpt.get("epoch_step", 0) + 1 if ckpt is not None and "step" in ckpt else None
    return RunLog(run_dir, purge_step=purge)


def check_select_metric(metric: str, class_counts: list[int], has_val: bool, chooses: str = "best.pt") -> None:
    """train.select_metric other than top1 must name a shot group with classes in this training set, and
    there must be a validation split to measure it on: else no epoch (or tau) would ever be chosen."""
    if metric == "top1":
        return
    if not has_val:
        raise SystemExit(f"config error: train.select_metric={metric} chooses {chooses} on the validation split, and "
                         f"this run has none: set data.val_per_class (or give a val split), or leave "
                         f"train.select_metric out")
    if not shot_groups(class_counts)[metric]:
        raise SystemExit(f"config error: train.select_metric={metric} chooses {chooses} by a shot group without "
                         f"classes in this training set: set train.select_metric=top1 or a group with classes")


def report_path(run_dir: Path, ckpt_path: Path) -> Path:
    """<run_dir>/test_metrics.json, or, for a checkpoint from elsewhere tested in a run directory that
    holds its own checkpoints, test_metrics_<its folder>_<its name>.json: never the run's own report."""
    foreign = ckpt_path.resolve().parent != run_dir.resolve()
    if foreign and any((run_dir / name).exists() for name in ("best.pt", "last.pt")):
        return run_dir / f"test_metrics_{ckpt_path.resolve().parent.name}_{ckpt_path.stem}.json"
    return run_dir / "test_metrics.json"


def test(cfg: Config, ckpt_path: Path | None) -> dict:
    """--test: the table of a checkpoint (default: the run's best.pt, else last.pt) on its test split,
    written to <run_dir>/test_metrics.json (report_path); the run's train.log is left as its training
    wrote it (a refused --test, a missing --ckpt say, adds nothing to it)."""
    ranks, device = start_processes(cfg)
    run_dir = setup_run(cfg.run_dir, cfg.train.seed, cfg.train.num_threads, writes=ranks.is_main, log_file=False)
    ckpt_path = ckpt_path or from_rank0(lambda: default_checkpoint(run_dir), ranks)  # the run's own: rank 0 has it
    try:
        metrics, class_names = evaluate_checkpoint(ckpt_path, cfg.data.root, cfg.data.download, cfg.eval.batch_size,
                                                   device, cfg.model.channels_last, cfg.eval.logit_adjust_tau,
                                                   cfg.train.amp, ranks, cfg.data.list_dir, cfg.data.workers)
    except EmptyClassError as e:  # eval.logit_adjust_tau with a class that had no training image
        raise ConfigError(str(e)) from None
    if ranks.is_main:
        write_test_report(metrics, class_names, report_path(run_dir, Path(ckpt_path)), ckpt_path,
                          cfg.eval.logit_adjust_tau)
    shutdown(ranks)
    return metrics


def run_cli(stage: str, description: str, main: Callable[..., dict]) -> None:
    """An entry script's command line: parse --cfg and overrides, then train (main) or --test."""
    args = parse_args(description)

    def command() -> None:
        if args.ckpt and "=" in args.ckpt and not Path(args.ckpt).exists():  # --ckpt swallowed an override
            raise SystemExit(f"error: --ckpt takes a checkpoint's path, got {args.ckpt!r}: put the path right "
                             f"after --ckpt")
        cfg = config_of(args, stage)
        with nothing_left_of_a_refused_run(Path(cfg.run_dir)), user_errors():
            if args.test:
                test(cfg, Path(args.ckpt).expanduser() if args.ckpt else None)
            else:
                main(cfg, resume=args.resume)

    run_program(command, args.debug, resumable=not args.test)  # --test has nothing to resume
