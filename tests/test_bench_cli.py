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
    # fp32 only: on a CPU without bf16 instructions (AVX2) bf16 runs emulated, 9x slower, and these rows' whole
    # epochs took over the test's 300 s (bf16 training: tests/test_stage1_cli.py)
    proc = run("bench/throughput.py", "--device", "cpu", "--batch-sizes", "16", "--steps", "2", "--warmup", "1",
               "--amp", "off", "--augment-chunk", "40", "--augment", "full", "none", "--prefetch", "off",
               "--rounds", "1", "--eval-images", "32", "--root", str(root))
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("device cpu") and "tf32 on, cudnn benchmark off;" in lines[0]
    rows = [line.split() for line in lines[2:] if line.strip()[:1].isdigit()]
    # The chunk column is the images per augmentation call: whole batches (40 -> 32).
    assert [tuple(r[:7]) for r in rows] == [("16", "off", n, "32", g, "off", "False") for n in ["True", "False"]
                                            for g in ["full", "none"]]
    for r in rows:  # train/s, pure/s, ratio, range, load ms, eval/s, fwd/s, ratio
        train, pure, ratio = map(float, r[7:10])
        low, high = map(float, r[10].split("-"))
        load_ms, ev, fwd, eval_ratio = map(float, r[11:])
        assert train > 0 and pure > 0 and ratio_of_rounded(ratio, train, pure)
        assert low == high  # one window of each path
        # On the CPU the loader's time is the augmentation itself: part of each real step, never all of it.
        assert 0 < load_ms < 1000 * 16 / train
        assert ratio_of_rounded(eval_ratio, ev, fwd)
    assert "paper stage-1 schedule" not in proc.stdout  # only printed when batch 512 was measured


def test_the_throughput_bench_profiles_each_setting_and_its_ratio_lies_within_its_windows(tmp_path, run):
    """With the loader prefetching: its thread makes the chunks, the loader's host time is the wait for it."""
    root = write_fake_cifar10(tmp_path, train_per_class=100, test_per_class=4)
    # 32 test images for a batch of 64: evaluation takes them all in one batch.
    proc = run("bench/throughput.py", "--device", "cpu", "--batch-sizes", "64", "--steps", "1", "--warmup", "1",
               "--amp", "off", "--prefetch", "on", "--rounds", "2", "--eval-images", "32", "--root", str(root),
               "--profile", str(tmp_path / "prof"))
    rows = [line.split() for line in proc.stdout.splitlines()[2:] if line.strip()[:1].isdigit()]
    assert [r[5] for r in rows] == ["on", "on"] and all(float(r[-2]) > 0 for r in rows)  # fwd/s
    for r in rows:
        ratio, (low, high) = float(r[9]), map(float, r[10].split("-"))
        # Both paths take the same images in every window: the ratio of the sums lies between the windows' ratios.
        assert low - 0.01 <= ratio <= high + 0.01 and low <= high
    assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == ["b64_off_nchw_c8192_full_prefetch.txt",
                                                                      "b64_off_nhwc_c8192_full_prefetch.txt"]
    for path in (tmp_path / "prof").iterdir():
        text = path.read_text()
        summaries = [line for line in text.splitlines() if line.startswith(("real:", "pure:"))]
        # 1 step rounds up to the 4 steps of an epoch (~250 images in batches of 64); one summary per path.
        assert [s.split(";")[0] for s in summaries] == ["real: 4 steps", "pure: 4 steps"], text[:500]
        loader_ms = [float(s.split("host in the loader ")[1].split(",")[0]) for s in summaries]
        assert loader_ms[0] > 0 and loader_ms[1] == 0  # only the real path runs the loader
        # Every thread is profiled: the prefetch thread's chunks (the augmentation itself) are there too.
        thread_ms = [float(s.split("in the prefetch thread ")[1].split(",")[0]) for s in summaries]
        assert thread_ms[0] > 0 and thread_ms[1] == 0
        assert all("waiting for the device 0.00 (0 waits)" in s for s in summaries)  # no CUDA here
        assert all("device kernels 0.00" in s for s in summaries)  # no device kernels on the CPU
        assert all("launches 0.0 (0.00 host), allocations 0 in the window (0.00 host)" in s for s in summaries)
        assert text.count("aten::convolution_backward") == 2  # one operator table per path on the CPU (host time)


def test_the_throughput_bench_refuses_zero_windows_in_one_line_before_loading_data(run, tmp_path):
    proc = run("bench/throughput.py", "--rounds", "0", "--root", str(tmp_path / "none"), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "error: argument --rounds: must be at least 1, got 0" in lines[0]


@pytest.mark.parametrize("args, message", [
    (["--root", "missing"], "error: CIFAR-10 not found: looked in"),
    (["--amp", "off", "fp16"], "error: train.amp=fp16 needs a CUDA device (this run is on cpu); use train.amp=bf16"),
])
def test_the_throughput_bench_refuses_missing_data_or_a_precision_the_device_lacks_in_one_line(
        run, tmp_path, args, message):
    root = write_fake_cifar10(tmp_path, train_per_class=100, test_per_class=4)
    args = [str(tmp_path / a) if a == "missing" else a for a in args]
    proc = run("bench/throughput.py", "--device", "cpu", "--root", str(root), *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert proc.stdout == ""  # refused before the first row


def test_the_methods_table_refuses_an_unknown_method_in_one_line_before_training(run, tmp_path):
    proc = run("bench/methods_table.py", "--methods", "ce", "nope", f"data.root={tmp_path}", "--out", str(tmp_path),
               check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "error: no config nope in config/cifar10_lt/methods_if100_exp; choose from arb, balanced_softmax" in lines[0]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("script, args, message", [
    ("bench/methods_table.py", ["--methods", "ce", "data.imbalance_factor=0.5"],
     "config error: data.imbalance_factor=0.5 is out of range: it must be >= 1"),
    # no data either: a run that started anyway would stop at once
    ("bench/methods_table.py", ["--methods", "ce", "--iterations", "-3", "data.root={tmp}/none"],
     "methods_table.py: error: --iterations must be at least 1; see --help"),
    ("bench/methods_table.py", ["--iterations", "0", "--methods", "ce", "data.root={tmp}/none"],
     "methods_table.py: error: --iterations must be at least 1; see --help"),
    ("bench/methods_table.py", ["--methods", "ce", "data.root={tmp}/none"], "error: CIFAR-10 not found: looked in"),
    ("bench/methods_table.py", ["--methods", "ldam_drw", "data.root={tmp}/none"], "error: CIFAR-10 not found"),
    ("bench/compare_runs.py", ["{tmp}/truncated"], "error: {tmp}/truncated/test_metrics.json is not valid JSON"),
    ("bench/compare_runs.py", ["{tmp}/none"], "error: {tmp}/none is not a directory; pass run directories"),
    ("bench/stage2_speed.py", ["--stage1", "{tmp}/none.pt"], "error: no checkpoint at {tmp}/none.pt"),
    ("bench/stage2_speed.py", ["--stage1", "{tmp}/none.pt", "--iterations", "0"],
     "stage2_speed.py: error: --iterations must be at least 1; see --help"),
    ("bench/stage2_speed.py", ["--stage1", "{tmp}/none.pt", "--views", "0"],
     "stage2_speed.py: error: --views must be at least 1; see --help"),
    # every run's method and overrides are checked before the first run; key=value words after --methods
    # are overrides, not method names
    ("bench/stage2_speed.py", ["--stage1", "{tmp}/none.pt", "--methods", "crt", "bogus", "train.num_threads=1"],
     "config error: stage2.method='bogus' is not one of balanced_softmax, balms, crt, lws, tau_norm"),
    ("bench/stage2_speed.py", ["--stage1", "{tmp}/none.pt", "--methods", "crt", "train.lr=-1"],
     "config error: train.lr=-1"),
    # --live-bn goes to the naive runs only (the cached ones refuse stage2.live_bn): every config passes,
    # and the missing checkpoint is what stops it
    ("bench/stage2_speed.py", ["--stage1", "{tmp}/none.pt", "--live-bn", "eval", "--methods", "balms"],
     "error: no checkpoint at {tmp}/none.pt"),
    ("bench/stage2_speed.py", ["--stage1", "{tmp}/none.pt", "stage2.live_bn=eval"],
     "stage2_speed.py: error: stage2.live_bn is read by the naive runs only: pass --live-bn instead; see --help"),
    ("bench/loader_speed.py", ["--folder", "{tmp}/none", "--root", "{data}"],
     "error: training images not found: {tmp}/none/train is not a folder"),
    ("bench/loader_speed.py", ["--folder", "{tmp}/none", "--workers", "0", "-1"],
     "loader_speed.py: error: argument --workers: must be at least 0, got -1; see --help"),
    ("bench/loader_speed.py", ["--folder", "{tmp}/none", "--batches", "0"],
     "loader_speed.py: error: argument --batches: must be at least 1, got 0; see --help"),
    ("-m", ["bench.meta_gradient", "--draws", "0"],
     "meta_gradient.py: error: argument --draws: must be at least 1, got 0; see --help"),
    ("-m", ["bench.meta_gradient", "--threads", "-1"],
     "meta_gradient.py: error: argument --threads: must be at least 1, got -1; see --help"),
    ("-m", ["bench.meta_gradient", "--out", "{tmp}"],
     "meta_gradient.py: error: --out {tmp} is a folder: name the file to write; see --help"),
], ids=["imbalance-factor", "negative-iterations", "zero-iterations", "no-data", "no-data-ldam", "truncated-json",
        "no-run-directory", "no-checkpoint", "stage2-zero-iterations", "stage2-zero-views", "stage2-bad-method",
        "stage2-override", "stage2-live-bn-flag", "stage2-live-bn-override", "no-folder", "loader-negative-workers",
        "loader-zero-batches", "meta-gradient-zero-draws", "meta-gradient-negative-threads",
        "meta-gradient-out-folder"])
def test_a_bench_driver_refuses_bad_input_in_one_line_with_status_2_and_leaves_no_run_directory(
        run, tmp_path, script, args, message):
    data = write_fake_cifar10(tmp_path / "data", train_per_class=100, test_per_class=1) if "{data}" in str(args) else ""
    (tmp_path / "truncated").mkdir()
    (tmp_path / "truncated" / "test_metrics.json").write_text('{"top1": 0.5, "many": 0.')  # a killed write
    args = [a.format(tmp=tmp_path, data=data) for a in args]
    out = tmp_path / "out"
    proc = run(script, *args, *(["--out", str(out)] if "methods_table" in script else []), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(message.format(tmp=tmp_path)), lines[0]
    assert proc.stdout == "" or "stage2_speed" not in script  # no table header before a refusal
    assert not out.exists()  # methods_table: no stray run directory (nor its parents) of the refused run


@pytest.mark.parametrize("script", ["augment_speed", "compare_runs", "loader_speed", "meta_gradient", "methods_table",
                                    "report", "stage2_speed", "sweep", "throughput"])
def test_every_bench_driver_answers_help_as_a_script_and_refuses_an_unknown_option(run, script):
    proc = run(f"bench/{script}.py", "--help")
    assert proc.stdout.startswith("usage: ") and script in proc.stdout.splitlines()[0] and not proc.stderr
    proc = run(f"bench/{script}.py", "--no-such-option", check=False)  # or the options it requires, named first
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].endswith("; see --help"), proc.stderr
