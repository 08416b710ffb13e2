"""A run directory's metric log: one JSON line per record in metrics.jsonl, the same scalars in
TensorBoard under tb/."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


class RunLog:
    def __init__(self, run_dir: str | Path, purge_step: int | None = None) -> None:
        """purge_step (a resumed run: its checkpoint's step + 1): TensorBoard hides the events a killed run
        wrote from that step on, the epochs the resumed run logs again (as metrics.jsonl drops their lines)."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge_step)

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Append `record` (plus step) to metrics.jsonl; numeric scalars go to TensorBoard too.

        Lists (e.g. per-class sampling probabilities) are written per element as tag/<index>. A NaN or
        infinite number is written as null: JSON has no token for it (Python's NaN breaks other readers).
        """
        line = json.dumps({"step": step, **{k: _json_number(v) for k, v in record.items()}}, allow_nan=False)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(line + "\n")
        for key, value in record.items():
            if _finite_number(value):
                self.writer.add_scalar(key, value, step)
            elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
                for i, v in enumerate(value):
                    if _finite_number(v):  # a NaN element leaves a gap in its curve, as a NaN scalar does
                        self.writer.add_scalar(f"{key}/{i}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_number(v) for v in value]
    return value
