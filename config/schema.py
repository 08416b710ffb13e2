"""Every configuration key of both stages, with its default and why.

Experiment YAML files under config/<dataset>/ hold only what differs from these defaults; the
command line overrides any key with a dotted path (`train.epochs=30`). Only the two entry scripts
read this; the packages below them take plain arguments. STAGE_KEYS says which keys only one stage
reads: setting one of them in a run of the other stage is an error, never silently ignored.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


def _default_data_root() -> str:
    # One environment variable points every run at a shared copy of the datasets.
    return os.environ.get("LT_DATA_ROOT") or "datasets"  # set but empty: the default, not the working directory


@dataclass
class DataConfig:
    # cifar10 | cifar100 (official python formats under root, held in memory) | folder
    # (root/{train,val,test}/<class>/*) | imagenet_lt | places_lt | inat2018 (the papers' split lists)
    dataset: str = "cifar10"
    root: str = field(default_factory=_default_data_root)  # folder holding cifar-10-batches-py/ ...; $LT_DATA_ROOT
    download: bool = False  # fetch the official archive (MD5-checked) when the folder is missing
    imbalance_factor: float = 100.0  # n_max / n_min of the long-tailed training set; 1 = balanced
    profile: str = "exp"  # exp | step: how counts fall from head to tail
    subset_seed: int = 0  # which images form the long-tailed subset (independent of train.seed)
    # torch | ldam: how subset_seed picks them (data.long_tail.SUBSET_DRAWS); ldam with seed 0 keeps the
    # LDAM-DRW code's images of the official CIFAR files exactly (numpy seeded, each class shuffled)
    subset_draw: str = "torch"
    val_per_class: int = 0  # images per class held out of the training images for model selection
    crop_padding: int = 4  # pixels of zero padding before the random crop; 0 = no crop; at most 32
    flip: bool = True  # random horizontal flip
    autoaugment: bool = False  # CIFAR AutoAugment policy (Cubuk et al. 2019)
    cutout: int = 0  # side of the Cutout square in pixels; 0 = off; at most 32
    # Stage 1, CIFAR: augment the next chunk of batches in a background thread (on its own CUDA stream)
    # while the current one trains; the same batches either way (data/prefetch.py, bench/throughput.py).
    prefetch: bool = False
    sampler: str = "instance"  # how a stage-1 epoch draws images (data.samplers.SAMPLERS)
    list_dir: str = ""  # split-list datasets: folder of ImageNet_LT_train.txt etc.; empty = root
    image_size: int = 224  # image-file datasets: training crop and evaluation centre crop, in pixels (<= 4096)
    workers: int = 4  # image-file datasets: DataLoader processes decoding images (0 = the main process)


@dataclass
class ModelConfig:
    name: str = "resnet32"  # models.MODELS; stage 2 with stage1.checkpoint reads it from the checkpoint
    channels_last: bool = True  # NHWC convolutions: faster on CPU for ResNet-32
    # Stage-1 classifier, models.heads.HEADS: linear | cosine (cos(x, w_c), no bias; the LDAM code's
    # NormedLinear, which LDAM's logit scale of 30 assumes). Stage 2 trains a linear head either way.
    head: str = "linear"
    # Weights to start from instead of a random init, since most users take a released model:
    # a models.zoo name, an http(s) URL (#sha256=<hex> pins it) or a path, in any layout of
    # models/foreign.py. Stage 1 fine-tunes it; stage 2 freezes it as the backbone (instead of
    # stage1.checkpoint). Empty = none.
    pretrained: str = ""
    # Stage 1 with pretrained: a new random head, for another number of classes. Stage 2 drops the
    # checkpoint's head by itself when its method trains a new one.
    reset_head: bool = False


@dataclass
class LossConfig:
    name: str = "ce"  # models.losses.LOSSES
    # Parameters of the chosen loss. None = that loss's own default (given after the colon);
    # setting a parameter that the chosen loss does not take is an error.
    label_smoothing: float | None = None  # ce: 0.0
    logit_adjust_tau: float | None = None  # logit_adjust: 1.0, the weight of log prior added to the logits
    beta: float | None = None  # class_balanced: 0.9999, effective-number decay
    variant: str | None = None  # class_balanced: softmax | sigmoid | focal
    gamma: float | None = None  # focal: 1.0; class_balanced with variant focal: 1.0
    form: str | None = None  # focal: softmax | sigmoid
    power: float | None = None  # reweight: 1.0 (inverse frequency); 0.5 = inverse square root
    max_margin: float | None = None  # ldam: 0.5, margin of the rarest class
    scale: float | None = None  # ldam: 30, logit scale
    drw_epoch: int | None = None  # ldam: None = no deferred re-weighting; else the 0-based epoch it starts
    use_global_counts: bool | None = None  # arb: False = batch counts; True = n (equals balanced softmax)


@dataclass
class TrainConfig:
    epochs: int = 200  # length of training in epochs (ignored when iterations > 0)
    iterations: int = 0  # length in optimiser steps instead of epochs (the BALMS schedule: 13000)
    batch_size: int = 128  # images per step
    lr: float = 0.1  # peak learning rate, reached after warm-up
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4  # L2 on all parameters, as the papers' code does
    schedule: str = "cosine"  # cosine | step: decay after warm-up
    warmup: float = 5.0  # linear warm-up length, in epochs (or in iterations when iterations > 0)
    # lr at the start of warm-up as a fraction of train.lr: 0 rises from ~0 (Goyal et al.); BALMS's
    # CIFAR configs warm up from base_lr 0.05 to warmup_lr 0.1, i.e. train.lr=0.1 with 0.5.
    warmup_start: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [160.0, 180.0])  # step schedule, same unit as warmup
    gamma: float = 0.1  # step schedule: lr factor at each milestone
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) mixup; 0 = off
    seed: int = 0  # torch / numpy / python seed: init, data order, augmentation
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default (all cores)
    select_metric: str = "top1"  # validation metric that picks the best checkpoint: top1 | many | medium | few
    # Where to compute: auto (CUDA when present, else CPU) | cpu | cuda | cuda:N | mps. The CIFAR images
    # go to this device once; batches are drawn, augmented and normalised there.
    device: str = "auto"
    # Mixed precision of forward passes: off | bf16 (CPU and CUDA) | fp16 (CUDA, with a gradient scaler).
    # Losses, the optimiser and stage 2's meta step stay in fp32.
    amp: str = "off"
    compile: bool = False  # torch.compile the model (stage 1) before training; first steps pay the compile time
    tf32: bool = True  # CUDA only: TF32 tensor cores for fp32 matmuls and convolutions
    # CUDA only: cuDNN times its convolution algorithms once per new input shape and keeps the fastest
    # (the first step of each shape pays for it; runs may then differ in the last bits). Off: its heuristics.
    cudnn_benchmark: bool = False
    # Split each batch of batch_size into this many micro-batches and add their gradients before the
    # step: the same update with less activation memory (BatchNorm sees each micro-batch alone).
    accum_steps: int = 1
    # Several processes (torchrun): batch_size stays the global batch, split over the ranks.
    sync_bn: bool = False  # stage 1: BatchNorm statistics over the global batch (all ranks), not each rank's share
    dist_timeout_s: float = 600.0  # a collective waiting longer than this (a rank died or hangs) fails the run
    # Seconds between last.pt writes at epoch ends; 0 = every epoch. The last epoch and a stop (Ctrl-C,
    # SIGTERM) always write it; a crash loses the epochs since the last write. An epoch end with its write
    # took 44 ms (ResNet-32, H100), 10 % of the paper's CIFAR schedule (591 epochs of 0.4 s): there, 60.
    save_every_s: float = 0.0


@dataclass
class Stage1Ref:
    # Stage 2: the stage-1 checkpoint whose backbone is frozen (a .pt of a stage-1 run). Its training
    # set (data.dataset, imbalance_factor, profile, subset_seed, subset_draw, val_per_class, image_size) and
    # model.name are read from it, so a stage-2 config need not repeat them.
    checkpoint: str = ""


@dataclass
class Stage2Config:
    method: str = "balanced_softmax"  # balanced_softmax | crt | balms | tau_norm | lws
    init_head: str = "reinit"  # reinit (as the BALMS code) | stage1: start from the stage-1 classifier
    # augmented views of the training set whose features are computed once (bench/stage2_speed.py); 0 = run the
    # backbone every batch
    cache_views: int = 4
    # BatchNorm of the backbone with cache_views=0: train (the BALMS code: batch statistics, running
    # averages updated by every batch and meta batch) | eval (stage 1's statistics, as cached views use)
    live_bn: str = "train"
    tau_norm_tau: float = 1.0  # tau_norm: exponent of w / ||w||^tau without a validation split to search it on
    # tau_norm: the taus searched on the validation split
    tau_norm_grid: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(21)])


@dataclass
class MetaSamplerConfig:
    """The BALMS meta-learned class sampler of stage 2 (stage2.method=balms); not data.sampler."""

    init_pow: float = 0.0  # sampler init: w ~ 1/pi^p; 0 = instance-balanced, 1 = class-balanced
    lr: float = 0.01  # Adam learning rate of the per-class sampler logits
    meta_batch_size: int = 512  # class-balanced meta batch for the outer loss
    gumbel_tau: float = 1.0  # Gumbel-softmax temperature of the draws
    # The Gumbel-softmax the straight-through meta-gradient comes from: image (BALMS's, over the N images;
    # O(B x N) noise per step, drawn in chunks) | class (over the C classes, then a uniform image of the drawn
    # class: O(B x C), cheaper for large N, but another gradient: bench/meta_gradient.py)
    relax: str = "image"
    # Where class-balanced meta batches come from: val (the held-out split, when data.val_per_class > 0;
    # else train) | train (the long-tailed training set itself) | resample (CIFAR: a second long-tailed
    # draw of the training split, seed data.subset_seed + 1, no validation image: the BALMS code's meta set)
    meta_split: str = "val"


@dataclass
class EvalConfig:
    # images per evaluation batch; on CPU, ResNet-32 runs 1.7x faster per image at 128 than at 512 (cache)
    batch_size: int = 128
    logit_adjust_tau: float = 0.0  # --test: logits - tau * log prior (post-hoc; ldam: scale * cosines); 0 = off


# Keys whose values form a closed set that no registry owns (registries check their own names).
CHOICES: dict[str, tuple[str, ...]] = {
    "data.profile": ("exp", "step"),
    "data.subset_draw": ("torch", "ldam"),
    "train.schedule": ("cosine", "step"),
    "train.select_metric": ("top1", "many", "medium", "few"),
    "train.amp": ("off", "bf16", "fp16"),
    "stage2.init_head": ("reinit", "stage1"),
    "stage2.live_bn": ("train", "eval"),
    "meta_sampler.meta_split": ("val", "train", "resample"),
    "meta_sampler.relax": ("image", "class"),
}

# Lower bounds of the numeric keys, (">" or ">=", bound): checked when the config loads, before
# anything is written (every float is also finite: nan and inf are refused for any key).
RANGES: dict[str, tuple[str, float]] = {
    "data.imbalance_factor": (">=", 1), "data.subset_seed": (">=", 0), "data.val_per_class": (">=", 0),
    "data.crop_padding": (">=", 0), "data.cutout": (">=", 0), "data.image_size": (">=", 1), "data.workers": (">=", 0),
    "train.seed": (">=", 0), "train.epochs": (">=", 1), "train.iterations": (">=", 0),
    "train.batch_size": (">=", 2),  # BatchNorm: 2 images
    "train.lr": (">=", 0), "train.momentum": (">=", 0), "train.weight_decay": (">=", 0), "train.warmup": (">=", 0),
    "train.warmup_start": (">=", 0),
    "train.gamma": (">", 0), "train.mixup_alpha": (">=", 0), "train.num_threads": (">=", 0),
    "train.accum_steps": (">=", 1), "train.dist_timeout_s": (">", 0), "train.save_every_s": (">=", 0),
    "stage2.cache_views": (">=", 0), "stage2.tau_norm_tau": (">=", 0),
    "meta_sampler.lr": (">=", 0), "meta_sampler.meta_batch_size": (">=", 1), "meta_sampler.gumbel_tau": (">", 0),
    "eval.batch_size": (">=", 1), "eval.logit_adjust_tau": (">=", 0),
}
# Upper bounds, ("<=" or "<", bound, why), checked by config.load.check_ranges: of the keys whose absurd values (a
# typo's extra zeros) would exhaust memory before any message, and of those past which training cannot work.
LIMITS: dict[str, tuple[str, float, str]] = {
    "data.crop_padding": ("<=", 32, "the CIFAR image side: a wider border only adds crops of zeros"),
    "data.cutout": ("<=", 32, "the CIFAR image side: a square that large can hide the whole image"),
    "data.image_size": ("<=", 4096, "pixels a side: a batch of larger crops takes gigabytes"),
    # BALMS draws its batches with replacement, so nothing else caps them (a data sampler gives at most an epoch).
    "train.batch_size": ("<=", 65536, "images per step over all ranks: beyond published schedules, and gigabytes a "
                                      "step"),
    "meta_sampler.meta_batch_size": ("<=", 65536, "images per meta step: BALMS uses 512; a larger one takes gigabytes"),
    # Also each tau of stage2.tau_norm_grid: w / ||w||^tau with a large tau rounds to an all-zero or broken head.
    "stage2.tau_norm_tau": ("<=", 10, "the exponent of each class weight's norm: the papers search 0 to 2, and past "
                                      "that the head underflows"),
    "train.dist_timeout_s": ("<=", 31_536_000, "seconds, a year: a collective that waits longer is a hang"),
    "train.warmup_start": ("<=", 1, "a fraction of train.lr, which the warm-up rises to"),
    "train.momentum": ("<", 1, "the share of each update the next one keeps: at 1 or more no update is ever "
                               "forgotten, and the weights diverge"),
    # Values past these ended in torch's overflow traceback (above ~3e38, the float32 range) or diverged at once.
    "train.lr": ("<=", 100, "the linear scaling rule, 0.1 per 256 images, gives 25.6 at the largest batch, 65536"),
    "train.weight_decay": ("<=", 1, "L2 factor: the papers use 1e-4 to 5e-4; at lr x decay >= 1 a step zeroes the "
                                    "weights"),
    "meta_sampler.lr": ("<=", 100, "Adam's step on the class logits, about lr a step: BALMS uses 0.01"),
}

# Keys (or whole sections) that one stage alone reads; every other key is read by both stages.
# A run of the other stage that sets one away from its default stops with an error naming the
# stage that reads it: a key that does nothing must not look as if it did.
STAGE_KEYS: dict[str, str] = {
    "data.sampler": "stage1",  # stage 2 draws by stage2.method
    "data.prefetch": "stage1",  # stage 2 augments its cached views once, or each batch of the live backbone
    "model.head": "stage1",  # stage 2 always trains a linear head
    "loss": "stage1",  # stage 2's loss is fixed by stage2.method
    "train.mixup_alpha": "stage1",
    "train.compile": "stage1",  # stage 2 runs the frozen backbone once per view (cache) or per batch
    "train.accum_steps": "stage1",
    "train.sync_bn": "stage1",  # stage 2's backbone is frozen, its BatchNorm in eval mode (cached views)
    "stage1": "stage2",
    "stage2": "stage2",
    "meta_sampler": "stage2",
}
STAGE_SCRIPTS = {"stage1": "stage1_train.py", "stage2": "stage2_classifier.py"}


def stage_of(key: str) -> str | None:
    """The stage that alone reads a dotted key, or None when both read it."""
    return STAGE_KEYS.get(key) or STAGE_KEYS.get(key.split(".", 1)[0])


# Keys that only some kinds of dataset read (data.build_files.DATASET_KINDS: cifar | folder | list);
# set away from its default for another kind, a key is an error.
DATASET_KEYS: dict[str, tuple[str, ...]] = {
    "data.download": ("cifar",),
    "data.crop_padding": ("cifar",),  # image files: RandomResizedCrop to data.image_size
    "data.autoaugment": ("cifar",),
    "data.cutout": ("cifar",),
    "data.prefetch": ("cifar",),  # image files: data.workers processes decode and augment ahead
    "data.imbalance_factor": ("cifar", "folder"),  # split lists are long-tailed as published
    "data.profile": ("cifar", "folder"),
    "data.subset_draw": ("cifar", "folder"),
    "data.list_dir": ("list",),
    "data.image_size": ("folder", "list"),
    "data.workers": ("folder", "list"),
}

# Old key -> new key (a whole section, or one key); an old name fails with the new one, and
# configs saved by older runs are read with the new names.
RENAMED: dict[str, str] = {
    "sampler.tau": "meta_sampler.gumbel_tau",
    "sampler": "meta_sampler",
    "loss.tau": "loss.logit_adjust_tau",
    "eval.posthoc_tau": "eval.logit_adjust_tau",
    "stage2.tau": "stage2.tau_norm_tau",
    "stage2.tau_grid": "stage2.tau_norm_grid",
}


@dataclass
class Config:
    name: str = "default"  # experiment name: the run directory is logs/<name>/ unless log_dir is set
    log_dir: str = ""  # run directory; empty = logs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage1: Stage1Ref = field(default_factory=Stage1Ref)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    meta_sampler: MetaSamplerConfig = field(default_factory=MetaSamplerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Not a config key (metadata key=False): the dotted keys given as command-line overrides, whatever their values
    # (load_config), so that a key given at its default value is checked where it is not read, as any other value.
    overridden: frozenset[str] = field(default_factory=frozenset, repr=False, compare=False, metadata={"key": False})

    @property
    def run_dir(self) -> str:
        return self.log_dir or os.path.join("logs", self.name)
