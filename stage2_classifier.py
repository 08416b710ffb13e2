"""Stage 2: freeze a stage-1 backbone and retrain the classifier so that tail classes stop losing.

    python stage2_classifier.py --cfg config/cifar10_lt/stage2_balms.yaml stage1.checkpoint=logs/<run>/last.pt
    python stage2_classifier.py --cfg config/cifar10_lt/stage2_balms.yaml --test
    python stage2_classifier.py --cfg config/cifar10_lt/demo_stage2_crt.yaml model.pretrained=NAME|URL|PATH

Methods (stage2.method): balanced_softmax, crt, balms (Balanced Softmax + meta-learned class sampler), lws
(learnable weight scaling), tau_norm (post-hoc, tau searched on the validation split). The head trains on
cached features of stage2.cache_views augmented views of the training set; cache_views=0 runs the backbone on
every batch, as the BALMS code does. The training set (data.dataset, imbalance_factor, profile, subset_seed,
subset_draw, val_per_class, image_size) and model.name are read from the stage-1 checkpoint (--resume: last.pt).
Writes a run directory as stage 1 does; the saved model is backbone + plain linear head, so --test and any
consumer of stage-1 checkpoints read it unchanged.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from config.cli import check_select_metric, open_log, run_cli, start_processes, start_run, training_set
from config.load import config_to_dict
from config.saved import check_stage_of_run
from config.schema import Config
from config.stage2 import (Method, check_data, check_method, check_tau_norm_keys, check_training_set, head_choice,
                           keeps_stage1_head, with_stage1_training_set)
from data.augment import BatchAugment
from data.build import LongTailData, build_meta_resample, recorded_normalization
from data.build_files import FileData, data_record
from data.loader import META_VIEW_STREAM, VIEW_STREAM, epoch_generator, steps_per_epoch
from data.samplers import build_sampler
from engine.distributed import Dist, broadcast_module, check_same_on_ranks, from_rank0
from engine.features import (CachedFeatures, LiveFeatures, cache_path, check_cache_fits, compute_views, disk_views,
                             drop_feature_caches, view_chunk)
from engine.head_loop import Features, MetaSampling, train_head_epoch
from engine.loop import evaluate
from engine.run import Progress, end_epoch, finish_run, finished_run, restore
from engine.stopping import StopRequest, stop_run
from engine.runlog import RunLog
from engine.schedule import sgd_with_schedule
from engine.tau_norm import tau_search
from meta_sampler.learner import ClassSampler
from models import build_model, load_pretrained
from models.checkpoint import CheckpointError, load_checkpoint, load_state_checked
from models.download import DownloadError
from models.heads import ScaledLinear, deployable_state, head_name, load_backbone_state, tau_normalized
from models.losses import EmptyClassError, build_loss
from models.pretrained import HeadMismatchError, training_run

STAGE = "stage2"
logger = logging.getLogger("stage2")


def stage1_run(cfg: Config, ranks: Dist, resume: bool) -> dict | None:
    """The stage-1 run's checkpoint: stage1.checkpoint, or model.pretrained naming a stage-1 run of this tool
    (a release); None for other weights. --resume: what the run took from it, read from the run's last.pt (its
    backbone too, by main), so the stage-1 file may be gone. Rank 0 reads, sending it to the others: only its
    machine may hold the stage-1 run directory."""
    def read() -> dict | None:
        last = Path(cfg.run_dir) / "last.pt"
        if resume and last.is_file():
            ckpt = load_checkpoint(last, mmap=True)
            check_stage_of_run(ckpt["config"], STAGE, last.parent)
            return {k: ckpt[k] for k in ("config", "model_args", "class_counts", "normalization") if k in ckpt}
        if cfg.stage1.checkpoint:
            return load_checkpoint(cfg.stage1.checkpoint)
        try:
            return training_run(cfg.model.pretrained)
        except (CheckpointError, DownloadError) as e:
            named = cfg.model.pretrained in str(e)  # most errors name their source already
            raise SystemExit(f"error: {e}" if named else f"error: {cfg.model.pretrained}: {e}") from None
    return from_rank0(read, ranks)


def build_backbone(cfg: Config, s1: dict | None, counts: list[int], digest: str, method: Method,
                   device: torch.device, ranks: Dist) -> tuple[nn.Module, dict]:
    """The frozen backbone with its stage-1 head, and the model_args of stage 2's checkpoints: a
    stage-1 run of this tool (its training set compared with counts and digest), or pretrained / imported
    weights (no training set to match)."""
    keep_head = keeps_stage1_head(cfg, method)
    if s1 is not None and s1.get("config"):
        check_training_set(s1, counts, digest)
        if "model" in s1 and "stage2" in s1["config"]:  # a stage-2 run's file (on --resume, s1 is this run's own)
            logger.warning("%s is a stage-2 run's checkpoint (stage2.method=%s): its backbone is the frozen stage-1 "
                           "one, %s", cfg.stage1.checkpoint or cfg.model.pretrained, s1["config"]["stage2"]["method"],
                           f"but {head_choice(cfg, method)} starts from the head that run trained, not stage 1's"
                           if keep_head else "and its head is not used")
        model, model_args = build_model(**s1["model_args"]), s1["model_args"]
        if "model" in s1:  # (not when resuming: main loads the run's own backbone)
            load_state_checked(model, s1["model"], f"model in {cfg.stage1.checkpoint or cfg.model.pretrained}")
    else:
        source = cfg.stage1.checkpoint or cfg.model.pretrained
        try:
            model = from_rank0(lambda: load_pretrained(source, arch=cfg.model.name, num_classes=len(counts),
                                                       reset_head=not keep_head), ranks)  # only rank 0's machine
        except HeadMismatchError as e:  # its advice, model.reset_head=true, is refused for these methods
            raise SystemExit(f"error: {source}: {e.problem}; stage2.method={cfg.stage2.method} starts from the "
                             f"backbone's own classifier, which must have this training set's {len(counts)} classes: "
                             f"use balanced_softmax, crt or balms, which train a new head") from None
        except (CheckpointError, DownloadError) as e:
            raise SystemExit(f"error: {source}: {e}") from None
        model_args = {"name": cfg.model.name, "num_classes": len(counts)}
    if keep_head and not isinstance(model.head, nn.Linear):
        raise SystemExit(f"error: {head_choice(cfg, method)} starts from the stage-1 classifier, which is a "
                         f"{head_name(model.head)} head, not linear: use balanced_softmax, crt or balms with "
                         f"stage2.init_head=reinit, which train a new linear head")
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.requires_grad_(False)
    return model.to(device), {**model_args, "head": "linear"}  # every stage-2 checkpoint deploys a linear head


def fit_tau_norm(cfg: Config, run_dir, runlog: RunLog | None, model: nn.Module, data: LongTailData | FileData,
                 payload: dict, ranks: Dist) -> dict:
    """tau_norm: no training; tau searched on the validation split (stage2.tau_norm_tau without one)."""
    stage1_head, tau, has_val = model.head, cfg.stage2.tau_norm_tau, len(data.val_labels) > 0
    if has_val:
        val_feats = compute_views(model, data.val_images, None, 1, data.mean, data.std, cfg.train.seed, VIEW_STREAM,
                                  cfg.eval.batch_size, cfg.model.channels_last, cfg.train.amp, ranks,
                                  cfg.data.workers)[0]
        tau, records = tau_search(stage1_head, val_feats, data.val_labels, data.class_counts,
                                  cfg.stage2.tau_norm_grid, cfg.train.select_metric)
        for i, r in enumerate(records if runlog is not None else []):  # step = grid index; the result's is 0
            runlog.log(i, {f"search_{k}": v for k, v in r.items()})
    model.head = tau_normalized(stage1_head, tau)
    logger.info("tau_norm: tau = %g (%s)", tau, "searched on the validation set" if has_val else "stage2.tau_norm_tau")
    record = {"tau": tau}
    val = validate(cfg, model, data, ranks) if has_val else None
    progress = Progress(cfg.train.select_metric, epoch=1)
    end_epoch(run_dir, runlog, progress, record, val, {**payload, "model": model.state_dict(), "tau": tau}, 1)
    finish_run(runlog, ranks)
    return record


def validate(cfg: Config, model: nn.Module, data: LongTailData | FileData, ranks: Dist) -> dict:
    return evaluate(model, data.val_images, data.val_labels, data.class_counts, cfg.eval.batch_size, data.mean,
                    data.std, cfg.model.channels_last, amp=cfg.train.amp, d=ranks, workers=cfg.data.workers)


def feature_source(cfg: Config, model: nn.Module, images: torch.Tensor | Dataset, data: LongTailData | FileData,
                   stream: int, ranks: Dist, run_dir: Path, chunk: int) -> Features:
    """Features of `images` by index, on the backbone's device: stage2.cache_views views computed once (each rank
    its share, every rank then all of them; for image files, float16 on disk in the run directory, reused on
    resume), or the backbone per batch (the images then wait on that device; every rank runs the whole batch)."""
    d, views = cfg.data, cfg.stage2.cache_views
    augment = BatchAugment(d.crop_padding, d.flip, d.autoaugment, d.cutout)
    device, on_disk = next(model.parameters()).device, isinstance(data, FileData)
    if views > 0:
        shape = (views, len(images), model.feature_dim)

        def compute() -> torch.Tensor:  # image files: float16 on the host, a view at a time, for disk_views
            check_cache_fits(shape, device, on_disk, run_dir if on_disk and ranks.is_main else None)
            return compute_views(model, images, augment, views, data.mean, data.std, cfg.train.seed, stream,
                                 cfg.eval.batch_size, cfg.model.channels_last, cfg.train.amp, ranks, d.workers,
                                 host_half=on_disk, chunk=chunk)
        if on_disk:
            return CachedFeatures(disk_views(cache_path(run_dir, stream), compute, ranks.is_main, shape, ranks),
                                  device)
        return CachedFeatures(compute())
    return LiveFeatures(model, images.to(device), augment, data.mean, data.std, cfg.model.channels_last,
                        bn_train=cfg.stage2.live_bn == "train", amp=cfg.train.amp, d=ranks)


def new_head(cfg: Config, method: Method, stage1_head: nn.Module, ranks: Dist) -> nn.Module:
    """The head stage 2 trains, on the stage-1 head's device; rank 0's on every rank (an init from each rank's
    global generator, moved on rank 0 alone when only it read the backbone: imported weights)."""
    if method.head == "lws":
        return ScaledLinear(stage1_head)  # the stage-1 head (the same on every rank) scaled by ones
    head = nn.Linear(stage1_head.in_features, stage1_head.out_features, device=stage1_head.weight.device)
    if cfg.stage2.init_head == "stage1":
        head.load_state_dict(stage1_head.state_dict())
    broadcast_module(head, ranks)
    return head


def meta_sampling(cfg: Config, model: nn.Module, data: LongTailData | FileData, features: Features,
                  ranks: Dist, run_dir: Path, chunk: int) -> MetaSampling:
    """BALMS: the class sampler, its optimiser, and the split its class-balanced meta batches come from
    (meta_sampler.meta_split: validation when there is one, the training set, or a second long-tailed
    draw of CIFAR's training split)."""
    ms, d = cfg.meta_sampler, cfg.data
    labels, meta_features, split = data.train_labels, features, "train"
    if ms.meta_split == "resample":
        images, labels = build_meta_resample(d.dataset, d.root, d.download, d.imbalance_factor, d.profile,
                                             d.subset_seed, d.val_per_class, d.subset_draw)
        split = "resampled"
        meta_features = feature_source(cfg, model, images, data, META_VIEW_STREAM, ranks, run_dir, chunk)
    elif len(data.val_labels) and ms.meta_split == "val":
        labels, split = data.val_labels, "val"
        meta_features = feature_source(cfg, model, data.val_images, data, META_VIEW_STREAM, ranks, run_dir, chunk)
    # On the backbone's device, so that a step's class draws, meta-gradient and update never wait for it.
    sampler = ClassSampler(data.train_labels, len(data.class_counts), ms.init_pow).to(next(model.parameters()).device)
    logger.info("balms: class-balanced meta batches of %d from the %s split (%d images)", ms.meta_batch_size,
                split, len(labels))
    return MetaSampling(sampler, torch.optim.Adam(sampler.parameters(), lr=ms.lr), labels, meta_features,
                        ms.meta_batch_size, ms.gumbel_tau, ms.relax)


def method_loss(cfg: Config, method: Method, data: LongTailData | FileData, device: torch.device) -> nn.Module | None:
    """The method's loss (per image for BALMS's meta step; None for tau_norm), once the training set is known
    to suit the config: a class with no image under Balanced Softmax's log counts, a selection metric with
    nothing to choose by, or a tau_norm key that would go unread, is one config error before the run."""
    has_val = len(data.val_labels) > 0
    check_select_metric(cfg.train.select_metric, data.class_counts, has_val,
                        "tau" if method.kind == "posthoc" else "best.pt")
    if method.kind == "posthoc":
        check_tau_norm_keys(cfg, has_val)
        return None
    try:
        loss = build_loss(method.loss, data.class_counts, **({"reduction": "none"} if method.kind == "meta" else {}))
    except EmptyClassError as e:
        raise SystemExit(f"config error: stage2.method={cfg.stage2.method} ({method.loss} loss): {e}: train stage 1 "
                         f"on data with every class, or use stage2.method=crt") from None
    return loss.to(device)


def main(cfg: Config, resume: bool = False) -> dict:
    method = check_method(cfg)
    ranks, device = start_processes(cfg)
    s1 = stage1_run(cfg, ranks, resume)
    if s1 is not None and s1.get("config"):
        cfg = with_stage1_training_set(cfg, s1)
    augment_note = check_data(cfg, s1)
    t, d = cfg.train, cfg.data
    run_dir, ckpt = start_run(cfg, STAGE, resume, ranks)
    if finished_run(ckpt, run_dir, ranks):
        return {}
    if ckpt is None:
        drop_feature_caches(run_dir, ranks.is_main)

    data = training_set(cfg, ranks, recorded_normalization(s1, d.dataset) if s1 else None)
    model, model_args = build_backbone(cfg, s1, data.class_counts, data.train_digest, method, device, ranks)
    loss_fn = method_loss(cfg, method, data, device)
    runlog = open_log(cfg, STAGE, run_dir, ranks, ckpt)
    if augment_note:
        logger.warning(augment_note)
    chunk = view_chunk(ckpt)
    payload = {"config": config_to_dict(cfg, STAGE), "model_args": model_args, **data_record(data),
               "stage1_checkpoint": cfg.stage1.checkpoint or cfg.model.pretrained, "view_chunk": chunk}
    if method.kind == "posthoc":
        return fit_tau_norm(cfg, run_dir, runlog, model, data, payload, ranks)

    # ---- features, head, loss, batches (a data sampler, or the BALMS meta-sampler), optimiser
    if ckpt is not None:  # the run's own backbone (and BN statistics), whatever stage1.checkpoint holds by now
        load_backbone_state(model, ckpt["model"], f"model in {run_dir / 'last.pt'}")
    features = feature_source(cfg, model, data.train_images, data, VIEW_STREAM, ranks, run_dir, chunk)
    model.head = head = new_head(cfg, method, copy.deepcopy(model.head), ranks)
    meta = sampler = None
    if method.kind == "meta":
        meta = meta_sampling(cfg, model, data, features, ranks, run_dir, chunk)
    else:
        sampler = build_sampler(method.sampler, data.train_labels, len(data.class_counts))
    epoch_len = steps_per_epoch(len(data.train_labels) if meta else sampler.num_samples, t.batch_size)
    optimizer, scheduler, steps_total = sgd_with_schedule(
        head.parameters(), epoch_len, t.lr, t.momentum, t.weight_decay, t.nesterov, t.epochs, t.iterations,
        t.warmup, t.schedule, t.milestones, t.gamma, t.warmup_start)
    states = {"head": head, "optimizer": optimizer, "scheduler": scheduler}
    if meta:
        states.update(meta_sampler=meta.sampler, meta_sampler_optimizer=meta.optimizer)
    progress = Progress(t.select_metric)
    if ckpt is not None:
        progress = restore(ckpt, states, run_dir, data.class_counts, epoch_len, train_digest=data.train_digest)

    # ---- train the head: one epoch, validate, checkpoint, log
    num_epochs = progress.final_epoch(steps_total, epoch_len)
    logger.info("stage 2 %s: %d steps of batch %d (%d epochs) on %s, features %s", cfg.stage2.method, steps_total,
                t.batch_size, num_epochs, device, f"cached x{cfg.stage2.cache_views}" if cfg.stage2.cache_views
                else f"live, BatchNorm in {cfg.stage2.live_bn} mode")
    record = {}
    stop = StopRequest().install() if ranks.world == 1 else None  # torchrun itself stops its workers
    for epoch in range(progress.epoch, num_epochs):
        done = progress.epoch_step  # > 0 when resuming a run stopped mid-epoch
        gen = epoch_generator(t.seed, epoch)
        batches = sampler.indices(epoch, gen).split(t.batch_size)[done:epoch_len] if sampler else None
        if done:  # the draws of the steps already taken: the stopped run saved its generator
            gen.set_state(ckpt["epoch_rng"])
        loss_fn.set_epoch(epoch)
        record = train_head_epoch(head, optimizer, scheduler, loss_fn, data.train_labels, features,
                                  progress.steps_this_epoch(steps_total, epoch_len), t.batch_size, gen, batches,
                                  meta, desc=f"epoch {epoch + 1}/{num_epochs}", stop=stop,
                                  carry=ckpt["epoch_sums"] if done else (0.0, 0.0, 0, 0.0))
        progress.took(record.pop("steps"))
        sums = record.pop("sums")
        state = {name: obj.state_dict() for name, obj in states.items()} | {"model": deployable_state(model, head)}
        if stop is not None and stop():
            stop_run(run_dir, runlog, progress, {**payload, **state, "epoch_rng": gen.get_state(),
                                                 "epoch_sums": sums}, stop.signum)
        progress.next_epoch()
        check_same_on_ranks({k: v for k, v in states.items() if isinstance(v, nn.Module)}, ranks)
        val = validate(cfg, model, data, ranks) if len(data.val_labels) else None
        end_epoch(run_dir, runlog, progress, record, val, {**payload, **state}, num_epochs, t.save_every_s)
    finish_run(runlog, ranks, stop)
    return record


if __name__ == "__main__":
    run_cli(STAGE, __doc__, main)
