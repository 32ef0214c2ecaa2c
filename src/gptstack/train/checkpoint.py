"""Checkpoints (atomic, resumable): the training core's own state. The final weights, configs and
tokenizers of the run directory are rundir.py's.

A checkpoint is one file, `<stage>/checkpoint/state.pt`: weights, optimizer state, RNG states,
step (which is also the data position: batches are a function of the step) and the config. It is
written to a temporary file, fsynced and renamed over the previous one, so a crash or `kill -9`
during the write leaves the last good checkpoint intact.
"""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch

from ..common import UserError, atomic_write_bytes
from ..rundir import check_finite

CHECKPOINT = "checkpoint/state.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(stage_dir: Path, model_state: dict, optimizer_state: dict, step: int, config: dict,
                    extra: dict | None = None) -> None:
    check_finite(model_state, f"{Path(stage_dir) / CHECKPOINT} (step {step})")
    buf = io.BytesIO()
    torch.save({"model": model_state, "optimizer": optimizer_state, "step": step, "rng": rng_state(),
                "config": config, "extra": extra or {}}, buf)
    atomic_write_bytes(Path(stage_dir) / CHECKPOINT, buf.getvalue())


def load_checkpoint(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated file cannot come from our writer; say so rather than crash
        raise UserError(f"{path}: unreadable checkpoint ({e}); pass --fresh to start over") from None
