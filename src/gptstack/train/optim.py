"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules."""
from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """Decay the weight matrices of linear layers; not norms, not embeddings (decaying an
    embedding row pulls rarely seen tokens to zero for no benefit), not biases. Frozen parameters
    (LoRA's base weights) are left out. LoRA's A and B are decayed like any matrix, as HF's Trainer
    (TRL + PEFT) decays every non-bias, non-norm parameter: the same weight_decay means the same
    thing with or without PEFT, and here it pulls the update B @ A towards the base model."""
    decay, no_decay = [], []
    seen = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))  # tied weights appear twice
            is_matrix = isinstance(module, torch.nn.Linear) and name in ("weight", "lora_A", "lora_B")
            (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per parameter for the whole update, on CUDA and CPU alike (on CPU much
    # faster than foreach for small models, the same update to rounding; bench/RESULTS.md)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def lr_at(step: int, max_steps: int, peak: float, warmup: int, schedule: str = "cosine",
          min_ratio: float = 0.1, decay_fraction: float = 0.3) -> float:
    """Linear warmup to `peak`, then cosine to `min_ratio * peak`, or WSD (stable, then linear
    decay over the last `decay_fraction` of steps), or constant."""
    floor = peak * min_ratio
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if schedule == "cosine":
        return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - floor)
    if schedule == "wsd":
        start_decay = 1 - decay_fraction
        if progress < start_decay:
            return peak
        return peak - (peak - floor) * (progress - start_decay) / decay_fraction
    raise ValueError(f"unknown schedule {schedule!r} (expected cosine, wsd or constant)")
