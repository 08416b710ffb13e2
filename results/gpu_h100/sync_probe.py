"""Where does a CUDA training epoch of the loader wait for the GPU? Prints the stack of each sync."""
import sys, traceback, warnings
from itertools import islice
sys.path.insert(0, ".")
import torch
from torch import nn
from data.augment import CIFAR10_MEAN, CIFAR10_STD, BatchAugment
from data.loader import BatchLoader
from data.samplers import build_sampler
from engine.loop import train_one_epoch
from models import build_model
from tests.test_gpu_pipeline import _images

device = torch.device("cuda")
images = _images(1024)
labels = torch.arange(1024) % 10
loader = BatchLoader(images.to(device), labels.to(device), 128, build_sampler("instance", labels, 10),
                     BatchAugment(4, True, True, 16), CIFAR10_MEAN, CIFAR10_STD, 0, channels_last=True)
model = build_model("resnet32", 10).to(device).to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
train_one_epoch(model, islice(loader.epoch(0), 2), 2, nn.CrossEntropyLoss(), opt, sched, amp="bf16")
torch.cuda.synchronize()
def show(message, category, filename, lineno, file=None, line=None):
    print("=== SYNC:", str(message)[:80])
    print("".join(l for l in traceback.format_stack()[:-1] if "site-packages" not in l and "/lib/python" not in l)[-1200:])
warnings.showwarning = show
warnings.simplefilter("always")
torch.cuda.set_sync_debug_mode("warn")
train_one_epoch(model, loader.epoch(1), len(loader), nn.CrossEntropyLoss(), opt, sched, amp="bf16")
torch.cuda.set_sync_debug_mode("default")
