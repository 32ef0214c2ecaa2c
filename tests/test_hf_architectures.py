"""Every architecture `import --from hf` accepts gives transformers' logits, in the training forward
and in the sampling engine's decode forward, and exports back to the same family with the same
logits: Llama with head_dim != hidden/heads, with attention and MLP biases, with linear and llama3
RoPE scaling (transformers 5's rope_parameters and 4.x's rope_scaling), dynamic NTK RoPE within the
context, Qwen2 (q/k/v biases, tied
embeddings), Mistral without a sliding window, and bf16 / fp16 checkpoints."""
import json

import pytest
import torch

from gptstack.engine.sampling import generate
from gptstack.model.hf import export_hf, import_hf

transformers = pytest.importorskip("transformers")

V = 101
BASE = dict(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

ARCHS = {
    "llama-head_dim": ("llama", {"head_dim": 16}),                    # 4 x 16 != 48
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-rope-llama3": ("llama", {"rope_parameters": LLAMA3}),
    "llama-rope-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}}),
    # dynamic NTK is the default within max_position_embeddings (64 here), all gptstack runs it on
    "llama-rope-dynamic": ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0}}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2": ("qwen2", {"head_dim": 8}),
    "mistral": ("mistral", {"sliding_window": None}),
}
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "mistral": ("MistralConfig", "MistralForCausalLM")}


def hf_model(family: str, extra: dict, seed: int = 0):
    config_cls, model_cls = (getattr(transformers, n) for n in CLASSES[family])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**BASE, **extra}))
    with torch.no_grad():  # transformers zero-initialises biases and sets norms to 1: make both visible
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def logits_diff(a, b, x) -> float:
    with torch.no_grad():
        return (a(x).logits - b(x)).abs().max().item()


@pytest.mark.parametrize("name", list(ARCHS))
def test_import_equals_transformers_and_exports_the_same_family(name, tmp_path):
    family, extra = ARCHS[name]
    hf = hf_model(family, extra)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = import_hf(tmp_path / "hf").eval()
    x = torch.randint(0, V, (2, 40))  # beyond llama3's original 16 positions
    assert logits_diff(hf, model, x) <= 1e-4
    # the engine's decode forward (norm folding, pair-ordered RoPE, biases after each matmul) samples
    # exactly what transformers' greedy generate picks
    prompt = [int(t) for t in x[0, :12]]
    ours = generate(model, [prompt], max_new_tokens=20, n=1, temperature=0.0, seed=0)[0][0]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                             pad_token_id=0)[0, 12:].tolist()
    assert ours.tokens == theirs
    # export: the family it came from
    export_hf(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    assert cfg["architectures"] == [CLASSES[family][1]]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert logits_diff(back, model, x) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_import_to_the_same_model(dtype, tmp_path):
    hf = hf_model("qwen2", {"tie_word_embeddings": True}).to(dtype)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = import_hf(tmp_path / "hf").eval()   # fp32 copies of the half-precision weights
    assert model.tok_emb.weight.dtype == torch.float32 and model.lm_head.weight is model.tok_emb.weight
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert logits_diff(reference, model, torch.randint(0, V, (2, 30))) <= 1e-4


def test_dynamic_rope_is_refused_beyond_the_context(tmp_path):
    from gptstack.common import UserError

    hf_model("llama", ARCHS["llama-rope-dynamic"][1]).save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = import_hf(tmp_path / "hf").eval()
    assert model.config.rope_type == "dynamic" and model.config.block_size == 64
    generate(model, [[1, 2, 3]], max_new_tokens=62, temperature=0.0)   # 64 positions: within
    with pytest.raises(UserError, match="rope_type 'dynamic': 65 positions, beyond the model's context of 64"):
        generate(model, [[1, 2, 3]], max_new_tokens=63, temperature=0.0)
    with pytest.raises(UserError, match="rope_type 'dynamic'"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_rope_scaling_4x_key_is_read_like_rope_parameters(tmp_path):
    # a config.json as transformers 4.x wrote it: rope_scaling with "type" / "rope_type", rope_theta beside it
    hf = hf_model("llama", {"rope_parameters": LLAMA3})
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    path = tmp_path / "hf/config.json"
    cfg = json.loads(path.read_text())
    params = cfg.pop("rope_parameters")
    cfg.update(rope_theta=params.pop("rope_theta"), rope_scaling={**params, "type": params.pop("rope_type")})
    path.write_text(json.dumps(cfg))
    model = import_hf(tmp_path / "hf").eval()
    assert model.config.rope_type == "llama3" and model.config.rope_original_context == 16
    assert logits_diff(hf, model, torch.randint(0, V, (1, 50))) <= 1e-4


# --- every architecture through the post-training stages: import -> sft -> rm, dpo -> export --------

CORPUS = "".join(f"What is {i} plus {i + 2}? It is {2 * i + 2}. The fox says hello {i} times.\n" for i in range(80))
QUESTIONS = [f"What is {i} plus {i + 2}?" for i in range(24)]
STAGE_SETS = ["--recipe", "micro", "--set", "eval.limit=2", "--set", "eval.max_new_tokens=4"] + [
    a for s in ("sft", "rm", "dpo") for kv in (f"{s}.max_steps=2", f"{s}.batch_size=2", f"{s}.warmup_steps=0",
                                               f"{s}.threads=1") for a in ("--set", kv)] + [
    "--set", "rm.norm_prompts=2", "--set", "rm.max_new_tokens=4"]


def _user_dir(tmp_path, family: str, extra: dict, template: bool):
    """A HF model directory as transformers saves it: this architecture, a byte-level BPE trained
    here (with ChatML's specials and template, or a base model's tokenizer without one)."""
    from hf_builders import CHATML, bpe_tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if template else ["<|endoftext|>"]
    # a Qwen2 directory in Qwen2's own tokenizer layout (transformers >= 5 rebuilds it for any qwen2 directory)
    tok = bpe_tokenizer(CORPUS, 300, specials, layout="qwen2" if family == "qwen2" else "bytelevel")
    roles = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML) if template else \
        dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **roles)
    d = tmp_path / "hf"
    hf_tok.save_pretrained(d)
    global BASE
    saved, BASE = BASE, {**BASE, "vocab_size": len(hf_tok)}
    try:
        hf_model(family, extra).save_pretrained(d, safe_serialization=True)
    finally:
        BASE = saved
    return d


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_each_architecture_post_trains_and_exports(name, lora, tmp_path):
    from gptstack.cli import main
    from gptstack.rundir import load_stage

    family, extra = ARCHS[name]
    template = family == "qwen2"   # Qwen keeps its own template; the base-model tokenizers get gptstack's chat tokens
    src, run = _user_dir(tmp_path, family, extra, template), tmp_path / "run"
    chats, prefs = tmp_path / "chats.jsonl", tmp_path / "prefs.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": f"It is {2 * i + 2}."}]}) + "\n"
                             for i, q in enumerate(QUESTIONS)))
    prefs.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}],
                                         "chosen": [{"role": "assistant", "content": f"It is {2 * i + 2}."}],
                                         "rejected": [{"role": "assistant", "content": "The fox."}]}) + "\n"
                             for i, q in enumerate(QUESTIONS)))
    lora_sets = [a for s in ("sft", "rm", "dpo") for a in ("--set", f"{s}.lora_rank={4 if lora else 0}")]
    assert main(["import", "--from", "hf", str(src), str(run)]) == 0
    assert main(["sft", "--from", str(run / "pretrain"), "--data", str(chats), "--out", str(run), *STAGE_SETS, *lora_sets]) == 0
    assert main(["rm", "--from", str(run / "sft"), "--prefs", str(prefs), "--out", str(run), *STAGE_SETS, *lora_sets]) == 0
    assert main(["dpo", "--policy", str(run / "sft"), "--prefs", str(prefs), "--out", str(run), *STAGE_SETS, *lora_sets]) == 0
    before, after = load_stage(run / "pretrain")[0], load_stage(run / "dpo")[0]
    moved = [n for (n, a), b in zip(before.named_parameters(), after.parameters()) if not torch.equal(a, b)]
    assert moved and (not lora or all("norm" not in n and "emb" not in n for n in moved))  # LoRA: only adapted matrices
    assert main(["export", "--to", "hf", str(run / "dpo"), str(tmp_path / "out")]) == 0
    model, cfg, tok = load_stage(run / "dpo")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == CLASSES[family][1]
    chat = [{"role": "user", "content": "What is 3 plus 5?"}]
    ids = tok.render_prompt(chat)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert list(hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)) == ids
    with torch.no_grad():
        assert (hf(torch.tensor([ids])).logits[0] - model.eval()(torch.tensor([ids]))[0]).abs().max().item() <= 1e-4
