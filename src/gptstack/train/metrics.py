"""Metrics: one JSON object per logged step in metrics.jsonl, mirrored to TensorBoard and, with
log.wandb, to Weights & Biases.

Only rank 0 writes. On resume from step k, lines past k (written after the checkpoint the run
resumes from) are dropped first, so the file reads as one uninterrupted run.

W&B gets every numeric value of each line under our name, plus `aliases`: the same value under
TRL's name (see TRL_NAMES), so dashboards built for TRL's trainers read our runs. The aliases go
to W&B only: metrics.jsonl stays one name per figure (the record the report card and tests read),
and TensorBoard mirrors it. Each W&B row carries `train/global_step` = the line's step, the x-axis
TRL's runs use (transformers' WandbCallback defines it as every metric's step metric); W&B's own
`_step` only counts rows, so the steps a resumed run logs again (those past its checkpoint) are
kept, not dropped as out of order (the first session's rows for them stay beside them).
The W&B run id is kept in RUN/<stage>/wandb_run_id: a resumed stage continues the same run.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..common import atomic_write_text
from ..config import LogConfig

WANDB_ID_FILE = "wandb_run_id"
# Our keys -> TRL's, as its trainers' W&B/TensorBoard callbacks write them (transformers' rewrite_logs:
# `x` -> `train/x`, `eval_x` -> `eval/x`). train/loss, train/grad_norm and train/epoch already are.
TRL_NAMES = {"train/lr": "train/learning_rate"}


def trl_names(keys) -> dict[str, str]:
    """Aliases for metrics logged under TRL's own log keys (DPO's `loss`, `rewards/chosen`, ... and
    `eval_`-prefixed held-out ones): `x` -> `train/x`, `eval_x` -> `eval/x`."""
    return {**{k: f"train/{k}" for k in keys}, **{f"eval_{k}": f"eval/{k}" for k in keys}}


class MetricsLogger:
    def __init__(self, stage_dir: Path, resume_step: int | None = None, enabled: bool = True, tensorboard: bool = True,
                 log: LogConfig | None = None, aliases: dict[str, str] | None = None, config: dict | None = None):
        """`log`: the [log] section (W&B when log.wandb); `aliases`: our key -> TRL's, W&B only;
        `config`: the run's resolved config, recorded as the W&B run's config."""
        self.enabled = enabled
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        self.aliases = {**TRL_NAMES, **(aliases or {})}
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
        if log is not None and log.wandb:
            self.wandb = open_wandb(Path(stage_dir), log, resume_step is not None, config)

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
        if self.wandb is not None:
            data = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
            data |= {alias: data[k] for k, alias in self.aliases.items() if k in data}
            self.wandb.log({**data, "train/global_step": step})

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
                self.tb = None
            if self.wandb is not None:
                self.wandb.finish()
                self.wandb = None


def open_wandb(stage_dir: Path, log: LogConfig, resumed: bool, config: dict | None):
    """A W&B run for the stage: the one named in RUN/<stage>/wandb_run_id when the stage resumes
    (its metrics.jsonl kept), else a new one whose id is written there. Named <prefix>/<stage> and
    grouped by <prefix> (log.wandb_run, else the run directory's name); its local files go under
    WANDB_DIR, else the stage directory."""
    wandb = log.wandb_module()
    id_file = stage_dir / WANDB_ID_FILE
    run_id = id_file.read_text(encoding="utf-8").strip() if resumed and id_file.is_file() else None
    stage = stage_dir.resolve().name
    prefix = log.wandb_run or stage_dir.resolve().parent.name
    run = wandb.init(project=log.wandb_project, entity=log.wandb_entity or None, name=f"{prefix}/{stage}",
                     group=prefix, job_type=stage, id=run_id or None, resume="allow" if run_id else None,
                     config=config, dir=os.environ.get("WANDB_DIR") or str(stage_dir))
    atomic_write_text(id_file, run.id + "\n")
    run.define_metric("train/global_step")
    run.define_metric("*", step_metric="train/global_step", step_sync=True)
    return run


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
