"""The simulated labeler: ranks K responses the way a noisy, mildly biased human would.

Each response gets a utility

    u = gold(task, response) + length_bias * log2(words) + style_bias[style_of(response)]
        + position_bias * (K-1-i)/(K-1)

(i = the position it was shown in) and the ranking is drawn from the Plackett-Luce model with
weights exp(u / tau), by sorting u/tau + Gumbel noise. The Gumbel trick makes every pair's order
an exact Bradley-Terry draw, whatever K is:

    P(a ranked above b) = sigmoid((u(a) - u(b)) / tau)

(the difference of two Gumbel variables is logistic), so with no biases the labeler agrees with
gold on a pair with probability sigmoid(|gold(a) - gold(b)| / tau). tau = 0 is a noiseless
labeler that sorts by utility (ties keep the shown order).

Defaults (WorldConfig): tau = 0.35, length_bias = 0.3 per doubling of length, and a style taste
of +0.1 for "thorough-looking" checked answers and +0.1 for friendly chatty ones. With gold's scale
(right answer +0.8, format and brevity 0.1 each), a right answer beats an equally long wrong one
sigmoid(0.8/0.35) = 91% of the time; among equally good answers, one twice as long is preferred
sigmoid(0.3/0.35) = 70% of the time although gold prefers the shorter one, and a wrong answer four
times as long as a right terse one ties with it (0.6 of length against 0.8 - 0.2 of gold). Real
preference data has these tastes (Singhal et al. 2023: 70-90 % of PPO's reward gain came from
length); they are the flaw a reward model learns and RL then amplifies.

Usage:
    labeler = Labeler.from_config(config)
    ranking = labeler.rank(task, responses, rng)            # indices, best first
    j = labeler.judge(task, responses, rng)                  # ranking + gold + utilities
    pairs = ranking_pairs(ranking)       # (better, worse) index pairs: gptstack.data.comparisons
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .gold import gold as gold_reward
from .styles import STYLES, style_of, words
from .tasks import WorldConfig, as_task


@dataclass(frozen=True)
class Judgement:
    ranking: list[int]          # indices into the responses, best first
    gold: list[float]           # gold reward of each response (in the order given)
    utility: list[float]        # what the labeler actually ranked by (gold + biases)


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class Labeler:
    def __init__(self, tau: float = 0.35, length_bias: float = 0.3, position_bias: float = 0.0,
                 style_bias: dict[str, float] | list[float] | None = None):
        if tau < 0:
            raise ValueError(f"tau: expected >= 0, got {tau}")
        self.tau, self.length_bias, self.position_bias = float(tau), float(length_bias), float(position_bias)
        if style_bias is None:
            style_bias = [0.0] * len(STYLES)
        if not isinstance(style_bias, dict):
            style_bias = dict(zip(STYLES, style_bias))
        self.style_bias = {s: float(style_bias.get(s, 0.0)) for s in STYLES}

    @classmethod
    def from_config(cls, config: WorldConfig | None = None) -> "Labeler":
        config = (config or WorldConfig()).validate()
        return cls(config.labeler_tau, config.labeler_length_bias, config.labeler_position_bias,
                   config.labeler_style_bias)

    def utilities(self, task, responses: list[str], golds: list[float] | None = None,
                  ended: list[bool] | None = None) -> tuple[list[float], list[float]]:
        """(gold, utility) per response."""
        task = as_task(task)
        k = len(responses)
        if golds is None:
            ended = ended or [True] * k
            golds = [gold_reward(task, r, e) for r, e in zip(responses, ended)]
        utils = []
        for i, (r, g) in enumerate(zip(responses, golds)):
            u = g + self.length_bias * math.log2(max(1, words(r))) + self.style_bias.get(style_of(r), 0.0)
            if k > 1:
                u += self.position_bias * (k - 1 - i) / (k - 1)
            utils.append(u)
        return list(golds), utils

    def judge(self, task, responses: list[str], rng: random.Random | int,
              golds: list[float] | None = None, ended: list[bool] | None = None) -> Judgement:
        """Rank `responses` (shown in this order) to `task`; `rng` is a random.Random or a seed.

        `golds` may be passed when already computed (they are not recomputed then).
        """
        if not isinstance(rng, random.Random):
            rng = random.Random(rng)
        golds, utils = self.utilities(task, responses, golds, ended)
        if self.tau == 0:
            keys = utils
        else:
            # u/tau + Gumbel(0, 1): sorting these draws a Plackett-Luce ranking.
            keys = [u / self.tau - math.log(-math.log(max(rng.random(), 1e-300))) for u in utils]
        ranking = sorted(range(len(responses)), key=lambda i: (-keys[i], i))
        return Judgement(ranking, golds, utils)

    def rank(self, task, responses: list[str], rng: random.Random | int, ended: list[bool] | None = None) -> list[int]:
        """Indices of `responses`, best first, as this labeler would rank them."""
        return self.judge(task, responses, rng, ended=ended).ranking

    def prob_prefers(self, task, a: str, b: str) -> float:
        """P(a ranked above b) when a is shown first and b second, under this labeler's model."""
        _, (ua, ub) = self.utilities(task, [a, b])
        if self.tau == 0:
            return 1.0 if ua >= ub else 0.0
        return sigmoid((ua - ub) / self.tau)


