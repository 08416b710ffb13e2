"""The metric log: every line is strict JSON, whatever the numbers."""
import json
import math

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
