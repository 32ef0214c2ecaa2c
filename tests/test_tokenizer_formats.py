"""Exactness against the references: tiktoken (GPT-2 files, rank files) and HF tokenizers/transformers."""
import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

from gptstack.common import UserError
from gptstack.tokenizer import GPT2_PATTERN, GPT4_PATTERN, Tokenizer
from gptstack.tokenizer.formats import bytes_to_unicode, dump_tiktoken_file, load_gpt2_files, merges_from_ranks


@pytest.fixture(scope="module")
def gpt2_files(shared_data):
    return shared_data / "gpt2/encoder.json", shared_data / "gpt2/vocab.bpe"


@pytest.fixture(scope="module")
def gpt2(gpt2_files):
    return Tokenizer.from_gpt2_files(*gpt2_files)


@pytest.fixture(scope="module")
def tiktoken_gpt2(gpt2_files):
    # exactly what tiktoken's registry builds for "gpt2", from the same local files
    encoder_json, vocab_bpe = gpt2_files
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json))
    from tiktoken_ext.openai_public import r50k_pat_str

    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def test_bytes_to_unicode_is_gpt2s_map():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"


@pytest.mark.parametrize("corpus", ["tinyshakespeare", "tinystories", "hh-rlhf", "gsm8k"])
def test_gpt2_files_equal_tiktoken_gpt2(gpt2, tiktoken_gpt2, real_texts, corpus):
    text = real_texts[corpus]
    assert gpt2.encode(text) == tiktoken_gpt2.encode_ordinary(text)
    assert gpt2.vocab_size == tiktoken_gpt2.n_vocab == 50257
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert GPT2_PATTERN == tiktoken_gpt2._pat_str


def test_gpt2_known_ids(gpt2):
    # ids from OpenAI's GPT-2 vocabulary ("hello world" -> [31373, 995], tiktoken's docstring)
    assert gpt2.encode("hello world") == [31373, 995]
    assert gpt2.decode([31373, 995]) == "hello world"


def test_gpt2_files_mismatch_is_rejected(gpt2_files, tmp_path):
    encoder_json, vocab_bpe = gpt2_files
    lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # swap two merges: ranks no longer match encoder.json
    bad = tmp_path / "vocab.bpe"
    bad.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(UserError, match="not from the same tokenizer"):
        load_gpt2_files(encoder_json, bad)


def test_tiktoken_file_equals_tiktoken_loader(gpt2, tmp_path, real_texts):
    # No cl100k_base.tiktoken is available offline; the same file format with GPT-2's ranks and
    # cl100k's regex and special-token layout checks the loader against tiktoken's own.
    path = tmp_path / "ranks.tiktoken"
    dump_tiktoken_file(gpt2.mergeable_ranks, path)
    ranks = load_tiktoken_bpe(str(path))
    n = len(ranks)
    specials = {"<|endoftext|>": n + 1, "<|fim_prefix|>": n + 2, "<|fim_middle|>": n + 3,
                "<|fim_suffix|>": n + 4, "<|endofprompt|>": n + 20}
    reference = tiktoken.Encoding("ref", pat_str=GPT4_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    ours = Tokenizer.from_tiktoken_file(path, pattern="cl100k")
    assert ours.special_tokens == specials
    for text in (real_texts["gsm8k"][:200_000], real_texts["hh-rlhf"][:200_000]):
        assert ours.encode(text) == reference.encode_ordinary(text)
    assert ours.decode([specials["<|endofprompt|>"]]) == "<|endofprompt|>"


def test_tiktoken_file_bad_line(tmp_path):
    path = tmp_path / "bad.tiktoken"
    path.write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(UserError, match=r"bad.tiktoken:2: expected '<base64 token> <rank>'"):
        Tokenizer.from_tiktoken_file(path)


def test_merges_from_ranks_rebuild_every_token(gpt2):
    ranks = gpt2.mergeable_ranks
    merges = merges_from_ranks(ranks)
    made = {a + b for a, b in merges}
    assert made == {t for t in ranks if len(t) > 1}


# --- HF export ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(real_texts):
    text = real_texts["tinyshakespeare"][:400_000] + real_texts["gsm8k"][:200_000]
    return Tokenizer.train(text, 3000, pattern="gpt4", progress=False)


def _hf_pair(tok, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok.to_huggingface(tmp_path)
    raw = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    raw.encode_special_tokens = True  # compare ordinary-text encoding, as gptstack's encode() does
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    return raw, fast, auto


@pytest.mark.parametrize("which", ["trained", "gpt2"])
def test_hf_export_same_ids(which, trained, gpt2, tmp_path, real_texts):
    tok = trained if which == "trained" else gpt2
    raw, fast, auto = _hf_pair(tok, tmp_path)
    for name, text in real_texts.items():
        sample = text[:150_000]
        ours = tok.encode(sample)
        assert raw.encode(sample, add_special_tokens=False).ids == ours, name
        assert fast.encode(sample, add_special_tokens=False) == ours, name
        assert auto.decode(ours) == tok.decode(ours), name
    for s, i in tok.special_tokens.items():
        assert raw.token_to_id(s) == i and fast.convert_tokens_to_ids(s) == i
    assert len(fast) == tok.vocab_size


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=50))
def test_hf_export_same_ids_on_arbitrary_text(trained, tmp_path_factory, text):
    global _HF_RAW
    if "_HF_RAW" not in globals():
        from tokenizers import Tokenizer as HFTokenizer

        d = tmp_path_factory.mktemp("hf")
        trained.to_huggingface(d / "tokenizer.json")
        _HF_RAW = HFTokenizer.from_file(str(d / "tokenizer.json"))
        _HF_RAW.encode_special_tokens = True
    assert _HF_RAW.encode(text, add_special_tokens=False).ids == trained.encode(text)


@pytest.mark.parametrize("pattern", ["digits", "gpt2"])
def test_hf_export_other_patterns(pattern, real_texts, tmp_path):
    tok = Tokenizer.train(real_texts["gsm8k"][:300_000], 1500, pattern=pattern, progress=False)
    raw, _, _ = _hf_pair(tok, tmp_path)
    for text in real_texts.values():
        assert raw.encode(text[:100_000], add_special_tokens=False).ids == tok.encode(text[:100_000])


def test_hf_export_no_pretokenizer(tmp_path):
    tok = Tokenizer.train("aaabdaaabac" * 20, 256 + 6, pattern=None, special_tokens=())
    raw, fast, _ = _hf_pair(tok, tmp_path)
    for text in ("aaabdaaabac", "abacabadaaaa", "xyz aaab"):
        assert raw.encode(text).ids == tok.encode(text)
