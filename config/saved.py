"""A run's saved config: written to its directory and checkpoints, read back, and compared with the
config a --resume or a stage-2 run brings (old key names read as their new ones).
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import yaml

from config.keys import ConfigError, flatten, renamed, set_key
from config.load import check_choices, config_to_dict
from config.schema import STAGE_SCRIPTS, Config


def _saved_flat(tree: dict) -> dict[str, Any]:
    """A saved config's dotted keys, old names (RENAMED) read as their new ones. A BALMS run saved before
    meta_sampler.relax (2026-12-06) drew with the class relaxation: its config reads so, not as the default."""
    flat = {renamed(k) or k: v for k, v in flatten(tree).items()}
    if flat.get("stage2.method") == "balms":
        flat.setdefault("meta_sampler.relax", "class")
    return flat


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config from a checkpoint's or run directory's saved dict (same checks)."""
    cfg = Config()
    for key, value in _saved_flat(tree).items():
        set_key(cfg, key, value, "saved config")
    check_choices(cfg)
    return cfg


def dump_config(cfg: Config, path: str | Path, stage: str | None = None) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg, stage), sort_keys=False))


def config_diff(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts (e.g. a checkpoint's and now).

    A key that one side lacks (added to the schema after that run was saved, or a key the run's
    stage does not read) differs only when the other side holds a value other than its default.
    """
    a, b = _saved_flat(saved), flatten(current)
    defaults = flatten(config_to_dict(Config()))
    return sorted(k for k in set(a) | set(b) if a.get(k, defaults.get(k)) != b.get(k, defaults.get(k)))


def check_stage_of_run(saved: dict, stage: str, run_dir: str | Path, resume: bool = True) -> None:
    """A run directory holds the run of one stage (a saved config holds the sections its stage reads:
    stage 2's has "stage2"): --resume of the other stage there, or a new run there without it (whose refusal
    would advise --resume), is refused as such, not as a config that differs at many keys."""
    saved_stage = "stage2" if "stage2" in saved else "stage1"
    if saved_stage != stage:
        raise ConfigError(f"{'--resume: ' if resume else ''}{run_dir} holds a {saved_stage} run "
                          f"({STAGE_SCRIPTS[saved_stage]}), not a {stage} one: each stage writes its own run "
                          f"directory; give the {stage} run its own name=... (or log_dir=...)")


# Keys whose values may differ between a run's saved config and the one that continues it (check_resume): where
# things lie, the host's resources, and how evaluation is batched or adjusted at --test.
SAME_RUN_KEYS = ("data.root", "data.list_dir", "data.download", "log_dir", "name", "train.device", "train.num_threads",
                 "data.workers", "data.prefetch", "train.cudnn_benchmark", "train.dist_timeout_s", "train.save_every_s",
                 "eval.batch_size", "eval.logit_adjust_tau")


# Keys naming a file the run started from: another spelling of the same file (relative or absolute, through a
# symlink, with ~) is the same run.
FILE_KEYS = ("stage1.checkpoint", "model.pretrained")


def _same_file(a: Any, b: Any) -> bool:
    try:
        return bool(a) and bool(b) and os.path.samefile(Path(str(a)).expanduser(), Path(str(b)).expanduser())
    except (OSError, ValueError):  # gone, unreadable, or a name that is no path (a release's)
        return False


def run_changes(saved: dict, cfg: Config, stage: str) -> list[str]:
    """The keys of a `stage` run's saved config that `cfg` changes beyond SAME_RUN_KEYS: a run of other settings."""
    current = config_to_dict(cfg, stage)
    run, now = _saved_flat(saved), flatten(current)
    return [k for k in config_diff(saved, current)
            if k not in SAME_RUN_KEYS and not (k in FILE_KEYS and _same_file(run.get(k), now.get(k)))]


def check_resume(saved: dict, cfg: Config, stage: str, saved_at: str | Path) -> None:
    """--resume continues a run only with the config it was started with. Where things lie may differ
    (a moved or renamed run directory, another copy or spelling of the data folder): the run is the
    directory's last.pt, and the data's class counts are checked against the checkpoint's. So may the
    host's resources (the device, threads, decoding processes, augmenting ahead in a thread (data.prefetch: the
    same batches), cuDNN's algorithm search, the collective timeout, how often last.pt is written), whether the
    data may be downloaded, and how evaluation is
    batched or adjusted at --test: a run moved to another machine continues, to float precision rather
    than bit for bit when the device or the thread count changes (a BALMS run with meta_sampler.relax=image,
    whose noise a GPU makes itself, on other draws between a CPU and a GPU)."""
    check_stage_of_run(saved, stage, Path(saved_at).parent)
    diff = run_changes(saved, cfg, stage)
    if diff:
        defaults, run, now = flatten(config_to_dict(Config())), _saved_flat(saved), flatten(config_to_dict(cfg, stage))
        def shown(v: Any) -> str:  # 2 rather than 2.0 for a float key given as train.warmup=2; 0.1 as 0.1
            return str(int(v)) if isinstance(v, float) and v.is_integer() and abs(v) < 1e15 else str(v)
        values = ", ".join(f"{k} (the run's {shown(run.get(k, defaults.get(k)))}, now "
                           f"{shown(now.get(k, defaults.get(k)))})" for k in diff)
        # The run's config.yaml, where it is now, with the data where it is now, and the keys that file lacks
        # because the run predates them (read as the run had them, not at their defaults).
        written = flatten(saved)
        own = [f"log_dir={Path(saved_at).parent}"]
        own += [f"data.root={cfg.data.root}"] if cfg.data.root != run.get("data.root") else []
        own += [f"{k}={run[k]}" for k in diff if k in run and k not in written]
        command = shlex.join(["python", STAGE_SCRIPTS[stage], "--cfg", str(saved_at), "--resume", *own])
        raise ConfigError(f"--resume with a config that differs from the run's at {values}; resume with the run's "
                          f"own config: {command}")
