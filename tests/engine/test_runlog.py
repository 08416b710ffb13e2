"""The metric log: every line is strict JSON, whatever the numbers."""
import json
import math
import time

from engine.runlog import RunLog


def _strict(line: str) -> dict:
    def refuse(token):
        raise ValueError(f"non-JSON token {token}")

    return json.loads(line, parse_constant=refuse)


def test_nan_and_infinite_numbers_are_logged_as_null_so_every_line_stays_valid_json(tmp_path):
    log = RunLog(tmp_path)
    log.log(3, {"loss": math.nan, "train_acc": 0.5, "sample_probs": [0.25, math.inf], "epoch": 1})
    log.log(6, {"loss": 1.25, "epoch": 2})
    log.close()
    lines = [_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 3, "loss": None, "train_acc": 0.5, "sample_probs": [0.25, None], "epoch": 1},
                     {"step": 6, "loss": 1.25, "epoch": 2}]


def _scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_a_resumed_log_hides_the_tensorboard_events_logged_after_its_checkpoint(tmp_path):
    # A run killed after logging epochs at steps 10, 20 and 30 whose last.pt is of step 20 logs step 30 again.
    killed = RunLog(tmp_path)
    for step, loss in ((10, 3.0), (20, 2.0), (30, 1.0)):
        killed.log(step, {"loss": loss})
    killed.close()
    # TensorBoard reads a directory's event files in name order, and a name starts with the writer's start
    # time in whole seconds: a resume comes later (here, in the same second, the files' order would depend on
    # a process-wide counter, compared as text).
    time.sleep(1.1)
    resumed = RunLog(tmp_path, purge_step=21)
    resumed.log(30, {"loss": 1.5})
    resumed.close()
    assert _scalars(tmp_path, "loss") == [(10, 3.0), (20, 2.0), (30, 1.5)]


def test_tensorboard_gets_each_finite_number_and_list_element_at_the_record_s_step_and_no_flag(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path)
    log.log(7, {"loss": math.nan, "train_acc": 0.5, "finished": True, "sample_probs": [0.25, 0.75, math.nan]})
    # read before close: each record is flushed, so a killed run keeps it and TensorBoard shows it live
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["sample_probs/0", "sample_probs/1", "train_acc"]  # no NaN
    assert _scalars(tmp_path, "sample_probs/1") == [(7, 0.75)] and _scalars(tmp_path, "train_acc") == [(7, 0.5)]
    log.close()
