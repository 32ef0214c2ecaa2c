"""A Llama-style GPT: RoPE, RMSNorm, SwiGLU, no biases, optional tied embeddings, grouped-query
attention, SDPA (flash attention on GPU), and a KV cache for generation.

The layout matches HF `LlamaForCausalLM` (rotate-half RoPE, separate norms before attention and
MLP, a final norm), so export is a renaming plus splitting the fused projections (model/hf.py).
q/k/v and gate/up are fused into single matmuls: fewer, larger kernels, which matters most on
CPU where a small model is bound by per-op overhead.

Batches of unequal sequences: `pad_mask` (B, keys) marks real tokens, and each row gets its own
RoPE positions (by default counted over its real tokens), so left-padded prompts and
right-padded responses give the same logits as each sequence alone. The sampling engine
(engine/sampling.py) runs this same computation with its own preallocated buffers and
pre-transposed weights; tests/test_engine.py checks that the two agree.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..common import UserError


ROPE_TYPES = ("default", "linear", "llama3", "dynamic")
HF_FAMILIES = ("llama", "qwen2", "mistral")


@dataclass
class GPTConfig:
    vocab_size: int = field(default=4096, metadata={"range": "[1, inf)", "help": "vocabulary size (set from the tokenizer)"})
    n_layer: int = field(default=4, metadata={"range": "[1, inf)", "help": "transformer blocks"})
    n_head: int = field(default=4, metadata={"range": "[1, inf)", "help": "attention (query) heads"})
    n_kv_head: int = field(default=0, metadata={"range": "[0, inf)", "help": "key/value heads for GQA; 0 = n_head (plain MHA)"})
    n_embd: int = field(default=128, metadata={"range": "[1, inf)", "help": "model width"})
    intermediate_size: int = field(default=0, metadata={"range": "[0, inf)", "help": "SwiGLU hidden width; 0 = 8/3 n_embd rounded up to 32"})
    block_size: int = field(default=256, metadata={"range": "[1, inf)", "help": "context length trained with (= exported max_position_embeddings)"})
    rope_theta: float = field(default=10000.0, metadata={"range": "(0, inf)", "help": "RoPE base"})
    norm_eps: float = field(default=1e-5, metadata={"range": "(0, inf)", "help": "RMSNorm epsilon"})
    tie_embeddings: bool = field(default=False, metadata={"help": "share the input embedding with the output head"})
    init_std: float = field(default=0.02, metadata={"range": "(0, inf)", "help": "std of the normal init of weights"})
    # What an imported Hugging Face model may need beyond gptstack's own architecture (model/hf.py);
    # the defaults are gptstack's model, and a config.json without these fields loads as before.
    head_size: int = field(default=0, metadata={"range": "[0, inf)", "help": "per-head width; 0 = n_embd / n_head (Qwen3, Gemma set it apart)"})
    qkv_bias: bool = field(default=False, metadata={"help": "biases on the q/k/v projections (Qwen2; Llama's attention_bias)"})
    proj_bias: bool = field(default=False, metadata={"help": "a bias on the attention output projection (Llama's attention_bias)"})
    mlp_bias: bool = field(default=False, metadata={"help": "biases on the MLP projections (Llama's mlp_bias)"})
    rope_type: str = field(default="default", metadata={"help": "default | linear (positions divided by rope_factor) | llama3 (Llama 3.1's frequency-dependent scaling) | dynamic (NTK: the default within block_size, which is all gptstack runs it on)"})
    rope_factor: float = field(default=1.0, metadata={"range": "[1, inf)", "help": "linear / llama3 RoPE scaling factor"})
    rope_low_freq_factor: float = field(default=1.0, metadata={"range": "(0, inf)", "help": "llama3 RoPE: low_freq_factor"})
    rope_high_freq_factor: float = field(default=4.0, metadata={"range": "(0, inf)", "help": "llama3 RoPE: high_freq_factor"})
    rope_original_context: int = field(default=8192, metadata={"range": "[1, inf)", "help": "llama3 RoPE: original_max_position_embeddings"})
    from_hf: str = field(default="", metadata={"help": "`gptstack run`: a local Hugging Face model directory imported as RUN/pretrain (with its tokenizer) instead of pretraining; its sizes replace the ones above"})
    hf_family: str = field(default="llama", metadata={"help": "the Hugging Face architecture export writes: llama | qwen2 | mistral (an import keeps its own)"})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not self.head_size and self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError("model: head dim (n_embd / n_head, or head_size) must be even for RoPE")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"model.rope_type: expected one of {', '.join(ROPE_TYPES)}, got {self.rope_type!r}")
        if self.rope_type == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError("model.rope_high_freq_factor must be larger than model.rope_low_freq_factor")
        if self.hf_family not in HF_FAMILIES:
            raise ValueError(f"model.hf_family: expected one of {', '.join(HF_FAMILIES)}, got {self.hf_family!r}")
        if self.hf_family == "qwen2" and (self.proj_bias or self.mlp_bias or not self.qkv_bias):
            raise ValueError("model.hf_family 'qwen2' has q/k/v biases and no others (qkv_bias=true, proj_bias=mlp_bias=false)")
        if self.hf_family == "mistral" and (self.qkv_bias or self.proj_bias or self.mlp_bias):
            raise ValueError("model.hf_family 'mistral' has no biases")
        if self.hf_family == "llama" and self.qkv_bias != self.proj_bias:
            raise ValueError("model.hf_family 'llama' has biases on all of q/k/v/o or none (qkv_bias = proj_bias)")

    # 0 means "derive from the other sizes"; derived here, not stored, so a recipe that changes
    # n_embd also changes the MLP width.
    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_dim(self) -> int:
        return self.intermediate_size or 32 * math.ceil(8 * self.n_embd / 3 / 32)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


# Presets from a CPU toy to GPT-2 small scale. Sizes are approximate (vocab-dependent).
PRESETS: dict[str, dict] = {
    "nano": dict(n_layer=2, n_head=2, n_embd=64),            # ~0.1M non-embedding: unit tests
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),           # ~0.8M: CPU demo
    "mini": dict(n_layer=6, n_head=6, n_embd=384),           # ~10M
    "small": dict(n_layer=8, n_head=8, n_embd=512),          # ~25M
    "124m": dict(n_layer=12, n_head=12, n_embd=768, tie_embeddings=True),  # GPT-2 small scale
}


class KVCache:
    """Keys and values of past positions, per layer, preallocated to `max_len`.

    Generation prefills the prompt once, then feeds one token per step; attention reads the
    cached keys/values instead of recomputing them (what makes sampling O(T) per token).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0  # positions filled so far
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.size(2)
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} > {self.max_len}")
        self.k[layer][:, :, self.pos : self.pos + T] = k
        self.v[layer][:, :, self.pos : self.pos + T] = v
        return self.k[layer][:, :, : self.pos + T], self.v[layer][:, :, : self.pos + T]


def inv_frequencies(config: GPTConfig, device=None) -> torch.Tensor:
    """RoPE's inverse frequencies (head_dim / 2,) as `transformers` computes them for the rope
    types gptstack reproduces (modeling_rope_utils: default, linear, llama3)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if config.rope_type == "linear":  # positions / factor, i.e. every frequency / factor
        return inv_freq / config.rope_factor
    # dynamic NTK changes the base only once a sequence is longer than the trained context, and then
    # for every position of it (so a KV cache cannot follow): gptstack runs such a model only within
    # block_size (= max_position_embeddings), where it is the default (`_extend_rope` refuses beyond)
    if config.rope_type == "llama3":
        # long wavelengths (> original context / low_freq_factor) slowed by `factor`, short ones (<
        # original context / high_freq_factor) kept, those between interpolated smoothly
        factor, low, high, ctx = (config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor,
                                  config.rope_original_context)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > ctx / low, inv_freq / factor, inv_freq)
        smooth = (ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < ctx / high) & ~(wavelen > ctx / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def dynamic_rope_beyond(config: GPTConfig, positions: int) -> str:
    return (f"model.rope_type 'dynamic': {positions} positions, beyond the model's context of {config.block_size} "
            "(max_position_embeddings), where dynamic NTK RoPE rescales every position; gptstack runs such a "
            "model within its context only (shorten the prompt or max_new_tokens)")


def rope_tables(config: GPTConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin, shape (length, 1, head_dim), in HF Llama's rotate-half layout.

    Llama computes x*cos + rotate_half(x)*sin with rotate_half(x) = (-x2, x1). Folding the minus
    into the table (sin_signed = (-sin, sin)) leaves x*cos + (x2, x1)*sin_signed: one op fewer
    per call, on a path that runs twice per layer forward and backward.
    """
    inv_freq = inv_frequencies(config, device)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos().unsqueeze(1), torch.cat([-sin, sin], dim=-1).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, head_dim)."""
    half = x.size(-1) // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return x * cos + swapped * sin_signed


def keep_positions(h: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions of h (B, T, ...) whose outputs a caller reads (HF's `logits_to_keep`): an int
    n > 0 keeps the last n, 0 all; a (B, K) index tensor keeps positions keep[b] of row b, in
    that order (packed rows: each row's response positions, wherever its sequences sit)."""
    if isinstance(logits_to_keep, torch.Tensor):
        index = logits_to_keep.to(h.device)
        return h.gather(1, index.view(*index.shape, *[1] * (h.dim() - 2)).expand(*index.shape, *h.shape[2:]))
    return h[:, -logits_to_keep:] if logits_to_keep else h


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.kv_heads) * config.head_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.proj_bias)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """attn_mask: bool (B, 1, T, T_k), True = may attend; None = plain causal."""
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        # RoPE on q and k in one call (they are adjacent in the fused projection)
        qk = apply_rope(qkv[:, :, : self.n_head + self.n_kv_head], cos, sin)
        q = qk[:, :, : self.n_head].transpose(1, 2)
        k = qk[:, :, self.n_head :].transpose(1, 2)
        v = qkv[:, :, self.n_head + self.n_kv_head :].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        T_k = k.size(2)
        if attn_mask is not None:  # padded rows: the caller's causal + key-padding mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=self.n_kv_head != self.n_head)
        elif T == T_k:  # training, or prefill into an empty cache
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        else:  # T new queries after T_k - T cached positions: each sees the past and itself
            mask = torch.ones(T, T_k, dtype=torch.bool, device=x.device).tril(diagonal=T_k - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_head != self.n_head)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.n_embd, 2 * config.ffn_dim, bias=config.mlp_bias)
        self.down = nn.Linear(config.ffn_dim, config.n_embd, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None = None, attn_mask: torch.Tensor | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, layer, cache, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(config, config.block_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("attn.proj.weight", "mlp.down.weight")):
                # residual-stream writes scaled down with depth (GPT-2), so the stream's variance
                # does not grow with the number of blocks
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def _rope(self, start: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        self._extend_rope(start + T, device)
        return self.rope_cos[start : start + T], self.rope_sin[start : start + T]

    def _extend_rope(self, end: int, device) -> None:
        if end > self.rope_cos.size(0) and self.config.rope_type == "dynamic":
            raise UserError(dynamic_rope_beyond(self.config, end))
        if end > self.rope_cos.size(0):  # beyond the trained context (sampling long): extend the tables
            cos, sin = rope_tables(self.config, max(end, 2 * self.rope_cos.size(0)), device)
            self.rope_cos, self.rope_sin = cos, sin

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None, *,
                      pad_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                      segments: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> final normed hidden states (B, T, n_embd); value/reward heads read these.

        pad_mask: (B, T_k) bool/0-1 over all key positions (the cached ones, then these T), True
        for real tokens. Real tokens never attend to pads (left or right padding, or holes); a
        pad's own output is garbage-but-finite (it attends to itself) and should be ignored.
        positions: (B, T) RoPE positions; by default each row counts its real tokens from 0
        (with pad_mask) or all tokens from the cache position (without).
        segments: (B, T) ids of packed sequences, each a contiguous run: a token attends only to
        earlier tokens of its own run, and positions restart at 0 in each, so every sequence of
        a packed row gets exactly the outputs it would get alone (SFT packing).
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        attn_mask = None
        if segments is not None:
            if cache is not None or pad_mask is not None:
                raise ValueError("segments (packed rows) cannot be combined with a KV cache or a pad_mask")
            t = torch.arange(T, device=idx.device)
            first = torch.ones_like(segments, dtype=torch.bool)
            first[:, 1:] = segments[:, 1:] != segments[:, :-1]
            run_start = torch.where(first, t, 0).cummax(dim=1).values
            if positions is None:
                positions = t - run_start
            same = segments[:, :, None] == segments[:, None, :]
            attn_mask = (same & (t[None, :] <= t[:, None])).unsqueeze(1)   # (B, 1, T, T)
        if pad_mask is not None:
            T_k = start + T
            if pad_mask.shape != (B, T_k):
                raise ValueError(f"pad_mask shape {tuple(pad_mask.shape)} != (batch, cached + new) = {(B, T_k)}")
            real = pad_mask.to(device=idx.device, dtype=torch.bool)
            if positions is None:
                positions = (real.long().cumsum(1) - 1).clamp(min=0)[:, start:]
            q_abs = torch.arange(start, T_k, device=idx.device)
            k_abs = torch.arange(T_k, device=idx.device)
            causal = k_abs[None, :] <= q_abs[:, None]                        # (T, T_k)
            own = k_abs[None, :] == q_abs[:, None]                           # a pad query sees itself
            attn_mask = (causal & (real[:, None, None, :] | own)).reshape(B, 1, T, T_k)
        if positions is not None:
            self._extend_rope(int(positions.max()) + 1, idx.device)
            cos, sin = self.rope_cos[:, 0][positions].unsqueeze(2), self.rope_sin[:, 0][positions].unsqueeze(2)
        else:
            cos, sin = self._rope(start, T, idx.device)
        x = self.tok_emb(idx)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, i, cache, attn_mask)
        if cache is not None:
            cache.pos += T
        return self.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                ignore_index: int = -1, *, pad_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                logits_to_keep: int | torch.Tensor = 0):
        """Logits (B, T, vocab) or, with `targets`, the mean cross-entropy over targets != ignore_index.
        pad_mask / positions / segments: padded or packed batches, see `hidden_states`.
        logits_to_keep: see `keep_positions` (HF's name): RL scores responses, not prompts, and
        skipping the prompt positions saves their share of the head and a full-size gradient in
        backward."""
        h = self.hidden_states(idx, cache, pad_mask=pad_mask, positions=positions, segments=segments)
        if targets is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("logits_to_keep is for logits, not with targets")
        logits = self.lm_head(keep_positions(h, logits_to_keep))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=ignore_index)

    # --- accounting ---------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul parameter plus attention's
        12 * layers * width * context (PaLM appendix B). Used for MFU."""
        c = self.config
        T = seq_len or c.block_size
        matmul_params = self.num_params() - self.tok_emb.weight.numel() * (0 if c.tie_embeddings else 1)
        matmul_params -= sum(p.numel() for n, p in self.named_parameters() if n.endswith(("norm.weight", ".bias")))
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * T

    # --- generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to `idx` (B, T); temperature 0 = greedy.

        With `use_cache=False` every step recomputes the whole sequence: the reference the KV-cache
        path is tested against, token for token.
        """
        cache = KVCache(self.config, idx.size(0), idx.size(1) + max_new_tokens, idx.device,
                        self.tok_emb.weight.dtype) if use_cache else None
        out = idx
        step_input = idx
        for _ in range(max_new_tokens):
            logits = self(step_input if use_cache else out, cache=cache)[:, -1, :].float()
            next_id = sample_next(logits, temperature, top_k, generator)
            out = torch.cat([out, next_id], dim=1)
            step_input = next_id
        return out


def resize_vocab(model: GPT, vocab_size: int, new_ids: list[int] | None = None, mean_of: int | None = None) -> GPT:
    """`model` with rows for a tokenizer that gained specials: the vocabulary grown to `vocab_size`
    ids where it is smaller, and the rows of `new_ids` (default: the grown ones) in the embedding and
    (untied) LM head set to the mean of rows [0, mean_of) (default: all the old rows), so the logits
    of the old ids are unchanged. `mean_of` matters for a checkpoint whose vocabulary is padded past
    its tokenizer (Qwen2.5: 151,936 rows for 151,665 ids): the new specials take padding rows, and
    their start is the mean of the trained rows only. A new GPT; config.vocab_size follows."""
    old = model.config.vocab_size
    size = max(old, vocab_size)
    new_ids = list(range(old, size)) if new_ids is None else list(new_ids)
    if not new_ids and size == old:
        return model
    if max(new_ids, default=0) >= size:
        raise ValueError(f"resize_vocab: new id {max(new_ids)} outside the {size} rows")
    cfg = GPTConfig(**{**asdict(model.config), "vocab_size": size})
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def grow(w: torch.Tensor) -> torch.Tensor:
        w = torch.cat([w, w.new_zeros(size - old, w.size(1))], dim=0)
        w[new_ids] = w[: mean_of or old].mean(dim=0, keepdim=True)
        return w

    sd["tok_emb.weight"] = grow(sd["tok_emb.weight"])
    sd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else grow(sd["lm_head.weight"])
    out = GPT(cfg).to(device=model.tok_emb.weight.device, dtype=model.tok_emb.weight.dtype)
    out.load_state_dict(sd)
    return out.train(model.training)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, vocab) logits -> (B, 1) ids. Temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
