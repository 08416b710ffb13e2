"""engine.device: which device a name means here, and mixed precision."""
import logging

import pytest
import torch
from torch import nn

from engine.device import DeviceError, autocast, check_amp, grad_scaler, resolve_device, set_cuda_flags

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_and_auto_without_cuda_resolve_to_the_cpu(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_cuda_without_a_gpu_says_to_use_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError, match=f"train.device={name}: no CUDA device .* use train.device=cpu"):
            resolve_device(name)


def test_a_cuda_index_beyond_the_devices_names_the_valid_ones(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="has 2 CUDA device\\(s\\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_mps_resolves_where_apple_silicon_has_it_and_says_to_use_the_cpu_elsewhere(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"train.device=mps: the Apple-silicon GPU \(MPS\) is not available here; "
                                          "use train.device=cpu"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize("name", ["gpu", "cuda0", "tpu", "CPU", "cuda:x"])
def test_an_unknown_device_name_lists_the_forms_that_exist(name):
    with pytest.raises(DeviceError, match="is not one of auto, cpu, cuda, cuda:N, mps"):
        resolve_device(name)


@pytest.mark.parametrize("avx512_bf16, amx, warned", [(False, False, True), (True, False, False),
                                                     (False, True, False)])
def test_bf16_on_a_cpu_without_bf16_instructions_runs_with_a_warning(monkeypatch, caplog, avx512_bf16, amx, warned):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    with caplog.at_level(logging.WARNING, logger="engine.device"):
        check_amp(torch.device("cpu"), "bf16")
        check_amp(torch.device("cpu"), "off")
    assert ("train.amp=bf16 on a CPU without bf16 instructions" in caplog.text) == warned
    assert len(caplog.records) == warned


def test_fp16_needs_cuda_and_bf16_runs_on_the_cpu():
    for device in ("cpu", "mps"):  # Apple GPUs too: the fp16 gradient scaler and fused SGD are CUDA's here
        with pytest.raises(DeviceError, match=f"train.amp=fp16 needs a CUDA device \\(this run is on {device}\\)"):
            check_amp(torch.device(device), "fp16")
    check_amp(torch.device("cpu"), "bf16")
    check_amp(torch.device("cpu"), "off")


@pytest.mark.parametrize("amp, dtype", [("off", torch.float32), ("bf16", torch.bfloat16)])
def test_autocast_runs_linear_layers_in_the_chosen_precision_on_the_cpu(amp, dtype):
    layer = nn.Linear(4, 3)
    with autocast(torch.device("cpu"), amp):
        out = layer(torch.randn(2, 4))
    assert out.dtype == dtype and layer.weight.dtype == torch.float32


def test_the_scaler_is_a_pass_through_unless_fp16():
    scaler = grad_scaler(torch.device("cpu"), "bf16")
    loss = torch.tensor(2.0, requires_grad=True)
    assert scaler.scale(loss) is loss and not scaler.is_enabled()


@pytest.mark.gpu
@gpu
def test_fp16_on_cuda_scales_the_loss_and_steps():
    device = resolve_device("cuda")
    check_amp(device, "fp16")
    layer = nn.Linear(4, 3).to(device)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = grad_scaler(device, "fp16")
    with autocast(device, "fp16"):
        # Small seeded inputs: fp16 gradients of the loss scaled by 65536 stay finite, so the step is taken.
        out = layer(0.1 * torch.randn(8, 4, generator=torch.Generator().manual_seed(0)).to(device))
    assert out.dtype == torch.float16
    before = layer.weight.detach().clone()
    scaler.scale(out.float().pow(2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() > 1 and not torch.equal(before, layer.weight)


def test_cuda_flags_set_tf32_and_the_cudnn_autotuner_on_cuda_and_nothing_elsewhere():
    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"), \
        (torch.backends.cudnn, "benchmark")
    saved = [getattr(obj, name) for obj, name in flags]
    try:
        set_cuda_flags(torch.device("cuda"), tf32=True, cudnn_benchmark=False)
        set_cuda_flags(torch.device("cpu"), tf32=False, cudnn_benchmark=True)
        assert [getattr(obj, name) for obj, name in flags] == [True, True, False]
        set_cuda_flags(torch.device("cuda"), tf32=False, cudnn_benchmark=True)
        assert [getattr(obj, name) for obj, name in flags] == [False, False, True]
    finally:
        for (obj, name), value in zip(flags, saved):
            setattr(obj, name, value)
