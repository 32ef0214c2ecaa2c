"""The over-optimization fits of Gao et al. (2023), "Scaling Laws for Reward Model Overoptimization".

Gold reward as a function of d = sqrt(KL(policy || initial policy)), as a gain over the initial
policy (d = 0), so both forms pass through the origin:
  best-of-n   gold(n) - gold(1) = d (alpha - beta d),        with KL_bon = log n - (n - 1)/n  (`fit_gain`)
  RL          gold - gold(d=0)  = d (alpha - beta log d)                                      (`fit_gao_rl`)
"""
from __future__ import annotations

import math

import numpy as np
import torch


def kl_bon(n: int) -> float:
    """KL(best-of-n || policy) = log n - (n - 1)/n."""
    return math.log(n) - (n - 1) / n


def fit_gain(d: list[float], gain: list[float]) -> tuple[float, float, float | None]:
    """Least squares of gain = d (alpha - beta d) = alpha d - beta d^2 -> (alpha, beta, R^2)."""
    d_arr, y = np.asarray(d, dtype=np.float64), np.asarray(gain, dtype=np.float64)
    X = np.stack([d_arr, -d_arr**2], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(X, y, rcond=None)
    ss_res = float(((y - X @ np.array([alpha, beta])) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return float(alpha), float(beta), (1.0 - ss_res / ss_tot) if ss_tot > 0 else None


def fit_gao_rl(points: list[dict]) -> dict:
    """Least squares of gold - gold(d=0) = d (alpha - beta log d) (Gao et al. 2023, RL form), a model
    linear in (alpha, beta), through the origin; R^2 on the gains. The fitted peak is where the
    derivative alpha - beta (log d + 1) vanishes: d* = exp(alpha / beta - 1)."""
    base = next((p["gold"] for p in points if p["d"] == 0), points[0]["gold"])
    pts = [p for p in points if p["d"] > 0]
    if len(pts) < 3:  # too few points to fit two coefficients and judge the fit: say so, keep the keys
        return {"fit/alpha": None, "fit/beta": None, "fit/r2": None, "fit/gold_at_d0": base}
    d = torch.tensor([p["d"] for p in pts], dtype=torch.float64)
    y = torch.tensor([p["gold"] - base for p in pts], dtype=torch.float64)
    X = torch.stack([d, -d * torch.log(d)], dim=1)
    coef = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    alpha, beta = coef.tolist()
    residual = ((X @ coef - y) ** 2).sum().item()
    total = ((y - y.mean()) ** 2).sum().item()
    out = {"fit/alpha": alpha, "fit/beta": beta, "fit/r2": 1 - residual / total if total > 0 else 0.0,
           "fit/gold_at_d0": base}
    if beta > 0:
        out["fit/peak_d"] = math.exp(alpha / beta - 1)
    return out
