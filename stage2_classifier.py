"""Stage 2: freeze a stage-1 backbone and retrain the classifier so that tail classes stop losing.

    python stage2_classifier.py --cfg config/cifar10_lt/stage2_balms.yaml stage1.checkpoint=logs/<run>/last.pt
    python stage2_classifier.py --cfg config/cifar10_lt/stage2_balms.yaml --test
    python stage2_classifier.py --cfg config/cifar10_lt/demo_stage2_crt.yaml model.pretrained=NAME|URL|PATH

Methods (stage2.method): balanced_softmax, crt, balms (Balanced Softmax + meta-learned class
sampler), lws (learnable weight scaling), tau_norm (post-hoc, tau searched on the validation
split). The head trains on cached features of stage2.cache_views augmented views of the training
set; cache_views=0 runs the backbone on every batch, as the BALMS code does.
Writes the same run directory as stage 1; the saved model is backbone + plain linear head, so
--test and any consumer of stage-1 checkpoints read it unchanged.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from config.load import config_diff, config_to_dict, dump_config
from config.schema import Config
from data.augment import BatchAugment
from data.build import build_long_tail
from data.loader import epoch_generator, steps_per_epoch
from data.samplers import build_sampler
from engine.features import CachedFeatures, LiveFeatures, compute_views
from engine.head_loop import MetaSampling, train_head_epoch
from engine.loop import metrics_from_logits, predict_logits
from engine.run import check_names, run_cli, setup_run, trim_metrics_log
from engine.runlog import RunLog
from engine.schedule import build_scheduler
from meta_sampler.learner import ClassSampler
from models import MODELS, build_model, load_pretrained
from models.checkpoint import CheckpointError, load_checkpoint, load_state_checked, save_checkpoint
from models.download import DownloadError
from models.heads import ScaledLinear, as_linear, head_name, tau_normalized
from models.losses import build_loss
from stage1_train import test

logger = logging.getLogger("stage2")


@dataclass(frozen=True)
class Method:
    loss: str  # models.losses name; balms uses it per sample inside the meta step
    sampler: str | None  # data.samplers name; None = the BALMS meta-sampler
    head: str  # linear | lws


METHODS: dict[str, Method | None] = {
    "balanced_softmax": Method("balanced_softmax", "instance", "linear"),
    "crt": Method("ce", "class_balanced", "linear"),
    "balms": Method("balanced_softmax", None, "linear"),
    "lws": Method("ce", "class_balanced", "lws"),
    "tau_norm": None,  # post-hoc: no training
}
# Stage-1 data keys that fix which images form the training set: stage 2 must use the same.
SUBSET_KEYS = ("dataset", "imbalance_factor", "profile", "subset_seed", "val_per_class")
FEATURE_STREAM = 2  # data.loader.epoch_generator stream of the cached views


def tau_search(stage1_head: nn.Linear, val_feats: torch.Tensor, val_labels: torch.Tensor,
               counts: list[int], grid: list[float], metric: str) -> tuple[float, list[dict]]:
    """Best tau on the validation features (the first of equals), and one record per tau."""
    records = []
    for tau in grid:
        with torch.no_grad():
            m = metrics_from_logits(tau_normalized(stage1_head, tau)(val_feats), val_labels, counts)
        records.append({"tau": tau, **{f"val_{k}": m[k] for k in ("top1", "many", "medium", "few")}})
    best = max(records, key=lambda r: -1.0 if r[f"val_{metric}"] is None else r[f"val_{metric}"])
    return best["tau"], records


def deployable_state(model: nn.Module, head: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with the head as a plain Linear: one layout for every checkpoint."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    state.update({f"head.{k}": v for k, v in as_linear(head).state_dict().items()})
    return state


def main(cfg: Config, resume: bool = False) -> dict:
    check_names({"model.name": (cfg.model.name, MODELS), "stage2.method": (cfg.stage2.method, METHODS)})
    run_dir = setup_run(cfg.run_dir, cfg.train.seed, cfg.train.num_threads)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if last_path.is_file() and not resume:
        raise SystemExit(f"{run_dir} already holds a run ({last_path}); pass --resume to continue it, "
                         f"or choose another name=... / log_dir=... for a new run")
    if cfg.stage2.method not in METHODS:
        raise SystemExit(f"unknown stage2.method {cfg.stage2.method!r}; valid: {', '.join(METHODS)}")
    if not cfg.stage1.checkpoint and not cfg.model.pretrained:
        raise SystemExit("stage 2 needs a backbone: stage1.checkpoint=logs/<stage-1 run>/last.pt, "
                         "or model.pretrained=NAME|URL|PATH (`python -m models list` shows the names)")
    if cfg.stage1.checkpoint and cfg.model.pretrained:
        raise SystemExit("set stage1.checkpoint or model.pretrained, not both: they name the same backbone")
    if cfg.model.head != "linear":
        raise SystemExit(f"model.head={cfg.model.head} is a stage-1 key: stage 2 always trains a linear head "
                         f"(on the features of any stage-1 head); remove it from the stage-2 config")
    method = METHODS[cfg.stage2.method]
    # Only these methods start from the checkpoint's head; the others train a new one.
    keeps_head = method is None or method.head == "lws" or cfg.stage2.init_head == "stage1"
    if cfg.model.reset_head and keeps_head:
        raise SystemExit(f"model.reset_head=true drops the head that stage2.method={cfg.stage2.method} "
                         f"(stage2.init_head={cfg.stage2.init_head}) starts from; balanced_softmax, crt and "
                         f"balms with init_head=reinit train a new head for any number of classes")

    # ---- frozen backbone: a stage-1 run of this tool (then stage 1's long-tailed training set), or
    # pretrained / imported weights, which have no training set to match
    s1 = load_checkpoint(cfg.stage1.checkpoint) if cfg.stage1.checkpoint else {}
    if s1.get("config"):
        s1_data = s1["config"]["data"]
        differ = [f"data.{k}: stage 1 {s1_data[k]!r}, now {getattr(cfg.data, k)!r}"
                  for k in SUBSET_KEYS if s1_data[k] != getattr(cfg.data, k)]
        if differ:
            raise SystemExit("stage 2 must train on stage 1's training set; set " + "; ".join(differ))
        model = build_model(**s1["model_args"])
        load_state_checked(model, s1["model"], f"model in {cfg.stage1.checkpoint}")
    d, t = cfg.data, cfg.train
    data = build_long_tail(d.dataset, d.root, d.download, d.imbalance_factor, d.profile, d.subset_seed, d.val_per_class)
    counts, labels, has_val = data.class_counts, data.train_labels, len(data.val_labels) > 0
    if s1.get("config"):
        if counts != s1["class_counts"]:
            raise SystemExit(f"the training set differs from stage 1's ({counts} vs {s1['class_counts']}): "
                             f"is data.root the same copy of the dataset?")
        model_args = s1["model_args"]
    else:
        model_args = {"name": cfg.model.name, "num_classes": len(counts)}
        source = cfg.stage1.checkpoint or cfg.model.pretrained
        try:
            model = load_pretrained(source, arch=cfg.model.name, num_classes=len(counts), reset_head=not keeps_head)
        except (CheckpointError, DownloadError) as e:
            raise SystemExit(f"{source}: {e}") from None
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    stage1_head = copy.deepcopy(model.head)
    if keeps_head and not isinstance(stage1_head, nn.Linear):
        raise SystemExit(f"stage2.method={cfg.stage2.method} (stage2.init_head={cfg.stage2.init_head}) starts from "
                         f"the stage-1 classifier, which is a {head_name(stage1_head)} head, not linear: use "
                         f"balanced_softmax, crt or balms with stage2.init_head=reinit, which train a new linear head")
    # Every stage-2 checkpoint deploys a linear head (deployable_state), whatever stage 1 trained.
    model_args = {**model_args, "head": "linear"}
    payload = {"config": config_to_dict(cfg), "model_args": model_args, "class_counts": counts,
               "class_names": data.class_names, "stage1_checkpoint": cfg.stage1.checkpoint}
    dump_config(cfg, run_dir / "config.yaml")
    runlog = RunLog(run_dir)

    def val_metrics() -> dict:
        logits = predict_logits(model, data.val_images, cfg.eval.batch_size, data.mean, data.std,
                                cfg.model.channels_last, "val")
        return metrics_from_logits(logits, data.val_labels, counts)

    if method is None:
        # ---- tau_norm: post-hoc, tau from the validation split (or the config without one)
        tau, records = cfg.stage2.tau, []
        if has_val:
            val_feats = compute_views(model, data.val_images, None, 1, data.mean, data.std, 0,
                                      cfg.eval.batch_size, cfg.model.channels_last)[0]
            tau, records = tau_search(stage1_head, val_feats, data.val_labels, counts, cfg.stage2.tau_grid,
                                      t.select_metric)
        for i, r in enumerate(records):
            runlog.log(i, r)
        model.head = tau_normalized(stage1_head, tau)
        logger.info("tau_norm: tau = %g (%s)", tau, "searched on the validation split" if has_val else "stage2.tau")
        record = {"tau": tau}
        if has_val:
            val = val_metrics()
            record.update({f"val_{k}": val[k] for k in ("top1", "many", "medium", "few")})
        for path in ([best_path] if has_val else []) + [last_path]:
            save_checkpoint(path, {**payload, "model": model.state_dict(), "epoch": 1, "step": 0, "tau": tau})
        runlog.close()
        return record

    # ---- features: K cached augmented views (BN in eval mode), or the backbone per batch
    augment = BatchAugment(d.crop_padding, d.flip, d.autoaugment, d.cutout)
    sv = cfg.stage2.cache_views
    if sv > 0:
        features = CachedFeatures(compute_views(model, data.train_images, augment, sv, data.mean, data.std,
                                                t.seed + FEATURE_STREAM, cfg.eval.batch_size, cfg.model.channels_last))
    else:
        features = LiveFeatures(model, data.train_images, augment, data.mean, data.std, cfg.model.channels_last,
                                bn_train=cfg.stage2.live_bn == "train")
    meta_labels, meta_features = labels, features  # the meta batch comes from val when there is one
    if has_val and method.sampler is None and cfg.sampler.meta_split == "val":
        meta_labels = data.val_labels
        meta_features = (CachedFeatures(compute_views(model, data.val_images, augment, max(sv, 1), data.mean,
                                                      data.std, t.seed + FEATURE_STREAM + 1, cfg.eval.batch_size,
                                                      cfg.model.channels_last))
                         if sv > 0 else LiveFeatures(model, data.val_images, augment, data.mean, data.std,
                                                     cfg.model.channels_last, cfg.stage2.live_bn == "train"))

    # ---- head, loss, optimizers, schedule
    if method.head == "lws":
        head = ScaledLinear(stage1_head)
    else:
        head = nn.Linear(stage1_head.in_features, stage1_head.out_features)
        if cfg.stage2.init_head == "stage1":
            head.load_state_dict(stage1_head.state_dict())
    model.head = head
    meta = None
    if method.sampler is None:
        loss_fn = build_loss(method.loss, counts, reduction="none")
        sampler = ClassSampler(labels, len(counts), cfg.sampler.init_pow)
        meta = MetaSampling(sampler, torch.optim.Adam(sampler.parameters(), lr=cfg.sampler.lr), meta_labels,
                            meta_features, cfg.sampler.meta_batch_size, cfg.sampler.tau)
        logger.info("balms: class-balanced meta batches of %d from the %s split (%d images)",
                    cfg.sampler.meta_batch_size, "val" if meta_labels is not labels else "train", len(meta_labels))
        num_samples = len(labels)
    else:
        loss_fn = build_loss(method.loss, counts)
        data_sampler = build_sampler(method.sampler, labels, len(counts))
        num_samples = data_sampler.num_samples
    epoch_len = steps_per_epoch(num_samples, t.batch_size)
    total_steps = t.iterations if t.iterations > 0 else t.epochs * epoch_len
    unit = 1 if t.iterations > 0 else epoch_len
    optimizer = torch.optim.SGD(head.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                nesterov=t.nesterov)
    scheduler = build_scheduler(optimizer, total_steps, round(t.warmup * unit), t.schedule,
                                [round(m * unit) for m in t.milestones], t.gamma)
    num_epochs = math.ceil(total_steps / epoch_len)

    # ---- resume
    start_epoch, step, best = 0, 0, {"metric": t.select_metric, "value": None, "epoch": None}
    if resume and last_path.is_file():
        ckpt = load_checkpoint(last_path)
        diff = config_diff(ckpt["config"], config_to_dict(cfg))
        if diff:
            raise SystemExit(f"--resume with a config that differs from the run's at {', '.join(diff)}")
        load_state_checked(model, ckpt["train_model"], f"model in {last_path}")
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if meta is not None:
            meta.sampler.load_state_dict(ckpt["sampler"])
            meta.optimizer.load_state_dict(ckpt["sampler_optimizer"])
        start_epoch, step, best = ckpt["epoch"], ckpt["step"], ckpt["best"]
        trim_metrics_log(run_dir, start_epoch)
        logger.info("resumed from %s at epoch %d, step %d", last_path, start_epoch, step)

    # ---- train the head: one epoch, validate, checkpoint, log
    feature_source = f"cached x{sv}" if sv > 0 else f"live, BatchNorm in {cfg.stage2.live_bn} mode"
    logger.info("stage 2 %s: %d steps of batch %d (%d epochs), features %s", cfg.stage2.method, total_steps,
                t.batch_size, num_epochs, feature_source)
    record = {}
    for epoch in range(start_epoch, num_epochs):
        steps = min(epoch_len, total_steps - step)
        gen = epoch_generator(t.seed, epoch)
        batches = None
        if meta is None:
            batches = data_sampler.indices(epoch, gen).split(t.batch_size)[:epoch_len]
        loss_fn.set_epoch(epoch)
        record = train_head_epoch(head, optimizer, scheduler, loss_fn, labels, features, steps, t.batch_size, gen,
                                  batches, meta, desc=f"epoch {epoch + 1}/{num_epochs}")
        step += steps
        record["epoch"] = epoch + 1
        if meta is not None:
            record["sample_probs"] = meta.sampler.class_probs().tolist()
        if has_val:
            val = val_metrics()
            record.update({f"val_{k}": val[k] for k in ("top1", "many", "medium", "few")})
            score = val[t.select_metric]
            if score is not None and (best["value"] is None or score > best["value"]):
                best = {"metric": t.select_metric, "value": score, "epoch": epoch + 1}
        state = {**payload, "model": deployable_state(model, head), "train_model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "epoch": epoch + 1, "step": step, "best": best}
        if meta is not None:
            state.update(sampler=meta.sampler.state_dict(), sampler_optimizer=meta.optimizer.state_dict())
        if has_val and best["epoch"] == epoch + 1:
            save_checkpoint(best_path, state)
        save_checkpoint(last_path, state)
        runlog.log(step, record)
        logger.info("epoch %d/%d %s", epoch + 1, num_epochs,
                    " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
    runlog.close()
    return record


if __name__ == "__main__":
    run_cli(__doc__, main, test)
