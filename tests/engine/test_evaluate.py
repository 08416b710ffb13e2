"""engine.evaluate's test path against the reference code's: the same logits from the same pickle bytes."""
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from engine import evaluate
from engine.loop import metrics_from_logits, predict_logits
from models import build_model
from models.checkpoint import save_checkpoint
from models.losses import EmptyClassError
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


def test_test_time_logit_adjustment_subtracts_the_given_tau_times_the_log_prior(tmp_path):
    """--test with eval.logit_adjust_tau=0.5 scores logits - 0.5 log(n_c / sum n), not the tau = 1 adjustment."""
    root = write_fake_cifar10(tmp_path, train_per_class=1, test_per_class=12)
    counts = [5000, 2000, 1000, 500, 200, 100, 50, 20, 10, 5]
    log_prior = torch.tensor(counts, dtype=torch.float32).div(sum(counts)).log()
    torch.manual_seed(0)
    model = build_model("resnet32", num_classes=10).eval()
    with torch.no_grad():  # logits of a few units (untrained, they reach hundreds), their bias 0.75 log prior
        model.head.weight.mul_(0.0005)
        model.head.bias.copy_(0.75 * log_prior)
    save_checkpoint(tmp_path / "last.pt", {"config": {"data": {"dataset": "cifar10"}}, "model": model.state_dict(),
                                           "model_args": {"name": "resnet32", "num_classes": 10},
                                           "class_counts": counts})
    images, labels, _, mean, std = evaluate.test_split({}, "cifar10", root, "", download=False)
    plain = predict_logits(model, images, 32, mean, std)

    def scored(tau):
        return evaluate.evaluate_checkpoint(tmp_path / "last.pt", root, False, 32, logit_adjust_tau=tau)[0]

    expected = {tau: metrics_from_logits(plain - tau * log_prior, labels, counts, confusion=True) for tau in (0.5, 1.0)}
    assert expected[0.5]["confusion_matrix"] != expected[1.0]["confusion_matrix"]  # the two taus predict otherwise
    for tau in (0.5, 1.0):
        assert scored(tau) == expected[tau]


def test_logit_adjustment_of_a_checkpoint_with_a_class_of_no_training_image_is_refused_before_any_forward_pass(
        tmp_path, monkeypatch):
    root = write_fake_cifar10(tmp_path, train_per_class=1, test_per_class=2)
    counts = [500, 200, 100, 50, 20, 10, 5, 2, 1, 0]
    save_checkpoint(tmp_path / "last.pt", {"config": {"data": {"dataset": "cifar10"}},
                                           "model": build_model("resnet32", num_classes=10).state_dict(),
                                           "model_args": {"name": "resnet32", "num_classes": 10},
                                           "class_counts": counts})
    monkeypatch.setattr(evaluate, "predict_all_ranks", lambda *a, **k: pytest.fail("forward passes before refusing"))
    with pytest.raises(EmptyClassError, match=r"^eval.logit_adjust_tau=1 subtracts tau \* log\(prior\), and 1 "
                                              r"class\(es\) of .*last.pt had no training image \(9\): test it "
                                              r"without the adjustment \(eval.logit_adjust_tau=0\)$"):
        evaluate.evaluate_checkpoint(tmp_path / "last.pt", root, False, 32, logit_adjust_tau=1.0)


def _cosine_checkpoint(tmp_path, counts, config):
    torch.manual_seed(0)
    model = build_model("resnet32", num_classes=10, head="cosine").eval()
    save_checkpoint(tmp_path / "last.pt", {"config": config, "model": model.state_dict(),
                                           "model_args": {"name": "resnet32", "num_classes": 10, "head": "cosine"},
                                           "class_counts": counts})
    return model


@pytest.mark.parametrize("loss, scale", [({"name": "ldam"}, 30.0), ({"name": "ldam", "scale": 16.0}, 16.0)])
def test_logit_adjustment_of_an_ldam_cosine_head_acts_on_the_cosines_times_the_loss_scale(tmp_path, loss, scale):
    """LDAM's softmax fitted scale * cos: Menon et al.'s post-hoc rule subtracts tau log prior from those logits,
    not from the raw cosines in [-1, 1], which the log prior (a spread of 6.9 here) would swamp."""
    root = write_fake_cifar10(tmp_path, train_per_class=1, test_per_class=12)
    counts = [5000, 2000, 1000, 500, 200, 100, 50, 20, 10, 5]
    log_prior = torch.tensor(counts, dtype=torch.float32).div(sum(counts)).log()
    model = _cosine_checkpoint(tmp_path, counts, {"data": {"dataset": "cifar10"}, "loss": loss})
    images, labels, _, mean, std = evaluate.test_split({}, "cifar10", root, "", download=False)
    cosines = predict_logits(model, images, 32, mean, std)
    expected = metrics_from_logits(scale * cosines - log_prior, labels, counts, confusion=True)
    assert metrics_from_logits(cosines - log_prior, labels, counts, confusion=True) != expected  # the scale matters
    assert evaluate.evaluate_checkpoint(tmp_path / "last.pt", root, False, 32, logit_adjust_tau=1.0)[0] == expected

