"""The RL core's arithmetic, shared by PPO, GRPO/RLOO and the over-optimization study.

Everything here works on the *response layout* of engine/rollout.py: a (B, R) tensor per
quantity, column k = the k-th response token of row b, with a (B, R) 0/1 `mask` of real tokens.
Pure functions of tensors, so each is tested against a hand-computed answer (tests/test_rl.py).

    logp, entropy = token_logprobs(model, batch, temperature)        # (B, R) each
    kl = logp - ref_logp                                             # per-token KL estimate (k1)
    rewards = per_token_rewards(scores, kl, kl_coef, mask)           # -β·KL each token, + score at the end
    adv, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)   # PPO
    adv = group_advantages(scores, group_size) / rloo_advantages(...)  # GRPO / RLOO
    loss, clipfrac, approxkl = clipped_policy_loss(new_logp, old_logp, adv, mask, clip=0.2)
    explained_variance(values, returns, mask)                        # how well the critic predicts
"""
from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the real entries (what TRL and OpenAI's lm-human-preferences use)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the real entries; pads come out 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """InstructGPT's reward: -β·(log π - log π_ref) at every response token, plus the sequence's
    score at its last real token. scores (B,), kl and mask (B, R)."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's real tokens (the value after the last real
    token is 0: the episode ends there). -> (advantages, returns = advantages + values), pads 0.

    δ_k = r_k + γ V_{k+1} - V_k,  A_k = δ_k + γλ A_{k+1}, by a reverse scan over columns."""
    mask = mask.to(values.dtype)
    values = values * mask
    B, R = values.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    for k in range(R - 1, -1, -1):
        delta = rewards[:, k] + gamma * next_value - values[:, k]
        adv = delta + gamma * lam * next_adv
        advantages[:, k] = adv * mask[:, k]
        # a pad column passes nothing back: the row's real tokens end before it
        next_value = torch.where(mask[:, k] > 0, values[:, k], next_value * 0)
        next_adv = torch.where(mask[:, k] > 0, adv, next_adv * 0)
    return advantages, (advantages + values) * mask


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: each sample's score minus its group's mean, divided by the group's std (unbiased, as in
    DeepSeekMath and TRL) when `scale`. scores (B,) with groups contiguous: B = prompts × group_size."""
    g = scores.view(-1, group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each sample's score minus the mean of the *other* samples of its group."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    g = scores.view(-1, group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def clipped_policy_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, as a loss to minimise (token-mean over real tokens).
    advantages: (B, R) per token, or (B,) per sequence (broadcast). -> (loss, clipfrac, approxkl)
    with approxkl = mean ½(log ratio)² (TRL's policy/approxkl_avg)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(new_logp)
    log_ratio = (new_logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approxkl = masked_mean(0.5 * log_ratio ** 2, mask)
    return loss, clipfrac, approxkl


def clipped_value_loss(new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss ½ max((V - R)², (clip(V, V_old ± ε) - R)²). -> (loss, clipfrac)."""
    clipped_values = old_values + torch.clamp(new_values - old_values, -clip, clip)
    loss_unclipped = (new_values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return loss, clipfrac


class AdaptiveKLController:
    """Ziegler et al. 2019: β ← β(1 + e·n/horizon), e = clip(KL/target − 1, −0.2, 0.2), where n is
    the number of samples since the last update. A fixed β is the same object with target None."""

    def __init__(self, init_kl_coef: float, target: float | None = None, horizon: int = 10000):
        if init_kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {init_kl_coef}")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float | None:
    """1 - Var(returns - values) / Var(returns) over the real tokens (CleanRL's
    losses/explained_variance): 1 when the critic predicts the returns exactly, 0 when it does no
    better than their mean, below 0 when worse. None when the returns do not vary."""
    def var(x: torch.Tensor) -> torch.Tensor:
        return masked_mean((x - masked_mean(x, mask)) ** 2, mask)

    var_returns = var(returns)
    if var_returns.item() == 0:
        return None
    return 1.0 - (var(returns - values) / var_returns).item()


class HackAlarm:
    """Warns when the proxy keeps rising while gold falls: window means of the last two windows."""

    def __init__(self, window: int, history: list | None = None):
        self.window, self.history, self.fired_at = window, history or [], -10**9

    def update(self, update: int, proxy: float, gold: float | None) -> bool:
        if gold is None:
            return False
        self.history.append((proxy, gold))
        w = self.window
        if len(self.history) < 2 * w or update - self.fired_at < w:
            return False
        prev, last = self.history[-2 * w : -w], self.history[-w:]
        mean = lambda xs, i: sum(x[i] for x in xs) / len(xs)  # noqa: E731
        if mean(last, 0) > mean(prev, 0) and mean(last, 1) < mean(prev, 1) - 0.005:
            self.fired_at = update
            return True
        return False


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim (float32)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)
