"""The batched sampling engine: the one generation path of eval, chat, best-of-N and RL.

    from gptstack.engine import generate
    out = generate(model, prompts, max_new_tokens=64, n=4, temperature=1.0, stop_ids=[end_id], seed=0)
    out[i][j].tokens, out[i][j].logprobs, out[i][j].finished     # sample j of prompts[i]

How it works, per chunk of prompts:
  - prompts of different lengths are *left*-padded to a common length; every row has its own RoPE
    positions (counted over its real tokens) and a key-padding mask, so a pad never changes a
    result and is never mistaken for an end of sequence;
  - one prefill per prompt; its KV cache is then copied n times along the batch, so the n samples
    of a prompt share it;
  - one token per step for all rows, the KV cache preallocated (no growth, no per-step mask
    building); a row that stops on a stop id or its length limit is masked, and once half the rows
    are done the batch is compacted so finished rows stop costing compute;
  - temperature, top-k, top-p; per-token logprobs of the *unfiltered* tempered distribution,
    log_softmax(logits / T) at the sampled token (log_softmax(logits) for T = 0), which is what a
    fresh forward pass recomputes in RL.

Determinism. Sample j of prompts[i] draws its random numbers from its own `torch.Generator`
seeded from (seed, i, j) (`stream_uniforms`); step t turns uniform u_t into a token by inverting
the CDF of that row's (filtered) distribution. So a stream's randomness never depends on the other
prompts, the batch size, chunking, the order of prompts or the device, and the same call gives the
same result. Its *logits* can differ at float-rounding level with the batch it runs in (padding
and GEMM shapes change the summation order), so across batch compositions the tokens are the same
except where u_t lands within ~1e-6 of a CDF boundary (a near-tie), and logprobs agree to ~1e-5.
tests/test_engine.py checks batched KV-cache sampling against one-at-a-time sampling without a
cache, token for token.

Context. A prompt longer than the model's context (config.block_size) is a UserError unless
`truncate=True`, which keeps its last block_size + 1 - max_new_tokens tokens (at least 1) so the
response fits. A sequence never runs past the context: a row whose prompt + response reaches
block_size + 1 tokens stops there, like max_new_tokens (finished=False).

Speed. On CPU a small model is bound by per-op overhead and, from ~10 M parameters, by memory
traffic (weights + KV cache read once per step). The decode step is the model's inference forward
(model/inference.py: `Decoder.forward`) over weights prepared once per weight version: each
RMSNorm weight folded into the matmul after it, q/k rows in RoPE-pair order so RoPE is one complex
multiply, and on CPU the decode matmuls in MKL's packed format (>= 1 MB) or as contiguous (in, out)
copies: fp32 `F.linear` re-packs its transposed weight on every call, which makes it slower at
decode's few rows (bf16 `F.linear` goes to oneDNN, which is faster than either, so bf16 models use it;
figures in bench/RESULTS.md). The prepared copy is cached per model until a parameter changes
(`prepared_weights`), at the price of about twice the model's matmul weights in memory. tests/test_engine.py
checks the engine's tokens and logprobs against `GPT.forward`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..common import UserError
from ..model.gpt import GPT
from ..model.inference import Decoder, PreparedWeights, prepared_weights

DEFAULT_MAX_ROWS = 256  # sequences decoded together when batch_size is not given
PREFILL_TOKENS = 8192   # prompt tokens per prefill pass (its activations are ~ tokens x 3 x ffn floats)


@dataclass
class Completion:
    prompt_index: int       # index into the `prompts` given to generate()
    tokens: list[int]       # generated ids, the stop id included when it stopped on one
    logprobs: list[float]   # per token: log_softmax(logits / T) at it (unfiltered; T = 0: log_softmax(logits))
    finished: bool          # stopped on a stop id (not on max_new_tokens or the context limit)


# --- randomness: one generator per (prompt, sample) stream ---------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 64-bit seed for one stream; distinct inputs give unrelated seeds."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ prompt_index) ^ sample_index)


def stream_uniforms(seed: int, prompt_index: int, sample_index: int, length: int) -> torch.Tensor:
    """The uniforms in [0, 1) that sample `sample_index` of prompt `prompt_index` uses, one per step
    (float32, CPU). The engine draws them once per call; a reference implementation can too."""
    g = torch.Generator().manual_seed(stream_seed(seed, prompt_index, sample_index))
    return torch.rand(length, generator=g)


_BELOW_ONE = 1.0 - 2.0 ** -23


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, V) logits and (R, 1) uniforms -> (R, 1) token ids and their (R, 1) logprobs.

    The token is the inverse CDF of the (top-k, then top-p filtered, renormalized) distribution
    of logits / T at u; the logprob is that of the *unfiltered* log_softmax(logits / T). T = 0 is
    argmax (u unused). A token of probability 0, filtered or underflowed, is never returned: the
    search point stays strictly below the CDF's total, and the search returns the first index whose
    CDF exceeds it.
    """
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(dim=-1, keepdim=True)
        return tok, torch.log_softmax(logits, dim=-1).gather(1, tok)
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    k = top_k if top_k and top_k < logits.size(-1) else None
    p = top_p if top_p is not None and top_p < 1.0 else None
    if k is None and p is None:
        cdf = logp.exp().cumsum_(dim=-1)
        order = None
    else:
        if k is not None:
            vals, order = torch.topk(logits, k, dim=-1)  # sorted, largest first
        else:
            vals, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(vals, dim=-1)
        if p is not None:  # keep the smallest prefix whose mass reaches top_p (the first always)
            before = probs.cumsum(dim=-1) - probs
            probs = probs.masked_fill(before >= p, 0.0)
        cdf = probs.cumsum_(dim=-1)
    # v = u * total * (1 - 2^-23) < total strictly, in float32 rounding too (total * 2^-23 is at
    # least one ulp of total), so the search lands on a token whose CDF step is > 0
    v = u * (cdf[:, -1:] * _BELOW_ONE)
    tok = torch.searchsorted(cdf, v, right=True)
    if order is not None:
        tok = order.gather(1, tok)
    return tok, logp.gather(1, tok)


# --- weights prepared for the decode loop ------------------------------------------------------

# --- the engine --------------------------------------------------------------------------------

def check_prompts(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, n: int, temperature: float,
           top_k: int | None, top_p: float | None, truncate: bool) -> list[list[int]]:
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if n < 1:
        raise UserError(f"n (samples per prompt) must be >= 1, got {n}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise UserError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    ctx, vocab = model.config.block_size, model.config.vocab_size
    keep = max(1, ctx + 1 - max_new_tokens)
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise UserError(f"prompt {i} is empty: it needs at least one token (e.g. <|bos|>)")
        if min(p) < 0 or max(p) >= vocab:
            bad = next(t for t in p if not 0 <= t < vocab)
            raise UserError(f"prompt {i}: token id {bad} is outside the model's vocabulary [0, {vocab})")
        if truncate and len(p) > keep:
            p = p[-keep:]
        elif len(p) > ctx:
            raise UserError(f"prompt {i} has {len(p)} tokens, more than the model's context of {ctx} "
                            f"(model.block_size); shorten it, or pass truncate=True to keep its last {keep}")
        out.append(p)
    return out


@torch.inference_mode()
def generate(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, n: int = 1,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stop_ids: Sequence[int] = (), seed: int = 0, batch_size: int | None = None,
             truncate: bool = False, on_token=None) -> list[list[Completion]]:
    """Sample n completions of each prompt; result[i] holds the n completions of prompts[i].

    temperature 0 = greedy (then top_k/top_p do nothing, and the n samples are identical);
    top_k 0/None and top_p None/1 = off. Stops a row on any of `stop_ids` (kept as its last
    token, finished=True) or after max_new_tokens. batch_size: prompts per chunk (each chunk
    decodes batch_size * n rows; default: up to 256 rows). truncate: see the module docstring.
    on_token(prompt_index, sample_index, token): called for every token as it is sampled (stop
    token included), for streaming output in chat.
    Runs on the model's device and dtype; the model is not modified.
    """
    prompts = check_prompts(model, prompts, max_new_tokens, n, temperature, top_k, top_p, truncate)
    results: list[list[Completion | None]] = [[None] * n for _ in prompts]
    if max_new_tokens == 0:
        return [[Completion(i, [], [], False) for _ in range(n)] for i in range(len(prompts))]
    per_chunk = batch_size or max(1, DEFAULT_MAX_ROWS // n)
    # longest first, so each chunk holds prompts of similar length (little padding); each stream's
    # randomness is its own, so grouping does not change what it samples
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    weights = prepared_weights(model)
    with _autocast_off(weights.emb.device):  # the model's own dtype, whatever the caller's context
        for c0 in range(0, len(order), per_chunk):
            idx = order[c0 : c0 + per_chunk]
            chunk = _generate_chunk(model, weights, [prompts[i] for i in idx], idx, max_new_tokens, n,
                                    temperature, top_k, top_p, stop_ids, seed, on_token)
            for (i, j), comp in zip(_rows(idx, n), chunk):
                results[i][j] = comp
    return results  # type: ignore[return-value]


def _autocast_off(device: torch.device):
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast
        return contextlib.nullcontext()


def _rows(prompt_indices: list[int], n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in prompt_indices for j in range(n)]


def _generate_chunk(model: GPT, weights: PreparedWeights, prompts: list[list[int]], prompt_indices: list[int],
                    max_new: int, n: int, temperature: float, top_k, top_p, stop_ids, seed,
                    on_token=None) -> list[Completion]:
    device, dtype = weights.emb.device, weights.emb.dtype
    P, L = len(prompts), max(len(p) for p in prompts)
    R = P * n
    ctx = model.config.block_size
    slots = L + max_new - 1  # the last sampled token is never fed back
    # n > 1: prefill into P rows of L slots, then copy them to the n samples' rows
    dec = Decoder(model, weights, P, slots if n == 1 else L, slots, device, dtype)

    # --- prefill: left-padded prompts, per-row positions, key-padding mask ---------------------
    lens = torch.tensor([len(p) for p in prompts])
    pad = L - lens                                                     # (P,)
    ids = torch.zeros(P, L, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, L - len(p):] = torch.tensor(p)
    col = torch.arange(L)
    positions = (col[None, :] - pad[:, None]).clamp(min=0)            # (P, L)
    padded = bool((pad > 0).any())
    if padded:
        real = col[None, :] >= pad[:, None]                           # (P, L)
        own = torch.eye(L, dtype=torch.bool)                          # a pad query sees itself: stays finite
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        prefill_mask = (causal & (real[:, None, :] | own)).unsqueeze(1).to(device)  # (P, 1, L, L)
        # decode steps: one additive row per sequence over all slots (0 = real, -inf = pad)
        key_bias = torch.zeros(P, 1, 1, slots, dtype=dtype)
        key_bias[:, 0, 0, :L].masked_fill_(~real, float("-inf"))
        key_bias = key_bias.to(device)
    else:
        prefill_mask = key_bias = None
    positions, ids = positions.to(device), ids.to(device)
    group = max(1, PREFILL_TOKENS // L)  # prompts per prefill pass: bounded activation memory
    logits = torch.cat([
        dec.forward(ids[g : g + group], 0, dec.rot[positions[g : g + group]].unsqueeze(2),
                    prefill_mask[g : g + group] if prefill_mask is not None else None, rows=slice(g, g + group))
        for g in range(0, P, group)])                                  # (P, V): the last position's

    # --- share the prefill among the n samples of each prompt ------------------------------------
    if n > 1:
        dec.expand(n, slots)
        logits = logits.repeat_interleave(n, 0)
        key_bias = key_bias.repeat_interleave(n, 0) if key_bias is not None else None
    pos = (lens.repeat_interleave(n) - 1).to(device)                  # position of the last fed token
    # a row stops at the context limit: prompt + response <= block_size + 1 tokens
    limit = torch.clamp(ctx + 1 - lens, max=max_new).repeat_interleave(n)
    capped = bool((limit < max_new).any())
    limit = limit.to(device)
    uniforms = torch.stack([stream_uniforms(seed, i, j, max_new) for i, j in _rows(prompt_indices, n)]).to(device)

    # --- decode loop -------------------------------------------------------------------------
    stop = torch.tensor(sorted(set(int(s) for s in stop_ids)), dtype=torch.long, device=device)
    track = len(stop) > 0 or capped
    check_every = 1 if device.type == "cpu" else 8  # "all done?" is a host sync: rarer on GPUs
    rows = torch.arange(R, device=device)                            # chunk row of each live row
    tok_buf = torch.empty(R, max_new, dtype=torch.long, device=device)
    lp_buf = torch.empty(R, max_new, dtype=torch.float32, device=device)
    alive = torch.ones(R, dtype=torch.bool, device=device)
    finished = torch.zeros(R, dtype=torch.bool, device=device)
    length = limit.clone()                                            # tokens kept per row
    done: dict[int, tuple[list[int], list[float], bool]] = {}
    streams = _rows(prompt_indices, n)                                # chunk row -> (prompt index, sample index)

    def flush(sel: torch.Tensor) -> None:
        for r, toks, lps, m, f in zip(rows[sel].tolist(), tok_buf[sel].tolist(), lp_buf[sel].tolist(),
                                      length[sel].tolist(), finished[sel].tolist()):
            done[r] = (toks[:m], lps[:m], f)

    for t in range(max_new):
        tok, lp = sample_tokens(logits, uniforms[:, t : t + 1], temperature, top_k, top_p)
        if on_token is not None:
            for r, live, token in zip(rows.tolist(), alive.tolist(), tok[:, 0].tolist()):
                if live:
                    on_token(*streams[r], token)
        tok_buf[:, t : t + 1] = tok
        lp_buf[:, t : t + 1] = lp
        if track:
            hit = alive & (torch.isin(tok[:, 0], stop) if len(stop) else torch.zeros_like(alive))
            length = torch.where(hit, t + 1, length)
            finished |= hit
            alive &= ~hit & (limit > t + 1)
            if t % check_every == 0 or t == max_new - 1:
                live = int(alive.sum())
                if live == 0:
                    break
                if live <= alive.numel() // 2:  # compact: finished rows stop costing compute
                    flush(~alive)
                    keep = alive.nonzero().squeeze(1)
                    dec.select(keep)
                    rows, tok_buf, lp_buf, length, finished, limit = (
                        x.index_select(0, keep) for x in (rows, tok_buf, lp_buf, length, finished, limit))
                    tok, pos, uniforms = tok.index_select(0, keep), pos.index_select(0, keep), uniforms.index_select(0, keep)
                    key_bias = key_bias.index_select(0, keep) if key_bias is not None else None
                    alive = alive.index_select(0, keep)
        if t == max_new - 1:
            break
        pos += 1
        slot = L + t
        mask = key_bias[..., : slot + 1] if key_bias is not None else None
        logits = dec.forward(tok, slot, dec.rot[pos][:, None, None], mask)
    flush(torch.ones_like(rows, dtype=torch.bool))
    out = []
    for r, (i, _j) in enumerate(streams):
        toks, lps, fin = done[r]
        out.append(Completion(i, toks, lps, fin))
    return out
