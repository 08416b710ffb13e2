"""Checkpoint files in the layouts users already have, converted to our model's state dict.

A layout is recognised from the checkpoint's keys (LAYOUTS, tried in order) and converted to our
key names: DataParallel's `module.` prefix is dropped and the classifier's `fc.*` becomes `head.*`.

- lt-decoupled: this tool's checkpoints (models.checkpoint), state dict under "model".
- balms: BALMS / Decoupling (classifier-balancing) code, final_model_checkpoint.pth
  {"epoch", "best_epoch", "best_acc", "centroids", "state_dict_best": {"feat_model", "classifier"}}
  or latest_model_checkpoint.pth {"epoch", "state_dict": {"feat_model", "classifier"}}; the best
  weights are taken when both are present; an LWS classifier's per-class "scales" (Decoupling's
  TauNormClassifier, fc(x) * scales) are folded into the head.
- mislas: MiSLAS / ARB-loss code, {"state_dict_model", "state_dict_classifier"} and, after MiSLAS
  stage 2, "state_dict_lws_model" whose per-class scales are folded into the head.
- state_dict: a flat state dict, torchvision's (classifier "fc") or our export (classifier "head").
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from models.checkpoint import FORMAT, CheckpointError

try:
    from numpy._core.multiarray import scalar as _numpy_scalar  # numpy >= 2
except ImportError:
    from numpy.core.multiarray import scalar as _numpy_scalar  # numpy 1.x

# Old checkpoints store accuracies as numpy scalars; these rebuild plain numbers and dtypes only,
# so weights_only loading may accept them. Pickles name the module numpy.core (numpy 1) or numpy._core.
_NUMPY_SAFE = [(_numpy_scalar, "numpy.core.multiarray.scalar"), (_numpy_scalar, "numpy._core.multiarray.scalar"),
               np.dtype, *(type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "bool"))]


@dataclass
class Converted:
    layout: str  # LAYOUTS name
    state: dict[str, torch.Tensor]  # our key names; head.* absent when the file has no classifier
    model_args: dict | None  # {"name", "num_classes"} for our checkpoints, None for foreign ones
    class_counts: list[int] | None  # training images per class, when the file records them
    class_names: list[str] | None


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """torch.load(weights_only=True) with an error that says what the file is not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(_NUMPY_SAFE):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled classes weights_only refuses
        pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if pickled is None:
            raise CheckpointError(f"{path} cannot be read as a checkpoint ({type(e).__name__}); "
                                  f"is it complete, and a file torch.save wrote?") from None
        raise CheckpointError(f"{path} pickles {pickled.group(1)}, and only tensors, numbers and strings are "
                              f"loaded, for safety (a pickle can run code). If you trust the file, save the weights "
                              f"alone: torch.save(torch.load(path, weights_only=False)[<key>], new_path) and pass "
                              f"new_path") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


# Prefixes of wrapped models' state dicts: DataParallel / DistributedDataParallel's, torch.compile's.
_WRAPPERS = re.compile(r"^(?:module\.|_orig_mod\.)+")


def _strip_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_WRAPPERS.sub("", k): v for k, v in state.items()}


def _backbone_and_classifier(backbone: dict, classifier: dict | None) -> dict[str, torch.Tensor]:
    state = _strip_module(backbone)
    state.update({"head." + k.removeprefix("fc."): v for k, v in _strip_module(classifier or {}).items()})
    return state


def _is_ours(ckpt: dict) -> bool:
    return ckpt.get("format") == FORMAT and isinstance(ckpt.get("model"), dict)


def _from_ours(ckpt: dict) -> Converted:
    return Converted("lt-decoupled", dict(ckpt["model"]), ckpt.get("model_args"), ckpt.get("class_counts"),
                     ckpt.get("class_names"))


def _balms_parts(ckpt: dict) -> dict | None:
    parts = ckpt.get("state_dict_best", ckpt.get("state_dict"))
    return parts if isinstance(parts, dict) and "feat_model" in parts else None


def _is_balms(ckpt: dict) -> bool:
    return _balms_parts(ckpt) is not None


def _fold_scales(state: dict, scales: torch.Tensor) -> None:
    """LWS's per-class scales folded into the plain head: logits_c = s_c * (w_c . x + b_c)."""
    state["head.weight"] = state["head.weight"] * scales[:, None]
    state["head.bias"] = state["head.bias"] * scales


def _from_balms(ckpt: dict) -> Converted:
    parts = _balms_parts(ckpt)
    state = _backbone_and_classifier(parts["feat_model"], parts.get("classifier"))
    if "head.scales" in state and "head.weight" in state:  # Decoupling's LWS (TauNormClassifier): fc(x) * scales
        _fold_scales(state, state.pop("head.scales").reshape(-1))
    return Converted("balms", state, None, None, None)


def _is_mislas(ckpt: dict) -> bool:
    return isinstance(ckpt.get("state_dict_model"), dict)


def _from_mislas(ckpt: dict) -> Converted:
    if ckpt.get("state_dict_block"):  # its Places-LT runs: the backbone's features go through one more block
        raise CheckpointError("this MiSLAS checkpoint has a state_dict_block (its Places-LT models pass the "
                              "backbone's features through one more trained block, which no model here has): "
                              "its features cannot be rebuilt; import a checkpoint without it")
    state = _backbone_and_classifier(ckpt["state_dict_model"], ckpt.get("state_dict_classifier"))
    lws = _strip_module(ckpt.get("state_dict_lws_model") or {})
    if "learned_norm" in lws and "head.weight" in state:
        _fold_scales(state, lws["learned_norm"].reshape(-1))  # (1, C) -> (C,)
    return Converted("mislas", state, None, None, None)


def _is_state_dict(ckpt: dict) -> bool:
    return len(ckpt) > 0 and all(isinstance(v, torch.Tensor) for v in ckpt.values())


def _from_state_dict(ckpt: dict) -> Converted:
    state = _strip_module(ckpt)
    return Converted("state_dict", {("head." + k[3:] if k.startswith("fc.") else k): v for k, v in state.items()},
                     None, None, None)


LAYOUTS: dict[str, tuple[Callable[[dict], bool], Callable[[dict], Converted]]] = {
    "lt-decoupled": (_is_ours, _from_ours),
    "balms": (_is_balms, _from_balms),
    "mislas": (_is_mislas, _from_mislas),
    "state_dict": (_is_state_dict, _from_state_dict),
}


def convert(ckpt: dict[str, Any], what: str) -> Converted:
    """The checkpoint in our key names; `what` names it in the error for an unknown layout."""
    for detect, to_ours in LAYOUTS.values():
        if detect(ckpt):
            return to_ours(ckpt)
    keys = ", ".join(sorted(map(str, ckpt))[:12])
    raise CheckpointError(f"{what} has none of the known layouts ({', '.join(LAYOUTS)}; see models/foreign.py); "
                          f"its top-level keys are: {keys}")
