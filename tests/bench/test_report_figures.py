"""bench/report_figures.py: what the figures plot, read from the matplotlib figure before it is saved."""
from __future__ import annotations

import numpy as np
import pytest

import bench.report_figures as figures
from bench.report_figures import Run, plot_confusion, plot_curves, plot_per_class


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures the plots would save, kept open instead."""
    kept = []
    monkeypatch.setattr(figures, "save", lambda fig, path: kept.append(fig))
    yield kept
    for fig in kept:
        figures.plt.close(fig)


def _run(name: str, losses: list[float] | None = None) -> Run:
    epochs = [{"epoch": e, "val_top1": 0.5, **({"loss": x} if losses else {})}
              for e, x in enumerate(losses or [None, None], 1)]
    return Run(name, "stage 1: ce", "10", {"top1": 0.5, "train_class_counts": [30, 3], "class_names": ["a", "b"],
                                          "confusion_matrix": [[3, 1], [0, 2]]}, epochs)


def test_the_confusion_matrix_shows_each_true_class_s_row_in_percent_of_its_images(drawn, tmp_path):
    plot_confusion(_run("r"), "baseline run", tmp_path / "c.png")
    assert np.allclose(drawn[0].axes[0].images[0].get_array(), [[75, 25], [0, 100]])


@pytest.mark.parametrize("losses, scale", [([100.0, 1.0], "log"), ([100.0, 0.0], "linear"), ([2.0, 1.0], "linear")])
def test_the_loss_axis_is_logarithmic_only_for_positive_losses_spanning_more_than_30_times(drawn, tmp_path, losses,
                                                                                            scale):
    plot_curves([_run("r", losses)], tmp_path / "curves.png")
    assert drawn[0].axes[0].get_yscale() == scale  # a zero loss has no place on a log axis


def test_the_runs_that_log_no_training_loss_are_returned_by_name(drawn, tmp_path):
    assert plot_curves([_run("trained", [1.0, 0.5]), _run("tau_norm")], tmp_path / "curves.png") == ["tau_norm"]


def test_a_class_with_no_training_image_is_drawn_at_the_tick_0_not_left_out_of_the_log_axis(drawn, tmp_path):
    run = Run("r", "stage 1: ce", "10", {"train_class_counts": [30, 3, 0], "per_class": [0.9, 0.5, 0.25]}, [])
    plot_per_class([run], tmp_path / "p.png")
    ax = drawn[0].axes[0]
    assert list(ax.lines[0].get_xdata()) == [30, 3, 0.5] and list(ax.lines[0].get_ydata()) == [90, 50, 25]
    assert ax.xaxis.get_major_formatter()(0.5, 0) == "0" and ax.xaxis.get_major_formatter()(3, 0) == "3"
