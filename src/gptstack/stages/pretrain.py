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
import shutil
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from tqdm.auto import tqdm

from ..common import UserError, atomic_write_json
from ..config import Config
from ..data.corpus import BUILTIN_TEXTS, build_corpus, eval_windows, get_batch, read_documents, split_documents
from ..model.gpt import GPT
from ..tokenizer import Tokenizer
from ..train.checkpoint import load_checkpoint, save_checkpoint, save_model, set_rng_state
from ..train.dist import all_reduce_mean, cleanup, init_distributed, print0, wrap_model
from ..train.metrics import MetricsLogger
from ..train.optim import build_optimizer, lr_at
from ..train.precision import autocast, measure_peak_flops, resolve_dtype

STAGE = "pretrain"


class Corpus:
    """The pretraining corpus a config names: files (data.paths), the task world's documents, or a
    shipped text; read (and validated) once, lazily, and split into train / val."""

    def __init__(self, cfg: Config, skip_bad_rows: bool = False):
        self.cfg, self.skip_bad_rows = cfg, skip_bad_rows
        self.counts: dict = {}
        self._splits = None
        d = cfg.data
        if d.paths:
            self.fingerprint = {"paths": [(str(Path(p).resolve()), Path(p).stat().st_size if Path(p).exists() else -1,
                                           Path(p).stat().st_mtime_ns if Path(p).exists() else -1) for p in d.paths],
                                "doc_separator": d.doc_separator, "split": d.split, "val_fraction": d.val_fraction}
        elif d.builtin == "world":
            self.fingerprint = {"world": cfg.world.__dict__, "chars": d.world_chars, "seed": cfg.pretrain.seed,
                                "val_fraction": d.val_fraction}
        elif (BUILTIN_TEXTS / f"{d.builtin}.txt").exists():
            self.fingerprint = {"builtin": d.builtin, "split": d.split, "val_fraction": d.val_fraction}
        else:
            raise UserError(f"data.builtin: expected world or one of "
                            f"{sorted(p.stem for p in BUILTIN_TEXTS.glob('*.txt'))}, got {d.builtin!r}")

    def splits(self) -> tuple[list[str], list[str], bool]:
        if self._splits is None:
            d = self.cfg.data
            if d.paths or d.builtin != "world":
                paths = d.paths or [str(BUILTIN_TEXTS / f"{d.builtin}.txt")]
                docs, self.counts = read_documents(paths, d.doc_separator, self.skip_bad_rows)
                self._splits = split_documents(docs, d.val_fraction, d.split)
            else:
                from ..world import documents

                seed = self.cfg.pretrain.seed
                self._splits = (documents(d.world_chars, seed, self.cfg.world, "train"),
                                documents(int(d.world_chars * d.val_fraction), seed, self.cfg.world, "val"), False)
        return self._splits


def check_vocab(model_vocab: int, tok: Tokenizer, where) -> None:
    if model_vocab != tok.vocab_size:
        raise UserError(f"{where}: the model has vocab_size {model_vocab} but the run's tokenizer has "
                        f"{tok.vocab_size} tokens; they must come from the same run (or use --fresh)")


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
    if tc.schedule not in ("cosine", "wsd", "constant"):
        raise UserError(f"pretrain.schedule: expected cosine, wsd or constant, got {tc.schedule!r}")
    info = init_distributed()
    try:
        dtype = resolve_dtype(tc.dtype, info.device)
    except ValueError as e:
        raise UserError(f"pretrain.{e}") from None
    if tc.threads:
        torch.set_num_threads(tc.threads)
    run_dir, stage_dir = Path(out), Path(out) / STAGE
    corpus = Corpus(cfg, skip_bad_rows)
    if info.is_main and cfg.data.paths:
        corpus.splits()  # bad input stops here, before any training or writing
    if fresh and info.is_main and stage_dir.exists():
        shutil.rmtree(stage_dir)
    if info.enabled:
        torch.distributed.barrier()  # no rank reads the stage directory before --fresh cleared it

    # --- tokenizer and data ----------------------------------------------------------------
    tok = ensure_tokenizer(run_dir, cfg, corpus, info)
    cfg.model.vocab_size = tok.vocab_size
    state = load_checkpoint(stage_dir)
    if state is not None:
        check_vocab(state["config"]["model"]["vocab_size"], tok, stage_dir / "checkpoint")
    if info.is_main:
        splits = build_corpus(corpus.splits, corpus.fingerprint, tok, run_dir / "data")
    if info.enabled:
        torch.distributed.barrier()
    if not info.is_main:
        splits = build_corpus(corpus.splits, corpus.fingerprint, tok, run_dir / "data")
    train_tokens, val = splits["train"].tokens, splits["val"]

    # --- model and optimizer -----------------------------------------------------------------
    torch.manual_seed(tc.seed)
    model = GPT(cfg.model).to(info.device)
    n_params = model.num_params()
    block = cfg.model.block_size
    tokens_per_step = tc.batch_size * block * tc.grad_accum * info.world
    assert tokens_per_step == tc.batch_size * tc.grad_accum * info.world * block  # the global batch, derived once
    train_model = wrap_model(model, info, tc.fsdp)
    optimizer = build_optimizer(train_model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2))
    sd_options = StateDictOptions(full_state_dict=True, cpu_offload=True)

    start_step = 0
    if state is not None:
        set_state_dict(train_model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        start_step = state["step"]
        set_rng_state(state["rng"])
        print0(f"resuming {stage_dir} from step {start_step}", info=info)
    step_model = torch.compile(train_model) if tc.compile else train_model
    logger = MetricsLogger(stage_dir, resume_step=start_step if state else None, enabled=info.is_main)
    if info.is_main:
        atomic_write_json(stage_dir / "config.json", cfg.to_dict())
    peak = tc.peak_flops or measure_peak_flops(info.device, dtype)
    flops_per_token = model.flops_per_token()
    print0(f"model: {n_params / 1e6:.2f}M params, vocab {tok.vocab_size}, context {block}; "
           f"{tokens_per_step} tokens/step x {tc.max_steps} steps; {len(train_tokens):,} train tokens; "
           f"dtype {str(dtype).removeprefix('torch.')}, {info.world} process(es)", info=info)

    def checkpoint(step: int) -> None:
        model_sd, optim_sd = get_state_dict(train_model, optimizer, options=sd_options)
        if info.is_main:
            save_checkpoint(stage_dir, model_sd, optim_sd, step, cfg.to_dict())

    # --- the loop ------------------------------------------------------------------------------
    bar = tqdm(total=tc.max_steps, initial=start_step, desc=STAGE, unit="step", disable=not info.is_main,
               dynamic_ncols=True, mininterval=1.0)
    bad_steps, t_last, tokens_since = 0, time.perf_counter(), 0
    last_step = min(tc.max_steps, tc.stop_at) if tc.stop_at else tc.max_steps
    for step in range(start_step, last_step):
        lr = lr_at(step, tc.max_steps, tc.lr, tc.warmup_steps, tc.schedule, tc.min_lr_ratio, tc.decay_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            x, y = get_batch(train_tokens, tc.batch_size, block, tc.seed, step, micro, info.rank, info.world)
            x, y = x.to(info.device), y.to(info.device)
            sync = micro == tc.grad_accum - 1
            if info.enabled and not tc.fsdp and not sync:
                ctx = train_model.no_sync()
            else:
                ctx = torch.enable_grad()
            with ctx:
                if info.enabled and tc.fsdp:
                    train_model.set_requires_gradient_sync(sync)
                with autocast(info.device, dtype):
                    loss = step_model(x, y)
                (loss / tc.grad_accum).backward()
            loss_sum += loss.item()
        train_loss = all_reduce_mean(loss_sum / tc.grad_accum, info)
        if not math.isfinite(train_loss):
            # NaN/inf guard: drop this update; stop if it keeps happening (the checkpoint on disk
            # is the last good state).
            optimizer.zero_grad(set_to_none=True)
            bad_steps += 1
            if bad_steps >= tc.max_bad_steps:
                raise RuntimeError(f"loss was {train_loss} for {bad_steps} consecutive steps at step {step}; "
                                   f"stopping (last good checkpoint: {stage_dir / 'checkpoint'}); lower pretrain.lr?")
            continue
        bad_steps = 0
        grad_norm = torch.nn.utils.clip_grad_norm_(train_model.parameters(), tc.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_since += tokens_per_step
        done = step + 1

        # --- log / eval / checkpoint ---
        if done % tc.log_every == 0 or done == tc.max_steps:
            now = time.perf_counter()
            tok_s = tokens_since / (now - t_last)
            mfu = flops_per_token * tok_s / (peak * info.world)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}", refresh=False)
            logger.log(done, **{"train/loss": train_loss, "train/lr": lr, "train/grad_norm": float(grad_norm),
                                "perf/tokens_per_sec": tok_s, "perf/mfu": mfu, "tokens_seen": done * tokens_per_step})
            t_last, tokens_since = now, 0
        if tc.eval_every and done % tc.eval_every == 0 and done != tc.max_steps:
            est = evaluate(model, val.tokens, block, info.device, dtype, n_batches=tc.eval_batches, seed=tc.seed)
            logger.log(done, **{"val/loss_estimate": est["loss"]})
        if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done != tc.max_steps:
            checkpoint(done)
        bar.update(1)
    bar.close()
    if last_step < tc.max_steps:  # time-boxed: leave a checkpoint to resume from, nothing final
        if last_step > start_step:
            checkpoint(last_step)
        logger.close()
        print0(f"{STAGE}: stopped at step {last_step} of {tc.max_steps} (pretrain.stop_at); rerun to resume", info=info)
        cleanup(info)
        return {"stopped_at": last_step}

    # --- final: full-split evaluation, weights, summary -------------------------------------------
    final = evaluate(model, val.tokens, block, info.device, dtype, bytes_per_split=val.n_bytes, tokenizer=tok)
    checkpoint(tc.max_steps)
    model_sd, _ = get_state_dict(train_model, optimizer, options=sd_options)
    summary = {
        "val_loss": final["loss"],
        "val_bpb": final["bpb"],
        "val_tokens": final["tokens"],
        "tokens_seen": tc.max_steps * tokens_per_step,
        "params": n_params,
        "steps": tc.max_steps,
        "wall_seconds": time.perf_counter() - t_start,
        **corpus.counts,
    }
    if info.is_main:
        save_model(stage_dir, model_sd, cfg.to_dict())
        atomic_write_json(stage_dir / "summary.json", summary)
        logger.log(tc.max_steps, **{"val/loss": final["loss"], "val/bpb": final["bpb"]})
    logger.close()
    print0(f"{STAGE}: val_loss {final['loss']:.4f} nats/token, val_bpb {final['bpb']:.4f}, "
           f"{summary['wall_seconds']:.1f} s; wrote {stage_dir}", info=info)
    cleanup(info)
    return summary
