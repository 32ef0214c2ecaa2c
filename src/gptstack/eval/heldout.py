"""Held-out measurements during RL: the points of the over-optimization curve (Gao et al. 2023).

At each evaluation the policy samples at T = 1 on a fixed spread of the world's eval prompts, and a
point records its KL to the reference, d = sqrt(KL), the gold reward, accuracy, the proxy (RM)
score and what the responses are like; eval/fits.py fits gold against d.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .. import world
from ..engine.rollout import rollout, token_logprobs
from ..model.heads import ScalarModel
from ..tokenizer import Tokenizer
from .problems import Problem, world_problems
from .rewards import gold_and_hacks, response_texts

if TYPE_CHECKING:
    from ..config import RLConfig


def heldout_items(world_config: world.WorldConfig, n: int) -> list[Problem]:
    """`n` prompts of the world's eval set, spread evenly over it (all families)."""
    tasks = world.eval_set(world_config)
    return world_problems([tasks[(i * len(tasks)) // n] for i in range(min(n, len(tasks)))])


def _sample(policy, prompts: list[list[dict]], tok: Tokenizer, tc: "RLConfig", seed: int):
    """T = 1 samples of the policy on `prompts` (tc.eval_samples each)."""
    policy.eval()
    return rollout(policy, [tok.render_prompt(m) for m in prompts], tc.eval_samples, tc.max_new_tokens,
                   temperature=1.0, stop_ids=tok.turn_end_ids, seed=seed, truncate=True)


def _kl(policy, ref, batch) -> float:
    """Mean KL(pi || pi_ref) of the sampled responses (summed over their tokens)."""
    return (token_logprobs(policy, batch)[0] - token_logprobs(ref, batch)[0]).sum(1).mean().item()


@torch.no_grad()
def heldout_point(policy, ref, rm: ScalarModel | None, items: list[Problem], tok: Tokenizer, tc: "RLConfig",
                  seed: int) -> dict:
    """Proxy (RM) and gold reward, accuracy and KL(pi || pi_ref) of T = 1 samples on held-out prompts."""
    batch = _sample(policy, [it.messages for it in items], tok, tc, seed)
    kl = _kl(policy, ref, batch)
    texts = response_texts(tok, batch)
    extra = gold_and_hacks(items, batch, texts)
    point = {"kl": kl, "d": math.sqrt(max(kl, 0.0)), "gold": extra["gold"].mean().item(),
             "accuracy": extra["correct"].mean().item(), **world.describe(texts)}
    if rm is not None:
        scores = rm.score(batch.ids, pad_mask=batch.pad_mask)
        point["proxy"] = scores.mean().item()
    # a few responses as they read at this point (the report shows them at the proxy's peak)
    point["samples"] = [{"prompt": items[batch.prompt_index[i]].messages[-1]["content"], "response": texts[i],
                         "gold": float(extra["gold"][i]), **({"proxy": float(scores[i])} if rm is not None else {})}
                        for i in range(0, len(texts), max(1, len(texts) // 4))][:4]
    return point


@torch.no_grad()
def file_point(policy, ref, rm: ScalarModel | None, prompts: list[list[dict]], tok: Tokenizer, tc: "RLConfig",
               seed: int) -> dict:
    """On held-out prompts of a user's file, where there is no gold: the RM's score of the policy's T = 1
    samples beside the reference's (SFT's) on the same prompts and seed, and the KL between them."""
    batch = _sample(policy, prompts, tok, tc, seed)
    out = {"eval/kl_to_sft": _kl(policy, ref, batch), "eval/heldout_prompts": len(prompts)}
    if rm is not None:
        ref_batch = _sample(ref, prompts, tok, tc, seed)
        out["eval/proxy_score"] = rm.score(batch.ids, pad_mask=batch.pad_mask).mean().item()
        out["eval/sft_proxy_score"] = rm.score(ref_batch.ids, pad_mask=ref_batch.pad_mask).mean().item()
    return out
