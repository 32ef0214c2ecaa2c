"""Scalar heads on the GPT trunk: reward models, PPO critics and process reward models.

    rm = ScalarModel.from_policy(sft_model, kind="reward")     # trunk copied from the policy
    values = rm(ids, pad_mask=mask)            # (B, T): one scalar per position
    rewards = rm.score(ids, pad_mask=mask)     # (B,): read at each row's last real token
    save_scalar_model(stage_dir, rm, cfg.to_dict());  rm, cfg = load_scalar_model(stage_dir, "reward")

The head is a linear map of the trunk's final (normed) hidden state, as in InstructGPT's RM and
TRL's value heads. The trunk's language-model head is dropped: nothing reads it, and an unused
parameter would trip DDP. A reward model is read at the last real token of prompt + response
(its <|assistant_end|> when the response ended), which `score` finds from the pad mask, so left
padding, right padding or holes give the same score as the sequence alone.

Normalisation (the RM's scores on the SFT policy's responses having mean 0 and std 1) is folded
into the head's weight and bias (`normalize`), so a saved RM's raw output is already normalised.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

from ..common import UserError
from .gpt import GPT, GPTConfig, keep_positions

KINDS = ("reward", "value", "prm", "orm")


class ScalarModel(nn.Module):
    def __init__(self, config: GPTConfig, kind: str = "reward"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"scalar head kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = kind
        self.config = config
        self.trunk = GPT(config)
        self.trunk.lm_head = None  # only hidden states are read (see the module docstring)
        self.head = nn.Linear(config.n_embd, 1)
        # zero head: every score starts at 0, so a Bradley-Terry loss starts at exactly log 2 and the
        # first steps train the head before they move the trunk
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy: GPT, kind: str = "reward") -> "ScalarModel":
        model = cls(policy.config, kind)
        trunk_state = {k: v for k, v in policy.state_dict().items() if not k.startswith("lm_head.")}
        model.trunk.load_state_dict(trunk_state, strict=True)
        return model.to(next(policy.parameters()).device)

    def forward(self, idx: torch.Tensor, pad_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T) scalars (float32), one per position (only those `logits_to_keep`
        selects: GPT.forward's argument). pad_mask / positions / segments: GPT.hidden_states'."""
        h = self.trunk.hidden_states(idx, pad_mask=pad_mask, positions=positions, segments=segments)
        return self.head(keep_positions(h, logits_to_keep)).squeeze(-1).float()

    def score(self, idx: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) the scalar at each row's last real token."""
        return gather_last(self(idx, pad_mask=pad_mask), pad_mask)

    @torch.no_grad()
    def normalize(self, mean: float, std: float) -> None:
        """Fold (s - mean) / std into the head, so scores come out normalised."""
        if not std > 0:
            raise ValueError(f"cannot normalise scores with std {std}")
        self.head.weight.div_(std)
        self.head.bias.sub_(mean).div_(std)


def last_real_index(pad_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask of real tokens -> (B,) index of each row's last real token (any padding side)."""
    mask = pad_mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("a row has no real token")
    T = mask.size(1)
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).max(dim=1).values


def gather_last(values: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    if pad_mask is None:
        return values[:, -1]
    idx = last_real_index(pad_mask.to(values.device))
    return values.gather(1, idx[:, None]).squeeze(1)


def pad_sequences(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids, pad_mask), right-padded with 0. Causal attention never lets a real token see the
    pads after it, so the trunk runs without a mask and the score is gathered at the last real token."""
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids.to(device), mask.to(device)


def sequence_scores(model, seqs: list[list[int]]) -> torch.Tensor:
    """(B,) reward of each token sequence (differentiable; `model` may be DDP-wrapped)."""
    device = next(model.parameters()).device
    ids, mask = pad_sequences(seqs, device)
    return gather_last(model(ids), mask)


@torch.inference_mode()
def score_ids(rm: ScalarModel, seqs: list[list[int]], batch_size: int = 64) -> list[float]:
    """Rewards of rendered sequences, batched by similar length (order kept)."""
    rm.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    for c in range(0, len(order), batch_size):
        idx = order[c : c + batch_size]
        for i, s in zip(idx, sequence_scores(rm, [seqs[i] for i in idx]).tolist()):
            out[i] = s
    return out


def save_scalar_model(stage_dir: str | Path, model: ScalarModel, config: dict, state_dict: dict | None = None) -> None:
    """model.safetensors (with the head's kind in its metadata) + config.json."""
    from ..train.checkpoint import save_model

    save_model(Path(stage_dir), state_dict if state_dict is not None else model.state_dict(), config,
               metadata={"gptstack_head": model.kind})


def scalar_kind(stage_dir: str | Path) -> str | None:
    """The head kind a stage's weights were saved with, or None for a language model."""
    path = Path(stage_dir) / "model.safetensors"
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("gptstack_head")


def load_scalar_model(stage_dir: str | Path, kind: str | tuple[str, ...] = KINDS, device: str = "cpu"):
    """A stage directory holding a scalar-head model -> (ScalarModel, Config). Refuses anything else
    (a language model, a PRM where a reward model is wanted) with a clear error."""
    from ..config import config_from_dict

    stage_dir = Path(stage_dir)
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    cfg_path, weights = stage_dir / "config.json", stage_dir / "model.safetensors"
    if not weights.exists() or not cfg_path.exists():
        raise UserError(f"{stage_dir}: no model here (expected model.safetensors and config.json)")
    found = scalar_kind(stage_dir)
    if found not in kinds:
        what = "a language model (no scalar head)" if found is None else f"a {found} model"
        raise UserError(f"{stage_dir}: expected a {' or '.join(kinds)} model, found {what}")
    cfg = config_from_dict(json.loads(cfg_path.read_text(encoding="utf-8")))
    model = ScalarModel(cfg.model, found)
    missing, unexpected = model.load_state_dict(load_file(str(weights), device=device), strict=False)
    if missing or unexpected:
        raise UserError(f"{weights}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device), cfg
