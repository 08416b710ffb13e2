"""data.build: the long-tailed counts of a training set whose copy lacks a class."""
import pytest
import torch

from data.build import rule_counts
from data.cifar import DatasetFormatError

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.parametrize("imbalance_factor", [1.0, 10.0])
def test_a_copy_without_images_of_a_class_is_one_error_naming_the_class(imbalance_factor):
    labels = torch.arange(9).repeat(5)  # classes 0-8, five images each: no 'truck'
    with pytest.raises(DatasetFormatError, match=r"^class 'truck' has no training image: .* check the training "
                                                 r"data \(data.root\)$"):
        rule_counts(labels, NAMES, imbalance_factor, "exp")
    # with every class present, the reference rule's counts (n_max 50, IF 10)
    assert rule_counts(torch.arange(10).repeat(50), NAMES, 10.0, "exp") == [50, 38, 29, 23, 17, 13, 10, 8, 6, 5]
