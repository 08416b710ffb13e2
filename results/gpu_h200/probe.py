"""GPU probe: per-step time split (loader+augment vs model step) and a profiler table of one real step."""
import sys, time
from itertools import islice
sys.path.insert(0, ".")
import torch
from torch import nn
from data.augment import BatchAugment
from data.build import build_long_tail
from data.loader import BatchLoader
from data.samplers import build_sampler
from engine.loop import train_one_epoch
from models import build_model
import os

dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
data = build_long_tail("cifar10", os.environ["LT_DATA_ROOT"], False, 100.0, "exp", 0, 0)
imgs, labels = data.train_images.to(dev), data.train_labels.to(dev)
sampler = build_sampler("instance", data.train_labels, 10)
def sync(): torch.cuda.synchronize()
for name, aug in [("crop+flip", BatchAugment(4, True, False, 0)), ("crop+flip+cutout", BatchAugment(4, True, False, 16)),
                  ("crop+flip+AA+cutout", BatchAugment(4, True, True, 16))]:
    loader = BatchLoader(imgs, labels, 512, sampler, aug, data.mean, data.std, 0, True)
    it = loader.epoch(0); next(it); sync(); t = time.perf_counter()
    n = 0
    for x, y in islice(it, 15): n += 1
    sync(); print(f"loader {name}: {(time.perf_counter()-t)/n*1e3:.2f} ms/batch", flush=True)
model = build_model("resnet32", 10).to(memory_format=torch.channels_last).to(dev)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
x = torch.randn(512, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last); y = torch.randint(0, 10, (512,), device=dev)
for amp in ["off", "bf16"]:
    train_one_epoch(model, [(x, y)] * 5, 5, nn.CrossEntropyLoss(), opt, sch, amp=amp); sync(); t = time.perf_counter()
    train_one_epoch(model, [(x, y)] * 30, 30, nn.CrossEntropyLoss(), opt, sch, amp=amp); sync()
    print(f"pure train step amp={amp}: {(time.perf_counter()-t)/30*1e3:.2f} ms/step", flush=True)
    # The same steps with no per-step host sync: the GPU time bound.
    with torch.autocast("cuda", torch.bfloat16, enabled=amp == "bf16"):
        pass
    sync(); t = time.perf_counter()
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16, enabled=amp == "bf16"):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward(); opt.step()
    sync(); print(f"no-sync train step amp={amp}: {(time.perf_counter()-t)/30*1e3:.2f} ms/step", flush=True)
loader = BatchLoader(imgs, labels, 512, sampler, BatchAugment(4, True, True, 16), data.mean, data.std, 0, True)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    train_one_epoch(model, islice(loader.epoch(1), 3), 3, nn.CrossEntropyLoss(), opt, sch, amp="bf16"); sync()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
