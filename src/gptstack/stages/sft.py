"""Supervised fine-tuning: turn the base model into an assistant on demonstrations.

    gptstack sft --from runs/tiny/pretrain --out runs/tiny                 # world demonstrations
    gptstack sft --from runs/tiny/pretrain --data chats.jsonl --out runs/tiny    # TRL messages / prompt+completion
    torchrun --nproc_per_node=2 -m gptstack.cli sft --from runs/tiny/pretrain --out runs/tiny

Each conversation is rendered with the chat template; the loss is taken only on assistant content
and its <|assistant_end|> (the loss mask), multi-turn included. Batches pad on the right (causal
attention never looks ahead, so padding cannot change a real token's logits) with targets -1; by
default (`sft.packing`) a batch's conversations are packed into rows of up to block_size tokens
instead, each attending only within itself, for the same loss with far less padding.
The eval protocol runs on the base model (few-shot, `base/` keys) before training and on the
fine-tuned model after (`eval/` keys), so the gain of SFT is on the record. A --data file's prompts
in the `sft.heldout_fraction` slice (the one held-out rule, data/split.py) are never trained on: the
fine-tuned model's loss on their assistant tokens is `heldout/loss` (the training loss), and on
GSM8K rows its greedy accuracy `heldout/accuracy` (eval/problems.py). Writes RUN/sft.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .. import world
from ..common import UserError, atomic_write_json, atomic_write_text
from ..config import Config
from ..data.batches import batch_indices
from ..data.formats import read_dataset, warn
from ..data.split import is_heldout
from ..data.packing import attention_pair_cost, cheapest_packing
from ..eval import protocol
from ..eval.problems import file_problem, greedy_accuracy
from ..tokenizer import Tokenizer
from ..rundir import adopt_model, adopt_tokenizer, load_stage
from ..train.dist import cleanup, init_distributed, print0
from ..train.loop import Session, resume_state

STAGE = "sft"


def load_conversations(data: str | None, cfg: Config, skip_bad_rows: bool
                       ) -> tuple[list[list[dict]], dict, list[tuple[list[dict], str | None]]]:
    """World demonstrations (default) or a file's conversations to train on, counts for
    summary.json, and the file's held-out conversations with their reference answers (GSM8K rows;
    else None): those whose prompt `is_heldout` puts in the sft.heldout_fraction slice. The world
    demonstrations hold nothing out (the eval protocol measures the model on the world's eval set)."""
    if data in (None, "world"):
        demos = world.demonstrations(cfg.sft.demos, seed=cfg.sft.seed, config=cfg.world)
        styles = {f"data/style/{s}": sum(d[1] == s for d in demos) / len(demos) for s in world.STYLES}
        return [t.messages(text) for t, _, text in demos], {"data/rows": len(demos), "data/usable": len(demos), **styles}, []
    ds = read_dataset(data, expect=("sft", "preference", "ranking", "verifiable"), skip_bad_rows=skip_bad_rows)
    if ds.n_skipped:
        warn(ds.describe())
    conversations = ds.as_sft()
    answers = [r.get("answer") for r in ds.rows] if ds.kind == "verifiable" else [None] * len(conversations)
    held = [is_heldout(prompt, cfg.sft.heldout_fraction) for prompt in ds.prompts()]
    train = [c for c, h in zip(conversations, held) if not h]
    if not train:
        raise UserError(f"{data}: every conversation is held out ({len(conversations)}, sft.heldout_fraction "
                        f"{cfg.sft.heldout_fraction}); lower sft.heldout_fraction")
    return train, ds.summary(), [(c, a) for c, a, h in zip(conversations, answers, held) if h]


def render_all(tok: Tokenizer, conversations: list[list[dict]], block_size: int) -> tuple[list[np.ndarray], int]:
    """-> per conversation a (2, L) array of [input ids; targets] (targets -1 off the mask), and
    how many were dropped for not fitting the context."""
    rendered, too_long = [], 0
    for messages in conversations:
        ids, mask = tok.render_conversation(messages)
        if len(ids) - 1 > block_size:
            too_long += 1
            continue
        ids_arr, mask_arr = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
        targets = np.where(mask_arr[1:], ids_arr[1:], -1)
        rendered.append(np.stack([ids_arr[:-1], targets]))
    return rendered, too_long


@torch.no_grad()
def heldout_loss(model, rendered: list[np.ndarray], batch_size: int, device, autocast) -> float:
    """The training loss on held-out conversations: the mean per-token cross-entropy over all their
    assistant tokens (the loss mask), each token weighing the same whatever its batch. Right-padded
    batches of similar lengths; `autocast()` is the training's precision context."""
    model.eval()
    order = sorted(range(len(rendered)), key=lambda i: rendered[i].shape[1])
    nats, tokens = 0.0, 0
    for start in range(0, len(order), batch_size):
        chunk = [rendered[i] for i in order[start : start + batch_size]]
        length = max(r.shape[1] for r in chunk)
        x = np.zeros((len(chunk), length), dtype=np.int64)
        y = np.full((len(chunk), length), -1, dtype=np.int64)
        for row, r in enumerate(chunk):
            x[row, : r.shape[1]], y[row, : r.shape[1]] = r
        n = int((y >= 0).sum())
        with autocast():
            loss = model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
        nats, tokens = nats + loss.item() * n, tokens + n
    return nats / tokens if tokens else math.nan


def get_batch(rendered: list[np.ndarray], batch_size: int, seed: int, step: int, micro: int = 0, rank: int = 0,
              world_size: int = 1, pack_to: int = 0, pair_cost: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> (inputs, targets, segments or None). Like pretraining, which conversations are drawn
    depends only on (seed, step, micro, rank). Without packing: one right-padded row each. With
    `pack_to` = L: the same conversations packed first-fit-decreasing into rows of at most L
    tokens (at the row length `cheapest_packing` finds cheapest for `pair_cost`), `segments`
    numbering the conversations of each row (the model keeps attention and positions within one,
    see GPT.hidden_states), so the loss is the padded batch's while the ~40 % of padding a world
    batch carries is mostly gone."""
    rows = batch_indices(len(rendered), batch_size, seed, step, micro, rank=rank, world=world_size, replace=True).tolist()
    if pack_to:
        lengths = [rendered[r].shape[1] for r in rows]
        bins = [[rows[i] for i in b] for b in cheapest_packing(lengths, pack_to, pair_cost)]
    else:
        bins = [[r] for r in rows]
    length = max(sum(rendered[r].shape[1] for r in b) for b in bins)
    x = np.zeros((len(bins), length), dtype=np.int64)
    y = np.full((len(bins), length), -1, dtype=np.int64)
    seg = np.zeros((len(bins), length), dtype=np.int64)
    for i, b in enumerate(bins):
        k = 0
        for j, r in enumerate(b):
            n = rendered[r].shape[1]
            x[i, k : k + n], y[i, k : k + n] = rendered[r]
            seg[i, k : k + n] = j
            k += n
        seg[i, k:] = len(b)   # the padding is a run of its own: nothing real attends to it
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(seg) if pack_to else None


def run(cfg: Config, source: str | Path, out: str | Path, data: str | None = None, fresh: bool = False,
        skip_bad_rows: bool = False) -> dict:
    t_start = time.perf_counter()
    tc = cfg.sft
    data = data or tc.data or None   # --data, else the config's sft.data
    info = init_distributed()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    source, run_dir = Path(source), Path(out)
    stage_dir = run_dir / STAGE
    tok_dir = source.parent / "tokenizer"
    model, source_cfg, tok = load_stage(source, info.device)
    cfg = adopt_model(cfg, source_cfg)  # the architecture is the pretrained model's, whatever the recipe says

    # --- data: read and validate everything before any training ---------------------------------
    conversations, counts, heldout = load_conversations(data, cfg, skip_bad_rows)
    context = tc.context(cfg.model.block_size)
    rendered, too_long = render_all(tok, conversations, context)
    held = []  # (rendered, messages, answer) of the held-out conversations that fit the context
    for messages, answer in heldout:
        one, dropped = render_all(tok, [messages], context)
        held += [(one[0], messages, answer)] if one else []
        too_long += dropped
    if too_long:
        warn(f"{data or 'world'}: {too_long} conversation(s) longer than the context ({context} "
             "tokens) skipped", info)
        counts["data/skipped/longer_than_context"] = too_long
    if not rendered:
        raise UserError(f"{data or 'world'}: no conversation fits the context of {context} tokens")
    if not any((r[1] >= 0).any() for r in rendered):
        raise UserError(f"{data}: no assistant tokens to learn from")
    if data not in (None, "world"):
        counts["data/train_conversations"] = len(rendered)
        if tc.heldout_fraction:
            counts["heldout/conversations"] = len(held)
            if not held:
                warn(f"{data}: no held-out conversation to measure heldout/loss on (sft.heldout_fraction "
                     f"{tc.heldout_fraction}: {len(heldout)} prompt(s) in the slice, none fitting the context)", info)

    if info.is_main:
        adopt_tokenizer(tok_dir, run_dir)  # later stages find it in RUN
    state = resume_state(stage_dir, fresh, info)

    # --- the base model, few-shot: the figure SFT has to beat ------------------------------------
    base_file = stage_dir / "base_eval.json"
    if info.is_main and not base_file.exists():
        base, _ = protocol.evaluate_policy(model, tok, cfg.world, cfg.eval, chat=False, prefix="base/eval")
        atomic_write_json(base_file, base)
    base = json.loads(base_file.read_text()) if info.is_main else {}

    # --- train ------------------------------------------------------------------------------------
    model.train()
    session = Session.start(tc, STAGE, model, stage_dir, info, cfg.to_dict(), state)
    session.epoch_size = len(rendered)  # train/epoch, as TRL logs it
    n_targets = sum(int((r[1] >= 0).sum()) for r in rendered)
    print0(f"sft: {len(rendered):,} conversations ({n_targets:,} trained tokens"
           + (f"; {len(held):,} held out" if held else "") + f"), batch {tc.batch_size} x "
           f"{tc.grad_accum} x {info.world}, {tc.max_steps} steps", info=info)

    def micro_loss(step: int, micro: int) -> torch.Tensor:
        x, y, seg = get_batch(rendered, tc.batch_size, tc.seed, step, micro, info.rank, info.world,
                              pack_to=context if tc.packing else 0,
                              pair_cost=attention_pair_cost(cfg.model.n_embd))
        return session.step_model(x.to(info.device), y.to(info.device),
                                  segments=None if seg is None else seg.to(info.device))

    def evaluate() -> dict:
        figures, _ = protocol.evaluate_policy(model, tok, cfg.world, cfg.eval)
        return {k: v for k, v in figures.items() if isinstance(v, float)}

    loss = session.run_steps(micro_loss, evaluate)
    if session.stopped_early():
        cleanup(info)
        return {"stopped_at": session.last_step}

    # --- final evaluation, weights, summary --------------------------------------------------------
    summary: dict = {}
    if info.is_main:
        figures, samples = protocol.evaluate_policy(model, tok, cfg.world, cfg.eval)
        atomic_write_text(stage_dir / "eval_samples.jsonl",
                          "".join(json.dumps(s) + "\n" for s in samples))
        held_figures = {}  # the held-out slice of a --data file: the training loss, and on GSM8K rows the accuracy
        if held:
            held_figures["heldout/loss"] = heldout_loss(model, [r for r, _, _ in held], tc.batch_size, info.device,
                                                        session.autocast)
            problems = [file_problem(m[:-1], a) for _, m, a in held if a is not None]
            if problems:
                held_figures |= greedy_accuracy(model, tok, problems, cfg.eval.max_new_tokens, seed=cfg.eval.seed,
                                                prefix="heldout")[0]
        summary = {**figures, **base, "steps": tc.max_steps, **counts, **held_figures,
                   "wall_seconds": time.perf_counter() - t_start}
        if loss is not None:
            summary["train/final_loss"] = loss
    session.finish(summary, **{k: v for k, v in summary.items() if isinstance(v, float) and k.startswith("eval/")})
    if info.is_main:
        held_out = "".join(f", held-out {what} {summary[key]:{fmt}}" for key, what, fmt in
                           (("heldout/loss", "loss", ".3f"), ("heldout/accuracy", "accuracy", ".1%")) if key in summary)
        print0(f"sft: accuracy {summary['eval/accuracy']:.1%} (base few-shot {base['base/eval/accuracy']:.1%}), "
               f"gold {summary['eval/gold_reward']:.3f}{held_out}; wrote {stage_dir}")
    cleanup(info)
    return summary
