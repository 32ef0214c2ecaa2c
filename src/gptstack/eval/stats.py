"""Every statistic the stages and the report card compute, in one place.

  wilson_interval      95 % interval of a binomial proportion (accuracies)
  paired_comparison    two policies graded on the same prompts: Newcombe's interval, McNemar's test
  auroc                P(a positive scores above a negative), ties one half
  within_group_auroc   the same over pairs of one group only (one prompt's responses)
  rankdata, spearman   average ranks and Spearman's rank correlation
  preference_metrics   a reward model's held-out figures against labels, gold and right answers
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..data.comparisons import distinct_pairs


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> list[float]:
    """95 % Wilson score interval for a binomial proportion (sound near 0 and 1, unlike p ± 2σ)."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def paired_comparison(a_correct: list[bool], b_correct: list[bool]) -> dict:
    """Two policies graded on the same prompts (a_correct[i], b_correct[i]: prompt i): the paired test,
    stronger than two independent Wilson intervals because it looks only where the policies disagree.

    b = prompts A gets right and B wrong, c = the reverse, n = prompts. Returns {"n", "b", "c",
    "difference": (b - c) / n (= accuracy A - accuracy B), "ci95": [lo, hi], "p_mcnemar"}.

    The interval is Newcombe's method 10 (Newcombe 1998, Stat. Med. 17:2635, "square and add"): the
    Wilson intervals [l1, u1] of p1 = accuracy A and [l2, u2] of p2 = accuracy B, combined with the
    correlation phi of the 2x2 table (r = both right, b, c, s = both wrong; the margins' product
    M = (r + b)(c + s)(r + c)(b + s)), with d = (b - c) / n:
        lo = d - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        hi = d + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)
    phi = (rs - bc - n/2) / sqrt(M) when rs - bc > n/2, 0 when 0 <= rs - bc <= n/2, (rs - bc) / sqrt(M)
    when rs - bc < 0, and 0 when M = 0 (as Newcombe, and Altman et al., Statistics with Confidence,
    2000). p_mcnemar: McNemar's exact two-sided test, the binomial probability of a split of the
    b + c discordant prompts at least as uneven as b : c at 1/2 (1 when b + c = 0)."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired_comparison: {len(a_correct)} and {len(b_correct)} answers; pairs need the same prompts")
    n = len(a_correct)
    if n == 0:
        raise ValueError("paired_comparison: no prompts")
    both = sum(1 for x, y in zip(a_correct, b_correct) if x and y)
    b = sum(1 for x, y in zip(a_correct, b_correct) if x and not y)
    c = sum(1 for x, y in zip(a_correct, b_correct) if y and not x)
    neither = n - both - b - c
    p1, p2 = (both + b) / n, (both + c) / n
    (l1, u1), (l2, u2) = wilson_interval(both + b, n), wilson_interval(both + c, n)
    margins = (both + b) * (c + neither) * (both + c) * (b + neither)
    cross = both * neither - b * c
    phi = 0.0
    if margins:
        phi = (cross - n / 2 if cross > n / 2 else min(cross, 0)) / math.sqrt(margins)
    d = (b - c) / n
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    m = b + c
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1))
    return {"n": n, "b": b, "c": c, "difference": d, "ci95": [max(-1.0, lo), min(1.0, hi)],
            "p_mcnemar": min(1.0, 2 * tail / 2 ** m)}


def auroc(scores: Sequence[float], labels: Sequence[float]) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting one half
    (the Mann-Whitney U statistic over average ranks). None without both classes."""
    y = np.asarray(labels) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return None
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over runs of equal scores
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def within_group_auroc(scores: Sequence[float], labels: Sequence[float], groups: Sequence[object]) -> float | None:
    """AUROC over (positive, negative) pairs of the same group only: how well a verifier ranks right
    above wrong responses to one prompt, which is what best-of-N needs (an AUROC over all pairs
    also rewards telling easy prompts from hard ones). None without such a pair."""
    by: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    wins = pairs = 0.0
    for rows in by.values():
        pos = [scores[i] for i in rows if labels[i] > 0.5]
        neg = [scores[i] for i in rows if labels[i] <= 0.5]
        for a in pos:
            for b in neg:
                wins += (a > b) + 0.5 * (a == b)
        pairs += len(pos) * len(neg)
    return wins / pairs if pairs else None


def rankdata(x: list[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (as scipy.stats.rankdata)."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(1, len(a) + 1)
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's r of the average ranks); None when either is constant."""
    rx, ry = rankdata(x), rankdata(y)
    if len(x) < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def preference_metrics(rows: list[dict], scores: list[list[float]], correct: list[list[bool] | None]) -> dict:
    """The held-out figures of the RM stage (stages/rm.py) from rows (responses, ranking, optional
    "gold"), the RM's scores per row, and per row which responses are right (None: not a world prompt)."""
    agree = pairs = 0.0
    labeler_hits = labeler_pairs = rm_gold_hits = 0.0
    cvw_hits = cvw_pairs = 0.0
    all_scores, all_gold = [], []
    for row, s, ok in zip(rows, scores, correct):
        kept, _ = distinct_pairs(row)
        gold = row.get("gold")
        for w, lo in kept:
            pairs += 1
            agree += 1.0 if s[w] > s[lo] else 0.5 if s[w] == s[lo] else 0.0
            if gold is not None and gold[w] != gold[lo]:
                labeler_pairs += 1
                labeler_hits += gold[w] > gold[lo]
                better, worse = (w, lo) if gold[w] > gold[lo] else (lo, w)
                rm_gold_hits += 1.0 if s[better] > s[worse] else 0.5 if s[better] == s[worse] else 0.0
        if ok is not None:
            for i in range(len(s)):
                for j in range(i + 1, len(s)):
                    if ok[i] != ok[j]:
                        right, wrong = (i, j) if ok[i] else (j, i)
                        cvw_pairs += 1
                        cvw_hits += 1.0 if s[right] > s[wrong] else 0.5 if s[right] == s[wrong] else 0.0
        if gold is not None:
            all_scores += s
            all_gold += gold
    out = {"eval/accuracy": agree / pairs if pairs else None, "eval/pairs": int(pairs),
           # pairs taken as independent (they are not within a K-wise prompt: read it as a rough guide)
           "eval/accuracy_ci95": wilson_interval(agree, int(pairs))}
    # with world prompts the ground-truth keys are always there (null when no pair qualifies), so
    # summary.json keeps DESIGN.md's keys even on a tiny held-out set
    world_rows = any(ok is not None for ok in correct) or bool(all_gold)
    if cvw_pairs or world_rows:
        out["eval/correct_vs_wrong_accuracy"] = cvw_hits / cvw_pairs if cvw_pairs else None
        out["eval/correct_vs_wrong_pairs"] = int(cvw_pairs)
    if all_gold:
        out["eval/gold_spearman"] = spearman(all_scores, all_gold)
    if labeler_pairs or world_rows:
        out["eval/labeler_gold_agreement"] = labeler_hits / labeler_pairs if labeler_pairs else None
        out["eval/gold_pair_accuracy"] = rm_gold_hits / labeler_pairs if labeler_pairs else None
        out["eval/gold_differs_pairs"] = int(labeler_pairs)
    return out


def pick_best(scores: np.ndarray, n: int) -> np.ndarray:
    """Best-of-n selection: (P, N) scores -> (P, N // n) index of the argmax in each disjoint
    consecutive block of n (the first on a tie). Blocks of one draw nest, so a larger n can only
    pick a response the scorer likes at least as much."""
    P, N = scores.shape
    blocks = scores[:, : (N // n) * n].reshape(P, N // n, n)
    return blocks.argmax(axis=2) + np.arange(N // n)[None, :] * n
