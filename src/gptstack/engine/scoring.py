"""Reading responses with a scalar head: how a reward model, a PRM or an ORM sees a response.

Reward model (stages/rm.py trains it, bon scores its samples with it): a response's score is the
head's output at the last real token of prompt + response, rendered with the chat template exactly
as the policy sees it (`render_for_rm`).

Process RM (stages/prm.py trains it; search scores with it): a response's steps are its lines, and
the PRM reads one logit per step at the step's last token: its "\\n", or <|assistant_end|> for the
final step of a response that ended (`render_steps`); a response's score aggregates its steps'
probabilities (`aggregate`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model.heads import ScalarModel, score_ids
from ..tokenizer import Tokenizer
from .rollout import sequence_logprobs

AGGREGATIONS = ("min", "product")


# --- reward model --------------------------------------------------------------------------------


def render_for_rm(tok: Tokenizer, prompt, response, ended: bool, block_size: int) -> list[int]:
    """prompt (messages, or already rendered ids ending in <|assistant_start|>) + response (text or
    ids) + the turn's end token (`tok.turn_end_ids[0]`: <|assistant_end|>) when the response ended;
    longer than the context: its last block_size tokens (the prompt's oldest go; the score is read
    at the end)."""
    p = tok.render_prompt(prompt) if prompt and isinstance(prompt[0], dict) else list(prompt)
    r = tok.encode(response) if isinstance(response, str) else list(response)
    seq = p + r + ([tok.turn_end_ids[0]] if ended else [])
    return seq[-block_size:]


def score_texts(rm: ScalarModel, tokenizer: Tokenizer, prompts: list, responses: list, ended: list[bool] | None = None,
                batch_size: int = 64) -> list[float]:
    """The reward of each (prompt, response), rendered exactly as the RM was trained (`render_for_rm`).
    prompts: message lists or rendered prompt ids; responses: text (re-encoded) or token ids
    (without the end token: `ended` says whether to append it; default all ended)."""
    ended = [True] * len(responses) if ended is None else ended
    block = rm.config.block_size
    seqs = [render_for_rm(tokenizer, p, r, e, block) for p, r, e in zip(prompts, responses, ended)]
    return score_ids(rm, seqs, batch_size)


@torch.inference_mode()
def likelihood_scores(policy, tok: Tokenizer, rows: list[dict]) -> list[list[float]]:
    """Per response of each ranking row, the policy's mean log-probability per token: a
    discriminator with no training at all (the generator's own knowledge), to read an RM's
    figures against."""
    prompts, responses, shape = [], [], []
    for row in rows:
        ended = row.get("ended") or [True] * len(row["responses"])
        p = tok.render_prompt(row["prompt"])
        for r, e in zip(row["responses"], ended):
            prompts.append(p)
            responses.append(tok.encode(r) + ([tok.turn_end_ids[0]] if e else []))
        shape.append(len(row["responses"]))
    flat = [lp / max(len(r), 1) for lp, r in zip(sequence_logprobs(policy.eval(), prompts, responses), responses)]
    out, k = [], 0
    for n in shape:
        out.append(flat[k : k + n])
        k += n
    return out


# --- process reward model --------------------------------------------------------------------


def response_steps(text: str) -> tuple[list[str], bool]:
    """A response's steps (its non-empty lines, stripped) and whether the last one is complete
    (a newline follows it; a response cut at its length limit may end inside a step)."""
    lines = text.split("\n")
    steps = [line.strip() for line in lines if line.strip()]
    return steps, bool(steps) and not lines[-1].strip()


@dataclass
class Rendered:
    ids: list[int]       # prompt + response (+ <|assistant_end|> when it ended)
    ends: list[int]      # per step, the index in ids of its last token (where the PRM reads it)
    complete: int        # how many of the steps are complete (all but a cut-off last one)


def render_steps(tok: Tokenizer, prompt_ids: Sequence[int], steps: Sequence[str], ended: bool,
                 last_complete: bool = False) -> Rendered:
    """prompt + the steps joined by newlines (+ <|assistant_end|> when the response ended).

    Steps are encoded one at a time, so each ends on a token boundary whatever the tokenizer (with
    the world's pre-split patterns this is also how the whole text encodes: a newline ends a
    pre-token). The final step of an ended response is read at <|assistant_end|>, where an outcome
    or preference RM reads the whole response. A response with no step is one empty step."""
    ids, ends = list(prompt_ids), []
    for k, step in enumerate(steps):
        newline = k < len(steps) - 1 or last_complete
        ids += tok.encode(step + ("\n" if newline else ""))
        ends.append(len(ids) - 1)
    if ended:
        ids.append(tok.turn_end_ids[0])
    if not steps:
        ends = [len(ids) - 1]
    ends[-1] = len(ids) - 1
    complete = len(steps) if (ended or last_complete or not steps) else len(steps) - 1
    return Rendered(ids, ends, complete)


def render_response(tok: Tokenizer, prompt_ids: Sequence[int], text: str, ended: bool) -> Rendered:
    steps, last_complete = response_steps(text)
    return render_steps(tok, prompt_ids, steps, ended, last_complete)


def aggregate(step_probs: Sequence[float], how: str = "min") -> float:
    """A response's PRM score from its steps' probabilities of being right: the weakest step
    (min, Math-Shepherd) or the chance that all are right (product, "Let's Verify Step by Step")."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation: expected one of {', '.join(AGGREGATIONS)}, got {how!r}")
    if not step_probs:
        return 0.0
    return min(step_probs) if how == "min" else math.prod(step_probs)


@torch.no_grad()
def head_logits(model: ScalarModel, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                batch_size: int = 64) -> list[list[float]]:
    """A scalar head's outputs at the given positions of each sequence (right-padded batches, so
    causal attention never sees the padding; similar lengths batched together)."""
    device = next(model.parameters()).device
    out: list[list[float] | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        ids = torch.zeros(len(rows), max(len(seqs[r]) for r in rows), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, : len(seqs[r])] = torch.tensor(seqs[r])
        values = model(ids.to(device)).cpu()
        for k, r in enumerate(rows):
            out[r] = values[k, list(positions[r])].tolist()
    return out  # type: ignore[return-value]


def score_responses(model: ScalarModel, tok: Tokenizer, prompts: Sequence[Sequence[int]], texts: Sequence[str],
                    ended: Sequence[bool], batch_size: int, per_step: bool) -> list[list[float]]:
    """Head outputs at each step's end (per_step: a PRM) or at the last token (an ORM or a
    preference RM), for rendered prompts and response texts."""
    rendered = [render_response(tok, p, t, e) for p, t, e in zip(prompts, texts, ended)]
    positions = [r.ends for r in rendered] if per_step else [[len(r.ids) - 1] for r in rendered]
    return head_logits(model, [r.ids for r in rendered], positions, batch_size)
