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
from pathlib import Path

import numpy as np
import torch

from config.load import config_diff, config_to_dict, dump_config
from config.schema import Config
from data.augment import BatchAugment
from data.build import NORMALIZATION, build_long_tail
from data.cifar import load_cifar
from data.loader import BatchLoader, steps_per_epoch
from data.samplers import SAMPLERS, build_sampler
from engine.loop import metrics_from_logits, predict_logits, train_one_epoch
from engine.run import check_names, report_test, run_cli, setup_run, trim_metrics_log
from engine.runlog import RunLog
from engine.schedule import build_scheduler
from models import MODELS, build_model, load_pretrained
from models.checkpoint import CheckpointError, load_checkpoint, load_state_checked, save_checkpoint
from models.download import DownloadError
from models.heads import HEADS, head_name
from models.losses import LOSSES, build_loss, posthoc_logit_adjust

logger = logging.getLogger("stage1")


def test(cfg: Config, ckpt_path: Path) -> dict:
    """Evaluate a checkpoint on the test split; group accuracies use the checkpoint's class counts."""
    ckpt = load_checkpoint(ckpt_path)
    model = build_model(**ckpt["model_args"])
    load_state_checked(model, ckpt["model"], f"model in {ckpt_path}")
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    split = load_cifar(cfg.data.dataset, cfg.data.root, "test", download=cfg.data.download)
    mean, std = NORMALIZATION[cfg.data.dataset]
    logits = predict_logits(model, split.images, cfg.eval.batch_size, mean, std, cfg.model.channels_last, "test")
    if cfg.eval.posthoc_tau:
        logits = posthoc_logit_adjust(logits, ckpt["class_counts"], cfg.eval.posthoc_tau)
    metrics = metrics_from_logits(logits, split.labels, ckpt["class_counts"])
    report_test(metrics, split.class_names, Path(cfg.run_dir) / "test_metrics.json", ckpt_path)
    return metrics


def main(cfg: Config, resume: bool = False) -> dict:
    check_names({"model.name": (cfg.model.name, MODELS), "model.head": (cfg.model.head, HEADS),
                 "loss.name": (cfg.loss.name, LOSSES), "data.sampler": (cfg.data.sampler, SAMPLERS)})
    run_dir = setup_run(cfg.run_dir, cfg.train.seed, cfg.train.num_threads)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if last_path.is_file() and not resume:
        raise SystemExit(f"{run_dir} already holds a run ({last_path}); pass --resume to continue it, "
                         f"or choose another name=... / log_dir=... for a new run")

    # ---- data: long-tailed training set, balanced validation hold-out, in-memory loader
    d = cfg.data
    data = build_long_tail(d.dataset, d.root, d.download, d.imbalance_factor, d.profile, d.subset_seed, d.val_per_class)
    t = cfg.train
    # The progressive sampler interpolates over the run; it draws N images per epoch.
    sampler_params = {}
    if d.sampler == "progressive":
        steps = steps_per_epoch(len(data.train_labels), t.batch_size)
        sampler_params["total_epochs"] = t.epochs if t.iterations == 0 else math.ceil(t.iterations / steps)
    sampler = build_sampler(d.sampler, data.train_labels, len(data.class_counts), **sampler_params)
    augment = BatchAugment(d.crop_padding, d.flip, d.autoaugment, d.cutout)
    loader = BatchLoader(data.train_images, data.train_labels, t.batch_size, sampler, augment,
                         data.mean, data.std, t.seed, cfg.model.channels_last)
    has_val = len(data.val_labels) > 0

    # ---- model: random init, or model.pretrained to fine-tune (its head, or a new one with model.reset_head)
    model_args = {"name": cfg.model.name, "num_classes": len(data.class_counts), "head": cfg.model.head}
    try:
        model = (load_pretrained(cfg.model.pretrained, arch=cfg.model.name, num_classes=model_args["num_classes"],
                                 reset_head=cfg.model.reset_head, head=cfg.model.head)
                 if cfg.model.pretrained else build_model(**model_args))
    except (CheckpointError, DownloadError) as e:
        raise SystemExit(f"model.pretrained={cfg.model.pretrained}: {e}") from None
    if head_name(model.head) != cfg.model.head:
        raise SystemExit(f"model.pretrained={cfg.model.pretrained} has a {head_name(model.head)} head, not the "
                         f"model.head={cfg.model.head} asked for: set model.head={head_name(model.head)}, or "
                         f"model.reset_head=true for a new {cfg.model.head} head")
    fresh_head = not cfg.model.pretrained or cfg.model.reset_head
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)

    # ---- loss
    loss_params = {k: v for k, v in vars(cfg.loss).items() if k != "name" and v is not None}
    loss_fn = build_loss(cfg.loss.name, data.class_counts, **loss_params)
    bias = loss_fn.init_bias()
    if bias is not None and fresh_head:  # a pretrained head keeps its learned bias
        if getattr(model.head, "bias", None) is None:
            raise SystemExit(f"loss.name={cfg.loss.name} initialises the classifier's bias, and "
                             f"model.head={cfg.model.head} has none: use model.head=linear")
        torch.nn.init.constant_(model.head.bias, bias)
    if cfg.loss.name == "ldam" and cfg.model.head == "linear" and getattr(loss_fn, "scale", 1.0) > 1:
        logger.warning("loss ldam multiplies logits by loss.scale=%g, meant for the cosines of model.head=cosine "
                       "(as the LDAM code); a linear head's logits times that can overflow", loss_fn.scale)

    # ---- optimizer and per-step schedule (epochs or iterations)
    epoch_len = len(loader)
    total_steps = t.iterations if t.iterations > 0 else t.epochs * epoch_len
    unit = 1 if t.iterations > 0 else epoch_len  # steps per unit of warmup / milestones
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                                weight_decay=t.weight_decay, nesterov=t.nesterov)
    scheduler = build_scheduler(optimizer, total_steps, round(t.warmup * unit), t.schedule,
                                [round(m * unit) for m in t.milestones], t.gamma)
    num_epochs = math.ceil(total_steps / epoch_len)

    # ---- resume
    start_epoch, step, best = 0, 0, {"metric": t.select_metric, "value": None, "epoch": None}
    if resume and last_path.is_file():
        ckpt = load_checkpoint(last_path)
        diff = config_diff(ckpt["config"], config_to_dict(cfg))
        if diff:
            raise SystemExit(f"--resume with a config that differs from the run's at {', '.join(diff)}; "
                             f"resume with the run's own config ({run_dir / 'config.yaml'})")
        load_state_checked(model, ckpt["model"], f"model in {last_path}")
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, step, best = ckpt["epoch"], ckpt["step"], ckpt["best"]
        trim_metrics_log(run_dir, start_epoch)
        logger.info("resumed from %s at epoch %d, step %d", last_path, start_epoch, step)
    dump_config(cfg, run_dir / "config.yaml")
    runlog = RunLog(run_dir)

    # ---- train: one epoch, validate, checkpoint (atomically), log
    logger.info("%d training images, %d steps/epoch, %d epochs, %d steps", len(data.train_labels),
                epoch_len, num_epochs, total_steps)
    record = {}
    for epoch in range(start_epoch, num_epochs):
        steps = min(epoch_len, total_steps - step)
        mixup_rng = np.random.default_rng([t.seed, epoch, 1])  # stream 1 of data.loader.epoch_generator
        loss_fn.set_epoch(epoch)
        start = time.perf_counter()
        record = train_one_epoch(model, islice(loader.epoch(epoch), steps), steps, loss_fn, optimizer, scheduler,
                                 t.mixup_alpha, mixup_rng, desc=f"epoch {epoch + 1}/{num_epochs}")
        step += steps
        record["epoch"], record["train_seconds"] = epoch + 1, time.perf_counter() - start
        if has_val:
            val_logits = predict_logits(model, data.val_images, cfg.eval.batch_size, data.mean, data.std,
                                        cfg.model.channels_last, "val")
            val = metrics_from_logits(val_logits, data.val_labels, data.class_counts)
            record.update({f"val_{k}": val[k] for k in ("top1", "many", "medium", "few")})
            score = val[t.select_metric]
            if score is not None and (best["value"] is None or score > best["value"]):
                best = {"metric": t.select_metric, "value": score, "epoch": epoch + 1}
        payload = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch + 1, "step": step, "best": best, "config": config_to_dict(cfg),
            "model_args": model_args, "class_counts": data.class_counts, "class_names": data.class_names,
        }
        if has_val and best["epoch"] == epoch + 1:
            save_checkpoint(best_path, payload)
        save_checkpoint(last_path, payload)
        runlog.log(step, record)
        logger.info("epoch %d/%d %s", epoch + 1, num_epochs,
                    " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
    runlog.close()
    return record


if __name__ == "__main__":
    run_cli(__doc__, main, test)
