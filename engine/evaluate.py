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

from torch.utils.data import Dataset

from data.build import recorded_normalization, training_digest
from data.build_files import DATASET_KINDS, FILE_DATASETS, read_test_split
from data.cifar import load_cifar
from data.image_files import ImageFileDataset, eval_transform
from engine.distributed import Dist, check_same_data, from_rank0, local_rank0_first
from engine.loop import metrics_from_logits, predict_all_ranks
from engine.metrics import format_table
from models.checkpoint import CheckpointError, load_checkpoint, load_state_checked
from models.losses import EmptyClassError, posthoc_logit_adjust, training_logit_scale
from models.registry import build_model


def checkpoint_dataset(ckpt: dict, path: str | Path) -> str:
    """The dataset a checkpoint of this tool was trained on (from its saved config)."""
    dataset = ((ckpt.get("config") or {}).get("data") or {}).get("dataset")
    if dataset is None:
        raise CheckpointError(f"{path} records no training dataset (an imported checkpoint): train a stage on it "
                              f"first, or classify images with predict.py --dataset")
    if dataset not in DATASET_KINDS:
        raise CheckpointError(f"{path} was trained on {dataset!r}, which this version cannot load "
                              f"(known: {', '.join(DATASET_KINDS)})")
    return dataset


def test_split(ckpt: dict, dataset: str, root: str | Path, list_dir: str | Path,
               download: bool) -> tuple[torch.Tensor | Dataset, torch.Tensor, list[str], tuple, tuple]:
    """(images, labels, class names, mean, std) of a checkpoint's test split: CIFAR's uint8 images, or
    an image-file Dataset with the evaluation transform at the checkpoint's data.image_size."""
    mean, std = recorded_normalization(ckpt, dataset)
    if dataset in FILE_DATASETS:
        names = ckpt["class_names"]
        split = read_test_split(dataset, root, list_dir, names)
        transform = eval_transform(ckpt["config"]["data"]["image_size"], mean, std)
        return ImageFileDataset(split, transform), split.labels, names, mean, std
    split = load_cifar(dataset, root, "test", download=download)
    return split.images, split.labels, split.class_names, mean, std


def evaluate_checkpoint(path: str | Path, data_root: str | Path, download: bool, batch_size: int,
                        device: torch.device = torch.device("cpu"), channels_last: bool = False,
                        logit_adjust_tau: float = 0.0, amp: str = "off", d: Dist = Dist(), list_dir: str | Path = "",
                        workers: int = 0) -> tuple[dict, list[str]]:
    """(metrics of engine.metrics.summarize, class names) of the checkpoint at `path` on its test split,
    computed on `device` under autocast `amp` (with several processes rank 0 reads the checkpoint and sends
    it to the others, each rank predicts its shard and every rank gets the metrics of the whole split).

    logit_adjust_tau > 0 subtracts tau * log prior (the checkpoint's class counts) from the logits the training
    loss's softmax fitted: the head's outputs times its scale (ldam's cosines x 30), as Menon et al. adjust.
    """
    ckpt = from_rank0(lambda: load_checkpoint(path), d)  # only rank 0's machine may hold it
    dataset = checkpoint_dataset(ckpt, path)
    counts = ckpt["class_counts"]
    def read() -> tuple[torch.Tensor | Dataset, torch.Tensor, list[str], tuple, tuple]:
        return test_split(ckpt, dataset, data_root, list_dir, download)
    images, labels, class_names, mean, std = local_rank0_first(read, d) if download else read()  # one download
    pixels = [memoryview(images.numpy())] if isinstance(images, torch.Tensor) else []  # files: roots may differ
    check_same_data(lambda: f"{len(labels)} images, digest {training_digest(labels.numpy().tobytes(), *pixels)}",
                    f"{dataset} test split", d)  # the 30 MB of CIFAR-10 test pixels hashed only under torchrun
    if len(counts) != len(class_names):
        raise CheckpointError(f"{path} has {len(counts)} class counts, but the {dataset} test split has "
                              f"{len(class_names)} classes: the checkpoint is damaged or edited")
    empty = [c for c, n in enumerate(counts) if n == 0]
    if logit_adjust_tau and empty:  # log 0: refused before the forward passes, not after them
        raise EmptyClassError(f"eval.logit_adjust_tau={logit_adjust_tau:g} subtracts tau * log(prior), and "
                              f"{len(empty)} class(es) of {path} had no training image "
                              f"({', '.join(map(str, empty[:5]))}{', ...' if len(empty) > 5 else ''}): test it "
                              f"without the adjustment (eval.logit_adjust_tau=0)")
    model = build_model(**ckpt["model_args"])
    load_state_checked(model, ckpt["model"], f"model in {path}")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    logits = predict_all_ranks(model.to(device), images, batch_size, mean, std, channels_last, "test", amp, d,
                               workers)
    if logit_adjust_tau:
        # checkpoint_dataset refused a checkpoint without its training config: its scale is known (not None)
        logits = posthoc_logit_adjust(logits * training_logit_scale(ckpt), counts, logit_adjust_tau)
    return metrics_from_logits(logits, labels, counts, confusion=True), class_names


def write_test_report(metrics: dict, class_names: Sequence[str], out_path: Path, ckpt_path: Path,
                      logit_adjust_tau: float = 0.0) -> None:
    """Print the many/medium/few table and write test_metrics.json, which records the post-hoc logit
    adjustment the logits had (eval.logit_adjust_tau; 0: none)."""
    out = {"checkpoint": str(ckpt_path), "logit_adjust_tau": logit_adjust_tau, "class_names": list(class_names),
           **metrics}
    out_path.write_text(json.dumps(out, indent=1))
    adjusted = f", logits adjusted post hoc by tau = {logit_adjust_tau:g}" if logit_adjust_tau else ""
    print(f"test split, checkpoint {ckpt_path}{adjusted}:\n{format_table(metrics, class_names)}\n"
          f"written to {out_path}")
