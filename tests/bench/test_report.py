"""bench/report.py on run directories written in the real on-disk format: 4-class stage-1 and BALMS
runs and a 3-class run (another class count in the same report)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.report import best_index, confusion_section, load_run, method_name, results_table
from bench.report_figures import Run
from engine.metrics import DENSE_CONFUSION_MAX
from tests.conftest import REPO

COUNTS = [200, 60, 20, 5]  # many, medium, medium, few
NAMES = ["cat", "dog", "owl", "eel"]


def confusion(correct: list[int], per_class: int = 10) -> list[list[int]]:
    """per_class test images of each class; the misses of class t are predicted as class t + 1."""
    c = len(correct)
    rows = [[0] * c for _ in range(c)]
    for t, k in enumerate(correct):
        rows[t][t], rows[t][(t + 1) % c] = k, per_class - k
    return rows


def write_run(path: Path, test: dict, config: dict, sample_probs: list[list[float]] | None = None) -> Path:
    """config.yaml, a 3-epoch metrics.jsonl (with BALMS's sample_probs when given) and test_metrics.json."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"name": path.name, **config}))
    lines = []
    for epoch in (1, 2, 3):
        record = {"step": 10 * epoch, "loss": 1.5 / epoch, "train_acc": 0.2 * epoch, "lr": 0.1, "epoch": epoch,
                  "val_top1": 0.1 + 0.15 * epoch, "val_many": 0.5, "val_medium": 0.2, "val_few": None}
        if sample_probs:
            record.update(meta_loss=1.0 / epoch, sample_probs=sample_probs[epoch - 1])
        else:
            record["train_seconds"] = 2.5
        lines.append(json.dumps(record))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    c = len(test["per_class"])
    (path / "test_metrics.json").write_text(json.dumps(
        {"checkpoint": str(path / "best.pt"), "class_names": NAMES[:c], **test}, indent=1))
    return path


def stage1_ce(path: Path) -> Path:
    test = {"top1": 0.5, "many": 0.9, "medium": 0.5, "few": 0.1, "per_class": [0.9, 0.6, 0.4, 0.1],
            "train_class_counts": COUNTS, "confusion_matrix": confusion([9, 6, 4, 1])}
    return write_run(path, test, {"data": {"imbalance_factor": 40.0}, "loss": {"name": "ce"}})


def stage2_balms(path: Path) -> Path:
    test = {"top1": 0.65, "many": 0.8, "medium": 0.65, "few": 0.5, "per_class": [0.8, 0.7, 0.6, 0.5],
            "train_class_counts": COUNTS, "confusion_matrix": confusion([8, 7, 6, 5])}
    probs = [[0.70, 0.20, 0.07, 0.03], [0.60, 0.22, 0.11, 0.07], [0.50, 0.25, 0.15, 0.10]]
    return write_run(path, test, {"data": {"imbalance_factor": 40.0}, "stage2": {"method": "balms"}}, probs)


def three_classes(path: Path) -> Path:
    """Another class count (3) and an empty few-shot group (null)."""
    test = {"top1": 0.6, "many": 0.7, "medium": 0.4, "few": None, "per_class": [0.7, 0.7, 0.4],
            "train_class_counts": [300, 120, 50], "confusion_matrix": confusion([7, 7, 4])}
    return write_run(path, test, {"data": {"imbalance_factor": 6.0}, "stage2": {"method": "crt"}})


def report(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.report", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def linked_figures(out: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (out / "report.md").read_text())


def test_the_results_table_prints_the_written_fractions_in_percent_and_null_as_a_dash(tmp_path):
    runs = [load_run(stage1_ce(tmp_path / "ce")), load_run(stage2_balms(tmp_path / "balms")),
            load_run(three_classes(tmp_path / "crt"))]
    assert results_table(runs).splitlines() == [
        "| run | method | IF | top-1 | many | medium | few |", "|---|---|---:|---:|---:|---:|---:|",
        "| ce | stage 1: ce | 40 | 50.0 | 90.0 | 50.0 | 10.0 |",
        "| balms | stage 2: balms | 40 | 65.0 | 80.0 | 65.0 | 50.0 |",
        "| crt | stage 2: crt | 6 | 60.0 | 70.0 | 40.0 | - |"]
    assert best_index(runs) == 1
    assert best_index([runs[2], runs[0]]) == 0  # the baseline is the best


def test_a_run_tested_with_post_hoc_logit_adjustment_or_another_checkpoint_says_so_beside_its_name(tmp_path):
    run = stage1_ce(tmp_path / "ce")
    test = json.loads((run / "test_metrics.json").read_text())  # its checkpoint: ce/best.pt
    (run / "test_metrics.json").write_text(json.dumps({**test, "logit_adjust_tau": 1.5}))
    row = results_table([load_run(run)]).splitlines()[2]
    assert row == "| ce (post-hoc tau 1.5) | stage 1: ce | 40 | 50.0 | 90.0 | 50.0 | 10.0 |"
    (run / "test_metrics.json").write_text(json.dumps({**test, "logit_adjust_tau": 0.0}))  # 0: no adjustment
    assert results_table([load_run(run)]).splitlines()[2].startswith("| ce | stage 1: ce | 40 |")
    # a run not yet tested holding the --test --ckpt of another run's checkpoint: that checkpoint is named
    other = str(tmp_path / "other" / "best.pt")
    (run / "test_metrics.json").write_text(json.dumps({**test, "checkpoint": other}))
    assert results_table([load_run(run)]).splitlines()[2].startswith(f"| ce (tests {other}) | stage 1: ce |")


def test_a_log_dir_holding_only_a_test_of_another_run_s_checkpoint_reports_with_that_run_s_records(tmp_path):
    run = stage1_ce(tmp_path / "ce")
    tested = tmp_path / "ce_posthoc"
    tested.mkdir()
    test = json.loads((run / "test_metrics.json").read_text())
    (tested / "test_metrics.json").write_text(json.dumps({**test, "logit_adjust_tau": 1.0}))
    loaded = load_run(tested)
    assert loaded.name == f"ce_posthoc (tests {run / 'best.pt'}; post-hoc tau 1)" and loaded.imbalance == "40"
    assert [e["epoch"] for e in loaded.epochs] == [1, 2, 3]  # ce's metrics.jsonl


@pytest.mark.parametrize("config, method", [
    ({"loss": {"name": "ce"}, "train": {"mixup_alpha": 0.0}, "data": {"sampler": "instance"}}, "stage 1: ce"),
    ({"loss": {"name": "ce"}, "train": {"mixup_alpha": 0.2}}, "stage 1: ce + mixup"),
    ({"loss": {"name": "focal"}, "data": {"sampler": "sqrt"}}, "stage 1: focal + sqrt sampling"),
    ({"stage2": {"method": "lws"}, "data": {"sampler": "class_balanced"}}, "stage 2: lws")])
def test_the_method_column_names_stage_1_s_mixup_and_sampler_beside_its_loss(config, method):
    assert method_name(config) == method


def test_the_best_run_of_a_tie_is_the_first_of_them_and_runs_without_a_test_score_never_are():
    from types import SimpleNamespace

    def runs(*scores):
        return [SimpleNamespace(test={"top1": s}) for s in scores]
    assert best_index(runs(0.7, 0.6, 0.7, None)) == 0  # a tie keeps the baseline
    assert best_index(runs(None, 0.6, 0.6)) == 1


def test_a_run_directory_s_epochs_come_from_its_metrics_log_in_epoch_order_last_record_of_a_repeated_epoch(tmp_path):
    run = stage1_ce(tmp_path / "ce")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    resumed = [json.dumps({"step": 0, "tau": 0.5, "val_top1": 0.3}), *lines[:2],
               json.dumps({**json.loads(lines[1]), "loss": 0.25}), lines[2], ""]
    (run / "metrics.jsonl").write_text("\n".join(resumed))
    assert [(e["epoch"], e["loss"]) for e in load_run(run).epochs] == [(1, 1.5), (2, 0.25), (3, 0.5)]


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "test_metrics.json").unlink(),
     "has no test_metrics.json; run `python stage2_classifier.py --cfg {run}/config.yaml log_dir={run} --test` first"),
    (lambda run: (run / "test_metrics.json").write_text('{"top1": 0.5,'), "test_metrics.json is not valid JSON"),
    (lambda run: (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"epo'), "metrics.jsonl line 2 is not valid JSON"),
    (lambda run: (run / "test_metrics.json").write_text('{"top1": 0.5}'), "test_metrics.json lacks some of top1"),
    (lambda run: (run / "config.yaml").write_text("[1, 2"), "config.yaml is not a YAML mapping"),
    (lambda run: (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "sample_probs": [0.5, 0.3, 0.2]})),
     "test_metrics.json and its metrics.jsonl disagree on the number of classes; rerun --test for that run"),
])
def test_a_damaged_run_directory_is_refused_with_one_message_that_says_what_to_do(tmp_path, damage, message):
    run = stage2_balms(tmp_path / "balms")
    damage(run)
    with pytest.raises(SystemExit) as e:
        load_run(run)
    assert message.format(run=run) in e.value.code and e.value.code.startswith("error: ")


@pytest.mark.slow
def test_the_report_links_every_figure_it_writes_and_draws_the_baseline_the_best_and_the_balms_sampler(tmp_path):
    runs = [stage1_ce(tmp_path / "ce"), stage2_balms(tmp_path / "balms"), three_classes(tmp_path / "crt")]
    out = tmp_path / "report"
    proc = report(*runs, "--out", out)
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    assert "| ce | stage 1: ce | 40 | 50.0 | 90.0 | 50.0 | 10.0 |" in text
    assert "| balms | stage 2: balms | 40 | 65.0 | 80.0 | 65.0 | 50.0 |" in text
    assert "| crt | stage 2: crt | 6 | 60.0 | 70.0 | 40.0 | - |" in text
    figures = linked_figures(out)
    assert sorted(figures) == ["confusion_baseline.png", "confusion_best.png", "curves.png", "per_class.png",
                               "sampling_2.png"]  # the best run is the BALMS run, the second given
    assert sorted(p.name for p in out.glob("*.png")) == sorted(figures)
    for name in figures:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "`balms`" in text.split("confusion_best.png")[1].splitlines()[2]  # its sentence names the best run


@pytest.mark.slow
def test_a_best_baseline_gets_one_confusion_matrix_and_no_sampler_figure_without_balms(tmp_path):
    out = tmp_path / "report"
    proc = report(three_classes(tmp_path / "crt"), stage1_ce(tmp_path / "ce"), "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(linked_figures(out)) == ["confusion_baseline.png", "curves.png", "per_class.png"]
    assert "sampling" not in (out / "report.md").read_text().lower()
    assert sorted(p.name for p in out.glob("*.png")) == ["confusion_baseline.png", "curves.png", "per_class.png"]


@pytest.mark.slow
def test_a_run_of_more_classes_than_a_dense_confusion_matrix_is_reported_without_its_figure(tmp_path):
    c = 1001  # above engine.metrics.DENSE_CONFUSION_MAX: test_metrics.json holds the nonzero cells
    counts = [300] * 500 + [10] * 501
    test = {"top1": 0.4, "many": 0.6, "medium": None, "few": 0.4, "per_class": [0.6] * 500 + [0.4] * 501,
            "train_class_counts": counts, "confusion_matrix": {"num_classes": c, "cells": [[0, 0, 6], [0, 1, 4]]}}
    big = write_run(tmp_path / "big", test, {"data": {"dataset": "inat2018"}, "loss": {"name": "ce"}})
    report_json = json.loads((big / "test_metrics.json").read_text())
    (big / "test_metrics.json").write_text(json.dumps({**report_json, "class_names": [str(k) for k in range(c)]}))
    out = tmp_path / "report"
    proc = report(big, stage1_ce(tmp_path / "ce"), "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(linked_figures(out)) == ["confusion_best.png", "curves.png", "per_class.png"]
    text = (out / "report.md").read_text()
    assert "The baseline run `big` has 1001 classes: no confusion matrix figure above 1000" in text


@pytest.mark.slow
def test_a_run_without_test_metrics_is_one_line_naming_the_test_command_and_no_traceback(tmp_path):
    good, untested = stage1_ce(tmp_path / "ce"), stage1_ce(tmp_path / "untested")
    (untested / "test_metrics.json").unlink()
    proc = report(good, untested, "--out", tmp_path / "report")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # a user error, as the entry scripts' ones
    assert proc.stderr.strip().splitlines() == [
        f"error: {untested} has no test_metrics.json; run `python stage1_train.py --cfg {untested}/config.yaml "
        f"log_dir={untested} --test` first"]
    assert not (tmp_path / "report").exists()  # refused before anything is written


@pytest.mark.slow
def test_a_command_line_without_out_is_one_line_naming_the_missing_option_with_exit_2(tmp_path):
    proc = report(stage1_ce(tmp_path / "ce"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "python -m bench.report: error: the following arguments are required: --out; see --help"]


@pytest.mark.parametrize("classes, drawn", [(DENSE_CONFUSION_MAX, True), (DENSE_CONFUSION_MAX + 1, False)])
def test_a_confusion_matrix_is_drawn_up_to_the_dense_limit_of_classes(tmp_path, monkeypatch, classes, drawn):
    drawn_for = []
    monkeypatch.setattr("bench.report.plot_confusion", lambda run, role, path: drawn_for.append((run.name, role)))
    run = Run("big", "stage 1: ce", "100", {"top1": 0.5, "train_class_counts": [1] * classes}, [])
    md = confusion_section([run], tmp_path)
    assert drawn_for == ([("big", "baseline run")] if drawn else [])
    assert ("![confusion matrix of the baseline run](confusion_baseline.png)" in md) is drawn
