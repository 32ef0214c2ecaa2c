"""Pretraining: next-token prediction on a text corpus.

    gptstack pretrain --out runs/tiny                                   # the tiny recipe, built-in corpus
    gptstack pretrain --recipe shakespeare-char --data input.txt --out runs/sc
    torchrun --nproc_per_node=2 -m gptstack.cli pretrain --out runs/tiny    # DDP (gloo on CPU)
    torchrun --nproc_per_node=2 -m gptstack.cli pretrain --out runs/tiny --set pretrain.fsdp=true

Writes RUN/tokenizer (trained first when absent), RUN/data (packed tokens), and RUN/pretrain:
model.safetensors, config.json, checkpoint/, metrics.jsonl, summary.json. Given the same RUN
again it resumes from the checkpoint (bit-for-bit on CPU) unless --fresh.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..config import Config
from ..data.corpus import build_corpus, eval_windows, get_batch
from ..model.gpt import GPT
from ..tokenizer import Tokenizer
from ..rundir import check_vocab
from ..train.dist import cleanup, init_distributed, print0
from ..train.loop import Session, resume_state
from ..train.precision import autocast, measure_peak_flops
from ..train.sources import Corpus

STAGE = "pretrain"


def ensure_tokenizer(run: Path, cfg: Config, corpus: Corpus, info) -> Tokenizer:
    """RUN/tokenizer if present, else trained on (the start of) the train split as the recipe says."""
    tok_dir = run / "tokenizer"
    if not (tok_dir / "gptstack.json").exists():
        if info.is_main:
            texts, budget = [], cfg.tokenizer.max_train_chars
            for d in corpus.splits()[0]:
                texts.append(d[:budget])
                budget -= len(texts[-1])
                if budget <= 0:
                    break
            tok = Tokenizer.train(texts, cfg.tokenizer.vocab_size, pattern=cfg.tokenizer.pattern)
            tok.save(tok_dir)
        if info.enabled:
            torch.distributed.barrier()
    return Tokenizer.load(tok_dir)


@torch.no_grad()
def evaluate(model, tokens, block_size: int, device, dtype, batch_size: int = 64, n_batches: int | None = None,
             seed: int = 0, bytes_per_split: int | None = None, tokenizer=None) -> dict:
    """Mean next-token loss (nats) over the *full* split in non-overlapping windows, or over
    `n_batches` random batches for a quick estimate; with the split's byte count, bits per byte."""
    model.eval()
    total_nats, total_tokens, text_nats = 0.0, 0, 0.0
    bos = tokenizer.bos_id if tokenizer is not None else -1
    if n_batches:
        batches = [get_batch(tokens, batch_size, block_size, seed, 10**9 + i) for i in range(n_batches)]
    else:
        x, y, tail = eval_windows(tokens, block_size)
        batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        if tail is not None:
            batches.append(tail)
    for xb, yb in batches:
        xb, yb = xb.to(device), yb.to(device)
        with autocast(str(device), dtype):
            logits = model(xb)
        nats = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="none")
        total_nats += nats.sum().item()
        text_nats += nats[yb.flatten() != bos].sum().item()  # bits per byte counts text, not <|bos|>
        total_tokens += yb.numel()
    model.train()
    out = {"loss": total_nats / total_tokens, "tokens": total_tokens}
    if bytes_per_split and not n_batches:
        out["bpb"] = text_nats / math.log(2) / bytes_per_split
    return out


def run(cfg: Config, out: str | Path, fresh: bool = False, skip_bad_rows: bool = False) -> dict:
    t_start = time.perf_counter()
    tc = cfg.pretrain
    info = init_distributed()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    run_dir, stage_dir = Path(out), Path(out) / STAGE
    corpus = Corpus(cfg, skip_bad_rows)
    if info.is_main and cfg.data.paths:
        corpus.splits()  # bad input stops here, before any training or writing
    state = resume_state(stage_dir, fresh, info)

    # --- tokenizer and data ----------------------------------------------------------------
    tok = ensure_tokenizer(run_dir, cfg, corpus, info)
    cfg.model.vocab_size = tok.vocab_size
    if state is not None:
        check_vocab(state["config"]["model"]["vocab_size"], tok, stage_dir / "checkpoint", exact=True)
    if info.is_main:
        splits = build_corpus(corpus.splits, corpus.fingerprint, tok, run_dir / "data")
    if info.enabled:
        torch.distributed.barrier()
    if not info.is_main:
        splits = build_corpus(corpus.splits, corpus.fingerprint, tok, run_dir / "data")
    train_tokens, val = splits["train"].tokens, splits["val"]

    # --- model, optimizer, resume --------------------------------------------------------------
    torch.manual_seed(tc.seed)
    model = GPT(cfg.model).to(info.device)
    block = cfg.model.block_size
    tokens_per_step = tc.batch_size * block * tc.grad_accum * info.world  # the global batch, derived once
    session = Session.start(tc, STAGE, model, stage_dir, info, cfg.to_dict(), state)
    peak = tc.peak_flops or measure_peak_flops(info.device, session.dtype)
    flops_per_token = model.flops_per_token()
    print0(f"model: {model.num_params() / 1e6:.2f}M params, vocab {tok.vocab_size}, context {block}; "
           f"{tokens_per_step} tokens/step x {tc.max_steps} steps; {len(train_tokens):,} train tokens; "
           f"dtype {str(session.dtype).removeprefix('torch.')}, {info.world} process(es)", info=info)

    def micro_loss(step: int, micro: int) -> torch.Tensor:
        x, y = get_batch(train_tokens, tc.batch_size, block, tc.seed, step, micro, info.rank, info.world)
        return session.step_model(x.to(info.device), y.to(info.device))

    # --- the loop ------------------------------------------------------------------------------
    tokens_since = 0
    for step in session.steps():
        result = session.step(step, lambda micro: micro_loss(step, micro))
        if result is None:
            continue
        lr, train_loss, grad_norm = result
        tokens_since += tokens_per_step
        done = step + 1
        if done % tc.log_every == 0 or done == tc.max_steps:
            tok_s = tokens_since / session.seconds_since_last_log()
            mfu = flops_per_token * tok_s / (peak * info.world)
            tokens_since = 0
            session.log(done, {"loss": f"{train_loss:.3f}", "tok_s": f"{tok_s:,.0f}", "mfu": f"{mfu:.1%}"},
                        **{"train/loss": train_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                           "perf/tokens_per_sec": tok_s, "perf/mfu": mfu, "tokens_seen": done * tokens_per_step})
        if tc.eval_every and done % tc.eval_every == 0 and done != tc.max_steps:
            est = evaluate(model, val.tokens, block, info.device, session.dtype, n_batches=tc.eval_batches, seed=tc.seed)
            session.log(done, **{"val/loss_estimate": est["loss"]})
        if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done != tc.max_steps:
            session.checkpoint(done)
    if session.stopped_early():
        cleanup(info)
        return {"stopped_at": session.last_step}

    # --- final: full-split evaluation, weights, summary -------------------------------------------
    final = evaluate(model, val.tokens, block, info.device, session.dtype, bytes_per_split=val.n_bytes, tokenizer=tok)
    summary = {
        "val_loss": final["loss"],
        "val_bpb": final["bpb"],
        "val_tokens": final["tokens"],
        "tokens_seen": tc.max_steps * tokens_per_step,
        "params": model.num_params(),
        "steps": tc.max_steps,
        "wall_seconds": time.perf_counter() - t_start,
        **corpus.counts,
    }
    session.finish(summary, **{"val/loss": final["loss"], "val/bpb": final["bpb"]})
    print0(f"{STAGE}: val_loss {final['loss']:.4f} nats/token, val_bpb {final['bpb']:.4f}, "
           f"{summary['wall_seconds']:.1f} s; wrote {stage_dir}", info=info)
    cleanup(info)
    return summary
