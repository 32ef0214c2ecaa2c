"""HF interop: export to a `LlamaForCausalLM` (or `Qwen2ForCausalLM`) directory, import a local Llama, Mistral or Qwen2 checkpoint.

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
from .gpt import GPT, GPTConfig, rope_tables


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def llama_config(cfg: GPTConfig, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None) -> dict:
    """config.json for the family the model came from: `LlamaForCausalLM` (gptstack's own models and
    Llama/SmolLM imports), `Qwen2ForCausalLM` (a Qwen2/2.5 import: q/k/v biases) or
    `MistralForCausalLM` (a Mistral import, without a sliding window)."""
    rope = None
    if cfg.rope_type == "linear":
        rope = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_type == "dynamic":
        rope = {"rope_type": "dynamic", "factor": cfg.rope_factor}
    elif cfg.rope_type == "llama3":
        rope = {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_context}
    out = {
        "architectures": [ARCHITECTURES[cfg.hf_family]],
        "model_type": cfg.hf_family,
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
        # rope_scaling: the key transformers 4.x, vLLM and 5.x (which converts it) all read
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if cfg.hf_family == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    elif cfg.hf_family == "mistral":
        out.update(sliding_window=None)
    else:
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    return out


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
        if block.attn.qkv.bias is not None:
            out.update(zip((p + f"self_attn.{n}_proj.bias" for n in "qkv"),
                           block.attn.qkv.bias.split([q_size, kv_size, kv_size])))
        if block.attn.proj.bias is not None:
            out[p + "self_attn.o_proj.bias"] = block.attn.proj.bias
        if block.mlp.gate_up.bias is not None:
            out.update(zip((p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"), block.mlp.gate_up.bias.chunk(2)))
            out[p + "mlp.down_proj.bias"] = block.mlp.down.bias
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
    turn = []
    if tokenizer is not None:
        try:  # a model's own template ends turns at its own token (<|eot_id|>, <|im_end|>), not always its eos
            turn = tokenizer.turn_end_ids
        except (UserError, KeyError):  # a tokenizer without chat tokens (import --chat none)
            pass
    ends = list(dict.fromkeys(i for i in (*turn, eos, bos) if i is not None))
    atomic_write_bytes(out_dir / "model.safetensors",
                       safetensors_bytes(to_llama_state_dict(model), metadata={"format": "pt"}))
    atomic_write_json(out_dir / "config.json", llama_config(model.config, bos, eos, pad))
    atomic_write_json(out_dir / "generation_config.json",
                      {"bos_token_id": bos, "eos_token_id": ends if len(ends) > 1 else eos, "pad_token_id": pad})
    return out_dir


FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}  # model_type -> the family export writes


def _rope_settings(hf: dict, path: Path) -> dict:
    """GPTConfig's rope fields from rope_scaling (transformers 4.x) or rope_parameters (5.x). A rope
    type gptstack does not compute exactly as transformers does is refused, never approximated
    (yarn, longrope); 'dynamic' is imported as what it is within the trained context, the default,
    and refused beyond it (model/gpt.py)."""
    found = {}
    for key in ("rope_parameters", "rope_scaling"):  # a config may carry both (one of them default)
        rope = hf.get(key) or {}
        if not isinstance(rope, dict):
            raise UserError(f"{path}: {key}: expected an object, got {rope!r}")
        found[key] = rope
    scaled = [k for k, r in found.items() if r.get("rope_type", r.get("type", "default")) != "default"]
    if len(scaled) == 2 and {k: v for k, v in found["rope_parameters"].items() if k != "rope_theta"} != \
            {("rope_type" if k == "type" else k): v for k, v in found["rope_scaling"].items()}:
        raise UserError(f"{path}: rope_parameters and rope_scaling disagree ({found})")
    key = scaled[0] if scaled else "rope_parameters"
    rope = found[key]
    kind = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError(f"{path}: {key}.partial_rotary_factor: only 1.0 (RoPE on the whole head) is supported")
    theta = float(rope.get("rope_theta", hf.get("rope_theta") or 10000.0))
    if kind == "default":
        return {"rope_theta": theta}
    try:
        if kind in ("linear", "dynamic"):
            return {"rope_theta": theta, "rope_type": kind, "rope_factor": float(rope["factor"])}
        if kind == "llama3":
            return {"rope_theta": theta, "rope_type": "llama3", "rope_factor": float(rope["factor"]),
                    "rope_low_freq_factor": float(rope["low_freq_factor"]),
                    "rope_high_freq_factor": float(rope["high_freq_factor"]),
                    "rope_original_context": int(rope["original_max_position_embeddings"])}
    except KeyError as e:
        raise UserError(f"{path}: {key}: rope_type {kind!r} needs {e.args[0]!r}") from None
    raise UserError(f"{path}: {key}.rope_type: {kind!r} is not supported (default, linear, llama3 and dynamic are)")


def _read_hf_config(directory: Path) -> dict:
    """config.json -> GPTConfig keyword arguments, or one UserError naming the field gptstack cannot
    reproduce, before any weight is read."""
    path = directory / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found (expected a HF model directory)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{path}: expected a JSON object")
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"{path}: model_type {model_type!r}: expected one of {', '.join(FAMILIES)} "
                        "(Llama, Mistral, SmolLM, Qwen2/2.5 checkpoints)")
    window = hf.get("sliding_window")
    if window and hf.get("use_sliding_window", True) and window < hf.get("max_position_embeddings", 2048):
        raise UserError(f"{path}: sliding_window: {window} tokens is not supported (full attention only)")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{path}: hidden_act: expected 'silu', got {hf.get('hidden_act')!r}")
    try:
        n_embd, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        fields = dict(
            vocab_size=int(hf["vocab_size"]), n_layer=int(hf["num_hidden_layers"]), n_head=n_head,
            n_kv_head=int(hf.get("num_key_value_heads") or n_head), n_embd=n_embd,
            intermediate_size=int(hf["intermediate_size"]), block_size=int(hf.get("max_position_embeddings", 2048)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)), hf_family=FAMILIES[model_type],
            head_size=int(hf.get("head_dim") or 0) if hf.get("head_dim") != n_embd // n_head else 0,
        )
    except KeyError as e:
        raise UserError(f"{path}: {e.args[0]}: missing") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: expected numbers for the model sizes ({e})") from None
    if model_type == "qwen2":  # q/k/v biases whatever attention_bias says; no others
        fields.update(qkv_bias=True)
    else:
        fields.update(qkv_bias=bool(hf.get("attention_bias")), proj_bias=bool(hf.get("attention_bias")),
                      mlp_bias=bool(hf.get("mlp_bias")))
    fields.update(_rope_settings(hf, path))
    return fields


def import_hf(directory: str | Path) -> GPT:
    """A local Llama / Mistral / Qwen2 checkpoint (config.json + *.safetensors, fp32/bf16/fp16) -> a
    GPT with the same logits (tests/test_hf_architectures.py)."""
    directory = Path(directory)
    try:
        cfg = GPTConfig(**_read_hf_config(directory))
    except ValueError as e:
        raise UserError(f"{directory / 'config.json'}: {e}") from None
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

    def take(name: str) -> torch.Tensor:   # fp32, one tensor at a time (a bf16 checkpoint is not doubled whole)
        if name not in sd:
            raise UserError(f"{directory}: weight {name!r} missing from the safetensors files")
        return sd.pop(name).float()

    # built without drawing an init every weight would overwrite (minutes for billions of them): on
    # the meta device, then given uninitialised CPU memory, every parameter copied below
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight   # to_empty gives each module its own tensor
    model.rope_cos, model.rope_sin = rope_tables(cfg, cfg.block_size)   # buffers: recomputed, not copied
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
            if cfg.qkv_bias:
                block.attn.qkv.bias.copy_(torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
            if cfg.proj_bias:
                block.attn.proj.bias.copy_(take(p + "self_attn.o_proj.bias"))
            if cfg.mlp_bias:
                block.mlp.gate_up.bias.copy_(torch.cat([take(p + "mlp.gate_proj.bias"), take(p + "mlp.up_proj.bias")]))
                block.mlp.down.bias.copy_(take(p + "mlp.down_proj.bias"))
            block.mlp_norm.weight.copy_(take(p + "post_attention_layernorm.weight"))
            block.mlp.gate_up.weight.copy_(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")], 0))
            block.mlp.down.weight.copy_(take(p + "mlp.down_proj.weight"))
    sd.pop("lm_head.weight", None)  # present but tied in some checkpoints
    leftover = [k for k in sd if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise UserError(f"{directory}: unexpected weights {leftover[:5]} (not a plain Llama checkpoint?)")
    return model
