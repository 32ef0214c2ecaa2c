"""HF interop: export to a `LlamaForCausalLM` directory, import a local Llama-architecture checkpoint.

The export is exact (same logits) because gptstack's model *is* Llama's architecture: the only
work is renaming and splitting the fused projections (qkv -> q/k/v, gate_up -> gate/up). Written
with safetensors and JSON only; `transformers` is needed to *load* the result, never to run
gptstack.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..common import UserError, atomic_write_bytes, atomic_write_json
from .gpt import GPT, GPTConfig


def llama_config(cfg: GPTConfig, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,  # the context it was trained with
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def to_llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    cfg = model.config
    q_size, kv_size = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split([q_size, kv_size, kv_size], dim=0)
        gate, up = block.mlp.gate_up.weight.chunk(2, dim=0)
        out.update({
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.attn.proj.weight,
            p + "post_attention_layernorm.weight": block.mlp_norm.weight,
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": block.mlp.down.weight,
        })
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def export_hf(model: GPT, out_dir: str | Path, tokenizer=None) -> Path:
    """Write config.json, model.safetensors, generation_config.json (+ the tokenizer files).

    With a tokenizer, the directory works unchanged with `apply_chat_template` and
    `pipeline("text-generation")`: tokenizer_config.json carries the chat template, bos/eos/pad
    tokens (see `formats.hf_special_tokens`), and generation_config.json the tokens that end a
    generation (<|assistant_end|>, <|bos|>) and the pad id for batches.
    """
    out_dir = Path(out_dir)
    bos = eos = pad = None
    if tokenizer is not None:
        # the tokenizer layer decides the special tokens (formats.hf_special_tokens); read them back
        tokenizer.to_huggingface(out_dir)
        named = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        bos, eos, pad = (tokenizer.special_tokens.get(named.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
    # generation ends where a turn ends (eos) or where a document does (<|bos|> starts the next one)
    ends = list(dict.fromkeys(i for i in (eos, bos) if i is not None))
    atomic_write_bytes(out_dir / "model.safetensors",
                       safetensors_bytes(to_llama_state_dict(model), metadata={"format": "pt"}))
    atomic_write_json(out_dir / "config.json", llama_config(model.config, bos, eos, pad))
    atomic_write_json(out_dir / "generation_config.json",
                      {"bos_token_id": bos, "eos_token_id": ends if len(ends) > 1 else eos, "pad_token_id": pad})
    return out_dir


def _read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found (expected a HF model directory)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    arch = hf.get("architectures") or [hf.get("model_type")]
    if hf.get("model_type") not in ("llama", "mistral", "qwen2") and "LlamaForCausalLM" not in arch:
        raise UserError(f"{path}: model_type {hf.get('model_type')!r}: expected a Llama-architecture model")
    for key, bad in (("attention_bias", True), ("mlp_bias", True)):
        if hf.get(key) is bad:
            raise UserError(f"{path}: {key}: biases are not supported (gptstack's model has none)")
    if hf.get("model_type") == "qwen2":  # q/k/v projections carry biases whatever attention_bias says
        raise UserError(f"{path}: model_type 'qwen2': its q/k/v projections have biases, which gptstack's model "
                        "does not (not supported yet)")
    if hf.get("rope_scaling"):
        raise UserError(f"{path}: rope_scaling: {hf['rope_scaling']} is not supported (plain RoPE only)")
    # transformers >= 5 writes RoPE settings as rope_parameters; anything but the default type is a
    # different model (llama3's frequency scaling, linear, dynamic), never imported silently
    rope_type = (hf.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise UserError(f"{path}: rope_parameters.rope_type: {rope_type!r} is not supported (plain RoPE, "
                        "rope_type 'default', only)")
    window = hf.get("sliding_window")
    if window and hf.get("use_sliding_window", True) and window < hf.get("max_position_embeddings", 2048):
        raise UserError(f"{path}: sliding_window: {window} tokens is not supported (full attention only)")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{path}: hidden_act: expected 'silu', got {hf.get('hidden_act')!r}")
    return hf


def import_hf(directory: str | Path) -> GPT:
    """A local Llama-architecture checkpoint (config.json + *.safetensors) -> a GPT, same logits."""
    directory = Path(directory)
    hf = _read_hf_config(directory)
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", n_embd // n_head) != n_embd // n_head:
        raise UserError(f"{directory}/config.json: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    cfg = GPTConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
        intermediate_size=hf["intermediate_size"], block_size=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope_theta), norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02),
    )
    index = directory / "model.safetensors.index.json"
    if index.exists():  # sharded: the index names the files (a directory may also hold others, e.g. consolidated.safetensors)
        try:
            files = sorted({directory / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index}: weight_map: expected {{tensor name: file}} ({e})") from None
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise UserError(f"{index}: weight_map names {missing[:3]}, not in {directory}")
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"{directory}: no *.safetensors weights found")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    sd = {k: v.float() for k, v in sd.items()}

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise UserError(f"{directory}: weight {name!r} missing from the safetensors files")
        return sd.pop(name)

    model = GPT(cfg)
    with torch.no_grad():
        model.tok_emb.weight.copy_(take("model.embed_tokens.weight"))
        model.norm.weight.copy_(take("model.norm.weight"))
        if not cfg.tie_embeddings:
            model.lm_head.weight.copy_(take("lm_head.weight"))
        for i, block in enumerate(model.layers):
            p = f"model.layers.{i}."
            block.attn_norm.weight.copy_(take(p + "input_layernorm.weight"))
            block.attn.qkv.weight.copy_(torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"], dim=0))
            block.attn.proj.weight.copy_(take(p + "self_attn.o_proj.weight"))
            block.mlp_norm.weight.copy_(take(p + "post_attention_layernorm.weight"))
            block.mlp.gate_up.weight.copy_(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")], 0))
            block.mlp.down.weight.copy_(take(p + "mlp.down_proj.weight"))
    sd.pop("lm_head.weight", None)  # present but tied in some checkpoints
    leftover = [k for k in sd if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise UserError(f"{directory}: unexpected weights {leftover[:5]} (not a plain Llama checkpoint?)")
    return model
