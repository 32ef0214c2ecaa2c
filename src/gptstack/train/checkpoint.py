"""Checkpoints (atomic, resumable) and final weights (safetensors + config.json).

A checkpoint is one file, `<stage>/checkpoint/state.pt`: weights, optimizer state, RNG states,
step (which is also the data position: batches are a function of the step) and the config. It is
written to a temporary file, fsynced and renamed over the previous one, so a crash or `kill -9`
during the write leaves the last good checkpoint intact.
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..common import UserError, atomic_write_bytes, atomic_write_json

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


def save_model(stage_dir: Path, state_dict: dict, config: dict, metadata: dict | None = None) -> None:
    """model.safetensors + config.json (the full resolved config) in `stage_dir`. `metadata`:
    extra string entries in the safetensors header (model/heads.py records its head kind there)."""
    stage_dir = Path(stage_dir)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    # safetensors refuses shared storage (tied embeddings): store the tied tensor once
    if "lm_head.weight" in tensors and "tok_emb.weight" in tensors and \
            state_dict["lm_head.weight"].data_ptr() == state_dict["tok_emb.weight"].data_ptr():
        del tensors["lm_head.weight"]
    data = safetensors_bytes(tensors, metadata={"format": "pt", "producer": "gptstack", **(metadata or {})})
    atomic_write_bytes(stage_dir / "model.safetensors", data)
    atomic_write_json(stage_dir / "config.json", config)


def load_model(stage_dir: str | Path, device: str = "cpu"):
    """A stage directory -> (GPT with its weights, Config). Used by every later stage."""
    from ..config import config_from_dict
    from ..model.gpt import GPT

    stage_dir = Path(stage_dir)
    cfg_path, weights = stage_dir / "config.json", stage_dir / "model.safetensors"
    if not weights.exists() or not cfg_path.exists():
        raise UserError(f"{stage_dir}: no model here (expected model.safetensors and config.json)")
    from ..model.heads import scalar_kind
    if (kind := scalar_kind(stage_dir)) is not None:
        raise UserError(f"{stage_dir}: this is a {kind} model (a scalar head), not a language model")
    cfg = config_from_dict(json.loads(cfg_path.read_text(encoding="utf-8")))
    model = GPT(cfg.model)
    state = load_file(str(weights), device=device)
    if cfg.model.tie_embeddings:
        state.setdefault("lm_head.weight", state["tok_emb.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{weights}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device), cfg


def check_vocab(model_vocab: int, tok, where) -> None:
    if model_vocab != tok.vocab_size:
        raise UserError(f"{where}: the model has vocab_size {model_vocab} but the run's tokenizer has "
                        f"{tok.vocab_size} tokens; they must come from the same run (or use --fresh)")


def check_same_tokenizer(stage_a: str | Path, stage_b: str | Path) -> None:
    """Refuse two stages whose runs' tokenizers (`<stage>/../tokenizer`) differ in ranks, special
    tokens or pre-split pattern: token ids would mean different things to the two models (a reward
    model scoring another tokenizer's policy, a reference model of another run)."""
    dirs = [Path(stage_a).parent / "tokenizer", Path(stage_b).parent / "tokenizer"]
    if dirs[0].resolve() == dirs[1].resolve():
        return
    found = []
    for d in dirs:
        path = d / "gptstack.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: no tokenizer here (expected the run's tokenizer beside {d.parent})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        found.append({k: data.get(k) for k in ("ranks", "special_tokens", "pattern")})
    differ = [k for k in ("ranks", "special_tokens", "pattern") if found[0][k] != found[1][k]]
    if differ:
        raise UserError(f"{stage_a} and {stage_b} use different tokenizers ({dirs[0]} and {dirs[1]} differ in "
                        f"{', '.join(differ)}); they must come from the same run's tokenizer")


def load_stage(stage_dir: str | Path, device: str = "cpu"):
    """A stage directory -> (model, its Config, the run's tokenizer), checked to belong together."""
    from ..tokenizer import Tokenizer

    stage_dir = Path(stage_dir)
    model, cfg = load_model(stage_dir, device)
    tok = Tokenizer.load(stage_dir.parent / "tokenizer")
    check_vocab(model.config.vocab_size, tok, stage_dir)
    return model, cfg, tok
