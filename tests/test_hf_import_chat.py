"""`gptstack import --from hf DIR RUN` gives the import gptstack's chat format (--chat gptstack, the
default where DIR has a tokenizer.json): sft runs on it, and its export speaks the same chat
template and gives the same logits as transformers. `--chat none` keeps the vocabulary.

Every model and tokenizer is built in the test (random weights, a BPE trained on a few KB)."""
import json

import pytest
import torch

from gptstack.cli import main
from gptstack.rundir import load_stage
from gptstack.tokenizer import DEFAULT_SPECIALS, Tokenizer

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

CORPUS = "".join(f"The quick brown fox jumps over the lazy dog {i} times. What is {i} + {i + 1}? It is {2 * i + 1}.\n"
                 for i in range(60))
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]


def _hf_tokenizer(bos: bool = True):
    """A byte-level BPE as HF tokenizers trains it: Llama 3's two specials first, then 256 bytes, merges."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    roles = dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>") if bos else {}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **roles)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf_tok = _hf_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    hf_tok.save_pretrained(d)
    return d


def _hf_logits(directory, ids):
    hf = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def _our_logits(model, ids):
    with torch.no_grad():
        return model.eval()(torch.tensor([ids]))[0]


def test_import_sft_export_chat(hf_dir, tmp_path):
    run = tmp_path / "run"
    n = len(transformers.AutoTokenizer.from_pretrained(hf_dir))
    assert main(["import", "--from", "hf", str(hf_dir), str(run)]) == 0

    model, _, tok = load_stage(run / "pretrain")
    # five chat specials added after the largest id; <|bos|> maps onto the model's own bos
    assert "<|bos|>" not in tok.special_tokens
    assert tok.bos_id == tok.special_tokens["<|begin_of_text|>"] == 0
    assert [tok.special(s) for s in DEFAULT_SPECIALS[1:]] == list(range(n, n + 5))
    assert tok.vocab_size == model.config.vocab_size == n + 5
    ids = tok.encode(CORPUS[:200])
    assert max(ids) < n
    ours = _our_logits(model, [tok.bos_id, *ids])
    torch.testing.assert_close(ours[:, :n], _hf_logits(hf_dir, [tok.bos_id, *ids]), atol=1e-4, rtol=1e-4)
    # new rows are the mean of the old ones
    torch.testing.assert_close(model.tok_emb.weight[n:], model.tok_emb.weight[:n].mean(0).expand(5, -1))
    torch.testing.assert_close(model.lm_head.weight[n:], model.lm_head.weight[:n].mean(0).expand(5, -1))

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i + 1}?"},
                                                     {"role": "assistant", "content": f"It is {2 * i + 1}."}]}) + "\n"
                            for i in range(16)))
    assert main(["sft", "--from", str(run / "pretrain"), "--data", str(data), "--out", str(run), "--recipe", "micro",
                 "--set", "sft.max_steps=3", "--set", "sft.heldout_fraction=0"]) == 0
    assert (run / "sft" / "model.safetensors").is_file()

    out = tmp_path / "export"
    assert main(["export", "--to", "hf", str(run / "sft"), str(out)]) == 0
    sft_model, _, tok = load_stage(run / "sft")
    prompt = tok.render_prompt(MESSAGES)
    assert prompt[0] == 0
    back = transformers.AutoTokenizer.from_pretrained(out)
    encoded = back.apply_chat_template(MESSAGES, add_generation_prompt=True)  # a BatchEncoding or a list, by version
    assert list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded) == prompt
    assert back.eos_token == "<|assistant_end|>"
    torch.testing.assert_close(_hf_logits(out, prompt), _our_logits(sft_model, prompt), atol=1e-4, rtol=1e-4)


def test_chat_none_keeps_the_vocabulary(hf_dir, tmp_path):
    n = len(transformers.AutoTokenizer.from_pretrained(hf_dir))
    assert main(["import", "--from", "hf", str(hf_dir), str(tmp_path / "run"), "--chat", "none"]) == 0
    model, _, tok = load_stage(tmp_path / "run" / "pretrain")
    assert tok.vocab_size == model.config.vocab_size == n
    assert tok.identity == Tokenizer.from_huggingface(hf_dir).identity
    with pytest.raises(Exception, match="user_start"):
        tok.render_prompt(MESSAGES)


def test_without_a_bos_token_bos_is_added(tmp_path):
    _hf_tokenizer(bos=False).save_pretrained(tmp_path)
    plain = Tokenizer.from_huggingface(tmp_path)
    tok, added = plain.with_chat_specials()
    assert added == list(DEFAULT_SPECIALS)
    assert [tok.special(s) for s in DEFAULT_SPECIALS] == list(range(plain.vocab_size, plain.vocab_size + 6))
    assert tok.bos_id == tok.special("<|bos|>") and tok.identity != plain.identity
    assert tok.with_chat_specials() == (tok, [])


def test_resize_vocab_tied_keeps_old_logits():
    from gptstack.model.gpt import GPT, GPTConfig, resize_vocab

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=16, tie_embeddings=True)).eval()
    grown = resize_vocab(model, 53)
    assert grown.config.vocab_size == 53 and grown.lm_head.weight is grown.tok_emb.weight
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(grown(ids)[..., :50], model(ids))
    torch.testing.assert_close(grown.tok_emb.weight[50:], model.tok_emb.weight.mean(0).expand(3, -1))


@pytest.mark.parametrize("chat", ["gptstack", "model"])
def test_a_checkpoint_padded_past_its_tokenizer(tmp_path, chat):
    """Qwen2.5's layout: more embedding rows than tokenizer ids (151,936 for 151,665). The import keeps
    the rows; gptstack's chat specials take padding rows, started at the mean of the tokenizer's rows;
    the logits of every id equal transformers'; an id sampled from a padding row decodes as U+FFFD."""
    template = "{% for m in messages %}<|begin_of_text|>{{ m.role }}: {{ m.content }}<|end_of_text|>{% endfor %}" \
               "{% if add_generation_prompt %}<|begin_of_text|>assistant: {% endif %}"
    hf_tok = _hf_tokenizer()
    if chat == "model":
        hf_tok.chat_template = template
    n = len(hf_tok)
    d = tmp_path / "hf"
    hf_tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=n + 30, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    assert main(["import", "--from", "hf", str(d), str(tmp_path / "run"), "--chat", chat]) == 0
    model, _, tok = load_stage(tmp_path / "run/pretrain")
    assert model.config.vocab_size == n + 30 and tok.vocab_size == (n + 5 if chat == "gptstack" else n)
    ids = [tok.bos_id, *tok.encode(CORPUS[:100])]
    hf_logits = _hf_logits(d, ids)
    if chat == "gptstack":   # the five specials sit in padding rows n .. n+4, the mean of rows 0 .. n-1
        torch.testing.assert_close(model.tok_emb.weight[n:n + 5], model.tok_emb.weight[:n].mean(0).expand(5, -1))
        torch.testing.assert_close(_our_logits(model, ids)[:, n + 5:], hf_logits[:, n + 5:], atol=1e-4, rtol=1e-4)
        hf_logits = hf_logits[:, :n]
    torch.testing.assert_close(_our_logits(model, ids)[:, : hf_logits.shape[1]], hf_logits, atol=1e-4, rtol=1e-4)
    assert tok.decode([*tok.encode(" fox"), n + 29]) == " fox\ufffd"
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i + 1}?"},
                                                     {"role": "assistant", "content": f"It is {2 * i + 1}."}]}) + "\n"
                            for i in range(12)))
    assert main(["sft", "--from", str(tmp_path / "run/pretrain"), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--recipe", "micro", "--set", "sft.max_steps=2", "--set", "sft.batch_size=2", "--set", "eval.limit=2",
                 "--set", "eval.max_new_tokens=4", "--set", "sft.threads=1"]) == 0
