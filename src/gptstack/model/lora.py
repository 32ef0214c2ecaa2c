"""LoRA (low-rank adapters) on the model's linear layers, as PEFT's `LoraConfig` builds them.

    apply_lora(model, rank=16, alpha=32)        # in place: every GPT inside gets adapters, its own
                                                # weights frozen (a scalar model's head stays trainable)
    merged = merge_lora_state_dict(model.state_dict(), 32 / 16)   # plain keys, adapters folded in

A target linear y = x W^T becomes y = x W^T + scaling * dropout(x) A^T B^T with A (rank, in) drawn
kaiming-uniform and B (out, rank) zero, so training starts exactly at the base model, and
scaling = alpha / rank (PEFT's default; no rsLoRA). tests/test_lora.py checks the outputs against
PEFT's. `merged_weight` is what the sampling engine (model/inference.py) reads, so a policy being
trained with LoRA samples with its adapted weights; a saved model is merged (plain keys), so later
stages, export and chat never see an adapter.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gpt import GPT

TARGETS = ("qkv", "proj", "gate_up", "down")   # the linear layers of a block (model/gpt.py)
_LORA_KEYS = (".lora_A", ".lora_B")


def _merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A, computed in float32 and rounded once to W's dtype. The one formula of
    both the engine's weights and the saved model, so the two agree bit for bit."""
    return (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)


def merged_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a linear layer applies: W, or W + scaling * B @ A for a LoRA layer (detached)."""
    w = linear.weight.detach()
    if getattr(linear, "lora_A", None) is not None:
        w = _merge(w, linear.lora_A.detach(), linear.lora_B.detach(), linear.scaling)
    return w


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update. A subclass, so everything that reads
    `.weight` (the base weight) or checks isinstance(m, nn.Linear) keeps working; the base's own
    weight (and bias) Parameter objects are kept, not copied."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        nn.Module.__init__(self)   # not nn.Linear.__init__: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        # A drawn on the CPU (a seeded CPU generator; the same draws whatever the device), then moved
        a = nn.init.kaiming_uniform_(torch.empty(rank, base.in_features, dtype=kw["dtype"]), a=math.sqrt(5),
                                     generator=generator)   # PEFT's init of A (nn.Linear's default)
        self.lora_A = nn.Parameter(a.to(kw["device"]))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the update through the rank-r bottleneck, never as a full (out, in) matrix: two thin matmuls
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return super().forward(x) + update * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def parse_targets(targets: str | list[str] | tuple[str, ...]) -> list[str]:
    """"qkv,proj" -> ["qkv", "proj"]; ValueError naming an unknown module."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    names = [t for t in names if t]
    for name in names:
        if name not in TARGETS:
            raise ValueError(f"unknown module {name!r} (expected {', '.join(TARGETS)})")
    if not names:
        raise ValueError(f"names no module (expected some of {', '.join(TARGETS)})")
    return names


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=TARGETS, dropout: float = 0.0,
               seed: int | None = None) -> nn.Module:
    """Give every GPT inside `model` (the model itself, a ScalarModel's trunk, PPO's policy and
    critic) LoRA adapters on the `targets` linears of each block, in place, and freeze every other
    parameter of those GPTs (embeddings, norms, LM head, base weights). Parameters outside a GPT
    keep their requires_grad: a reward model's or critic's `head` (and `likelihood_coef`) must
    still learn, as PEFT's modules_to_save keeps a classifier head trainable. `seed`: A's draws from
    their own generator, so they do not depend on what the global RNG served before (a stopped
    and resumed stage, or one run after another in a process, starts from the same adapters). -> `model`."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    names = parse_targets(targets)
    generator = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
    gpts = [m for m in model.modules() if isinstance(m, GPT)]
    if not gpts:
        raise ValueError(f"apply_lora: no GPT inside {type(model).__name__}")
    for gpt in gpts:
        if any(isinstance(m, LoRALinear) for m in gpt.modules()):
            raise ValueError("apply_lora: this model already has LoRA adapters")
        gpt.requires_grad_(False)
        for block in gpt.layers:
            for parent in (block.attn, block.mlp):
                for name in names:
                    if hasattr(parent, name):   # qkv and proj live in attn, gate_up and down in mlp
                        lora = LoRALinear(getattr(parent, name), rank, alpha, dropout, generator).train(parent.training)
                        setattr(parent, name, lora)
    return model


def without_adapters(model: nn.Module) -> nn.Module:
    """`model` as it was before its adapters, frozen, for evaluation: a copy whose frozen tensors are
    the model's own (shared, no memory; LoRA never changes them), its LoRA layers plain linears over
    them, and its other trainable tensors (a scalar head) copied. PPO's and DPO's reference under
    LoRA: the SFT model without a second copy of its weights."""
    import copy

    shared = {id(p): p for p in model.parameters() if not p.requires_grad}
    out = copy.deepcopy(model, memo=dict(shared))
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                plain.weight = child.weight
                if child.bias is not None:
                    plain.bias = child.bias
                setattr(parent, name, plain)
    return out.requires_grad_(False).eval()


def merge_lora_state_dict(state_dict: dict, scaling: float) -> dict:
    """A full state dict with LoRA adapters (any prefix: `policy.layers.0.attn.qkv.lora_A`) ->
    the same keys a plain model has, each adapted weight W + scaling * B @ A. Pure: works on
    Session.full_state_dicts()'s CPU tensors under FSDP too. Untouched tensors are passed through
    as the same objects (a tied embedding stays tied)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(_LORA_KEYS):
            continue
        base = key[: -len("weight")]
        if key.endswith(".weight") and base + "lora_A" in state_dict:
            value = _merge(value, state_dict[base + "lora_A"], state_dict[base + "lora_B"], scaling)
        out[key] = value
    return out


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, each shared tensor counted once (PEFT's print_trainable_parameters)."""
    params = list(model.parameters())   # deduplicated: a tied embedding appears once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
