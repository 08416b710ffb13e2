"""Keys that only some runs read, checked once the run's dataset kind or loss is known: a key set for another
kind of dataset or another loss is an error, never silently ignored."""
from __future__ import annotations

from config.keys import ConfigError
from config.load import changed_keys
from config.schema import DATASET_KEYS, Config


def check_dataset_keys(cfg: Config, kind: str) -> None:
    """No key that another kind of dataset alone reads is set away from its default."""
    changed = changed_keys(cfg)
    for key, value in changed.items():
        if key in DATASET_KEYS and kind not in DATASET_KEYS[key]:
            raise ConfigError(f"{key}={value!r} is read for {' and '.join(DATASET_KEYS[key])} datasets only; "
                              f"data.dataset={cfg.data.dataset} ({kind}) does not use it: remove it")
    if kind == "list" and not cfg.data.val_per_class and "data.subset_seed" in changed:
        raise ConfigError(f"data.subset_seed={cfg.data.subset_seed} picks the validation images held out of a split "
                          f"list's training images (data.val_per_class > 0); data.dataset={cfg.data.dataset} holds "
                          f"none out and trains on its list as published: remove it")


def check_loss_keys(cfg: Config, takes: dict[str, list[str]]) -> None:
    """No loss.* parameter is set that loss.name does not take; takes: {loss name: its parameters}."""
    for key, value in changed_keys(cfg).items():
        param = key.removeprefix("loss.")
        if param == key or param == "name" or param in takes[cfg.loss.name]:
            continue
        readers = [n for n, params in takes.items() if param in params]
        reads = [f"loss.{p}" for p in takes[cfg.loss.name] if hasattr(cfg.loss, p)]
        raise ConfigError(f"{key}={value!r} is read by loss.name={' or '.join(readers)} only; loss.name="
                          f"{cfg.loss.name} does not use it (it reads {', '.join(reads) or 'no loss.* key'}): "
                          f"remove it")


def check_drw_epoch(cfg: Config, run_epochs: int) -> None:
    """loss.drw_epoch (0-based) is an epoch of the run, else its re-weighting would never start: checked as a new
    run starts (one started before the check, 2026-12-07, still resumes); run_epochs counts train.iterations' too."""
    drw = cfg.loss.drw_epoch
    if drw is not None and drw >= run_epochs:
        raise ConfigError(f"loss.drw_epoch={drw} is not an epoch of the run (0 to {run_epochs - 1}): its re-weighting "
                          f"would never start; set it below {run_epochs} (LDAM-DRW: 160 of 200 epochs), or remove it")
