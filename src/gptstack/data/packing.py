"""Packing sequences of unequal length into few rows, so a batch carries little padding.

    bins = first_fit_decreasing([len(s) for s in seqs], capacity=256)   # lists of indices into seqs

SFT packs conversations (stages/sft.py) and RL packs prompt + response rows for its training
forwards (engine/rollout.py); the model keeps every packed sequence to itself (GPT `segments`:
attention and RoPE positions restart per sequence), so outputs equal those of the padded batch.
"""
from __future__ import annotations

from collections.abc import Sequence


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose lengths sum to at most `capacity` (a length
    above it gets a bin of its own). Longest first, each into the first bin with room: within
    11/9 of the fewest bins plus one (Johnson 1973), deterministic (ties keep their order)."""
    bins: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        k = next((b for b, used in enumerate(fill) if used + n <= capacity), None)
        if k is None:
            bins.append([])
            fill.append(0)
            k = len(bins) - 1
        bins[k].append(i)
        fill[k] += n
    return bins


def attention_pair_cost(n_embd: int) -> float:
    """What one attention pair costs in a training step, relative to one position's matmuls: a pair
    is ~n_embd multiply-adds, a position ~12 n_embd^2, so ~1 / (10 n_embd) once attention's lower
    efficiency is counted (the constant fitted on padded vs packed step times of the 1.2 M bench
    model, bench/RESULTS.md)."""
    return 1.0 / (10 * n_embd)


def cheapest_packing(lengths: Sequence[int], max_capacity: int, pair_cost: float) -> list[list[int]]:
    """First-fit-decreasing bins at the capacity, from the longest length (no row longer than
    needed) up to `max_capacity`, whose rows cost least when every row is padded to the longest:
    rows x L x (1 + pair_cost x L). The L^2 term is attention, which a packed row computes over
    all its L x L pairs (a block-diagonal mask skips nothing): packing many short sequences into
    long rows trades padding for attention, and one prompt's group of equal-length samples (GRPO)
    is cheapest unpacked."""
    longest = max(lengths)
    top = max(max_capacity, longest)
    best_cost, best = float("inf"), []
    for capacity in sorted({*range(longest, top + 1, max(1, longest // 2)), top}):
        bins = first_fit_decreasing(lengths, capacity)
        L = max(sum(lengths[i] for i in b) for b in bins)
        cost = len(bins) * L * (1 + pair_cost * L)
        if cost < best_cost:
            best_cost, best = cost, bins
    return best
