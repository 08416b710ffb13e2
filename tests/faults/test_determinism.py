"""The same config and seed, run twice on the CPU: the same weights, optimiser state and metric lines,
bit for bit (the README's determinism statement)."""
import pytest

from tests.faults.kill_resume import command, differences, run_to_end

pytestmark = pytest.mark.slow


def test_two_runs_with_one_seed_end_bit_identical_on_the_cpu(fake_cifar10, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for run_dir in (first, second):
        run_to_end(command(1, fake_cifar10, run_dir))
    assert differences(first, second) == []
    assert (first / "metrics.jsonl").read_text() != "", "the runs logged nothing to compare"
