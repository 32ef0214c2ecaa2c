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
