"""Metrics: one JSON object per logged step in metrics.jsonl, mirrored to TensorBoard.

Only rank 0 writes. On resume from step k, lines past k (written after the checkpoint the run
resumes from) are dropped first, so the file reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..common import atomic_write_text


class MetricsLogger:
    def __init__(self, stage_dir: Path, resume_step: int | None = None, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(Path(stage_dir) / "tensorboard"), flush_secs=30)
            except ImportError:  # optional: JSONL is the record
                self.tb = None

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        row = {"step": step}
        for k, v in values.items():
            v = float(v) if not isinstance(v, (int, str)) else v
            row[k] = v if not (isinstance(v, float) and not math.isfinite(v)) else str(v)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
