"""--test of either stage: a checkpoint scored on its dataset's test split.

The dataset, its normalisation and the training class counts (which set the many / medium / few
groups) are read from the checkpoint, never from the config of the command that tests it; only
where the data lives and how fast to run come from the caller.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from data.build import NORMALIZATION
from data.cifar import load_cifar
from engine.distributed import Dist
from engine.loop import metrics_from_logits, predict_all_ranks
from engine.metrics import format_table
from models.checkpoint import CheckpointError, load_checkpoint, load_state_checked
from models.losses import posthoc_logit_adjust
from models.registry import build_model


def checkpoint_dataset(ckpt: dict, path: str | Path) -> str:
    """The dataset a checkpoint of this tool was trained on (from its saved config)."""
    dataset = ((ckpt.get("config") or {}).get("data") or {}).get("dataset")
    if dataset is None:
        raise CheckpointError(f"{path} records no training dataset (an imported checkpoint): train a stage on it "
                              f"first, or classify images with predict.py --dataset")
    if dataset not in NORMALIZATION:
        raise CheckpointError(f"{path} was trained on {dataset!r}, which this version cannot load "
                              f"(known: {', '.join(NORMALIZATION)})")
    return dataset


def evaluate_checkpoint(path: str | Path, data_root: str | Path, download: bool, batch_size: int,
                        device: torch.device = torch.device("cpu"), channels_last: bool = False,
                        logit_adjust_tau: float = 0.0, amp: str = "off", d: Dist = Dist()) -> tuple[dict, list[str]]:
    """(metrics of engine.metrics.summarize, class names) of the checkpoint at `path` on its test split,
    computed on `device` under autocast `amp` (with several processes each rank predicts its shard and
    every rank gets the metrics of the whole split).

    logit_adjust_tau > 0 subtracts tau * log prior (the checkpoint's class counts) from the logits.
    """
    ckpt = load_checkpoint(path)
    dataset = checkpoint_dataset(ckpt, path)
    counts = ckpt["class_counts"]
    split = load_cifar(dataset, data_root, "test", download=download)
    if len(counts) != len(split.class_names):
        raise CheckpointError(f"{path} has {len(counts)} class counts, but the {dataset} test split has "
                              f"{len(split.class_names)} classes: the checkpoint is damaged or edited")
    model = build_model(**ckpt["model_args"])
    load_state_checked(model, ckpt["model"], f"model in {path}")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    mean, std = NORMALIZATION[dataset]
    logits = predict_all_ranks(model.to(device), split.images, batch_size, mean, std, channels_last, "test", amp, d)
    if logit_adjust_tau:
        logits = posthoc_logit_adjust(logits, counts, logit_adjust_tau)
    return metrics_from_logits(logits, split.labels, counts), split.class_names


def write_test_report(metrics: dict, class_names: Sequence[str], out_path: Path, ckpt_path: Path) -> None:
    """Print the many/medium/few table and write test_metrics.json."""
    out = {"checkpoint": str(ckpt_path), "class_names": list(class_names), **metrics}
    out_path.write_text(json.dumps(out, indent=1))
    print(f"test split, checkpoint {ckpt_path}:\n{format_table(metrics, class_names)}\nwritten to {out_path}")
