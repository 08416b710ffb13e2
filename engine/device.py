"""Where a run computes and in what precision: the device, autocast, the fp16 gradient scaler, TF32.

Entry scripts resolve `train.device` once with `resolve_device` and pass the torch.device down as
a plain argument; nothing below them asks torch which device to use.
"""
from __future__ import annotations

import contextlib
import logging
import re
from typing import ContextManager

import torch

logger = logging.getLogger(__name__)

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(RuntimeError):
    """A device or precision this machine cannot run; the message says what to use instead."""


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """auto (CUDA when present, else CPU) | cpu | cuda | cuda:N | mps -> a torch.device that exists here; errors
    name the setting as `key` (predict.py's is --device)."""
    same = "=" if key.startswith(("train.", "eval.")) else " "  # a config key, or a command-line option
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise DeviceError(f"{key}{same}{name}: no CUDA device is visible here; use {key}{same}cpu (or auto)")
        index = int(name.split(":")[1]) if ":" in name else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceError(f"{key}{same}{name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"{key}{same}mps: the Apple-silicon GPU (MPS) is not available here; use {key}{same}cpu")
        return torch.device("mps")
    raise DeviceError(f"{key}{same}{name!r} is not one of auto, cpu, cuda, cuda:N, mps")


def check_amp(device: torch.device, amp: str) -> None:
    """fp16 needs a GPU (its gradient scaler); bf16 runs on CPU and CUDA."""
    if amp not in AMP_DTYPES:
        raise DeviceError(f"train.amp={amp!r} is not one of {', '.join(AMP_DTYPES)}")
    if amp == "fp16" and device.type != "cuda":
        raise DeviceError(f"train.amp=fp16 needs a CUDA device (this run is on {device.type}); use train.amp=bf16")
    if amp == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        logger.warning("train.amp=bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX): PyTorch emulates "
                       "them, several times slower than fp32 (9x on an AVX2 AMD EPYC); train.amp=off is faster here")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); torch's private probes, else assume so."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not all(probes):
        return True
    return any(probe() for probe in probes)


def autocast(device: torch.device, amp: str) -> ContextManager:
    """Mixed precision for forward passes (callers compute losses in fp32); a no-op context with amp=off."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """Loss scaling against fp16 gradient underflow; disabled (a pass-through) for off and bf16."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def set_cuda_flags(device: torch.device, tf32: bool, cudnn_benchmark: bool) -> None:
    """CUDA's process-wide speed flags (nothing on other devices): TF32 tensor-core matmuls and
    convolutions (10-bit mantissa inputs, fp32 accumulation); cuDNN's autotuner, which times the
    convolution algorithms once for each new input shape and keeps the fastest."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = cudnn_benchmark
