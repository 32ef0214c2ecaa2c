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
traffic (weights + KV cache read once per step). The decode step (`_Decoder.forward`) is the
model's forward written out over weights prepared once per weight version (`_Weights`): each
RMSNorm weight folded into the matmul after it, q/k rows in RoPE-pair order so RoPE is one complex
multiply, and on CPU the decode matmuls in MKL's packed format (>= 1 MB) or as contiguous (in, out)
copies: fp32 `F.linear` re-packs its transposed weight on every call, which makes it slower at
decode's few rows (bf16 `F.linear` goes to oneDNN, which is faster than either, so bf16 models use it;
figures in bench/RESULTS.md). The prepared copy is cached per model until a parameter changes
(`_prepared`), at the price of about twice the model's matmul weights in memory. tests/test_engine.py
checks the engine's tokens and logprobs against `GPT.forward`.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..common import UserError
from ..model.gpt import GPT, rope_tables

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

def _mkl_packed_ok() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _interleave_halves(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Reorder each head's output rows (i, i + half) -> (2i, 2i + 1): RoPE's rotate-half pairs
    become adjacent, so RoPE is one complex multiply. q and k get the same order, so q.k is unchanged."""
    half = head_dim // 2
    return w.view(heads, 2, half, -1).transpose(1, 2).reshape(heads * head_dim, -1)


class _Weights:
    """The model's weights laid out for inference (a copy; the model is not touched):
      - each RMSNorm's weight folded into the matmul that reads its output (W' = W diag(g)),
        so a norm is only x * rsqrt(mean(x^2) + eps);
      - q and k rows in RoPE-pair order (`_interleave_halves`);
      - for the decode steps' few rows, each matmul in the layout fastest for that row count:
        on CPU MKL's packed format (or a contiguous (in, out) copy), because F.linear re-packs
        the transposed weight on every call.
    """

    def __init__(self, model: GPT):
        c = model.config
        H, Hkv, hd = c.n_head, c.kv_heads, c.head_dim
        self.emb = model.tok_emb.weight.detach()
        self.mats = []
        for b in model.layers:
            q, k, v = b.attn.qkv.weight.detach().split([H * hd, Hkv * hd, Hkv * hd])
            qkv = torch.cat([_interleave_halves(q, H, hd), _interleave_halves(k, Hkv, hd), v])
            self.mats.append((qkv * b.attn_norm.weight.detach(), b.attn.proj.weight.detach(),
                              b.mlp.gate_up.weight.detach() * b.mlp_norm.weight.detach(), b.mlp.down.weight.detach()))
        self.head = model.lm_head.weight.detach() * model.norm.weight.detach()
        if self.emb.device.type != "cpu":
            self.mode = "linear"  # cuBLAS reads a transposed weight for free
        elif self.emb.dtype == torch.bfloat16:
            # CPU bf16 F.linear runs oneDNN (AMX where the CPU has it), faster than contiguous
            # (in, out) copies on both bench models
            self.mode = "linear"
        elif self.emb.dtype == torch.float32 and _mkl_packed_ok():
            self.mode = "mkl"
        else:
            self.mode = "mm_t"
        self._linear = None
        self._t: dict[int, object] = {}
        self._packed: dict[int, tuple] = {}

    def prefill(self):
        """(per-layer (qkv, proj, gate_up, down), head) matmul functions for many rows:
        f(x) = x @ W.T, or with a residual f(x, r) = r + x @ W.T."""
        if self._linear is None:
            self._linear = [tuple(_linear(w) for w in ws) for ws in self.mats], _linear(self.head)
        return self._linear

    def decode(self, rows: int):
        """The same for `rows` rows (one new token each)."""
        if self.mode == "linear":
            return self.prefill()
        if rows not in self._packed:
            self._packed.clear()  # one row count at a time (compaction changes it)

            def fn(w):
                if self.mode == "mkl" and w.numel() * w.element_size() >= MKL_MIN_BYTES:
                    return _mkl_packed(w, rows)
                if id(w) not in self._t:
                    self._t[id(w)] = _mm_t(w)
                return self._t[id(w)]
            self._packed[rows] = ([tuple(fn(w) for w in ws) for ws in self.mats], fn(self.head))
        return self._packed[rows]


# MKL's packed format wins for weights from ~1 MB; below, its per-call overhead loses to torch.mm
# with a contiguous (in, out) weight (the two bench models either side, bench/RESULTS.md).
MKL_MIN_BYTES = 1 << 20


def _linear(w: torch.Tensor):
    def f(x, res=None):
        y = F.linear(x, w)
        return y if res is None else res.add_(y)
    return f


def _mm_t(w: torch.Tensor):
    wt = w.t().contiguous()

    def f(x, res=None):
        return torch.mm(x, wt) if res is None else torch.addmm(res, x, wt)
    return f


def _mkl_packed(w: torch.Tensor, rows: int):
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    lin = torch.ops.mkl._mkl_linear

    def f(x, res=None):
        y = lin(x, packed, w, None, rows)
        return y if res is None else res.add_(y)
    return f


_PREPARED: "weakref.WeakKeyDictionary[GPT, tuple[tuple, _Weights]]" = weakref.WeakKeyDictionary()


def _prepared(model: GPT) -> _Weights:
    """Prepared weights, reused while no parameter has changed. The key holds each tensor's pointer,
    version counter *and* its sum and norm: a fused optimizer (AdamW(fused=True), on CPU and CUDA)
    writes parameters in place without bumping the version counter, so a key of pointers and
    versions alone would keep serving the weights of before the update. The sums read the weights
    once, a small fraction of a generation and far less than preparing them again."""
    params = [p.detach() for p in model.parameters()]
    sums = torch.stack([torch.stack([p.sum(), torch.linalg.vector_norm(p)]) for p in params]).tolist()
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device, *s) for p, s in zip(params, sums))
    hit = _PREPARED.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    weights = _Weights(model)
    _PREPARED[model] = (key, weights)
    return weights


class _Decoder:
    """One chunk's decoding state: KV buffers, per-row positions and padding, and the forward
    pass of GPT (model/gpt.py) written out over them."""

    def __init__(self, model: GPT, weights: _Weights, rows: int, length: int, positions: int, device, dtype):
        c = model.config
        self.c, self.w = c, weights
        self.H, self.Hkv, self.hd = c.n_head, c.kv_heads, c.head_dim
        self.gqa = self.H != self.Hkv
        # (rows, slots, heads, head_dim): a step's new keys are one run per row, and SDPA reads
        # the (rows, heads, slots, head_dim) view as fast as a contiguous one (this layout beat a
        # head-major cache on both bench models)
        shape = (rows, length, self.Hkv, self.hd)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(c.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(c.n_layer)]
        # RoPE on adjacent pairs: one complex multiply by e^(i pos freq) (float32/64), or the
        # same rotation written out in real ops (half precision has no complex multiply)
        cos, sin = rope_tables(self.hd, positions, c.rope_theta, device)  # (positions, 1, hd), sin signed
        half = self.hd // 2
        self.complex_rope = dtype in (torch.float32, torch.float64)
        if self.complex_rope:
            self.rot = torch.complex(cos[:, 0, :half], sin[:, 0, half:]).to(
                torch.complex64 if dtype == torch.float32 else torch.complex128)
        else:
            self.rot = torch.stack([cos[:, 0, :half], sin[:, 0, half:]], dim=-1).to(dtype)  # (length, half, 2)
        self.eps = torch.tensor(c.norm_eps, device=device, dtype=dtype)
        self.inv_d = 1.0 / c.n_embd

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its weight (folded into the next matmul): x * rsqrt(mean(x^2) + eps)."""
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        return x * torch.addcmul(self.eps, r, r, value=self.inv_d).rsqrt_()

    def rope(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """x (B, T, heads, head_dim) in pair order; rot: self.rot at the rows' positions, (B, T, 1, ...)."""
        pairs = x.unflatten(-1, (-1, 2))
        if self.complex_rope:
            return torch.view_as_real(torch.view_as_complex(pairs) * rot).flatten(-2)
        a, b = pairs.unbind(-1)
        c, s = rot.unbind(-1)
        return torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)

    def forward(self, ids: torch.Tensor, slot: int, rot: torch.Tensor, mask: torch.Tensor | None,
                rows: slice = slice(None)) -> torch.Tensor:
        """ids (B, T) written at cache slots [slot, slot + T) of cache rows `rows`; rot: self.rot
        at the rows' positions, (B, T, 1, ...); mask bool (B, 1, T, slot + T) / additive float, or
        None = causal. Returns the last position's logits (B, vocab)."""
        B, T = ids.shape
        H, Hkv, hd = self.H, self.Hkv, self.hd
        d, end = self.c.n_embd, slot + T
        causal = mask is None and T > 1
        mats, head = self.w.decode(B) if T == 1 else self.w.prefill()
        x = F.embedding(ids.reshape(-1), self.w.emb)  # (B*T, d)
        for i, (qkv_f, proj_f, gate_up_f, down_f) in enumerate(mats):
            qkv = qkv_f(self.norm(x)).view(B, T, H + 2 * Hkv, hd)
            qk = self.rope(qkv[:, :, : H + Hkv], rot)
            kc, vc = self.k[i][rows], self.v[i][rows]
            kc[:, slot:end] = qk[:, :, H:]
            vc[:, slot:end] = qkv[:, :, H + Hkv :]
            y = F.scaled_dot_product_attention(qk[:, :, :H].transpose(1, 2), kc[:, :end].transpose(1, 2),
                                               vc[:, :end].transpose(1, 2), attn_mask=mask, is_causal=causal,
                                               enable_gqa=self.gqa)
            x = proj_f(y.transpose(1, 2).reshape(B * T, H * hd), x)
            gu = gate_up_f(self.norm(x))
            f = gu.size(1) // 2
            x = down_f(F.silu(gu[:, :f]).mul_(gu[:, f:]), x)
        return head(self.norm(x.view(B, T, d)[:, -1]))

    def expand(self, n: int, length: int) -> None:
        """Copy every row n times along the batch (rows i*n .. i*n+n-1), into buffers of `length` slots."""
        for buf in (self.k, self.v):
            for i, b in enumerate(buf):
                B, S, Hkv, hd = b.shape
                big = torch.empty(B * n, length, Hkv, hd, device=b.device, dtype=b.dtype)
                big.view(B, n, length, Hkv, hd)[:, :, :S] = b[:, None]
                buf[i] = big

    def select(self, keep: torch.Tensor) -> None:
        for buf in (self.k, self.v):
            for i, b in enumerate(buf):
                buf[i] = b.index_select(0, keep)


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
    weights = _prepared(model)
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


def _generate_chunk(model: GPT, weights: _Weights, prompts: list[list[int]], prompt_indices: list[int],
                    max_new: int, n: int, temperature: float, top_k, top_p, stop_ids, seed,
                    on_token=None) -> list[Completion]:
    device, dtype = weights.emb.device, weights.emb.dtype
    P, L = len(prompts), max(len(p) for p in prompts)
    R = P * n
    ctx = model.config.block_size
    slots = L + max_new - 1  # the last sampled token is never fed back
    # n > 1: prefill into P rows of L slots, then copy them to the n samples' rows
    dec = _Decoder(model, weights, P, slots if n == 1 else L, slots, device, dtype)

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
