"""What an RL stage's rollouts score: the reward it trains on, and what the world's gold says of them.

    rewarder = Rewarder("rm", rm)        # or "gold", "answer", or fn(prompts, responses) -> scores
    texts = response_texts(tok, batch)
    extra = gold_and_hacks(items, batch, texts)      # gold, correct, repetition (world prompts), length
    scores = rewarder(items, batch, texts, extra)

`items` are the prompts the rollouts answer, indexed by batch.prompt_index: anything with
`messages`, `task` (world prompts) and `answer` (verifiable files), as train/sources.py's Items
and eval/problems.py's Problems have.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import world
from ..data.formats import check_answer
from ..engine.rollout import Batch
from ..model.heads import ScalarModel
from ..tokenizer import Tokenizer


def response_texts(tok: Tokenizer, batch: Batch) -> list[str]:
    """Each rollout's response as text, without its <|assistant_end|>."""
    return [tok.decode(r[:-1] if done else r) for r, done in zip(batch.responses, batch.finished.tolist())]


def gold_and_hacks(items: Sequence, batch: Batch, texts: list[str]) -> dict[str, torch.Tensor]:
    """Per rollout: gold reward and correctness (world prompts), repetition and length."""
    ended = batch.finished.tolist()
    out = {"length": batch.mask.sum(1)}
    tasks = [items[i].task for i in batch.prompt_index]
    if all(t is not None for t in tasks):
        scores = [world.score(t, text, e) for t, text, e in zip(tasks, texts, ended)]
        out["gold"] = torch.tensor([s.score for s in scores])
        out["correct"] = torch.tensor([float(s.correct) for s in scores])
        out["repetition"] = torch.tensor([s.repetition for s in scores])
    return out


class Rewarder:
    """The score of each rollout: the reward model ("rm"), the world's gold reward ("gold"), a
    verifiable answer check ("answer": 1 if the final answer matches, for GSM8K-format files), or a
    Python function fn(prompts, responses) -> scores (TRL's reward functions; library use, tests)."""

    def __init__(self, kind, rm: ScalarModel | None = None):
        self.kind, self.rm = kind, rm

    @torch.no_grad()
    def __call__(self, items: Sequence, batch: Batch, texts: list[str], extra: dict) -> torch.Tensor:
        if callable(self.kind):
            prompts = [items[i].messages[-1]["content"] for i in batch.prompt_index]
            return torch.tensor([float(x) for x in self.kind(prompts, texts)])
        if self.kind == "rm":
            return self.rm.score(batch.ids, pad_mask=batch.pad_mask)
        if self.kind == "gold":
            return extra["gold"]
        return torch.tensor([float(check_answer(t, items[i].answer)) for i, t in zip(batch.prompt_index, texts)])
