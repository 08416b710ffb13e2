"""bench.compare_runs: its table's numbers in their columns, and runs of other class counts refused."""
import json
from pathlib import Path

import pytest

from bench.compare_runs import row_name, table


def _run(path, top1, many, medium, few, per_class, counts, **more):
    path.mkdir()
    (path / "test_metrics.json").write_text(json.dumps({"top1": top1, "many": many, "medium": medium, "few": few,
                                                        "per_class": per_class, "train_class_counts": counts, **more}))
    return path


def test_each_run_is_a_row_of_top_1_the_shot_groups_and_per_class_accuracy_in_percent(tmp_path):
    a = _run(tmp_path / "a", 0.5, 0.9, None, 0.125, [0.9, 0.1], [200, 10])
    b = _run(tmp_path / "b", 0.625, 0.75, None, 0.5, [0.75, 0.5], [200, 10])
    assert table([a, b]).splitlines() == [
        "| run | top-1 | many | medium | few | 0 (200) | 1 (10) |",
        "|---|---|---|---|---|---|---|",
        "| a | 50.0 | 90.0 | - | 12.5 | 90.0 | 10.0 |",
        "| b | 62.5 | 75.0 | - | 50.0 | 75.0 | 50.0 |"]


def test_an_accuracy_of_zero_prints_as_0_0_and_only_an_absent_group_as_a_dash(tmp_path):
    a = _run(tmp_path / "a", 0.0, 0.0, None, 0.0, [0.0, 0.0], [200, 10])
    assert table([a]).splitlines()[2] == "| a | 0.0 | 0.0 | - | 0.0 | 0.0 | 0.0 |"


def test_runs_trained_on_other_class_counts_are_refused(tmp_path):
    a = _run(tmp_path / "a", 0.5, 0.9, None, 0.125, [0.9, 0.1], [200, 10])
    b = _run(tmp_path / "b", 0.5, 0.9, None, 0.125, [0.9, 0.1], [100, 10])
    with pytest.raises(SystemExit, match="b was trained on other class counts than a"):
        table([a, b])


def test_a_run_tested_post_hoc_or_on_another_run_s_checkpoint_is_named_so(tmp_path):
    a = _run(tmp_path / "a", 0.5, 0.9, None, 0.125, [0.9, 0.1], [200, 10], logit_adjust_tau=0.0)
    b = _run(tmp_path / "b", 0.625, 0.75, None, 0.5, [0.75, 0.5], [200, 10], logit_adjust_tau=1.0,
             checkpoint=str(tmp_path / "b" / "best.pt"))
    c = _run(tmp_path / "c", 0.625, 0.75, None, 0.5, [0.75, 0.5], [200, 10], checkpoint=str(tmp_path / "a" / "x.pt"))
    rows = table([a, b, c]).splitlines()
    assert rows[2].startswith("| a | 50.0 |") and rows[3].startswith("| b (post-hoc tau 1) | 62.5 |")
    assert rows[4].startswith(f"| c (tests {tmp_path / 'a' / 'x.pt'}) | 62.5 |")  # another run's checkpoint


def test_a_run_s_own_checkpoint_is_not_flagged_however_its_path_was_written(tmp_path, monkeypatch):
    """--test inside the run directory (checkpoint "best.pt"), the run reached through a link, moved since its
    --test: its own; a checkpoint of a folder by another name: another run's."""
    run = tmp_path / "logs" / "cifar_ce"
    run.mkdir(parents=True)
    (tmp_path / "latest").symlink_to(run)
    for given, checkpoint in [(run, "best.pt"), (run, "./last.pt"), (tmp_path / "latest", str(run / "best.pt")),
                              (tmp_path / "latest", "latest/best.pt"), (run, "results/cifar_ce/best.pt")]:
        assert row_name(given, {"checkpoint": checkpoint}) == given.name, (given, checkpoint)
    assert row_name(run, {"checkpoint": "logs/other/best.pt"}) == "cifar_ce (tests logs/other/best.pt)"
    monkeypatch.chdir(run)
    assert row_name(Path("."), {"checkpoint": "best.pt"}) == "cifar_ce"
