"""bench/throughput.py as a user runs it: a real process on the CPU, on a tiny CIFAR-10 copy."""
from __future__ import annotations

import pytest

from tests.conftest import write_fake_cifar10

pytestmark = pytest.mark.slow


def ratio_of_rounded(ratio: float, a: float, b: float) -> bool:
    """Whether `ratio` (printed to 0.01) can be a / b of the rates a and b printed to whole numbers."""
    return (a - 0.5) / (b + 0.5) - 0.005 <= ratio <= (a + 0.5) / (b - 0.5) + 0.005


def test_the_throughput_bench_prints_one_row_of_rates_and_ratios_per_switch_setting(tmp_path, run):
    root = write_fake_cifar10(tmp_path, train_per_class=100, test_per_class=4)  # IF 100 keeps 1 truck
    proc = run("bench/throughput.py", "--device", "cpu", "--batch-sizes", "16", "--steps", "2", "--warmup", "1",
               "--amp", "off", "bf16", "--augment-chunk", "40", "--augment", "full", "none",
               "--eval-images", "32", "--root", str(root))
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("device cpu") and "tf32 on" in lines[0]
    rows = [line.split() for line in lines[2:] if line.strip()[:1].isdigit()]
    # The chunk column is the images per augmentation call: whole batches (40 -> 32).
    assert [tuple(r[:5]) for r in rows] == [("16", a, n, "32", g) for a in ["off", "bf16"] for n in ["True", "False"]
                                            for g in ["full", "none"]]
    for r in rows:  # train/s, pure/s, ratio, load ms, eval/s, fwd/s, ratio
        train, pure, ratio, load_ms, ev, fwd, eval_ratio = map(float, r[6:])
        assert train > 0 and pure > 0 and ratio_of_rounded(ratio, train, pure)
        # On the CPU the loader's time is the augmentation itself: part of each real step, never all of it.
        assert 0 < load_ms < 1000 * 16 / train
        assert ratio_of_rounded(eval_ratio, ev, fwd)
    assert "paper stage-1 schedule" not in proc.stdout  # only printed when batch 512 was measured


def test_the_methods_table_refuses_an_unknown_method_in_one_line_before_training(run, tmp_path):
    proc = run("bench/methods_table.py", "--methods", "ce", "nope", f"data.root={tmp_path}", "--out", str(tmp_path),
               check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "error: no config nope in config/cifar10_lt/methods_if100_exp; choose from arb, balanced_softmax" in lines[0]
    assert not list(tmp_path.iterdir())
