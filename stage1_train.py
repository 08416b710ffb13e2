"""Stage 1: learn a representation on a long-tailed training set.

    python stage1_train.py --cfg config/cifar10_lt/stage1_softmax.yaml [key=value ...]
    python stage1_train.py --cfg config/cifar10_lt/stage1_softmax.yaml --resume   # continue a killed run
    python stage1_train.py --cfg config/cifar10_lt/stage1_softmax.yaml --test     # test split table
    python stage1_train.py --cfg config/cifar10_lt/stage1_softmax.yaml model.pretrained=NAME|URL|PATH  # fine-tune

Writes logs/<name>/: config.yaml, metrics.jsonl, tb/, train.log, last.pt and (with a validation
split, data.val_per_class > 0) best.pt; --test adds test_metrics.json.
"""
from __future__ import annotations

import logging
import math
import time
from itertools import islice

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from config.cli import check_select_metric, open_log, run_cli, start_processes, start_run, training_set
from config.load import check_names, config_to_dict
from config.readers import check_drw_epoch, check_loss_keys
from config.schema import Config, TrainConfig
from data.augment import BatchAugment
from data.build import LongTailData, recorded_normalization
from data.build_files import FileData, data_record
from data.loader import MIXUP_STREAM, BatchLoader, epoch_steps
from data.samplers import SAMPLERS, build_sampler
from data.stream import StreamLoader
from engine.compiled import CompiledForBatchSizes
from engine.device import grad_scaler
from engine.distributed import Dist, broadcast_module, from_rank0, sync_batchnorm
from engine.loop import evaluate, micro_batch_sizes, train_one_epoch
from engine.run import Progress, end_epoch, finish_run, finished_run, restore
from engine.stopping import StopRequest, stop_run
from engine.schedule import sgd_with_schedule, total_steps
from models import MODELS, build_model, load_pretrained
from models.checkpoint import CheckpointError
from models.download import DownloadError
from models.heads import HEADS, head_name
from models.losses import LOSSES, EmptyClassError, LongTailLoss, build_loss, loss_params

STAGE = "stage1"
logger = logging.getLogger("stage1")
Loader = BatchLoader | StreamLoader


def build_data(cfg: Config, device: torch.device, ranks: Dist,
               ckpt: dict | None = None) -> tuple[LongTailData | FileData, Loader]:
    """The long-tailed training set (with its validation split) and its loader, each rank taking its
    share of every global batch. CIFAR: uint8 images and labels sit on `device`, where batches are
    gathered, augmented and normalised; image files: decoded and augmented in data.workers processes.
    A resumed run (ckpt, its last.pt) keeps the normalisation it started with."""
    d, t = cfg.data, cfg.train
    data = training_set(cfg, ranks, recorded_normalization(ckpt, d.dataset) if ckpt else None)
    sampler_params = {}
    if d.sampler == "progressive":  # interpolates from instance to class-balanced over the whole run
        epoch_len = epoch_steps(len(data.train_labels), t.batch_size, ranks.world)
        sampler_params["total_epochs"] = math.ceil(total_steps(epoch_len, t.epochs, t.iterations) / epoch_len)
    sampler = build_sampler(d.sampler, data.train_labels, len(data.class_counts), **sampler_params)
    if sampler.num_samples != len(data.train_labels):  # over- and under-sampling: the epoch's length is the draw's
        logger.info("data.sampler=%s draws %d images an epoch", d.sampler, sampler.num_samples)
    if isinstance(data, FileData):
        return data, StreamLoader(data.train_images, t.batch_size, sampler, t.seed, d.workers, device,
                                  cfg.model.channels_last, ranks.rank, ranks.world)
    augment = BatchAugment(d.crop_padding, d.flip, d.autoaugment, d.cutout)
    loader = BatchLoader(data.train_images.to(device), data.train_labels.to(device), t.batch_size, sampler, augment,
                         data.mean, data.std, t.seed, cfg.model.channels_last, ranks.rank, ranks.world,
                         prefetch=d.prefetch)
    return data, loader


def build_network(cfg: Config, num_classes: int, device: torch.device, resuming: bool,
                  ranks: Dist) -> tuple[nn.Module, dict, bool]:
    """(model, its model_args, whether its head is new): a random init, or model.pretrained to
    fine-tune (its own head, or a new one with model.reset_head), read (or downloaded) by rank 0 and sent to
    the others. A resumed run's weights all come from its last.pt: the pretrained file is not read again (a
    cleared cache, a node offline)."""
    m = cfg.model
    if m.reset_head and not m.pretrained:
        raise SystemExit("config error: model.reset_head=true replaces the head of pretrained weights, and no "
                         "model.pretrained (--pretrained) is given: every head is new then; remove it")
    model_args = {"name": m.name, "num_classes": num_classes, "head": m.head}
    if m.pretrained and not resuming:
        try:
            model = from_rank0(lambda: load_pretrained(m.pretrained, arch=m.name, num_classes=num_classes,
                                                       reset_head=m.reset_head, head=m.head), ranks)
        except (CheckpointError, DownloadError) as e:
            raise SystemExit(f"error: model.pretrained={m.pretrained}: {e}") from None
    else:
        model = build_model(**model_args)
    if head_name(model.head) != m.head:
        raise SystemExit(f"config error: model.pretrained={m.pretrained} has a {head_name(model.head)} head, not the "
                         f"model.head={m.head} asked for: set model.head={head_name(model.head)}, or "
                         f"model.reset_head=true for a new {m.head} head")
    if m.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device), model_args, not m.pretrained or m.reset_head


def build_criterion(cfg: Config, class_counts: list[int], model: nn.Module, fresh_head: bool) -> LongTailLoss:
    """The loss, with the classifier bias it asks for set on a new head (a pretrained one keeps its own)."""
    params = {k: v for k, v in vars(cfg.loss).items() if k != "name" and v is not None}
    try:
        loss_fn = build_loss(cfg.loss.name, class_counts, **params)
    except EmptyClassError as e:
        raise SystemExit(f"config error: loss.name={cfg.loss.name}: {e}: train on data with every class, or use "
                         f"loss.name=ce or focal") from None
    except ValueError as e:  # a parameter the loss does not take, or out of its range
        raise SystemExit(f"config error: loss.name={cfg.loss.name}: {e}") from None
    bias = loss_fn.init_bias()
    if bias is not None and fresh_head:
        if getattr(model.head, "bias", None) is None:
            raise SystemExit(f"config error: loss.name={cfg.loss.name} initialises the classifier's bias, and "
                             f"model.head={cfg.model.head} has none: use model.head=linear")
        torch.nn.init.constant_(model.head.bias, bias)
    if cfg.loss.name == "ldam" and cfg.model.head == "linear" and getattr(loss_fn, "scale", 1.0) > 1:
        logger.warning("loss ldam multiplies logits by loss.scale=%g, meant for the cosines of model.head=cosine "
                       "(as the LDAM code); a linear head's logits times that can overflow", loss_fn.scale)
    return loss_fn


def parameter_groups(model: nn.Module, loss_fn: LongTailLoss) -> list[dict]:
    """The optimiser's parameter groups: one, or, when the loss sets the classifier's bias (class-balanced
    sigmoid / focal), that bias in a second group without weight decay, as Cui et al.'s code keeps it."""
    bias = getattr(model.head, "bias", None)
    if loss_fn.init_bias() is None or bias is None:
        return [{"params": list(model.parameters())}]
    return [{"params": [p for p in model.parameters() if p is not bias]}, {"params": [bias], "weight_decay": 0.0}]


def wrap_for_training(model: nn.Module, t: TrainConfig, device: torch.device, d: Dist) -> nn.Module:
    """The module the loop calls: BatchNorm over the global batch (sync_bn), DistributedDataParallel
    (gradients averaged over ranks), torch.compile (for the micro-batches of this process's full batch; an
    epoch's shorter last batch runs uncompiled rather than compiling again); all share `model`'s parameters."""
    if d.world > 1:
        if t.sync_bn:
            model = sync_batchnorm(model, device)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if not t.compile:
        return model
    return CompiledForBatchSizes(model, micro_batch_sizes(t.batch_size // d.world, t.accum_steps))


def mixup_generator(seed: int, epoch: int, alpha: float, skip: int, batch_size: int) -> np.random.Generator:
    """The epoch's mixup draws (lam, pairing per step), past the `skip` steps a stopped run already took."""
    rng = np.random.default_rng([seed, epoch, MIXUP_STREAM])
    for _ in range(skip if alpha > 0 else 0):
        rng.beta(alpha, alpha)
        rng.permutation(batch_size)
    return rng


def check_global_batch(batch_size: int, world: int) -> None:
    """train.batch_size is the global batch: each of the torchrun processes takes an equal share of at least
    2 images (BatchNorm in training mode cannot normalise one)."""
    if batch_size % world or batch_size < 2 * world:
        below = batch_size // world * world
        sizes = " or ".join(str(b) for b in (below, below + world) if b >= 2 * world)
        raise SystemExit(f"config error: train.batch_size={batch_size} (the global batch) must split evenly over "
                         f"the {world} processes, at least 2 images each: use train.batch_size={sizes}, or "
                         f"another number of processes")


def main(cfg: Config, resume: bool = False) -> dict:
    check_names({"model.name": (cfg.model.name, MODELS), "model.head": (cfg.model.head, HEADS),
                 "loss.name": (cfg.loss.name, LOSSES), "data.sampler": (cfg.data.sampler, SAMPLERS)})
    check_loss_keys(cfg, {name: loss_params(name) for name in LOSSES})
    t = cfg.train
    d, device = start_processes(cfg)
    run_dir, ckpt = start_run(cfg, STAGE, resume, d)
    if finished_run(ckpt, run_dir, d):
        return {}
    check_global_batch(t.batch_size, d.world)

    data, loader = build_data(cfg, device, d, ckpt)
    check_select_metric(t.select_metric, data.class_counts, len(data.val_labels) > 0)
    model, model_args, fresh_head = build_network(cfg, len(data.class_counts), device, ckpt is not None, d)
    loss_fn = build_criterion(cfg, data.class_counts, model, fresh_head).to(device)
    train_model = wrap_for_training(model, t, device, d)  # checkpoints save `model`
    optimizer, scheduler, steps_total = sgd_with_schedule(
        parameter_groups(model, loss_fn), len(loader), t.lr, t.momentum, t.weight_decay, t.nesterov, t.epochs,
        t.iterations, t.warmup, t.schedule, t.milestones, t.gamma, t.warmup_start, fused=t.amp == "fp16")
    if ckpt is None:
        check_drw_epoch(cfg, math.ceil(steps_total / len(loader)))
    scaler = grad_scaler(device, t.amp)
    states = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    if t.amp == "fp16":
        states["scaler"] = scaler
    epoch_len = len(loader)
    progress = (restore(ckpt, states, run_dir, data.class_counts, epoch_len, train_digest=data.train_digest)
                if ckpt is not None else Progress(t.select_metric))
    runlog = open_log(cfg, STAGE, run_dir, d, ckpt)
    payload = {"config": config_to_dict(cfg, STAGE), "model_args": model_args, **data_record(data)}

    # ---- train: one epoch, validate, checkpoint (atomically), log
    num_epochs = progress.final_epoch(steps_total, epoch_len)
    logger.info("%d training images, %d steps/epoch, %d epochs, %d steps, on %s (amp %s)%s", len(data.train_labels),
                epoch_len, num_epochs, steps_total, device, t.amp, f", {d.world} processes" if d.world > 1 else "")
    record = {}
    stop = StopRequest().install() if d.world == 1 else None  # torchrun itself stops its workers
    for epoch in range(progress.epoch, num_epochs):
        done = progress.epoch_step  # > 0 when resuming a run stopped mid-epoch
        steps = progress.steps_this_epoch(steps_total, epoch_len)
        mixup_rng = mixup_generator(t.seed, epoch, t.mixup_alpha, done, t.batch_size // d.world)
        loss_fn.set_epoch(epoch)
        start = time.perf_counter()
        record = train_one_epoch(train_model, islice(loader.epoch(epoch), done, done + steps), steps, loss_fn,
                                 optimizer, scheduler, t.mixup_alpha, mixup_rng, t.accum_steps, t.amp, scaler,
                                 desc=f"epoch {epoch + 1}/{num_epochs}", d=d, stop=stop,
                                 carry=ckpt["epoch_sums"] if done and d.is_main else (0.0, 0.0, 0))
        record["train_seconds"] = time.perf_counter() - start
        progress.took(record.pop("steps"))
        sums = record.pop("sums")  # this rank's: only one process stops mid-epoch, and rank 0 carries them on
        state = {name: obj.state_dict() for name, obj in states.items()}
        if stop is not None and stop():
            stop_run(run_dir, runlog, progress, {**payload, **state, "epoch_sums": sums}, stop.signum)
        progress.next_epoch()
        broadcast_module(model, d)  # rank 0's BatchNorm statistics (each rank's own without sync_bn), as saved
        val = (evaluate(model, data.val_images, data.val_labels, data.class_counts, cfg.eval.batch_size, data.mean,
                        data.std, cfg.model.channels_last, amp=t.amp, d=d, workers=cfg.data.workers)
               if len(data.val_labels) else None)
        end_epoch(run_dir, runlog, progress, record, val, {**payload, **state}, num_epochs, t.save_every_s)
    finish_run(runlog, d, stop)
    return record


if __name__ == "__main__":
    run_cli(STAGE, __doc__, main)
