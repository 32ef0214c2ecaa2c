"""Comparisons: reading them in the one ranking form, and the (better, worse) pairs a ranking implies.

    rows, counts = load_preferences("runs/tiny/prefs")      # or a file, or a feedback .sqlite
    ranking_pairs([2, 0, 1])                                # [(2, 0), (2, 1), (0, 1)]
    ranking_pairs([2, 0, 1], "best_worst")                  # [(2, 1)]
    pairs, identical = distinct_pairs(rows[0])              # less the pairs of identical responses

The reward model and DPO train on these pairs, the labeler (world/labeler.py) and the prefs stage
count them: one function, so they all mean the same pairs.
"""
from __future__ import annotations

from pathlib import Path

from ..common import UserError
from .feedback import read_feedback
from .formats import read_dataset, warn

PAIR_MODES = ("all", "best_vs_rest", "best_worst")


def ranking_pairs(ranking: list[int], mode: str = "all") -> list[tuple[int, int]]:
    """(better, worse) response pairs of a ranking (best first): all K(K-1)/2 (InstructGPT), the
    best against each other one, or only the best against the worst (one pair, as UltraFeedback's
    binarised sets keep)."""
    if mode == "all":
        return [(ranking[i], ranking[j]) for i in range(len(ranking)) for j in range(i + 1, len(ranking))]
    if mode == "best_vs_rest":
        return [(ranking[0], other) for other in ranking[1:]]
    if mode == "best_worst":
        return [(ranking[0], ranking[-1])]
    raise ValueError(f"pairs: expected one of {', '.join(PAIR_MODES)}, got {mode!r}")


def distinct_pairs(row: dict, mode: str = "all") -> tuple[list[tuple[int, int]], int]:
    """A ranking row's pairs (`ranking_pairs`) less those of identical responses (same text and same
    `ended`), which carry no preference -> (pairs, how many were identical)."""
    ended = row.get("ended") or [True] * len(row["responses"])
    key = [(r, e) for r, e in zip(row["responses"], ended)]
    pairs = ranking_pairs(row["ranking"], mode)
    kept = [(w, lo) for w, lo in pairs if key[w] != key[lo]]
    return kept, len(pairs) - len(kept)


def load_preferences(path: str | Path, skip_bad_rows: bool = False) -> tuple[list[dict], dict]:
    """Comparisons from a file (TRL prompt/chosen/rejected, hh-rlhf, K-wise ranking JSONL), a
    RUN/prefs directory or a `gptstack serve` feedback .sqlite -> (rows, counts for summary.json).

    Every row comes out in the ranking form: {"prompt": [messages ending with the user turn],
    "responses": [K strings], "ranking": [indices, best first]} plus, where known, "ended" and
    "gold" (one per response). A pair (chosen, rejected) is the ranking [0, 1] of [chosen, rejected].
    """
    path = Path(path)
    if path.suffix in (".sqlite", ".db"):
        return read_feedback(path)
    if path.is_dir():
        if not (path / "prefs.jsonl").exists():
            raise UserError(f"{path}: no prefs.jsonl here (expected the output of `gptstack prefs`)")
        path = path / "prefs.jsonl"
    ds = read_dataset(path, expect=("preference", "ranking"), skip_bad_rows=skip_bad_rows)
    if ds.n_skipped:
        warn(ds.describe())
    if ds.kind == "ranking":
        rows = ds.rows
    else:
        rows = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]], "ranking": [0, 1]} for r in ds.rows]
    if not rows:
        raise UserError(f"{path}: no usable comparison ({ds.describe()})")
    return rows, ds.summary()
