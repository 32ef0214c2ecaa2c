"""The model's inference forward: the decode path the sampling engine (engine/sampling.py) runs.

    weights = prepared_weights(model)           # cached until a parameter changes
    dec = Decoder(model, weights, rows, slots, positions, device, dtype)
    logits = dec.forward(ids, slot, rot, mask)   # writes the KV cache, returns the last position's logits

It computes exactly GPT.forward (model/gpt.py) — tests/test_engine.py checks tokens and logprobs
against it — over weights laid out for inference rather than for training: each RMSNorm weight
folded into the matmul after it, q/k rows in RoPE-pair order so RoPE is one complex multiply, and on
CPU the decode matmuls in MKL's packed format or as contiguous (in, out) copies (fp32 F.linear
re-packs its transposed weight on every call; figures in bench/RESULTS.md). Training needs the
norm weights as parameters and the plain layout for its gradients, hence two forwards of one model,
both here in model/.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..common import UserError
from .gpt import GPT, dynamic_rope_beyond, rope_tables
from .lora import merged_weight


def _mkl_packed_ok() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _interleave_halves(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Reorder each head's output rows (i, i + half) -> (2i, 2i + 1): RoPE's rotate-half pairs
    become adjacent, so RoPE is one complex multiply. q and k get the same order, so q.k is unchanged."""
    half = head_dim // 2
    return w.view(heads, 2, half, -1).transpose(1, 2).reshape(heads * head_dim, -1)


class PreparedWeights:
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
        self.mats, self.biases = [], []
        for b in model.layers:
            q, k, v = merged_weight(b.attn.qkv).split([H * hd, Hkv * hd, Hkv * hd])
            qkv = torch.cat([_interleave_halves(q, H, hd), _interleave_halves(k, Hkv, hd), v])
            self.mats.append((qkv * b.attn_norm.weight.detach(), merged_weight(b.attn.proj),
                              merged_weight(b.mlp.gate_up) * b.mlp_norm.weight.detach(), merged_weight(b.mlp.down)))
            # biases (imported Qwen2 / Llama with attention_bias or mlp_bias) are added after each
            # matmul; the norm folding leaves them as they are, q/k's follow their rows' new order
            bq, bk, bv = (b.attn.qkv.bias.detach().split([H * hd, Hkv * hd, Hkv * hd])
                          if b.attn.qkv.bias is not None else (None,) * 3)
            self.biases.append((
                None if bq is None else torch.cat([_interleave_halves(bq[:, None], H, hd)[:, 0],
                                                   _interleave_halves(bk[:, None], Hkv, hd)[:, 0], bv]),
                *(None if m.bias is None else m.bias.detach() for m in (b.attn.proj, b.mlp.gate_up, b.mlp.down))))
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


_PREPARED: "weakref.WeakKeyDictionary[GPT, tuple[tuple, PreparedWeights]]" = weakref.WeakKeyDictionary()


def prepared_weights(model: GPT) -> PreparedWeights:
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
    weights = PreparedWeights(model)
    _PREPARED[model] = (key, weights)
    return weights


class Decoder:
    """One chunk's decoding state: KV buffers, per-row positions and padding, and the forward
    pass of GPT (model/gpt.py) written out over them."""

    def __init__(self, model: GPT, weights: PreparedWeights, rows: int, length: int, positions: int, device, dtype):
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
        if c.rope_type == "dynamic" and positions > c.block_size:
            raise UserError(dynamic_rope_beyond(c, positions))
        cos, sin = rope_tables(c, positions, device)  # (positions, 1, hd), sin signed
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
        for i, ((qkv_f, proj_f, gate_up_f, down_f), (qkv_b, proj_b, gate_up_b, down_b)) in enumerate(zip(mats, self.w.biases)):
            qkv = qkv_f(self.norm(x))
            if qkv_b is not None:
                qkv += qkv_b
            qkv = qkv.view(B, T, H + 2 * Hkv, hd)
            qk = self.rope(qkv[:, :, : H + Hkv], rot)
            kc, vc = self.k[i][rows], self.v[i][rows]
            kc[:, slot:end] = qk[:, :, H:]
            vc[:, slot:end] = qkv[:, :, H + Hkv :]
            y = F.scaled_dot_product_attention(qk[:, :, :H].transpose(1, 2), kc[:, :end].transpose(1, 2),
                                               vc[:, :end].transpose(1, 2), attn_mask=mask, is_causal=causal,
                                               enable_gqa=self.gqa)
            x = proj_f(y.transpose(1, 2).reshape(B * T, H * hd), x)
            if proj_b is not None:
                x += proj_b
            gu = gate_up_f(self.norm(x))
            if gate_up_b is not None:
                gu += gate_up_b
            f = gu.size(1) // 2
            x = down_f(F.silu(gu[:, :f]).mul_(gu[:, f:]), x)
            if down_b is not None:
                x += down_b
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
