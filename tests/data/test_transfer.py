"""Host-to-device copies (data/transfer.py)."""
from __future__ import annotations

import pytest
import torch

from data.transfer import to_device, widest_float


def test_on_the_cpu_the_tensor_itself_comes_back_without_a_copy():
    t = torch.arange(6)
    assert to_device(t, torch.device("cpu")) is t


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_copy_is_taken_before_the_caller_reuses_its_tensor():
    """The copy starts from a pinned copy of the tensor: overwriting the original at once, before the
    GPU has done the transfer, cannot change what arrives."""
    t = torch.arange(1 << 20)
    on_gpu = to_device(t, torch.device("cuda"))
    t.zero_()
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), torch.arange(1 << 20))


def test_sums_and_draws_are_float64_except_on_mps_which_has_none():
    assert widest_float(torch.device("cpu")) == widest_float(torch.device("cuda", 1)) == torch.float64
    assert widest_float(torch.device("mps")) == torch.float32
