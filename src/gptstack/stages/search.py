"""Best-of-N by process RM, outcome RM, preference RM and majority vote, and PRM-guided step search.

    gptstack search --policy runs/tiny/sft --prm runs/tiny/prm --orm runs/tiny/prm --rm runs/tiny/rm --out runs/tiny
    gptstack search --policy RUN/sft --prm RUN/prm --rm none --out RUN        # no preference RM: rm is null
    gptstack search --policy RUN/sft --prm RUN/prm --rm RUN/rm --data test.jsonl --out RUN   # GSM8K / prompt+answer

The prompts are the world's fixed held-out eval set, the families in `search.families` (default the
multi-step arithmetic family), or a file of prompts with answers. For each prompt the policy samples
max(N) responses at T = `search.temperature`; for each N the samples are cut into max(N) / N
disjoint groups of N, and each method picks one response per group:
  prm         the highest PRM score: its steps' probabilities of being right, aggregated by min
              (`search.aggregate`; the other aggregation is reported under `prm_aggregation`)
  orm         the highest ORM score (the outcome RM trained on the same samples as the PRM)
  rm          the highest preference-RM score (`--rm RUN/rm`, made by `gptstack rm`)
  majority    the most common final answer (ties: the one that came first; no answer, no vote)
`accuracy[method][N]` is the fraction of right picks, averaged over groups and prompts (every sample
is used once, so N = 1 is the policy's plain accuracy at T); `tokens[method][N]` is the mean number
of tokens generated per prompt: those of the N samples.

prm_search (engine/step_search.py) is a step-level beam search guided by the PRM at the same
generated-token budget: each prompt gets the tokens best-of-N spent on it at that N (the mean over
its groups), and `tokens["prm_search"]` is what it actually generated (never more).

Writes RUN/search/summary.json (the keys above, plus `oracle` = pass@N, `accuracy_ci95`, paired
win/loss counts between methods) and picks.jsonl (every method's pick at the largest N, to read).
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import world
from ..common import UserError, atomic_write_text
from ..config import Config
from ..data.formats import read_dataset
from ..engine import generate
from ..engine.scoring import AGGREGATIONS, aggregate, score_responses
from ..engine.step_search import prm_search
from ..eval.problems import file_problems, world_problems
from ..eval.stats import pick_best, wilson_interval
from ..rundir import (check_same_tokenizer, check_vocab, load_scalar_model, load_stage, scalar_kind, write_config,
                      write_summary)

STAGE = "search"
METHODS = ("prm", "orm", "rm", "majority", "prm_search")


def resolve_scalar(path: str | Path, kind: str) -> Path:
    """A stage holding a `kind` model: the path itself, or its `kind` subfolder (`--orm RUN/prm`
    finds the ORM that `gptstack prm` writes to RUN/prm/orm)."""
    p = Path(path)
    if scalar_kind(p) != kind and scalar_kind(p / kind) == kind:
        return p / kind
    return p


# --- best-of-N from fixed samples -----------------------------------------------------------------


def groups(n: int, samples: int) -> list[slice]:
    """The disjoint groups of N samples that best-of-N at N uses."""
    return [slice(g * n, (g + 1) * n) for g in range(samples // n)]


def best_of_n(scores: np.ndarray, correct: np.ndarray, n: int) -> np.ndarray:
    """(P, S) scores and correctness -> (P, G): is the highest-scored sample of each group right
    (ties: the first)."""
    return np.take_along_axis(correct, pick_best(scores, n), axis=1)


def vote(keys: list) -> int | None:
    """Index of a sample holding the most common final answer (None: no answer votes); a tie goes
    to the answer that came first."""
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return None
    top = max(votes.values())
    return next(i for i, k in enumerate(keys) if k is not None and votes[k] == top)


def majority_vote(keys: list[list], correct: np.ndarray, n: int) -> np.ndarray:
    """(P, S) final answers (None: none) -> (P, G): is each group's most common answer right
    (a group with no answer at all is wrong)."""
    out = np.zeros((len(keys), correct.shape[1] // n), dtype=bool)
    for p, row in enumerate(keys):
        for gi, g in enumerate(groups(n, correct.shape[1])):
            i = vote(row[g])
            out[p, gi] = i is not None and correct[p, g.start + i]
    return out


def group_tokens(tokens: np.ndarray, n: int) -> np.ndarray:
    """(P, S) generated tokens -> (P,): the mean over groups of a group's total, per prompt."""
    return np.stack([tokens[:, g].sum(axis=1) for g in groups(n, tokens.shape[1])], axis=1).mean(axis=1)


# --- the stage ------------------------------------------------------------------------------------


def run(cfg: Config, policy_dir: str | Path, prm_dir: str | Path, out: str | Path, orm_dir: str | Path | None = None,
        rm_dir: str | Path | None = None, data: str | None = None, fresh: bool = False) -> dict:
    t_start = time.perf_counter()
    sc = cfg.search
    if sc.threads:
        torch.set_num_threads(sc.threads)
    # --- inputs, all checked before any work -----------------------------------------------------
    ns = sorted(set(sc.n))
    if not ns or ns[0] < 1 or any(ns[-1] % n for n in ns):
        raise UserError(f"search.n: expected positive sizes that each divide the largest, got {sc.n}")
    if sc.aggregate not in AGGREGATIONS:
        raise UserError(f"search.aggregate: expected one of {', '.join(AGGREGATIONS)}, got {sc.aggregate!r}")
    for key in ("expand", "step_tokens", "max_new_tokens", "batch_size", "score_batch_size"):
        if getattr(sc, key) < 1:
            raise UserError(f"search.{key}: expected a positive number, got {getattr(sc, key)}")
    policy_dir, run_dir = Path(policy_dir), Path(out)
    stage_dir = run_dir / STAGE
    policy, _, tok = load_stage(policy_dir)
    policy.eval()
    if rm_dir is None:
        rm_dir = policy_dir.parent / "rm"
        if not (rm_dir / "model.safetensors").exists():
            raise UserError(f"no preference reward model at {rm_dir}: pass --rm RUN/rm (made by `gptstack rm`), "
                            "or --rm none to leave the rm method out")
    verifiers = {}
    for name, given, kind in (("prm", prm_dir, "prm"), ("orm", orm_dir or prm_dir, "orm"),
                              ("rm", None if str(rm_dir) == "none" else rm_dir, "reward")):
        if given is None:
            continue
        path = resolve_scalar(given, kind)
        model, _ = load_scalar_model(path, kind)
        check_same_tokenizer(policy_dir, given)  # RUN/prm/orm uses RUN/prm's run tokenizer
        check_vocab(model.config.vocab_size, tok, path)
        verifiers[name] = model.eval()
    if data not in (None, "world"):
        ds = read_dataset(data, expect="verifiable")
        problems = file_problems(ds.rows)
    else:
        bad = [f for f in sc.families if f not in world.FAMILIES]
        if bad or not sc.families:
            raise UserError(f"search.families: expected a list of {', '.join(world.FAMILIES)}, got {sc.families!r}")
        problems = world_problems([t for t in world.eval_set(cfg.world) if t.family in sc.families])
    if sc.prompts:
        problems = problems[: sc.prompts]
    if not problems:
        raise UserError(f"{data or 'world'}: no prompts to search on")
    if fresh and stage_dir.exists():
        import shutil
        shutil.rmtree(stage_dir)
    write_config(stage_dir, cfg.to_dict())

    # --- sample max(N) responses per prompt, score each with every verifier ---------------------
    S, ends = ns[-1], tok.turn_end_ids
    prompts = [tok.render_prompt(pr.messages) for pr in problems]
    completions = []
    for c0 in tqdm(range(0, len(prompts), sc.batch_size), desc=f"search: {S} samples", unit="batch", dynamic_ncols=True):
        completions += generate(policy, prompts[c0 : c0 + sc.batch_size], sc.max_new_tokens, n=S,
                                temperature=sc.temperature, stop_ids=ends, seed=sc.seed + c0, batch_size=sc.batch_size)
    flat_p = [p for p in range(len(prompts)) for _ in range(S)]
    texts = [tok.decode([t for t in c.tokens if t not in ends]) for cs in completions for c in cs]
    ended = [c.finished for cs in completions for c in cs]
    correct = np.array([problems[p].is_right(t) for p, t in zip(flat_p, texts)]).reshape(-1, S)
    keys = [[problems[p].answer_key(t) for t in texts[p * S : (p + 1) * S]] for p in range(len(prompts))]
    tokens = np.array([len(c.tokens) for cs in completions for c in cs]).reshape(-1, S)
    flat_prompts = [prompts[p] for p in flat_p]
    scores: dict[str, np.ndarray] = {}
    step_logits = score_responses(verifiers["prm"], tok, flat_prompts, texts, ended, sc.score_batch_size, per_step=True)
    for how in AGGREGATIONS:
        scores[f"prm_{how}"] = np.array([aggregate([1 / (1 + math.exp(-v)) for v in vals], how)
                                         for vals in step_logits]).reshape(-1, S)
    scores["prm"] = scores[f"prm_{sc.aggregate}"]
    for name in ("orm", "rm"):
        if name in verifiers:
            vals = score_responses(verifiers[name], tok, flat_prompts, texts, ended, sc.score_batch_size, per_step=False)
            scores[name] = np.array([v[0] for v in vals]).reshape(-1, S)

    # --- best-of-N tables --------------------------------------------------------------------
    accuracy: dict[str, dict] = {m: {} for m in METHODS}
    spent: dict[str, dict] = {m: {} for m in METHODS}
    picks_right: dict[str, dict[int, np.ndarray]] = {m: {} for m in METHODS}
    by_aggregation: dict[str, dict] = {how: {} for how in AGGREGATIONS}
    oracle = {}
    budgets = {}
    for n in ns:
        bon_tokens = group_tokens(tokens, n)
        budgets[n] = [int(b) for b in bon_tokens]
        for m in ("prm", "orm", "rm", "majority"):
            if m == "majority":
                right = majority_vote(keys, correct, n)
            elif m in scores:
                right = best_of_n(scores[m], correct, n)
            else:
                accuracy[m][str(n)] = spent[m][str(n)] = None
                continue
            picks_right[m][n] = right
            accuracy[m][str(n)] = float(right.mean())
            spent[m][str(n)] = float(bon_tokens.mean())
        for how in AGGREGATIONS:
            by_aggregation[how][str(n)] = float(best_of_n(scores[f"prm_{how}"], correct, n).mean())
        oracle[str(n)] = float(np.stack([correct[:, g].any(axis=1) for g in groups(n, S)], axis=1).mean())

    # --- PRM-guided search at each N's budget -----------------------------------------------------
    t_search = time.perf_counter()
    search_picks = {}
    for n in ns:
        chosen, used = prm_search(policy, verifiers["prm"], tok, prompts, budgets[n], n, sc, seed=sc.seed)
        assert all(u <= b for u, b in zip(used, budgets[n])), "prm_search exceeded its token budget"
        chosen_texts = [tok.decode([t for t in b.tokens if t not in ends]) for b in chosen]
        right = np.array([pr.is_right(t) for pr, t in zip(problems, chosen_texts)])[:, None]
        picks_right["prm_search"][n] = right
        accuracy["prm_search"][str(n)] = float(right.mean())
        spent["prm_search"][str(n)] = float(np.mean(used))
        search_picks[n] = chosen_texts
        print(f"search: N={n:>3}  " + "  ".join(
            f"{m} {accuracy[m][str(n)]:.3f}" if accuracy[m][str(n)] is not None else f"{m} -" for m in METHODS)
            + f"  (oracle {oracle[str(n)]:.3f}; tokens bon {spent['prm'][str(n)]:.0f}, search {np.mean(used):.0f})")
    search_seconds = time.perf_counter() - t_search

    # --- summary, picks -------------------------------------------------------------------------
    P = len(problems)
    ci = {m: {k: (wilson_interval(round(v * P), P) if v is not None else None) for k, v in accuracy[m].items()}
          for m in METHODS}
    paired = {}
    for a, b in (("prm", "orm"), ("orm", "majority"), ("prm", "majority"), ("prm", "rm"), ("prm_search", "prm")):
        paired[f"{a}_vs_{b}"] = {}
        for n in ns:
            if n in picks_right[a] and n in picks_right[b]:
                ra, rb = picks_right[a][n], picks_right[b][n]
                if ra.shape != rb.shape:  # the search picks once per prompt: compare with the first group
                    ra, rb = ra[:, :1], rb[:, :1]
                paired[f"{a}_vs_{b}"][str(n)] = [int((ra & ~rb).sum()), int((~ra & rb).sum())]
    summary = {
        "accuracy": accuracy, "tokens": spent, "accuracy_ci95": ci, "oracle": oracle,
        "prm_aggregation": by_aggregation, "aggregate": sc.aggregate, "paired": paired,
        "prm_search/budget": {str(n): float(np.mean(budgets[n])) for n in ns},
        "n_prompts": P, "samples_per_prompt": S, "families": list(sc.families) if data in (None, "world") else [],
        "search/wall_seconds": search_seconds, "wall_seconds": time.perf_counter() - t_start,
    }
    picks = []
    for p, pr in enumerate(problems):
        g = slice(0, S)
        row = {"prompt": pr.prompt}
        for m in ("prm", "orm", "rm"):
            if m in scores:
                i = int(scores[m][p, g].argmax())
                row[m] = {"response": texts[p * S + i], "correct": bool(correct[p, i]), "score": float(scores[m][p, i])}
        i = vote(keys[p])
        row["majority"] = {"answer": None if i is None else str(keys[p][i]), "correct": bool(picks_right["majority"][S][p, 0])}
        row["prm_search"] = {"response": search_picks[S][p], "correct": bool(picks_right["prm_search"][S][p, 0])}
        row["samples_correct"] = int(correct[p].sum())
        picks.append(row)
    atomic_write_text(stage_dir / "picks.jsonl", "".join(json.dumps(r) + "\n" for r in picks))
    write_summary(stage_dir, summary)
    print(f"search: wrote {stage_dir} ({P} prompts x {S} samples; {summary['wall_seconds']:.0f} s, "
          f"search {search_seconds:.0f} s)")
    return summary
