"""Held-out figures of a process RM and an outcome RM trained on the same responses (stages/prm.py).

Each example is one response: `ids` (prompt + response, rendered), `ends` (per step, where the PRM
reads it), `labels` (per step, 1 = right so far), `outcome` (the final answer's correctness) and
`prompt` (a key: responses to one prompt are compared with each other).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from ..engine.scoring import aggregate, head_logits
from ..model.heads import ScalarModel
from .stats import auroc, within_group_auroc


def verifier_figures(prm: ScalarModel, orm: ScalarModel, examples: Sequence, batch_size: int) -> dict:
    """Held-out figures: the PRM's step accuracy and AUROC against the step labels, how well each
    verifier ranks right above wrong responses (AUROC against the outcome, over all pairs and over
    pairs of responses to the same prompt), and best-of-k: the
    share of held-out prompts whose top-scored response (of the k sampled) is right, beside
    pass@k (some response is right) and `eval/outcome_mean` (a random pick)."""
    if not examples:
        return {}
    prm.eval()
    orm.eval()
    seqs = [ex.ids.tolist() for ex in examples]
    step_probs = [[1 / (1 + math.exp(-v)) for v in vals]
                  for vals in head_logits(prm, seqs, [ex.ends for ex in examples], batch_size)]
    orm_scores = [vals[0] for vals in head_logits(orm, seqs, [[len(s) - 1] for s in seqs], batch_size)]
    prm_scores = [aggregate(ps, "min") for ps in step_probs]
    # what best-of-N needs: among one prompt's responses, is the top-scored one right?
    by_prompt: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_prompt.setdefault(ex.prompt, []).append(i)
    flat_p = [p for ps in step_probs for p in ps]
    flat_y = [y for ex in examples for y in ex.labels]
    outcomes = [ex.outcome for ex in examples]
    figures = {
        "eval/responses": len(examples),
        "eval/steps": len(flat_y),
        "eval/outcome_mean": sum(outcomes) / len(outcomes),
        "prm/eval/step_accuracy": sum((p > 0.5) == (y > 0.5) for p, y in zip(flat_p, flat_y)) / len(flat_y),
        "prm/eval/step_auroc": auroc(flat_p, flat_y),
        "prm/eval/outcome_auroc": auroc(prm_scores, outcomes),
        "prm/eval/outcome_auroc_product": auroc([aggregate(ps, "product") for ps in step_probs], outcomes),
        "orm/eval/outcome_auroc": auroc(orm_scores, outcomes),
        "prm/eval/within_prompt_auroc": within_group_auroc(prm_scores, outcomes, [ex.prompt for ex in examples]),
        "orm/eval/within_prompt_auroc": within_group_auroc(orm_scores, outcomes, [ex.prompt for ex in examples]),
        "orm/eval/outcome_accuracy": sum((s > 0) == (y > 0.5) for s, y in zip(orm_scores, outcomes)) / len(outcomes),
        "eval/prompts": len(by_prompt),
        "eval/pass@k": sum(any(outcomes[i] > 0.5 for i in rows) for rows in by_prompt.values()) / len(by_prompt),
        "prm/eval/best_of_k": sum(outcomes[max(rows, key=lambda i: prm_scores[i])] > 0.5
                                  for rows in by_prompt.values()) / len(by_prompt),
        "orm/eval/best_of_k": sum(outcomes[max(rows, key=lambda i: orm_scores[i])] > 0.5
                                  for rows in by_prompt.values()) / len(by_prompt),
    }
    return {k: v for k, v in figures.items() if v is not None}
