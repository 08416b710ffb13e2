"""Seconds of each training step of a compiled ResNet-32 on the CPU (NHWC, fp32), batch 128 and then 118 (an
epoch's shorter last batch): with `plain` torch.compile the first step of each shape compiles; with `one-size`
(engine/compiled.py, what train.compile=true runs) only the first 128 does, and the 118s run the module as it is.
Run each with an empty inductor cache:

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python results/compile_cost_cpu.py plain|one-size
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from engine.compiled import CompiledForBatchSizes  # noqa: E402
from models import build_model  # noqa: E402

torch.manual_seed(0)
model = build_model("resnet32", 10).to(memory_format=torch.channels_last)
compiled = torch.compile(model) if sys.argv[1] == "plain" else CompiledForBatchSizes(model, {128})
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def step(batch: int) -> float:
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    start = time.perf_counter()
    optimizer.zero_grad()
    nn.functional.cross_entropy(compiled(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


print(sys.argv[1], ", ".join(f"batch {batch}: {step(batch):.2f} s" for batch in (128, 128, 118, 118, 128)))
