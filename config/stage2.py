"""What a stage-2 run accepts: its methods, the keys each method reads, and the checks of a stage-2
config against its method and against the stage-1 run whose backbone it retrains."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from config.load import changed_keys, check_names
from config.saved import config_from_dict
from config.schema import Config, DataConfig, ModelConfig
from data.build_files import FILE_DATASETS
from models import MODELS

logger = logging.getLogger("stage2")


@dataclass(frozen=True)
class Method:
    kind: str  # sampled: a data sampler draws the batches | meta: the BALMS meta-sampler does | posthoc: no training
    head: str  # new: a linear head (stage2.init_head) | lws: stage-1 weights, learned scales | stage1: the stage-1 head
    loss: str = ""  # models.losses name; balms uses it per sample inside the meta step
    sampler: str = ""  # data.samplers name of a sampled method


METHODS: dict[str, Method] = {
    "balanced_softmax": Method("sampled", "new", "balanced_softmax", "instance"),
    "crt": Method("sampled", "new", "ce", "class_balanced"),
    "balms": Method("meta", "new", "balanced_softmax"),
    "lws": Method("sampled", "lws", "ce", "class_balanced"),
    "tau_norm": Method("posthoc", "stage1"),
}
# Stage-2 keys (or sections) that only some methods read: set for another method, they are an error.
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "meta_sampler": ("balms",),
    "stage2.init_head": ("balanced_softmax", "crt", "balms"),  # lws and tau_norm start from the stage-1 head
    "stage2.tau_norm_tau": ("tau_norm",),
    "stage2.tau_norm_grid": ("tau_norm",),
    # tau_norm trains nothing: the schedule and the training views are the trained methods' alone
    **dict.fromkeys(("train.epochs", "train.iterations", "train.batch_size", "train.lr", "train.momentum",
                     "train.nesterov", "train.weight_decay", "train.schedule", "train.warmup", "train.warmup_start",
                     "train.milestones", "train.gamma", "train.save_every_s", "stage2.cache_views", "stage2.live_bn",
                     "data.crop_padding", "data.flip", "data.autoaugment", "data.cutout"),
                    ("balanced_softmax", "crt", "balms", "lws")),
}
# Stage-1 keys that fix which images form the training set: read from the stage-1 checkpoint.
SUBSET_KEYS = ("dataset", "imbalance_factor", "profile", "subset_seed", "subset_draw", "val_per_class", "image_size")
AUGMENT_KEYS = ("crop_padding", "flip", "autoaugment", "cutout")  # compared with stage 1's (check_data)


def check_method_keys(cfg: Config) -> None:
    """The method and the model exist, and no key set is one the method never reads: also made as the config loads
    (config.cli.config_of), so that such a key is named as unread before any rule on its value."""
    check_names({"stage2.method": (cfg.stage2.method, METHODS), "model.name": (cfg.model.name, MODELS)})
    for key in changed_keys(cfg):
        readers = METHOD_KEYS.get(key) or METHOD_KEYS.get(key.split(".")[0]) or (cfg.stage2.method,)
        if cfg.stage2.method not in readers:
            raise SystemExit(f"config error: {key} is read by stage2.method={' | '.join(readers)} only, not by "
                             f"{cfg.stage2.method}: remove it")


def check_method(cfg: Config) -> Method:
    """The method, once the settings that contradict it or each other are refused."""
    check_method_keys(cfg)
    method, changed = METHODS[cfg.stage2.method], changed_keys(cfg)
    if cfg.stage2.cache_views and "stage2.live_bn" in changed:
        raise SystemExit(f"config error: stage2.live_bn is read with stage2.cache_views=0 only (the backbone on every "
                         f"batch); the {cfg.stage2.cache_views} cached views are computed in eval mode: remove it, "
                         f"or set stage2.cache_views=0")
    if not cfg.stage1.checkpoint and not cfg.model.pretrained:
        raise SystemExit("config error: stage 2 needs a backbone: stage1.checkpoint=logs/<stage-1 run>/last.pt, "
                         "or model.pretrained=NAME|URL|PATH (`python -m models list` shows the names)")
    if cfg.stage1.checkpoint and cfg.model.pretrained:
        raise SystemExit("config error: set stage1.checkpoint or model.pretrained, not both: they name the same "
                         "backbone; clear the other (stage1.checkpoint= beside --pretrained, when the config sets it)")
    if cfg.model.reset_head and keeps_stage1_head(cfg, method):
        raise SystemExit(f"config error: model.reset_head=true drops the head that {head_choice(cfg, method)} "
                         f"starts from; balanced_softmax, crt and balms with init_head=reinit train a new head for "
                         f"any number of classes")
    return method


def check_tau_norm_keys(cfg: Config, has_val: bool) -> None:
    """tau_norm searches tau over stage2.tau_norm_grid on a validation split, and takes stage2.tau_norm_tau
    without one: the other key would go unread."""
    changed = changed_keys(cfg)
    if has_val and "stage2.tau_norm_tau" in changed:
        raise SystemExit("config error: stage2.tau_norm_tau is tau_norm's tau without a validation split; this run "
                         "has one and searches tau over stage2.tau_norm_grid on it: remove stage2.tau_norm_tau, or "
                         "search one value (stage2.tau_norm_grid=[0.3])")
    if not has_val and "stage2.tau_norm_grid" in changed:
        raise SystemExit("config error: stage2.tau_norm_grid is searched on the validation split, and this run has "
                         "none: tau is stage2.tau_norm_tau; remove the grid, or hold out images in stage 1 "
                         "(data.val_per_class)")


def check_data(cfg: Config, s1: dict | None) -> str:
    """Refuse a meta split the dataset cannot give; return a warning (or "") when stage 2 augments its
    training images otherwise than the stage-1 run did: the BALMS code's stage 2 applies its stage 1's
    crop, flip, AutoAugment and Cutout, and cached features keep whatever views stage 2 draws."""
    if cfg.stage2.method == "balms" and cfg.meta_sampler.meta_split == "resample" \
            and cfg.data.dataset in FILE_DATASETS:
        raise SystemExit(f"config error: meta_sampler.meta_split=resample draws a second long-tailed set from "
                         f"CIFAR's training split; data.dataset={cfg.data.dataset} has no images beyond its "
                         f"training set: use meta_split=val (with data.val_per_class) or train")
    if cfg.stage2.cache_views == 0 and cfg.data.dataset in FILE_DATASETS:
        raise SystemExit(f"config error: stage2.cache_views=0 runs the backbone on in-memory images; "
                         f"data.dataset={cfg.data.dataset} streams image files: set stage2.cache_views to 1 or more")
    if s1 is None or not s1.get("config") or METHODS[cfg.stage2.method].kind == "posthoc":  # tau_norm: no views
        return ""
    saved = config_from_dict(s1["config"]).data
    differ = [k for k in AUGMENT_KEYS if getattr(cfg.data, k) != getattr(saved, k)]
    if not differ:
        return ""

    def keys(data: DataConfig) -> str:
        return ", ".join(f"data.{k}={str(getattr(data, k)).lower()}" for k in differ)
    return (f"stage 2 augments with {keys(cfg.data)}, stage 1 trained with {keys(saved)}: set them in the "
            f"stage-2 config to train the classifier on the views the backbone learned from")


def keeps_stage1_head(cfg: Config, method: Method) -> bool:
    return method.head != "new" or cfg.stage2.init_head == "stage1"


def head_choice(cfg: Config, method: Method) -> str:
    """The keys that choose a stage-2 run's starting head, as an error names them (init_head only where read)."""
    init = f" (stage2.init_head={cfg.stage2.init_head})" if method.head == "new" else ""
    return f"stage2.method={cfg.stage2.method}{init}"


def check_training_set(s1: dict, counts: list[int], digest: str) -> None:
    """The training set stage 2 built has the stage-1 run's class counts (else an error) and images (else a
    warning: a copy of the data with other pixels or in another order; data.build.training_digest)."""
    if counts != s1["class_counts"]:
        raise SystemExit(f"error: the training set differs from stage 1's ({counts} vs {s1['class_counts']}): "
                         f"is data.root the same copy of the dataset?")
    if s1.get("train_digest", digest) != digest:  # (releases and runs before 2026-12-06 record none)
        logger.warning("the training images differ from stage 1's (digest %s, stage 1's %s), though their class "
                       "counts match: the head trains on other images than the backbone learned from; point "
                       "data.root at the copy of the dataset stage 1 trained on", digest, s1["train_digest"])


def with_stage1_training_set(cfg: Config, s1: dict) -> Config:
    """cfg with the training-set keys and model.name of the stage-1 run; a different value set in
    the stage-2 config (or given on the command line, its default too) is an error, since stage 2 must
    train on stage 1's training set."""
    saved, default = config_from_dict(s1["config"]).data, DataConfig()
    mine = {f"data.{k}": (getattr(cfg.data, k), getattr(saved, k), getattr(default, k)) for k in SUBSET_KEYS}
    mine["model.name"] = (cfg.model.name, s1["model_args"]["name"], ModelConfig().name)
    for key, (value, recorded, unset) in mine.items():
        if value != recorded and (value != unset or key in cfg.overridden):
            raise SystemExit(f"config error: {key}={value!r}, but the stage-1 run "
                             f"{cfg.stage1.checkpoint or cfg.model.pretrained} has "
                             f"{key}={recorded!r}: stage 2 reads it from the checkpoint; remove {key} from the "
                             f"{'command line' if key in cfg.overridden else 'stage-2 config'}")
    data = dataclasses.replace(cfg.data, **{k: getattr(saved, k) for k in SUBSET_KEYS})
    model = dataclasses.replace(cfg.model, name=s1["model_args"]["name"])
    return dataclasses.replace(cfg, data=data, model=model)
