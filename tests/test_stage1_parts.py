"""Pieces of stage1_train.py's main, in-process."""
import torch

from models import build_model
from models.losses import build_loss
from stage1_train import parameter_groups


def test_a_bias_the_class_balanced_sigmoid_loss_sets_is_kept_out_of_weight_decay():
    model = build_model("resnet32", num_classes=10)
    counts = [500, 300, 200, 100, 60, 40, 20, 10, 8, 5]
    groups = parameter_groups(model, build_loss("class_balanced", counts, variant="sigmoid"))
    assert len(groups) == 2 and groups[1] == {"params": [model.head.bias], "weight_decay": 0.0}
    assert len(groups[0]["params"]) == len(list(model.parameters())) - 1
    optimizer = torch.optim.SGD(groups, lr=0.1, weight_decay=5e-4)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0]
    plain = parameter_groups(model, build_loss("ce", counts))
    assert len(plain) == 1 and len(plain[0]["params"]) == len(list(model.parameters()))
