"""PRM-guided step-level beam search at a fixed budget of generated tokens (stages/search.py compares it
with best-of-N at the same budget).

Each round gives each of the N // expand kept beams `expand` children of one step (sampled up to a
newline or <|assistant_end|>, at most `step_tokens` tokens), scores every child by the PRM over its
complete steps, sets finished ones aside and keeps the best unfinished ones. A beam that can no
longer beat the best finished one (the min and the product only fall as steps are added) is pruned;
when no beam is left and a full round's budget is, the search starts again from the root. Each round
is planned so that children x their token cap fit the remaining budget (`plan_round`), so the search
never exceeds it. The answer is the finished beam with the best score.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..tokenizer import Tokenizer
from .sampling import generate
from .scoring import aggregate, head_logits, render_response


def newline_ids(tok: Tokenizer) -> list[int]:
    """Every token whose text contains a newline: where a step ends."""
    return [i for i in range(tok.vocab_size) if b"\n" in tok.token_bytes(i)]


def plan_round(beams: int, expand: int, remaining: int, step_tokens: int) -> tuple[list[int], int]:
    """Children per kept beam (best first) this round and the token cap of each, such that
    children x cap <= remaining: a round can never take the search past its budget. While the
    budget allows, each beam gets `expand` children of up to `step_tokens` tokens; as it runs out,
    fewer children (the best beams keep theirs) rather than cut steps; the last few tokens go to
    one child of the best beam."""
    if remaining <= 0 or beams <= 0:
        return [], 0
    rows = min(beams * expand, remaining // step_tokens)
    if rows == 0:
        return [1], remaining
    return [min(expand, rows - b * expand) for b in range(beams) if rows > b * expand], step_tokens


@dataclass
class Beam:
    tokens: list[int]       # the response so far, as sampled
    score: float = 1.0      # PRM aggregate over its complete steps (1 before the first)
    complete: int = 0       # complete steps scored
    ended: bool = False


def prm_search(policy, prm, tok: Tokenizer, prompts: list[list[int]], budgets: list[int], n: int, sc,
               seed: int = 0, progress: bool = True) -> tuple[list[Beam], list[int]]:
    """Step-level beam search for every prompt at once -> (chosen beam, tokens generated) per
    prompt. `budgets[p]`: the most tokens prompt p may generate (see the module docstring)."""
    ends = tok.turn_end_ids
    stops = newline_ids(tok) + ends
    expand, width = min(sc.expand, n), max(1, n // sc.expand)
    ctx = policy.config.block_size
    active = [[Beam([])] for _ in prompts]
    finished: list[list[Beam]] = [[] for _ in prompts]
    # if nothing finishes (the budget ran out first), the answer is the most advanced unfinished beam
    fallback: list[Beam] = [Beam([]) for _ in prompts]
    used = [0] * len(prompts)

    def keep_fallback(p: int, beams: list[Beam]) -> None:
        for b in beams:
            if (b.complete, b.score, len(b.tokens)) > (fallback[p].complete, fallback[p].score, len(fallback[p].tokens)):
                fallback[p] = b

    bar = tqdm(desc=f"prm_search N={n}", unit="round", disable=not progress, dynamic_ncols=True, leave=False)
    for rnd in range(10_000):
        # --- plan: which beams get how many children, of how many tokens at most -----------------
        requests = []  # (prompt, beam, children, cap)
        for p, beams in enumerate(active):
            if not beams and budgets[p] - used[p] >= expand * sc.step_tokens:
                # every beam finished or was pruned with a full round's budget left: search again
                # from the root (new samples); the best finished score still prunes the new beams
                beams = active[p] = [Beam([])]
            counts, cap = plan_round(len(beams), expand, budgets[p] - used[p], sc.step_tokens)
            for beam, k in zip(beams, counts):
                room = min(cap, sc.max_new_tokens - len(beam.tokens), ctx + 1 - len(prompts[p]) - len(beam.tokens))
                if room > 0:
                    requests.append((p, beam, k, room))
            keep_fallback(p, beams)
        if not requests:
            break
        # --- expand: one engine call per (cap, children) group --------------------------------
        children: list[list[tuple[Beam, Beam]]] = [[] for _ in prompts]
        by_shape: dict[tuple[int, int], list] = {}
        for req in requests:
            by_shape.setdefault((req[3], req[2]), []).append(req)
        for (cap, k), reqs in sorted(by_shape.items()):
            call_seed = zlib.crc32(f"{seed}/{n}/{rnd}/{cap}/{k}".encode())
            outs = generate(policy, [prompts[p] + beam.tokens for p, beam, _, _ in reqs], cap, n=k,
                            temperature=sc.temperature, stop_ids=stops, seed=call_seed)
            for (p, beam, _, _), samples in zip(reqs, outs):
                for c in samples:
                    used[p] += len(c.tokens)
                    tokens = beam.tokens + c.tokens
                    children[p].append((beam, Beam(tokens, ended=bool(c.tokens) and c.tokens[-1] in ends)))
        # --- score children that completed a step ---------------------------------------------
        to_score = []
        for p, kids in enumerate(children):
            seen = set()
            unique = []
            for parent, child in kids:
                key = tuple(child.tokens)
                if key in seen:
                    continue  # a duplicate adds nothing to the beam (its tokens still count)
                seen.add(key)
                text = tok.decode(child.tokens[:-1] if child.ended else child.tokens)
                r = render_response(tok, prompts[p], text, child.ended)
                child.score, child.complete = parent.score, parent.complete
                if r.complete > parent.complete or child.ended:  # an ended one is read at <|assistant_end|>
                    to_score.append((child, r))
                unique.append(child)
            children[p] = unique
        if to_score:
            logits = head_logits(prm, [r.ids for _, r in to_score], [r.ends[: r.complete] for _, r in to_score],
                                 sc.score_batch_size)
            for (child, r), vals in zip(to_score, logits):
                child.score = aggregate([1 / (1 + math.exp(-v)) for v in vals], sc.aggregate)
                child.complete = r.complete
        # --- select: finished aside, the best unfinished kept, hopeless ones pruned -------------
        for p, kids in enumerate(children):
            finished[p] += [c for c in kids if c.ended]
            best_done = max((c.score for c in finished[p]), default=-1.0)
            alive, dead = [], []
            for c in kids:  # a child at the length limit or the context's end can grow no further
                if not c.ended:
                    full = len(c.tokens) >= sc.max_new_tokens or len(prompts[p]) + len(c.tokens) > ctx
                    (dead if full else alive).append(c)
            alive.sort(key=lambda c: -c.score)
            keep_fallback(p, dead)
            active[p] = [c for c in alive if c.score > best_done][:width]
            keep_fallback(p, alive[width:])
        bar.update(1)
    bar.close()
    chosen = []
    for p in range(len(prompts)):
        chosen.append(max(finished[p], key=lambda b: b.score) if finished[p] else fallback[p])  # first of equals
    return chosen, used
