"""engine.tau_norm.tau_search on hand-made validation features."""
import pytest
import torch
from torch import nn

from engine.tau_norm import tau_search


COUNTS = [200, 10]  # class 0 many-shot (> 100), class 1 few-shot (< 20), no medium class
GRID = [0.0, 0.5, 1.0]


def _stage1_head() -> nn.Linear:
    """Row norms 4 (head class 0) and 1 (tail class 1). The bias would make class 1 win every
    sample if tau-normalisation kept it (it drops it, as in the Decoupling code)."""
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
        head.bias.copy_(torch.tensor([0.0, 10.0]))
    return head


# Every x has x0 = 1, so after tau-normalisation z0 = 4 / 4^tau = 4, 2, 1 for tau = 0, 0.5, 1 and z1 = x1.
VAL_FEATS = torch.tensor([
    [1.0, 0.5],  # class 0: z1 = 0.5 < 4, 2, 1 -> right at every tau
    [1.0, 1.2],  # class 0: right at tau 0, 0.5; wrong at tau 1 (1 < 1.2)
    [1.0, 1.5],  # class 0: right at tau 0, 0.5; wrong at tau 1
    [1.0, 3.0],  # class 1: wrong at tau 0 (4 > 3); right at tau 0.5, 1
    [1.0, 2.5],  # class 1: wrong at tau 0; right at tau 0.5, 1
    [1.0, 1.6],  # class 1: wrong at tau 0, 0.5 (2 > 1.6); right at tau 1
])
VAL_LABELS = torch.tensor([0, 0, 0, 1, 1, 1])
# per tau: (class-0 acc, class-1 acc) = (3/3, 0/3), (3/3, 2/3), (1/3, 3/3)
EXPECTED = [
    {"tau": 0.0, "val_top1": 3 / 6, "val_many": 1.0, "val_medium": None, "val_few": 0.0},
    {"tau": 0.5, "val_top1": 5 / 6, "val_many": 1.0, "val_medium": None, "val_few": 2 / 3},
    {"tau": 1.0, "val_top1": 4 / 6, "val_many": 1 / 3, "val_medium": None, "val_few": 1.0},
]


def _check_records(records):
    assert len(records) == len(GRID)
    for got, want in zip(records, EXPECTED):
        assert set(got) == {"tau", "val_top1", "val_many", "val_medium", "val_few"}
        assert got["tau"] == want["tau"] and got["val_medium"] is None
        for key in ("val_top1", "val_many", "val_few"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (got["tau"], key)


def test_tau_search_picks_the_tau_that_balances_head_and_tail_by_top1():
    tau, records = tau_search(_stage1_head(), VAL_FEATS, VAL_LABELS, COUNTS, GRID, "top1")
    assert tau == 0.5
    _check_records(records)


def test_tau_search_selects_by_the_given_metric():
    tau, records = tau_search(_stage1_head(), VAL_FEATS, VAL_LABELS, COUNTS, GRID, "few")
    assert tau == 1.0
    _check_records(records)


def test_tau_search_takes_the_first_of_equal_scores():
    tau, _ = tau_search(_stage1_head(), VAL_FEATS, VAL_LABELS, COUNTS, GRID, "many")  # 1.0 at tau 0 and 0.5
    assert tau == 0.0


def test_tau_search_takes_the_first_of_scores_equal_but_for_their_last_float_bit(monkeypatch):
    # Class accuracies (0.3, 0.0) and (0.1, 0.2) average to 0.15 and 0.15000000000000002.
    import engine.tau_norm
    scores = iter([(0.3 + 0.0) / 2, (0.1 + 0.2) / 2])
    assert (0.1 + 0.2) / 2 > (0.3 + 0.0) / 2
    monkeypatch.setattr(engine.tau_norm, "metrics_from_logits",
                        lambda *a, **k: dict.fromkeys(("top1", "medium", "few"), 0.5) | {"many": next(scores)})
    tau, _ = tau_search(_stage1_head(), VAL_FEATS, VAL_LABELS, COUNTS, [0.0, 1.0], "many")
    assert tau == 0.0


def test_tau_search_by_a_metric_with_no_classes_takes_the_first_tau_without_failing():
    # No medium-shot class: every record's val_medium is None (whether a group has classes depends on the counts
    # and labels, never on tau, so no grid mixes None and scores), and the first grid value is chosen.
    tau, records = tau_search(_stage1_head(), VAL_FEATS, VAL_LABELS, COUNTS, GRID, "medium")
    assert tau == 0.0 and [r["val_medium"] for r in records] == [None, None, None]


def test_tau_search_leaves_the_stage1_head_unchanged():
    head = _stage1_head()
    tau_search(head, VAL_FEATS, VAL_LABELS, COUNTS, GRID, "top1")
    assert head.weight.tolist() == [[4.0, 0.0], [0.0, 1.0]] and head.bias.tolist() == [0.0, 10.0]
