"""bench/sweep.py: the run plan in process, and the sweep as a user runs it on a tiny CIFAR-10 copy."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from bench.compare_runs import pct
from bench.methods_table import VAL_PER_CLASS
from bench.sweep import plan, sweep
from data.build import build_long_tail
from data.loader import steps_per_epoch
from tests.conftest import write_fake_cifar10

KEYS = {"dataset", "profile", "imbalance_factor", "method", "top1", "many", "medium", "few"}


def sweep_args(out: Path, **changes) -> argparse.Namespace:
    args = {"datasets": ["cifar10"], "profiles": ["exp"], "imbalance_factors": [1.0, 10.0],
            "methods": ["ce", "balanced_softmax"], "iterations": 2, "out": out,
            "configs": Path("config/cifar10_lt/methods_if100_exp"), "overrides": []}
    return argparse.Namespace(**{**args, **changes})


def test_every_point_gets_its_own_run_directory_but_imbalance_factor_1_is_one_run_for_every_profile(tmp_path):
    runs = plan(sweep_args(tmp_path, profiles=["step", "exp"], methods=["balanced_softmax"],
                           overrides=["data.imbalance_factor=5", "train.num_threads=1"]))
    assert [(keys["profile"], keys["imbalance_factor"], Path(cfg.run_dir).name) for keys, cfg in runs] == [
        ("step", 1.0, "cifar10_step_if1_balanced_softmax"), ("step", 10.0, "cifar10_step_if10_balanced_softmax"),
        ("exp", 1.0, "cifar10_step_if1_balanced_softmax"), ("exp", 10.0, "cifar10_exp_if10_balanced_softmax")]
    # the swept keys win over a user's override; the other overrides and the short schedule apply
    assert [(c.data.imbalance_factor, c.data.profile, c.loss.name) for _, c in runs] == [
        (1.0, "step", "balanced_softmax"), (10.0, "step", "balanced_softmax"), (1.0, "step", "balanced_softmax"),
        (10.0, "exp", "balanced_softmax")]
    assert {(c.train.iterations, c.train.num_threads, c.train.schedule) for _, c in runs} == {(2, 1, "cosine")}


def test_a_method_is_its_whole_config_and_ldam_defers_reweighting_to_80_percent_of_each_runs_epochs(tmp_path):
    root = write_fake_cifar10(tmp_path / "data", train_per_class=100, test_per_class=4)
    runs = plan(sweep_args(tmp_path, methods=["ce", "ldam_drw"], iterations=60, overrides=[f"data.root={root}"]))
    ldam = [(keys["imbalance_factor"], cfg) for keys, cfg in runs if keys["method"] == "ldam_drw"]
    assert [c.model.head for _, c in ldam] == ["cosine", "cosine"] and {c.loss.name for _, c in ldam} == {"ldam"}
    drw = []
    for factor, cfg in ldam:  # 60 steps of 128: 7 steps an epoch at IF 1 (800 images), 3 at IF 10
        n = len(build_long_tail("cifar10", root, False, factor, "exp", 0, VAL_PER_CLASS).train_labels)
        drw.append(cfg.loss.drw_epoch)
        assert cfg.loss.drw_epoch == int(0.8 * math.ceil(60 / steps_per_epoch(n, 128)))
    assert drw[0] < drw[1]
    assert [(c.model.head, c.loss.name) for k, c in runs if k["method"] == "ce"] == [("linear", "ce")] * 2


@pytest.mark.slow
def test_an_unknown_method_is_one_line_naming_the_configs_there(run, tmp_path):
    proc = run("bench/sweep.py", "--methods", "ce", "ldam", "--out", str(tmp_path), check=False)
    [line] = proc.stderr.strip().splitlines()
    assert proc.returncode == 2
    assert "error: no config ldam in config/cifar10_lt/methods_if100_exp; choose from arb" in line
    assert not list(tmp_path.iterdir())


def test_a_bad_override_stops_the_sweep_before_any_run_with_one_config_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        sweep(sweep_args(tmp_path / "out", overrides=["train.epoch=3"]))
    assert e.value.code.startswith("config error: unknown config key 'train.epoch'")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_sweep_trains_tests_and_tabulates_every_run_then_reuses_them_when_rerun(tmp_path, run):
    root = write_fake_cifar10(tmp_path / "data", train_per_class=100, test_per_class=4)
    out = tmp_path / "sweep"
    args = ("bench/sweep.py", "--iterations", "2", "--imbalance-factors", "1", "10", f"data.root={root}",
            "--profiles", "exp", "train.num_threads=1", "--out", str(out))  # overrides after a list option too
    run(*args)
    names = ["cifar10_exp_if1_ce", "cifar10_exp_if1_balanced_softmax", "cifar10_exp_if10_ce",
             "cifar10_exp_if10_balanced_softmax"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(names)
    records = json.loads((out / "sweep.json").read_text())
    assert [(r["imbalance_factor"], r["method"]) for r in records] == [
        (1.0, "ce"), (1.0, "balanced_softmax"), (10.0, "ce"), (10.0, "balanced_softmax")]
    table = (out / "table.md").read_text().splitlines()
    for name, r in zip(names, records):
        assert set(r) == KEYS and (r["dataset"], r["profile"]) == ("cifar10", "exp")
        test = json.loads((out / name / "test_metrics.json").read_text())
        assert all(r[k] == test[k] for k in ("top1", "many", "medium", "few"))
        counts = test["train_class_counts"]  # 100 images a class, less 20 held out for validation
        assert (len(counts), max(counts), min(counts)) == (10, 80, 80 if r["imbalance_factor"] == 1 else 10)
        row = (f"| cifar10 | exp | {r['imbalance_factor']:g} | {r['method']} | {pct(r['top1'])} | {pct(r['many'])} | "
               f"{pct(r['medium'])} | {pct(r['few'])} |")
        assert row in table
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    written = {p: p.stat().st_mtime_ns for p in out.glob("*/**/*") if p.is_file()}
    proc = run(*args)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/**/*") if p.is_file()} == written  # nothing retrained
    assert "| cifar10 | exp | 10 | balanced_softmax |" in proc.stdout
