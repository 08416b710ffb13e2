"""A run directory's metric log: one JSON line per record in metrics.jsonl, the same scalars in
TensorBoard under tb/."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


class RunLog:
    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.run_dir / "tb"))

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Append `record` (plus step) to metrics.jsonl; numeric scalars go to TensorBoard too.

        Lists (e.g. per-class sampling probabilities) are written per element as tag/<index>.
        """
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
            elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
                for i, v in enumerate(value):
                    self.writer.add_scalar(f"{key}/{i}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
