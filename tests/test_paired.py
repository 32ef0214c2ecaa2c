"""The paired comparison of two policies on the same eval prompts (eval/stats.py: paired_comparison):
hand-counted b and c, McNemar's exact p worked out by hand, Newcombe's method-10 interval recomputed
step by step from its formula, and the properties any such interval must have."""
from __future__ import annotations

import math
import random

import pytest

from gptstack.eval.stats import paired_comparison

Z = 1.959964


def table(both: int, b: int, c: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Two answer lists with the given 2x2 table: both right, only A right (b), only B right (c), neither."""
    a_correct = [True] * both + [True] * b + [False] * c + [False] * neither
    b_correct = [True] * both + [False] * b + [True] * c + [False] * neither
    return a_correct, b_correct


def test_counts_difference_and_mcnemar_p_by_hand():
    # A right on 8 of 10, B on 4 of 10; they disagree on 6: A alone 5 times, B alone once
    a_correct, b_correct = table(both=3, b=5, c=1, neither=1)
    r = paired_comparison(a_correct, b_correct)
    assert (r["n"], r["b"], r["c"]) == (10, 5, 1)
    assert r["difference"] == pytest.approx(0.8 - 0.4)
    # exact McNemar: 2 * P(X <= 1), X ~ Bin(6, 1/2) = 2 * (1 + 6) / 64 = 14 / 64
    assert r["p_mcnemar"] == pytest.approx(0.21875, abs=1e-15)
    # the order of the prompts does not matter, only the pairing
    order = list(range(10))
    random.Random(0).shuffle(order)
    assert paired_comparison([a_correct[i] for i in order], [b_correct[i] for i in order]) == r


def test_more_mcnemar_p_by_hand():
    # b = 6, c = 16: 2 * sum_{k<=6} C(22, k) / 2^22 = 2 * (1 + 22 + 231 + 1540 + 7315 + 26334 + 74613) / 4194304
    assert paired_comparison(*table(59, 6, 16, 80))["p_mcnemar"] == pytest.approx(2 * 110056 / 4194304, abs=1e-15)
    # b = 5, c = 0: 2 / 32; b = c: the split is as even as it gets, p = 1
    assert paired_comparison(*table(0, 5, 0, 0))["p_mcnemar"] == pytest.approx(0.0625, abs=1e-15)
    assert paired_comparison(*table(2, 4, 4, 2))["p_mcnemar"] == 1.0


def test_identical_answers_differ_by_zero_with_p_one():
    answers = [True, False, True, True, False, False, True]
    r = paired_comparison(answers, list(answers))
    assert (r["b"], r["c"], r["difference"], r["p_mcnemar"]) == (0, 0, 0.0, 1.0)
    lo, hi = r["ci95"]
    assert -1 <= lo < 0 < hi <= 1


def wilson(x: int, n: int) -> tuple[float, float]:
    """The Wilson score interval, written out here again so the test does not lean on the code under test."""
    p = x / n
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z / (1 + Z**2 / n) * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2))
    return centre - half, centre + half


def test_newcombe_interval_by_hand_negative_correlation():
    # both = 3, b = 5, c = 1, neither = 1, n = 10: p1 = 8/10, p2 = 4/10, difference 0.4
    l1, u1 = wilson(8, 10)   # 0.49016, 0.94332
    l2, u2 = wilson(4, 10)   # 0.16818, 0.68733
    assert (l1, u1, l2, u2) == pytest.approx((0.49016, 0.94332, 0.16818, 0.68733), abs=1e-5)
    # phi: both * neither - b * c = 3 - 5 = -2 < 0, so uncorrected: -2 / sqrt(8 * 2 * 4 * 6) = -2 / sqrt(384)
    phi = -2 / math.sqrt(384)
    lo = 0.4 - math.sqrt((0.8 - l1) ** 2 - 2 * phi * (0.8 - l1) * (u2 - 0.4) + (u2 - 0.4) ** 2)
    hi = 0.4 + math.sqrt((u1 - 0.8) ** 2 - 2 * phi * (u1 - 0.8) * (0.4 - l2) + (0.4 - l2) ** 2)
    assert (lo, hi) == pytest.approx((-0.04354, 0.68471), abs=1e-5)
    assert paired_comparison(*table(3, 5, 1, 1))["ci95"] == pytest.approx([lo, hi], abs=1e-12)


def test_newcombe_interval_by_hand_corrected_positive_correlation():
    # Cavo et al. 2012 (the paired example of Fagerland, Lydersen & Laake): both = 59, b = 6, c = 16,
    # neither = 80, n = 161; p1 = 65/161, p2 = 75/161
    n, p1, p2 = 161, 65 / 161, 75 / 161
    l1, u1 = wilson(65, n)
    l2, u2 = wilson(75, n)
    # both * neither - b * c = 4720 - 96 = 4624 > n / 2, so phi takes Newcombe's correction of n / 2:
    # (4624 - 80.5) / sqrt(65 * 96 * 75 * 86)
    phi = (4624 - 80.5) / math.sqrt(65 * 96 * 75 * 86)
    assert phi == pytest.approx(0.71617, abs=1e-5)
    d = (6 - 16) / n
    lo = d - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    assert (d, lo, hi) == pytest.approx((-0.06211, -0.11862, -0.00463), abs=1e-5)
    r = paired_comparison(*table(59, 6, 16, 80))
    assert r["difference"] == pytest.approx(d)
    assert r["ci95"] == pytest.approx([lo, hi], abs=1e-12)
    # 0 <= cross <= n / 2: phi is 0, and the interval is the square-and-add one of independent proportions;
    # both = 2, b = 3, c = 1, neither = 4: cross = 8 - 3 = 5 = n / 2, p1 = 5/10, p2 = 3/10
    a_correct, b_correct = table(2, 3, 1, 4)
    (l1, u1), (l2, u2) = wilson(5, 10), wilson(3, 10)
    expect = [0.2 - math.hypot(0.5 - l1, u2 - 0.3), 0.2 + math.hypot(u1 - 0.5, 0.3 - l2)]
    assert paired_comparison(a_correct, b_correct)["ci95"] == pytest.approx(expect, abs=1e-12)


def test_interval_properties_on_random_pairs():
    rng = random.Random(1234)
    for _ in range(300):
        n = rng.randint(1, 60)
        a_correct = [rng.random() < rng.random() for _ in range(n)]
        b_correct = [x if rng.random() < 0.7 else not x for x in a_correct]
        r = paired_comparison(a_correct, b_correct)
        lo, hi = r["ci95"]
        assert -1 <= lo <= r["difference"] <= hi <= 1
        assert r["difference"] == pytest.approx(sum(a_correct) / n - sum(b_correct) / n)
        assert 0 < r["p_mcnemar"] <= 1
        swapped = paired_comparison(b_correct, a_correct)   # B vs A: the mirror image
        assert (swapped["b"], swapped["c"], swapped["p_mcnemar"]) == (r["c"], r["b"], r["p_mcnemar"])
        assert swapped["ci95"] == pytest.approx([-hi, -lo], abs=1e-12)


def test_extremes_stay_inside_minus_one_one():
    r = paired_comparison([True] * 5, [False] * 5)
    assert r["difference"] == 1.0 and 0 < r["ci95"][0] < r["ci95"][1] <= 1.0
    r = paired_comparison([False] * 5, [True] * 5)
    assert r["difference"] == -1.0 and -1.0 <= r["ci95"][0] < r["ci95"][1] < 0


def test_unpaired_input_is_refused():
    with pytest.raises(ValueError, match="same prompts"):
        paired_comparison([True, False], [True])
    with pytest.raises(ValueError, match="no prompts"):
        paired_comparison([], [])
