"""The report card's figures: each function takes plain numbers (read from summaries and metrics by
card.py) and returns PNG bytes. matplotlib's object API (`Figure`, rendered by Agg) rather than
pyplot: no global state, no display, nothing left open between figures."""
from __future__ import annotations

import io
import math

from matplotlib.figure import Figure

GRID = {"alpha": 0.3, "linewidth": 0.5}


def _png(fig: Figure, dpi: int) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _panels(n: int, width: float = 3.4, height: float = 2.6, cols: int = 3) -> tuple[Figure, list]:
    """n axes, `cols` to a row (the spare ones of the last row hidden)."""
    cols = min(n, cols)
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[:n]:
        ax.grid(**GRID)
    return fig, axes[:n]


def pretrain_loss(train: list[tuple[float, float]], val: list[tuple[float, float]], dpi: int) -> bytes:
    """Training loss per logged step and the validation loss (estimates and the final full split)."""
    fig, (ax,) = _panels(1, 5.5, 3.2)
    if train:
        ax.plot(*zip(*train), label="train/loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o--", label="validation", color="tab:red")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Pretraining loss")
    ax.legend()
    return _png(fig, dpi)


def family_bars(families: list[str], accuracy: dict[str, list[float | None]], dpi: int) -> bytes:
    """Greedy accuracy per task family, one bar per stage (`accuracy[stage][i]` for families[i])."""
    fig, (ax,) = _panels(1, 6.5, 3.2)
    width = 0.8 / max(len(accuracy), 1)
    for j, (stage, values) in enumerate(accuracy.items()):
        xs = [i + (j - (len(accuracy) - 1) / 2) * width for i in range(len(families))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=stage)
    ax.set_xticks(range(len(families)), families)
    ax.set(ylabel="greedy accuracy", ylim=(0, 1.2), yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0], title="Accuracy per task family (held-out eval set)")
    ax.legend(fontsize="small", ncols=min(len(accuracy), 6), loc="upper center")
    return _png(fig, dpi)


def rm_bars(figures: dict[str, float], dpi: int) -> bytes:
    """The reward model's held-out figures as horizontal bars, 0.5 (chance for pairs) marked."""
    fig, (ax,) = _panels(1, 6.5, 0.45 * len(figures) + 1.2)
    names = list(figures)[::-1]
    ax.barh(names, [figures[n] for n in names], color="tab:purple")
    for i, n in enumerate(names):
        ax.text(figures[n], i, f" {figures[n]:.3f}", va="center", fontsize="small")
    ax.axvline(0.5, color="grey", linestyle=":", label="chance for pair accuracies (Spearman: 0)")
    ax.set(xlim=(min(0.0, *figures.values()), 1.1), title="Reward model (held-out)")
    ax.legend(fontsize="small", loc="lower right")
    return _png(fig, dpi)


def best_of_n(by_n: list[dict], fit: dict | None, gold_n1: float, dpi: int) -> bytes:
    """Gold (left axis) and proxy (right axis) of the best-of-n pick vs d = sqrt(KL_bon), each point
    labelled with its n, and the fitted gain gold(1) + d (alpha - beta d)."""
    fig, (ax,) = _panels(1, 6.0, 3.6)
    d = [r["d"] for r in by_n]
    ax.plot(d, [r["gold"] for r in by_n], "o", color="tab:blue", label="gold")
    for r in by_n:
        ax.annotate(f"n={r['n']}", (r["d"], r["gold"]), textcoords="offset points", xytext=(3, -10), fontsize=7)
    if fit:
        xs = [max(d) * i / 100 for i in range(101)]
        ax.plot(xs, [gold_n1 + x * (fit["alpha"] - fit["beta"] * x) for x in xs], ":", color="tab:blue",
                label=f"fit d(α − βd), R² = {fit['r2']:.2f}" if fit.get("r2") is not None else "fit d(α − βd)")
    ax2 = ax.twinx()
    ax2.plot(d, [r["proxy"] for r in by_n], "s--", color="tab:orange", label="proxy (RM)")
    ax.set(xlabel="d = √KL(best-of-n ‖ policy)", ylabel="gold reward", title="Best-of-n on the eval set")
    ax2.set_ylabel("proxy (RM score)")
    ax.legend(loc="upper left", fontsize="small")
    ax2.legend(loc="lower right", fontsize="small")
    return _png(fig, dpi)


def curves(series: dict[str, list[tuple[float, float]]], xlabel: str, dpi: int) -> bytes:
    """One panel per metric: `series[name]` is its (x, value) points."""
    series = {k: v for k, v in series.items() if v}
    fig, axes = _panels(len(series))
    for ax, (name, pts) in zip(axes, series.items()):
        ax.plot(*zip(*pts), linewidth=1)
        ax.set(xlabel=xlabel, title=name)
    return _png(fig, dpi)


def overoptimization(points: list[dict], fit: dict | None, peak_d: float | None, bon: list[dict] | None,
                     bon_fit: dict | None, bon_gold_n1: float | None, dpi: int) -> bytes:
    """Proxy (RM score), gold and mean response length vs d = sqrt(KL) along the RL run, one panel each
    (proxy and length where every point has them). Each held-out point is a marker coloured by its update,
    not a line: d need not grow with the update, so a line sorted by d would invent an order and one in
    update order would zig-zag. The gold panel adds Gao et al.'s RL form gold = gold(0) + d (alpha - beta log d)
    and best-of-n's points with its form d (alpha - beta d); a ring marks the proxy's peak on every panel."""
    panels = [(k, label) for k, label in (("proxy", "proxy (RM score)"), ("gold", "gold reward"),
                                          ("length", "mean length (words)")) if all(k in p for p in points)]
    fig, axes = _panels(len(panels), 3.8, 3.4)
    d, steps = [p["d"] for p in points], [p["step"] for p in points]
    peak = max(points, key=lambda p: p["proxy"]) if panels[0][0] == "proxy" else None
    top = max(d + [r["d"] for r in bon or []] + [1e-3])
    xs = [top * i / 100 for i in range(1, 101)]  # from above 0: the RL form has log d
    for ax, (key, label) in zip(axes, panels):
        dots = ax.scatter(d, [p[key] for p in points], c=steps, cmap="viridis", vmin=min(steps), vmax=max(steps),
                          s=22, zorder=3, label="RL (held-out)")
        if peak is not None:
            ax.scatter([peak["d"]], [peak[key]], s=110, facecolors="none", edgecolors="tab:red", zorder=4,
                       label="proxy peak")
        ax.set(xlabel="d = √KL(π ‖ π_sft)", ylabel=label, title=label)
        if key == "gold":
            if fit:
                ax.plot(xs, [fit["gold_at_d0"] + x * (fit["alpha"] - fit["beta"] * math.log(x)) for x in xs], ":",
                        color="tab:blue", label=f"RL fit d(α − β log d), R² = {fit['r2']:.2f}")
            if peak_d is not None:
                ax.axvline(peak_d, color="tab:blue", alpha=0.4, linestyle="-.", label=f"gold peak d = {peak_d:.2f}")
            if bon:
                ax.plot([r["d"] for r in bon], [r["gold"] for r in bon], "^", color="tab:green", label="best-of-n: gold")
                if bon_fit and bon_gold_n1 is not None:
                    ax.plot(xs, [bon_gold_n1 + x * (bon_fit["alpha"] - bon_fit["beta"] * x) for x in xs], ":",
                            color="tab:green", label="best-of-n fit d(α − βd)")
            ax.legend(fontsize="x-small")
    fig.colorbar(dots, ax=axes[-1], label="update")
    return _png(fig, dpi)


def gold_comparison(series: dict[str, list[tuple[float, float]]], finals: dict[str, float], dpi: int) -> bytes:
    """Left: gold reward of the training rollouts per rollout seen, one line per RL stage.
    Right: the eval protocol's gold reward of each policy stage."""
    fig, (left, right) = _panels(2, 4.2, 3.2)
    for name, pts in series.items():
        if pts:
            left.plot(*zip(*pts), label=name, linewidth=1)
    left.set(xlabel="rollouts", ylabel="gold reward", title="Gold reward while training")
    left.legend(fontsize="small")
    right.bar(list(finals), list(finals.values()), color="tab:green")
    for i, v in enumerate(finals.values()):
        right.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize="small")
    right.set(ylabel="gold reward (eval set, T = 1)", title="Gold reward after training")
    return _png(fig, dpi)


def search_accuracy(accuracy: dict[str, dict[str, float | None]], tokens: dict[str, dict[str, float]],
                    oracle: dict[str, float] | None, dpi: int) -> bytes:
    """Accuracy vs N (left) and vs tokens generated per prompt (right), one line per selection method."""
    fig, (left, right) = _panels(2, 4.2, 3.4)
    for method, by_n in accuracy.items():
        pts = sorted((int(n), v) for n, v in by_n.items() if v is not None)
        if not pts:
            continue
        left.plot(*zip(*pts), "o-", label=method, markersize=3)
        tok = [(tokens.get(method, {}).get(str(n)), v) for n, v in pts]
        tok = [(t, v) for t, v in tok if t is not None]
        if tok:
            right.plot(*zip(*tok), "o-", label=method, markersize=3)
    if oracle:
        left.plot(*zip(*sorted((int(n), v) for n, v in oracle.items())), "k:", label="oracle (pass@N)")
    left.set_xscale("log", base=2)
    left.set(xlabel="N", ylabel="accuracy", title="Selection accuracy vs N")
    right.set(xscale="log", xlabel="tokens generated per prompt", ylabel="accuracy", title="… vs compute")
    left.legend(fontsize="x-small")
    return _png(fig, dpi)
