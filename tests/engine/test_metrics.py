"""Long-tail metrics: confusion counts, many/medium/few boundaries, per-class means, empty groups, table text."""
import pytest
import torch

from engine.metrics import (DENSE_CONFUSION_MAX, confusion_matrix, confusion_record, dense_confusion, format_table,
                            summarize)

# Training counts on the group boundaries: many > 100, medium 20..100, few < 20.
BOUNDARY_COUNTS = [101, 100, 20, 19]

# Rows = true class, columns = predicted; unequal test sizes 3, 1, 4, 2.
# Per-class accuracy: 2/3, 1/1, 1/4, 0/2.
CONFUSION = torch.tensor([
    [2, 1, 0, 0],
    [0, 1, 0, 0],
    [0, 0, 1, 3],
    [1, 0, 1, 0],
])


def from_confusion(cm: torch.Tensor, train_counts: list[int], confusion: bool = False) -> dict:
    """summarize of the predictions whose confusion matrix is cm: cm[t, p] images of class t predicted p."""
    true, pred = torch.nonzero(torch.ones_like(cm), as_tuple=True)
    n = cm.flatten()
    return summarize(pred.repeat_interleave(n), true.repeat_interleave(n), train_counts, confusion)


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 2, 2, 2, 0])
    cm = confusion_matrix(preds, labels, 3)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[1, 1, 0], [0, 1, 1], [1, 0, 2]]


def test_confusion_matrix_keeps_classes_never_seen():
    cm = confusion_matrix(torch.tensor([1]), torch.tensor([1]), 4)
    assert cm.shape == (4, 4)
    assert cm.sum().item() == 1 and cm[1, 1].item() == 1


def test_summarize_puts_boundary_counts_in_the_right_groups():
    m = from_confusion(CONFUSION, BOUNDARY_COUNTS, confusion=True)
    assert m["per_class"] == pytest.approx([2 / 3, 1.0, 0.25, 0.0])
    assert m["many"] == pytest.approx(2 / 3)  # class 0 (101) only
    assert m["medium"] == pytest.approx(0.625)  # classes 1 (100) and 2 (20)
    assert m["few"] == 0.0 and m["few"] is not None  # class 3 (19)
    assert m["top1"] == pytest.approx(0.4)  # 4 correct of 10, pooled
    assert m["train_class_counts"] == BOUNDARY_COUNTS
    assert m["confusion_matrix"] == CONFUSION.tolist()


def test_group_accuracy_is_mean_of_class_accuracies_not_pooled():
    medium = from_confusion(CONFUSION, BOUNDARY_COUNTS)["medium"]
    # Classes 1 and 2: (1/1 + 1/4) / 2 = 0.625, whereas pooling would give (1 + 1) / (1 + 4) = 0.4.
    assert medium == pytest.approx(0.625)
    assert medium != pytest.approx(0.4)


def test_empty_group_is_none():
    m = from_confusion(torch.tensor([[3, 1], [0, 2]]), [500, 300])
    assert m["many"] == pytest.approx((0.75 + 1.0) / 2)
    assert m["medium"] is None
    assert m["few"] is None


def test_class_without_test_images_is_none_and_left_out_of_its_group():
    cm = torch.tensor([
        [4, 0, 0],
        [0, 0, 0],  # class 1: no test images
        [0, 1, 3],
    ])
    m = from_confusion(cm, [200, 50, 30])  # classes 1 and 2 are both medium
    assert m["per_class"][0] == 1.0
    assert m["per_class"][1] is None
    assert m["per_class"][2] == pytest.approx(0.75)
    assert m["medium"] == pytest.approx(0.75)  # not (0 + 0.75) / 2
    assert m["top1"] == pytest.approx(7 / 8)


def test_format_table_prints_percent_with_two_decimals_and_dash_for_none():
    cm = torch.tensor([
        [2, 1, 0],
        [0, 0, 0],
        [1, 0, 7],
    ])
    m = from_confusion(cm, [500, 300, 150])  # all many: medium and few are None
    lines = format_table(m, ["cat", "dog", "frog"]).splitlines()
    assert lines[0].split() == ["top-1", "many", "medium", "few"]
    # top-1 = 9/11; many = (2/3 + 7/8) / 2 = 0.7708333
    assert lines[1].split() == ["81.82", "77.08", "-", "-"]
    rows = [line.split() for line in lines[4:]]
    assert rows == [["cat", "500", "66.67"], ["dog", "300", "-"], ["frog", "150", "87.50"]]


def test_format_table_uses_class_indices_without_names():
    m = from_confusion(torch.tensor([[1, 0], [0, 1]]), [10, 5])
    lines = format_table(m).splitlines()
    assert lines[1].split() == ["100.00", "-", "-", "100.00"]
    assert [line.split() for line in lines[4:]] == [["0", "10", "100.00"], ["1", "5", "100.00"]]


def test_a_validation_builds_no_confusion_matrix():
    assert "confusion_matrix" not in from_confusion(CONFUSION, BOUNDARY_COUNTS)


def test_above_the_dense_limit_the_report_holds_the_nonzero_cells_and_reads_back_the_same_matrix():
    c = DENSE_CONFUSION_MAX + 1
    labels, preds = torch.tensor([c - 1, 0, 5, 0, 5]), torch.tensor([3, 0, 5, 0, 7])
    record = confusion_record(preds, labels, c)
    assert record == {"num_classes": c, "cells": [[0, 0, 2], [5, 5, 1], [5, 7, 1], [c - 1, 3, 1]]}
    assert torch.equal(dense_confusion(record), confusion_matrix(preds, labels, c))
    dense = confusion_matrix(preds[1:], labels[1:], 8)
    assert confusion_record(preds[1:], labels[1:], 8) == dense.tolist()
    assert torch.equal(dense_confusion(dense.tolist()), dense)


def test_at_the_dense_limit_the_report_holds_the_whole_matrix():
    c = DENSE_CONFUSION_MAX
    labels, preds = torch.tensor([c - 1, 0]), torch.tensor([0, 0])
    record = confusion_record(preds, labels, c)
    assert isinstance(record, list) and len(record) == c and record[c - 1][0] == 1 and record[0][0] == 1
