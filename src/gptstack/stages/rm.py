"""Reward model from comparisons: a scalar head on the SFT trunk, trained with Bradley–Terry.

    gptstack rm --from runs/tiny/sft --prefs runs/tiny/prefs --out runs/tiny       # `gptstack prefs` output
    gptstack rm --from runs/tiny/sft --prefs ../shared/data/hh-rlhf/helpful-base/test.jsonl.gz --out runs/hh
    gptstack rm --from runs/tiny/sft --prefs runs/tiny/feedback.sqlite --out runs/tiny   # labels from `gptstack serve`
    torchrun --nproc_per_node=2 -m gptstack.cli rm --from runs/tiny/sft --prefs runs/tiny/prefs --out runs/tiny

The reward of a response is the head's output at the last real token of prompt + response, rendered
with the chat template exactly as the policy sees it (`render_for_rm`: <|assistant_end|> appended
only when the response ended; a sequence longer than the context keeps its last block_size tokens,
so the prompt's oldest tokens go first). Training minimises the Bradley–Terry loss
-log sigmoid(r_w - r_l). A K-wise ranking is one batch element (InstructGPT): the prompt's K
responses go through the trunk once and all C(K,2) (better, worse) pairs are formed from their K
scores; each prompt's loss is the mean over its pairs, and prompts are averaged, so a prompt with
many pairs does not outweigh one with few. Pairs of identical responses (the same text, both ended
or both not) carry no preference and are skipped and counted; a supplied ranking cannot hold ties
(data/formats.py refuses one with a file:line error), and rows with identical chosen/rejected or an
empty response are skipped and counted by the reader.

A fraction of the prompts (rm.eval_fraction, chosen by a hash of the prompt, so a prompt is never on
both sides) is held out. On it, summary.json reports (DESIGN.md):
  eval/accuracy                    held-out label pairs the RM orders as the labeler did (ties 1/2)
  eval/correct_vs_wrong_accuracy   pairs of responses where exactly one answer is right: the RM
                                   scores the right one higher (world prompts)
  eval/gold_spearman               rank correlation of RM score and gold reward over all responses
  eval/labeler_gold_agreement      label pairs whose gold differs that the labels order as gold
                                   does: the ceiling the labels themselves set
  policy/accuracy                  the SFT policy's own greedy accuracy on the same prompts: the
                                   generator side of the generator–discriminator gap
  policy/logprob_correct_vs_wrong_accuracy   the same pairs judged by the policy's own mean
                                   log-likelihood per token, a discriminator needing no training
Finally the reward is normalised (folded into the head) so the SFT policy's responses (one sample
at T = 1 for each of rm.norm_prompts training prompts) score mean 0, std 1. Writes RUN/rm.

Two options keep the trunk's LM head (model/heads.py), both off by default:
  rm.lm_coef = w           loss = Bradley–Terry + w x the next-token cross-entropy of each prompt's
                           best response (its tokens after <|assistant_start|>, the end token
                           included; mean over the micro-batch's tokens): the verifier keeps
                           modelling the responses it judges (Cobbe et al. 2021). The head is a
                           training aid only: RUN/rm is saved without it, so downstream stages (PPO
                           builds its critic from the RM) see a plain reward model.
  rm.likelihood_score      score = head(h_last) + c x the response's mean log p(token) under the
                           RM's own LM head, c learned (from rm.likelihood_init) by the
                           Bradley–Terry loss (the trunk moves too, so it is the RM's likelihood,
                           not the policy's). RUN/rm keeps the LM head. Beware in RL: a policy
                           optimised against this reward is paid for text the RM finds likely,
                           i.e. for collapsing towards the SFT distribution's modes (short,
                           stereotyped answers), an incentive a KL penalty does not remove (it
                           pushes the same way).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import world
from ..common import UserError
from ..config import Config
from ..data.batches import batch_indices
from ..data.comparisons import distinct_pairs, load_preferences
from ..data.formats import warn
from ..data.split import is_heldout
from ..engine.scoring import likelihood_scores, render_for_rm, score_texts
from ..eval.problems import greedy_accuracy, world_problems
from ..eval.stats import preference_metrics
from ..model.heads import (ScalarModel, gather_last, latest_start, pad_sequences, response_token_logprobs,
                           scalar_metadata, scalar_weights, score_ids, sequence_scores)
from ..tokenizer import ASSISTANT_START, Tokenizer
from ..rundir import adopt_model, adopt_tokenizer, load_stage
from ..train.dist import cleanup, init_distributed, print0
from ..train.loop import Session, resume_state

STAGE = "rm"

# --- the loss ------------------------------------------------------------------------------------


def bradley_terry_loss(scores: torch.Tensor, groups: list[list[tuple[int, int]]]) -> torch.Tensor:
    """Mean over groups (prompts) of the mean over the group's (better, worse) pairs of
    -log sigmoid(r_better - r_worse); pair indices point into `scores`."""
    win = torch.tensor([w for g in groups for w, _ in g], device=scores.device)
    lose = torch.tensor([lo for g in groups for _, lo in g], device=scores.device)
    weight = torch.tensor([1.0 / len(g) for g in groups for _ in g], device=scores.device)
    return -(F.logsigmoid(scores[win] - scores[lose]) * weight).sum() / len(groups)


def response_lm_loss(logits: torch.Tensor, ids: torch.Tensor, rows: list[int], start_id: int,
                     pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens (those after the latest `start_id`,
    <|assistant_start|>) of the sequences `rows` of a batch; logits (B, T, vocab) of ids (B, T)."""
    r = torch.tensor(rows, device=ids.device)
    picked = ids[r]
    logp, in_response = response_token_logprobs(picked, lambda b, s: logits[r[b], s], latest_start(picked, start_id),
                                                 None if pad_mask is None else pad_mask[r])
    return -logp.sum() / in_response.sum().clamp(min=1)


def best_rows(items: list[dict]) -> list[int]:
    """Each prompt's best response (its ranking's first) as an index into `collate`'s sequences."""
    out, k = [], 0
    for x in items:
        out.append(k + x["row"]["ranking"][0])
        k += len(x["seqs"])
    return out


def collate(items: list[dict]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Prompts (each {"seqs": its K rendered responses, "pairs": (better, worse) indices}) -> the
    flat list of sequences, each response once (one pass through the trunk), and per prompt its
    pairs as indices into that list."""
    seqs, groups = [], []
    for x in items:
        groups.append([(len(seqs) + w, len(seqs) + lo) for w, lo in x["pairs"]])
        seqs += x["seqs"]
    return seqs, groups


# --- the stage -----------------------------------------------------------------------------------


def run(cfg: Config, source: str | Path, prefs: str | Path, out: str | Path, fresh: bool = False,
        skip_bad_rows: bool = False) -> dict:
    t_start = time.perf_counter()
    tc = cfg.rm
    info = init_distributed()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    source, run_dir = Path(source), Path(out)
    stage_dir = run_dir / STAGE
    policy, source_cfg, tok = load_stage(source, info.device)
    cfg = adopt_model(cfg, source_cfg)
    block = tc.context(cfg.model.block_size)
    # both find the response after the latest <|assistant_start|>, which a model's own template lacks
    needs_start = [o for o, on in (("rm.lm_coef", tc.lm_coef > 0), ("rm.likelihood_score", tc.likelihood_score)) if on]
    if needs_start and ASSISTANT_START not in tok.special_tokens:
        raise UserError(f"{needs_start[0]}: needs gptstack's chat format (the response is what follows "
                        f"{ASSISTANT_START}), but {source}'s tokenizer renders chats with the model's own template "
                        "(gptstack import --chat model); turn it off, or import with --chat gptstack")

    # --- data: read, render and split everything before any training -------------------------------
    rows, counts = load_preferences(prefs, skip_bad_rows)
    train, held = [], []
    identical = truncated = 0
    for row in rows:
        pairs, same = distinct_pairs(row)
        identical += same
        if not pairs:
            continue
        ended = row.get("ended") or [True] * len(row["responses"])
        seqs = [render_for_rm(tok, row["prompt"], r, e, block + 1) for r, e in zip(row["responses"], ended)]
        truncated += sum(len(s) > block for s in seqs)
        item = {"row": row, "seqs": [s[-block:] for s in seqs], "pairs": pairs}
        (held if is_heldout(row["prompt"], tc.eval_fraction) else train).append(item)
    counts.update({"pairs/skipped/identical": identical, "sequences/truncated": truncated,
                   "train/prompts": len(train), "train/pairs": sum(len(x["pairs"]) for x in train),
                   "eval/prompts": len(held)})
    if identical:
        warn(f"{prefs}: {identical} pair(s) of identical responses skipped (no preference to learn)", info)
    if truncated:
        warn(f"{prefs}: {truncated} sequence(s) longer than the context ({block} tokens) keep their last {block}",
             info)
    if not train or not held:
        raise UserError(f"{prefs}: {len(train)} training and {len(held)} held-out prompts with a comparison; "
                        f"need at least one of each (rm.eval_fraction = {tc.eval_fraction})")
    per_step = tc.batch_size * tc.grad_accum * info.world
    if tc.max_steps <= 0:  # derived from epochs, in a copy (the caller's config keeps its 0)
        tc = dataclasses.replace(tc, max_steps=max(1, math.ceil(tc.epochs * len(train) / per_step)))
        cfg = dataclasses.replace(cfg, rm=tc)

    if info.is_main:
        adopt_tokenizer(source.parent / "tokenizer", run_dir)
    state = resume_state(stage_dir, fresh, info)

    # --- model: the SFT trunk, a zero head (every score starts at 0, the loss at log 2) -------------
    start_id = tok.special(ASSISTANT_START) if needs_start else -1
    rm = ScalarModel.from_policy(policy, "reward", lm_head=tc.lm_coef > 0,
                                 response_start_id=start_id if tc.likelihood_score else None)
    if tc.likelihood_score:
        # Adam moves a scalar by about lr per step, so from 0 c stays ~0.01 over an epoch at lr 3e-4:
        # rm.likelihood_init = 1 starts from the trunk's own likelihood ranking instead
        with torch.no_grad():
            rm.likelihood_coef.fill_(tc.likelihood_init)
    rm.train()
    session = Session.start(tc, STAGE, rm, stage_dir, info, cfg.to_dict(), state)
    print0(f"rm: {len(train):,} training prompts ({counts['train/pairs']:,} pairs), {len(held):,} held out; "
           f"batch {tc.batch_size} prompts x {tc.grad_accum} x {info.world}, {tc.max_steps} steps "
           f"({tc.max_steps * per_step / len(train):.2f} epochs)", info=info)

    def held_out_scores() -> list[list[float]]:
        flat = score_ids(rm, [s for x in held for s in x["seqs"]], tc.score_batch_size)
        rm.train()
        out, k = [], 0
        for x in held:
            out.append(flat[k : k + len(x["seqs"])])
            k += len(x["seqs"])
        return out

    def micro_loss(step: int, micro: int) -> torch.Tensor:
        rows = batch_indices(len(train), tc.batch_size, tc.seed, step, micro, tc.grad_accum, info.rank, info.world)
        items = [train[i] for i in rows]
        seqs, groups = collate(items)
        if not tc.lm_coef:
            return bradley_terry_loss(sequence_scores(session.step_model, seqs), groups)
        # one forward for scores and LM logits (DDP: every parameter that gets a gradient in one call)
        ids, mask = pad_sequences(seqs, next(rm.parameters()).device)
        values, logits = session.step_model(ids, return_logits=True)
        bt = bradley_terry_loss(gather_last(values, mask), groups)
        return bt + tc.lm_coef * response_lm_loss(logits, ids, best_rows(items), start_id, mask)

    # --- train -------------------------------------------------------------------------------------
    def evaluate() -> dict:
        figures = preference_metrics([x["row"] for x in held], held_out_scores(), [None] * len(held))
        return {"eval/accuracy": figures["eval/accuracy"]}

    loss = session.run_steps(micro_loss, evaluate)
    if session.stopped_early():
        cleanup(info)
        return {"stopped_at": session.last_step}
    if session.start_step < tc.max_steps:
        # the trained, not yet normalised head: a run killed after this point resumes here and
        # normalises once (finish then writes no second checkpoint)
        session.checkpoint(tc.max_steps)

    # --- held-out evaluation, the policy's own accuracy, normalisation -----------------------------
    summary: dict = {}
    if info.is_main:
        tasks = [world.task_from_messages(x["row"]["prompt"]) for x in held]
        correct = []
        for x, task in zip(held, tasks):
            row = x["row"]
            if task is not None and "gold" not in row:
                ended = row.get("ended") or [True] * len(row["responses"])
                row["gold"] = [world.gold(task, r, e) for r, e in zip(row["responses"], ended)]
            correct.append(None if task is None else [world.is_correct(task, r) for r in row["responses"]])
        figures = preference_metrics([x["row"] for x in held], held_out_scores(), correct)
        world_tasks = [t for t in tasks if t is not None]
        if world_tasks:
            figures.update(greedy_accuracy(policy, tok, world_problems(world_tasks), tc.max_new_tokens, prefix="policy")[0])
            held_rows = [x["row"] for x in held]
            likelihood = preference_metrics(held_rows, likelihood_scores(policy, tok, held_rows), correct)
            if "eval/correct_vs_wrong_accuracy" in likelihood:
                figures["policy/logprob_correct_vs_wrong_accuracy"] = likelihood["eval/correct_vs_wrong_accuracy"]
        mean, std = normalization(rm, policy, tok, [x["row"]["prompt"] for x in train], tc, cfg.rm.seed)
        rm.normalize(mean, std)
        rm.train()
        summary = {**figures, "norm/raw_mean": mean, "norm/raw_std": std, "steps": tc.max_steps, **counts,
                   "wall_seconds": time.perf_counter() - t_start}
        if loss is not None:
            summary["train/final_loss"] = loss
    session.finish(summary, metadata=saved_metadata(rm), weights=saved_weights(rm), checkpoint=False,
                   **{k: v for k, v in summary.items() if isinstance(v, float) and k.startswith("eval/")})
    if info.is_main:
        cvw = summary.get("eval/correct_vs_wrong_accuracy")
        print0(f"rm: held-out pair accuracy {summary['eval/accuracy']:.1%}"
               + (f", correct-vs-wrong {cvw:.1%} (the policy's own accuracy {summary['policy/accuracy']:.1%})"
                  if cvw is not None and "policy/accuracy" in summary else "")
               + f"; wrote {stage_dir}")
    cleanup(info)
    return summary


def saved_metadata(rm: ScalarModel) -> dict:
    """Header of RUN/rm's weights: an LM head only the training loss read (rm.lm_coef without
    rm.likelihood_score) is not saved (`saved_weights`), so the header does not announce it."""
    meta = scalar_metadata(rm)
    if not rm.likelihood_score:
        meta.pop("gptstack_lm_head", None)
    return meta


def saved_weights(rm: ScalarModel):
    """-> the `weights` argument of Session.finish: the state dict RUN/rm holds. Without the
    likelihood term the LM head is dropped: the scores do not read it, and PPO builds its critic
    from the RM, where an unused parameter would trip DDP."""
    def pick(state: dict) -> dict:
        if not rm.likelihood_score:
            state = {k: v for k, v in state.items() if not k.startswith("trunk.lm_head.")}
        return scalar_weights(state)
    return pick


def normalization(rm: ScalarModel, policy, tok: Tokenizer, prompts: list[list[dict]], tc, seed: int) -> tuple[float, float]:
    """(mean, std) of the RM's raw scores on the SFT policy's own responses: one sample at T = 1
    for each of the first rm.norm_prompts prompts of a seeded shuffle."""
    from ..engine import generate  # noqa: PLC0415

    order = np.random.default_rng(seed).permutation(len(prompts))[: tc.norm_prompts]
    rendered = [tok.render_prompt(prompts[i]) for i in order]
    ends = tok.turn_end_ids
    out = generate(policy.eval(), rendered, tc.max_new_tokens, n=1, temperature=1.0, stop_ids=ends, seed=seed,
                   truncate=True)
    responses = [[t for t in c.tokens if t not in ends] for (c,) in out]
    scores = score_texts(rm, tok, rendered, responses, [c.finished for (c,) in out], tc.score_batch_size)
    if len(scores) < 2:
        return float(scores[0]) if scores else 0.0, 1.0
    mean, std = float(np.mean(scores)), float(np.std(scores))
    return mean, std if std > 0 else 1.0
