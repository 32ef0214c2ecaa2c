"""HF interop: export and import give the same logits as transformers' LlamaForCausalLM."""
import json
import re

import pytest
import torch

from gptstack.common import UserError
from gptstack.model import GPT, GPTConfig
from gptstack.model.hf import export_hf, import_hf
from gptstack.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


def make(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=300, n_layer=3, n_head=4, n_embd=64, block_size=48, rope_theta=500.0)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg))
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}, {"tie_embeddings": True, "n_kv_head": 1}])
def test_export_logits_equal_transformers(kw, tmp_path):
    model = make(**kw)
    tok = Tokenizer.train("hello world " * 50, 300, pattern="gpt4", progress=False)
    export_hf(model, tmp_path, tok)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    assert json.loads((tmp_path / "config.json").read_text())["max_position_embeddings"] == 48
    x = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff <= 1e-4, diff
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok.encode("hello world", add_special_tokens=False) == tok.encode("hello world")


def test_import_roundtrip_equal_logits(tmp_path):
    # a transformers-made Llama (GQA, its own init) -> gptstack: same logits
    cfg = transformers.LlamaConfig(vocab_size=211, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = import_hf(tmp_path / "hf").eval()
    x = torch.randint(0, 211, (2, 40))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-4
    # and back out again, equal once more
    export_hf(model, tmp_path / "again")
    hf2 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert (hf2(x).logits - hf(x).logits).abs().max().item() <= 1e-4


def test_import_rejects_non_llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="model_type 'gpt2': expected one of llama, mistral, qwen2"):
        import_hf(tmp_path)
    with pytest.raises(UserError, match="not found"):
        import_hf(tmp_path / "nope")


def _tiny_llama(**kw):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, **kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_import_reads_a_sharded_checkpoint_through_its_index(tmp_path):
    hf = _tiny_llama()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "hf/model.safetensors.index.json").exists()
    # a directory may also hold weights the index does not name (Mistral's consolidated.safetensors)
    from safetensors.torch import save_file
    save_file({"junk": torch.zeros(3)}, str(tmp_path / "hf/consolidated.safetensors"))
    model = import_hf(tmp_path / "hf").eval()
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("edit, field", [
    # rope types gptstack does not compute as transformers does: refused, never approximated
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 2.0}},
     "rope_parameters.rope_type: 'longrope'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
     "rope_scaling.rope_type: 'yarn'"),
    ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, "rope_type 'llama3' needs 'low_freq_factor'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}, "model_type 'qwen3'"),
    ({"model_type": "mistral", "sliding_window": 16}, "sliding_window: 16"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"hidden_size": "big"}, "expected numbers"),
])
def test_import_refuses_what_it_cannot_reproduce_before_reading_weights(tmp_path, edit, field):
    _tiny_llama().save_pretrained(tmp_path / "hf", safe_serialization=True)
    path = tmp_path / "hf/config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    (tmp_path / "hf/model.safetensors").write_bytes(b"not read")  # refused before any weight is read
    with pytest.raises(UserError, match=re.escape(field)):
        import_hf(tmp_path / "hf")


@pytest.mark.parametrize("edit, message", [
    ("no-config", "config.json: not found (expected a HF model directory)"),
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "model_type 'gemma': expected one of"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}}, "rope_type: 'yarn'"),
])
def test_cli_import_refuses_with_one_line_and_writes_nothing(tmp_path, capsys, edit, message):
    from gptstack.cli import main

    _tiny_llama().save_pretrained(tmp_path / "hf", safe_serialization=True)
    path = tmp_path / "hf/config.json"
    if edit == "no-config":
        path.unlink()
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    capsys.readouterr()  # transformers' own progress bar
    assert main(["import", "--from", "hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()
