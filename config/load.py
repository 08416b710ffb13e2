"""YAML experiment files + dotted command-line overrides -> a type-checked `Config`.

    cfg = load_config("config/cifar10_lt/stage1_softmax.yaml", ["train.epochs=30"])

Every key is checked against the schema (config/keys.py); then the values together: choices, ranges,
and with `stage` a key that the other stage alone reads (schema.STAGE_KEYS) set away from its default
names the stage that reads it.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from config.keys import ConfigError, flatten, key_fields, set_key, set_override, shown
from config.schema import CHOICES, LIMITS, RANGES, STAGE_SCRIPTS, Config, stage_of
from config.yaml12 import load_yaml


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (),
                stage: str | None = None, check_keys: typing.Callable[[Config], None] | None = None) -> Config:
    """Defaults, then the YAML file's keys, then `key=value` overrides, in that order.

    stage ("stage1" | "stage2"): the stage that will run, whose unread keys must stay at their defaults.
    check_keys: more checks of unread keys (stage 2's method's), made with the stage's, before any rule on values.
    """
    cfg, from_file = Config(), set()
    if path is not None:
        path = Path(path).expanduser()  # --cfg=~/x.yaml: no shell expands a ~ after =
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a file"
            raise ConfigError(f"config file {str(path)!r} {what}; pass --cfg with a YAML under config/")
        try:
            tree = load_yaml(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a YAML text file (not UTF-8): pass --cfg a YAML under config/") from None
        except yaml.YAMLError as e:  # PyYAML names the stream "<unicode string>": name the file
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            # A reader error (a control character) has no `problem`: its message's first line, without the stream.
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, got {type(tree).__name__}")
        for key, value in flatten(tree).items():
            set_key(cfg, key, value, f"in {path}")
            from_file.add(key)
    epochs_given, overridden = None, set()  # a train.epochs= override, which train.iterations > 0 would override
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.epochs=30")
        set_override(cfg, key.strip(), raw, f"override {shown(item)}")
        overridden.add(key.strip())
        if key.strip() == "train.epochs":
            epochs_given = item
    cfg.overridden = frozenset(overridden)
    # A ~ after key= is expanded by no shell (nor in a YAML file): the run directory and the stage-1 checkpoint
    # would be read as a folder named ~. (data.root, data.list_dir and model.pretrained are expanded where read.)
    cfg.log_dir, cfg.stage1.checkpoint = os.path.expanduser(cfg.log_dir), os.path.expanduser(cfg.stage1.checkpoint)
    if stage is not None:  # a key the stage never reads is named as such before any rule on its value
        check_stage(cfg, stage, path, from_file)
    if check_keys is not None:
        check_keys(cfg)
    check_choices(cfg)
    check_ranges(cfg)
    if epochs_given and cfg.train.iterations > 0:
        raise ConfigError(f"{epochs_given} has no effect: train.iterations={cfg.train.iterations} sets the run's "
                          f"length (and train.warmup's unit) in steps; set train.iterations=N instead, or add "
                          f"train.iterations=0 to count in epochs")
    return cfg


def changed_keys(cfg: Config) -> dict[str, Any]:
    """{dotted key: value} of every key set away from its default or given as a command-line override (at its
    default value too: `data.sampler=instance` given to stage 2 is as unread as any other sampler)."""
    defaults = flatten(config_to_dict(Config()))
    return {k: v for k, v in flatten(config_to_dict(cfg)).items() if v != defaults[k] or k in cfg.overridden}


def check_stage(cfg: Config, stage: str, path: Path | None = None, from_file: typing.Collection[str] = ()) -> None:
    """No key that only the other stage reads is set away from its default; one set in a --cfg file (from_file)
    that sets none of this stage's own keys says the file is the other stage's config."""
    ours = any(stage_of(k) == stage for k in from_file)
    for key, value in changed_keys(cfg).items():
        owner = stage_of(key)
        if owner not in (None, stage) and key in from_file and not ours:
            raise ConfigError(f"{path} is a {owner} config (it sets {key}, read by {STAGE_SCRIPTS[owner]} only): "
                              f"run it with python {STAGE_SCRIPTS[owner]} --cfg {path}")
        if owner not in (None, stage):
            raise ConfigError(f"{key}={value!r} is read by {owner} ({STAGE_SCRIPTS[owner]}) only; "
                              f"{stage} ({STAGE_SCRIPTS[stage]}) does not use it: remove it"
                              + (f" from {path}" if key in from_file else ""))


def check_names(names: dict[str, tuple[str, typing.Collection[str]]]) -> None:
    """Each key that picks from a registry, {key: (value, registry)}, names an entry of it.

    Checked before any work, so that a typo ends the run with one line: the close names and all valid ones.
    """
    for key, (value, registry) in names.items():
        if value not in registry:
            raise ConfigError(not_one_of(key, value, sorted(registry)))


def not_one_of(key: str, value: str, valid: typing.Sequence[str]) -> str:
    """The message for a key whose value is none of `valid`: all of them, and the close ones."""
    close = difflib.get_close_matches(value, list(valid), n=3, cutoff=0.5)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return f"{key}={value!r} is not one of {', '.join(valid)}{hint}"


def _value(cfg: Config, key: str) -> Any:
    """The value of a dotted section.key."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def check_ranges(cfg: Config) -> None:
    """Numeric keys within their bounds (schema.RANGES, schema.LIMITS), Nesterov with a momentum, and the run named."""
    for key, (op, bound) in RANGES.items():
        value = _value(cfg, key)
        if not (value > bound if op == ">" else value >= bound):
            raise ConfigError(f"{key}={shown(value)} is out of range: it must be {op} {bound:g}")
    for key, (op, bound, why) in LIMITS.items():
        value = _value(cfg, key)
        if not (value < bound if op == "<" else value <= bound):
            raise ConfigError(f"{key}={shown(value)} is out of range: it must be {op} {bound} ({why})")
    if cfg.train.nesterov and cfg.train.momentum == 0:  # torch.optim.SGD refuses it with a traceback
        raise ConfigError("train.nesterov=true needs a momentum, and train.momentum=0 has none: set train.momentum "
                          "(e.g. 0.9) or train.nesterov=false")
    # Seeds: numpy's global one (from train.seed) and the LDAM draw's take 32 bits, a torch generator's 64.
    seed_bits = {"train.seed": 32, "data.subset_seed": 32 if cfg.data.subset_draw == "ldam" else 64}
    for key, bits in seed_bits.items():
        if _value(cfg, key) >= 2**bits:
            raise ConfigError(f"{key}={shown(_value(cfg, key))} is out of range: it must be < 2**{bits} ({2**bits})")
    for section in dataclasses.fields(cfg):  # counts and sizes reach C ints (torch.set_num_threads, DataLoader)
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values) if dataclasses.is_dataclass(values) else ():
            value, key = getattr(values, f.name), f"{section.name}.{f.name}"
            if type(value) is int and value >= 2**31 and key not in seed_bits:
                raise ConfigError(f"{key}={shown(value)} is out of range: it must be < 2**31")
    grid = cfg.stage2.tau_norm_grid
    if not grid or min(grid) < 0:
        raise ConfigError(f"stage2.tau_norm_grid={grid} must list at least one tau, each >= 0 (e.g. [0.5, 1.0])")
    _, tau_bound, why = LIMITS["stage2.tau_norm_tau"]  # each tau of the grid, as the one tau
    if max(grid) > tau_bound:
        raise ConfigError(f"stage2.tau_norm_grid={shown(grid)} holds {max(grid):g}: each tau must be <= {tau_bound} "
                          f"({why})")
    if not cfg.name.strip() and not cfg.log_dir:
        raise ConfigError("name is empty: give the run a name (its directory is logs/<name>), or set log_dir")
    if not cfg.log_dir:  # name makes the run directory only without log_dir
        check_run_name(cfg.name)
    elif not cfg.log_dir.isprintable():  # bytes not valid in the locale (surrogate escapes), control characters
        raise ConfigError(f"log_dir={cfg.log_dir!r} holds characters that are not printable text (TensorBoard and "
                          f"the logs cannot write it): give log_dir a path in printable characters")


def check_schedule_keys(cfg: Config) -> None:
    """The schedule of a new run (config.cli.start_run; --test trains nothing, and a run started before the checks
    added on 2026-12-07 still resumes). The warm-up ends before the run does, else the lr would never reach train.lr;
    so does each milestone of the step schedule, else the lr would never decay there, and the default milestones
    (epochs of the 200-epoch schedule) are not taken as steps. The cosine schedule reads no milestones or gamma, so
    given on the command line they are an error (a file's are not: one written for the step schedule may be run
    with train.schedule=cosine, and a run's config.yaml holds every key); likewise train.warmup_start without a
    warm-up."""
    t = cfg.train
    length, unit = _run_length(cfg)
    if t.warmup and t.warmup >= (t.iterations or t.epochs):
        raise ConfigError(f"train.warmup={t.warmup:g} ({unit}) is not shorter than the run ({length}): "
                          f"lower train.warmup (0 = none) or lengthen the run")
    if not t.warmup and "train.warmup_start" in cfg.overridden:
        raise ConfigError(f"train.warmup_start={t.warmup_start:g} is read only with a warm-up; train.warmup=0 has "
                          f"none: remove it, or set train.warmup")
    if t.schedule != "step":
        for key in ("train.milestones", "train.gamma"):
            if key in cfg.overridden:
                raise ConfigError(f"{key}={shown(_value(cfg, key))} is read by train.schedule=step only; "
                                  f"train.schedule={t.schedule} does not use it: remove it, or set train.schedule=step")
    elif t.iterations and "train.milestones" not in changed_keys(cfg):
        raise ConfigError(f"train.milestones keeps its default {shown(t.milestones)}, epochs of a 200-epoch run, but "
                          f"{length} counts steps: set train.milestones in steps (e.g. "
                          f"[{round(0.8 * t.iterations)}, {round(0.9 * t.iterations)}])")
    elif t.milestones and max(t.milestones) >= (t.iterations or t.epochs):
        raise ConfigError(f"train.milestones={shown(t.milestones)} ({unit}) holds {max(t.milestones):g}, not before "
                          f"the run's end ({length}): the lr would never decay there; set each milestone within "
                          f"the run")


def _run_length(cfg: Config) -> tuple[str, str]:
    """The key that sets the run's length, as `key=value`, and the unit of warm-up and milestones."""
    t = cfg.train
    return (f"train.iterations={t.iterations}", "steps") if t.iterations else (f"train.epochs={t.epochs}", "epochs")


def check_run_name(name: str) -> None:
    """name is a relative path under logs/ (`group/run` too; a path elsewhere goes in log_dir), in characters every
    file system and log takes."""
    if name.startswith("/") or "\\" in name or any(part in ("", ".", "..") for part in name.split("/")):
        raise ConfigError(f"name={name!r} is not a folder under logs/ (its run directory is logs/<name>): name it "
                          f"with '/' only between folder names, none of them '.' or '..', and no '\\', or give "
                          f"the whole path as log_dir=...")
    if not name.isprintable():  # control characters, or bytes not valid in the locale (surrogate escapes)
        raise ConfigError(f"name={name!r} holds characters that are not printable text: name the run in "
                          f"printable characters")


def check_choices(cfg: Config) -> None:
    """Keys with a closed set of values (schema.CHOICES) hold one of them."""
    for key, valid in CHOICES.items():
        value = _value(cfg, key)
        if value not in valid:
            raise ConfigError(not_one_of(key, value, valid))


def config_to_dict(cfg: Config, stage: str | None = None) -> dict:
    """The config as nested dicts; with `stage`, only the keys that stage reads."""
    tree = {f.name: getattr(cfg, f.name) for f in key_fields(cfg)}
    tree = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in tree.items()}
    if stage is None:
        return tree
    return {section: ({k: v for k, v in value.items() if stage_of(f"{section}.{k}") in (None, stage)}
                      if isinstance(value, dict) else value)
            for section, value in tree.items() if stage_of(section) in (None, stage)}
