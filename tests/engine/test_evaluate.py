"""engine.evaluate's test path against the reference code's: the same logits from the same pickle bytes."""
import pickle

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from engine import evaluate
from engine.loop import predict_logits
from models import build_model
from tests.conftest import write_fake_cifar10


def test_cifar_test_logits_equal_those_of_a_plain_torchvision_pipeline_on_the_pickle_bytes(tmp_path):
    """The LDAM-DRW / BALMS evaluation: each test image of the official pickle as a PIL image,
    ToTensor, Normalize with the CIFAR-10 mean and std, the model in eval mode."""
    root = write_fake_cifar10(tmp_path, train_per_class=1, test_per_class=12)
    torch.manual_seed(0)
    model = build_model("resnet32", num_classes=10).eval()
    with torch.no_grad():  # BatchNorm statistics away from (0, 1), as a trained model's are
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)

    images, labels, _, mean, std = evaluate.test_split({}, "cifar10", root, "", download=False)
    ours = predict_logits(model, images, 32, mean, std)

    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f)
    pixels = np.asarray(raw["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # HWC
    reference = T.Compose([T.ToTensor(), T.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))])
    with torch.no_grad():
        theirs = model(torch.stack([reference(Image.fromarray(p)) for p in pixels]))

    assert labels.tolist() == raw["labels"]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert (ours.argmax(1) == theirs.argmax(1)).all()
