"""SIGKILL at random points of stage 1 and of stage-2 BALMS, then --resume: bit-identical to a run
never interrupted. Two points per stage here; `python tests/faults/kill_resume.py` runs ten."""
import pytest

from tests.faults.kill_resume import command, kill_points, run_to_end

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", [1, 2])
def test_a_run_killed_at_random_points_resumes_to_the_uninterrupted_weights_and_metrics(fake_cifar10, tmp_path,
                                                                                       stage):
    stage1_ckpt = None
    if stage == 2:
        stage1_ckpt = tmp_path / "backbone" / "last.pt"
        run_to_end(command(1, fake_cifar10, stage1_ckpt.parent))
    trials = kill_points(stage, points=2, seed=0, workdir=tmp_path, data_root=fake_cifar10, stage1_ckpt=stage1_ckpt)
    assert [t["differences"] for t in trials] == [[], []], trials
    assert any(t["killed"] for t in trials), f"no kill landed while the run was going: {trials}"
