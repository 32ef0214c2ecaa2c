"""Which rows a micro-batch trains on: the one seeded sampler every training stage draws from.

    batch_indices(n, batch_size, seed, step, micro, grad_accum, rank, world)                # epochs
    batch_indices(n, batch_size, seed, step, micro, rank=rank, world=world, replace=True)   # draws

The draw is a function of (seed, step, micro, rank) alone, so a resumed run draws what an
uninterrupted one would have, and under DDP the ranks split one global batch between them (N
processes see exactly the rows one process would). Two ways to draw:
  - epochs (default; rm, dpo): epoch after epoch of seeded shuffles of range(n), every row once per
    epoch; position g of the stream is row permutation(seed, g // n)[g % n];
  - replace (pretrain's windows, sft, prm): each (step, micro) draws batch_size x world rows
    uniformly with replacement, and rank r takes the r-th slice.
"""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, seed: int, step: int, micro: int = 0, grad_accum: int = 1, rank: int = 0,
                  world: int = 1, replace: bool = False) -> np.ndarray:
    """The (batch_size,) row indices into range(n) of one micro-batch (see the module docstring)."""
    if replace:
        g = np.random.default_rng([seed, step, micro])
        return g.integers(0, n, size=batch_size * world)[rank * batch_size : (rank + 1) * batch_size]
    start = ((step * grad_accum + micro) * world + rank) * batch_size
    return np.array([_permutation(n, seed, g // n)[g % n] for g in range(start, start + batch_size)], dtype=np.int64)
