"""Tokenizer.from_huggingface: the same ids as transformers' AutoTokenizer, or a clear refusal.

Every HF tokenizer here is built in the test (trained on a few KB of text, or written from ranks
the way transformers' tiktoken converter writes Llama 3's), saved with save_pretrained and read
back by AutoTokenizer: nothing is downloaded.
"""
import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptstack.common import UserError
from gptstack.tokenizer import Tokenizer
from gptstack.tokenizer.formats import bytes_to_unicode, merges_from_ranks

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from hf_builders import bpe_tokenizer  # noqa: E402

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = "".join(
    f"The quick brown fox jumps over the lazy dog {i} times. It's what they'd've said, isn't it? We'LL see.\n"
    f"def main(argv):\n    for i in range({i * 7}):\n        print(f'{{i:03d}}', i * 3.14159)\n    return 0\n"
    f"Prices: $1,234.{i:02d} on 2024-05-{i + 1:02d}, 100% of {i * 37} items; call 555-01{i:02d}.\r\n"
    "Ünïcödé naïve café — «quoted» 日本語のテキスト 中文字符 Привет, мир! Ελληνικά 한국어\n"
    "Emoji: 😀😃 🎉 👍🏽 🇫🇷 ❤️\t\ttabs   and    spaces\n\n\n"
    '<html><body class="x">a &amp; b</body></html> {"key": [1, 2, 3], "n": null}\n'
    for i in range(12)
)
TRICKY = [
    "", "hello world", "Hello World HELLO", "  leading and trailing  ", "a\r\nb\r\n\r\nc\n\n\nd\r\r",
    "tabs\t\tand\u00a0nbsp and\u3000ideographic space", "x = 12345678901; y=3.14159e-10\n",
    "def f(a, b):\n    return {'k': [a, b]}  # comment\n", "日本語のテキスト、中文字符。Привет, мир!",
    "😀😃🎉 👍🏽 🇫🇷 ❤️ family: 👨‍👩‍👧", "it's IT'S they'd've We'LL 'sup", "   \n  \n ", "1 22 333 4444 55555",
    "e\u0301 vs \u00e9 (combining)", "<|endoftext|> text <|begin_of_text|><pad> <tool>x<tool><tool>",
    "a<|endoftext|>b", "\ufeffBOM and \u200bzero width", "ſ ǅ K ﬁ", "$$$$ ---- ==== ....",
]


def _hf_dir(path, spec: dict, **config):
    """tokenizer.json spec -> a save_pretrained directory AutoTokenizer reads."""
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **config).save_pretrained(path)
    return path


def _trained_spec(style: str) -> dict:
    """A BPE trained by HF tokenizers (as GPT-2, SmolLM): specials first, then the 256 byte
    tokens, then one token per merge; plus a non-special added token after them."""
    tok = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = byte_level if style == "gpt2" else pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    tok.add_tokens(["<tool>"])
    return json.loads(tok.to_str())


def _llama3_spec() -> dict:
    """Llama 3's layout: tiktoken ranks (ids = ranks), every split of each token as a merge (what
    transformers' TikTokenConverter writes), ignore_merges, a Split regex then ByteLevel without
    regex, specials after the vocabulary."""
    ranks = Tokenizer.train(CORPUS, 700, pattern=LLAMA3_PATTERN, special_tokens=(), progress=False).mergeable_ranks
    char = bytes_to_unicode()
    text = lambda b: "".join(char[x] for x in b)  # noqa: E731
    n = len(ranks)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|eot_id|>"]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": n + k, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for k, s in enumerate(specials)],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(t): r for t, r in ranks.items()},
                  "merges": [[text(a), text(b)] for a, b in merges_from_ranks(ranks)]},
    }


def _qwen2_spec() -> dict:
    """Qwen2's layout: an NFC normalizer, a Split regex then ByteLevel without regex, specials after the vocabulary."""
    tok = bpe_tokenizer(CORPUS, 700, layout="qwen2")
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return json.loads(tok.to_str())


SPECS = {"gpt2": lambda: _trained_spec("gpt2"), "smollm": lambda: _trained_spec("digits"), "llama3": _llama3_spec,
         "qwen2": _qwen2_spec}
CONFIGS = {
    "gpt2": dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>"),
    "smollm": dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>"),
    "llama3": dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"),
    "qwen2": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """style -> (spec, directory, our Tokenizer, AutoTokenizer with special-token parsing off)."""
    out = {}
    for style, make in SPECS.items():
        spec = make()
        d = _hf_dir(tmp_path_factory.mktemp(style), spec, **CONFIGS[style])
        hf = transformers.AutoTokenizer.from_pretrained(d, split_special_tokens=True)
        out[style] = (spec, d, Tokenizer.from_huggingface(d), hf)
    return out


def hf_ids(hf, text: str) -> list[int]:
    return hf(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("style", list(SPECS))
def test_same_ids_as_transformers(built, style):
    _, _, ours, hf = built[style]
    for text in TRICKY + [CORPUS, "Cafe\u0301 and A\u030a: composed by NFC in qwen2's only"]:
        assert ours.encode(text) == hf_ids(hf, text), text
        assert ours.decode(ours.encode(text)) == ours.normalize(text)
    assert ours.encode_batch(TRICKY) == [hf_ids(hf, t) for t in TRICKY]


def test_layouts(built):
    # HF-trained: specials at 0 and 1, the bytes at 2..257, a non-special added token after the vocab
    spec, _, gpt2, _ = built["gpt2"]
    n = len(spec["model"]["vocab"])
    assert gpt2.special_tokens["<|endoftext|>"] == 0 and gpt2.special_tokens["<pad>"] == 1
    assert min(gpt2.mergeable_ranks.values()) == 2 and gpt2.text_tokens == ["<tool>"]
    assert gpt2.special_tokens["<tool>"] == n and gpt2.vocab_size == n + 1
    # Llama 3: ranks 0..n-1, specials after
    spec, _, llama, _ = built["llama3"]
    n = len(spec["model"]["vocab"])
    assert sorted(llama.mergeable_ranks.values()) == list(range(n))
    assert llama.special_tokens["<|begin_of_text|>"] == n and llama.vocab_size == n + 4 and not llama.text_tokens


@pytest.mark.parametrize("style", list(SPECS))
def test_special_strings_stay_text(built, style):
    _, d, ours, hf = built[style]
    text = "say <|endoftext|> or <|begin_of_text|><|eot_id|> or <pad>"
    ids = ours.encode(text)
    assert ids == hf_ids(hf, text)  # HF with split_special_tokens=True
    assert not set(ids) & set(ours.special_tokens.values())
    # HF's default parses them: the special's id, which ours never produces from text
    default = transformers.AutoTokenizer.from_pretrained(d)
    special = ours.special_tokens["<|endoftext|>" if style != "llama3" else "<|begin_of_text|>"]
    assert special in hf_ids(default, text) and hf_ids(default, text) != ids


def test_non_special_added_token_is_matched_like_hf(built):
    _, d, ours, hf = built["gpt2"]
    tool = ours.special_tokens["<tool>"]
    default = transformers.AutoTokenizer.from_pretrained(d)
    for text in ["<tool>", "a<tool>b", " <tool> <tool><tool>x", "<too<tool>l>", "<tool"]:
        assert ours.encode(text) == hf_ids(hf, text) == hf_ids(default, text), text
    assert ours.encode("x<tool>y").count(tool) == 1


@pytest.mark.parametrize("style", list(SPECS))
def test_bos_eos_pad_as_transformers_names_them(built, style):
    _, _, ours, hf = built[style]
    for key in ("bos_token", "eos_token", "pad_token"):
        assert ours.special_roles.get(key) == getattr(hf, key), key
    if hf.bos_token is not None:  # Qwen2 names none
        assert ours.bos_id == hf.bos_token_id


@pytest.mark.parametrize("config,special", [
    ({}, False),
    ({"additional_special_tokens": ["<tool>"]}, False),
    ({"pad_token": "<tool>"}, True),
    ({"added_tokens_decoder": {"ID": {"content": "<tool>", "special": True}}}, True),
])
def test_added_token_special_as_transformers_loads_it(built, tmp_path, config, special):
    # tokenizer.json says <tool> is not special; tokenizer_config.json may make it special
    spec = built["gpt2"][0]
    if "added_tokens_decoder" in config:
        config = {"added_tokens_decoder": {str(spec["added_tokens"][2]["id"]): {
            "content": "<tool>", "special": True, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, split_special_tokens=True)
    ours = Tokenizer.from_huggingface(tmp_path)
    assert ours.encode("a<tool>b") == hf_ids(hf, "a<tool>b")
    assert (ours.text_tokens == []) == special


def test_roles_from_special_tokens_map(built, tmp_path):
    spec = built["llama3"][0]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<|begin_of_text|>", "lstrip": False}, "eos_token": "<|eot_id|>",
         "pad_token": "not-an-added-token"}))
    tok = Tokenizer.from_huggingface(tmp_path)
    assert tok.special_roles == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    assert tok.bos_id == tok.special_tokens["<|begin_of_text|>"]


def test_save_load_keeps_ids_and_identity(built, tmp_path):
    _, _, ours, _ = built["gpt2"]
    ours.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode(TRICKY[14]) == ours.encode(TRICKY[14])
    assert again.text_tokens == ["<tool>"] and again.special_roles == ours.special_roles
    assert again.identity == ours.identity
    assert json.loads((tmp_path / "gptstack.json").read_text())["version"] == 2
    # without text tokens the file and identity are as before this feature
    _, _, llama, _ = built["llama3"]
    llama.save(tmp_path / "l")
    data = json.loads((tmp_path / "l" / "gptstack.json").read_text())
    assert data["version"] == 1 and "text_tokens" not in data
    plain = Tokenizer(llama.mergeable_ranks, pattern=llama.pattern, special_tokens=llama.special_tokens)
    assert plain.identity == llama.identity


@pytest.mark.parametrize("style", list(SPECS))
def test_an_imported_tokenizer_goes_back_to_hf_as_it_came(built, tmp_path, style):
    """Saving an imported tokenizer writes an HF tokenizer.json with its own bos/eos/pad names and
    its non-special added tokens still non-special: transformers reads back the same ids."""
    _, _, ours, hf = built[style]
    ours.save(tmp_path / "tok")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok", split_special_tokens=True)
    for text in TRICKY:
        assert hf_ids(back, text) == hf_ids(hf, text), text
    for role in ("bos_token", "eos_token", "pad_token"):
        if getattr(hf, role) is not None:
            assert getattr(back, role) == getattr(hf, role), role


def test_ignore_merges_true_changes_nothing_for_trained_bpe(built, tmp_path):
    # tiktoken takes a chunk that is a whole token as that token: HF's ignore_merges. On a trained
    # BPE every token comes out of its own merges as itself, so the flag changes no id.
    spec = copy.deepcopy(built["gpt2"][0])
    spec["model"]["ignore_merges"] = True
    d = _hf_dir(tmp_path, spec)
    hf = transformers.AutoTokenizer.from_pretrained(d, split_special_tokens=True)
    ours = Tokenizer.from_huggingface(d)
    assert ours.identity == built["gpt2"][2].identity
    for text in TRICKY:
        assert ours.encode(text) == hf_ids(hf, text) == hf_ids(built["gpt2"][3], text)


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


@pytest.mark.parametrize("pre_tokenizer", [
    # HF's Split (Isolated) keeps unmatched text as pieces; tiktoken would drop it
    {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{L}+"}, "behavior": "Isolated", "invert": False},
        {**BYTE_LEVEL, "use_regex": False}]},
    {**BYTE_LEVEL, "use_regex": False},  # no split at all
    {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False}, BYTE_LEVEL]},
], ids=["split-with-gaps", "no-split", "digit-runs"])
def test_other_pre_tokenizers(built, tmp_path, pre_tokenizer):
    spec = copy.deepcopy(built["llama3"][0])
    spec["pre_tokenizer"] = pre_tokenizer
    d = _hf_dir(tmp_path, spec)
    hf = transformers.AutoTokenizer.from_pretrained(d, split_special_tokens=True)
    ours = Tokenizer.from_huggingface(d)
    for text in TRICKY:
        assert ours.encode(text) == hf_ids(hf, text), text


# --- the hypothesis check ----------------------------------------------------------------------

PIECES = ["<|endoftext|>", "<|begin_of_text|>", "<tool>", "'s", "'LL", "\r\n", "\r", "\n\n", "   ", "\t",
          "123456", "3.14", "😀", "👍🏽", "日本語", "é", "e\u0301", "def f():", "    return", " the", "ſ", "K"]
TEXTS = st.lists(
    st.one_of(
        st.text(st.sampled_from("abcxyzABC éüßñ日本語中文ключΔλ😀🎉👍🏽 \t\r\n0123456789'\".,;:!?(){}[]<>|_-=+$#@"),
                max_size=12),
        st.text(st.characters(exclude_categories=("Cs",)), max_size=6),
        st.sampled_from(PIECES),
    ),
    max_size=12,
).map("".join)


@pytest.mark.parametrize("style", ["gpt2", "llama3", "smollm", "qwen2"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_same_ids_as_transformers_on_generated_text(built, style, text):
    _, _, ours, hf = built[style]
    assert ours.encode(text) == hf_ids(hf, text)


# --- a real vocabulary: GPT-2's ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_hf(shared_data, tmp_path_factory):
    """GPT-2's released encoder.json + vocab.bpe as HF's GPT-2 tokenizer.json."""
    bpe = models.BPE.from_file(str(shared_data / "gpt2/encoder.json"), str(shared_data / "gpt2/vocab.bpe"))
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    spec = json.loads(tok.to_str())
    d = _hf_dir(tmp_path_factory.mktemp("gpt2-real"), spec, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    return spec, d


def test_gpt2_real_vocabulary(gpt2_hf, shared_data, real_texts):
    spec, d = gpt2_hf
    ours = Tokenizer.from_huggingface(d)  # the merge checks run over all 50k tokens (~1 s)
    hf = transformers.AutoTokenizer.from_pretrained(d, split_special_tokens=True)
    from_files = Tokenizer.from_gpt2_files(shared_data / "gpt2/encoder.json", shared_data / "gpt2/vocab.bpe")
    assert ours.mergeable_ranks == from_files.mergeable_ranks and ours.special_tokens == {"<|endoftext|>": 50256}
    assert ours.bos_id == 50256
    for text in [t[:30_000] for t in real_texts.values()] + TRICKY:
        ids = ours.encode(text)
        assert ids == hf_ids(hf, text) == from_files.encode(text)


def test_gpt2_real_vocabulary_with_two_merges_swapped_is_refused(gpt2_hf, tmp_path):
    # the merges list and the ids disagree (as in a hand-edited file): tiktoken cannot encode it
    spec = copy.deepcopy(gpt2_hf[0])
    merges = spec["model"]["merges"]
    merges[100], merges[101] = merges[101], merges[100]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match=r"tokenizer.json: model.merges\[101\]: .* must rise in the order"):
        Tokenizer.from_huggingface(tmp_path)


# --- refusals --------------------------------------------------------------------------------------


def _set(path: str, value):
    def edit(spec):
        *keys, last = path.split(".")
        node = spec
        for k in keys:
            node = node[int(k)] if k.isdigit() else node[k]
        node[int(last) if last.isdigit() else last] = value
    return edit


def _split_then_bytelevel_regex(spec):
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}


def _drop_byte(spec):
    del spec["model"]["vocab"]["Ā"]  # byte 0


def _lstrip_non_special(spec):
    spec["added_tokens"][-1]["lstrip"] = True


def _swap_ids(spec):
    vocab = spec["model"]["vocab"]
    a, b = [f"{x}{y}" for x, y in spec["model"]["merges"][3:5]]
    vocab[a], vocab[b] = vocab[b], vocab[a]


REFUSALS = [
    ("model.type", _set("model.type", "Unigram")),
    ("model.type", _set("model.type", "WordPiece")),
    ("model.type", _set("model.type", "WordLevel")),
    ("normalizer", _set("normalizer", {"type": "NFKC"})),
    ("normalizer", _set("normalizer", {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]})),
    ("pre_tokenizer", _set("pre_tokenizer", {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"})),
    ("pre_tokenizer", _set("pre_tokenizer", {"type": "Whitespace"})),
    ("pre_tokenizer", _set("pre_tokenizer", None)),
    ("pre_tokenizer", _set("pre_tokenizer.add_prefix_space", True)),
    ("pre_tokenizer", _split_then_bytelevel_regex),
    ("decoder", _set("decoder", None)),
    ("decoder", _set("decoder", {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"})),
    ("model.byte_fallback", _set("model.byte_fallback", True)),
    ("model.continuing_subword_prefix", _set("model.continuing_subword_prefix", "##")),
    ("model.end_of_word_suffix", _set("model.end_of_word_suffix", "</w>")),
    ("model.dropout", _set("model.dropout", 0.1)),
    ("model.vocab", _drop_byte),
    ("added_tokens[2].lstrip", _lstrip_non_special),
    ("model.merges[4]", _swap_ids),
]


@pytest.mark.parametrize("field,edit", REFUSALS, ids=[f"{f}-{k}" for k, (f, _) in enumerate(REFUSALS)])
def test_refused_naming_file_and_field(built, tmp_path, field, edit):
    spec = copy.deepcopy(built["gpt2"][0])
    edit(spec)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError) as e:
        Tokenizer.from_huggingface(tmp_path)
    assert f"{tmp_path / 'tokenizer.json'}: {field}" in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key,value,message", [
    ("behavior", "Removed", "pre_tokenizer: Split behavior 'Removed'"),
    ("pattern", {"String": " "}, "pre_tokenizer: Split pattern {'String': ' '}"),
    ("pattern", {"Regex": "(unbalanced"}, "pre_tokenizer: pattern: invalid regex"),
    ("pattern", {"Regex": r"\p{N}{1,3}+"}, "pre_tokenizer: Split regex .* bounded repeat"),
])
def test_llama3_style_refusals(built, tmp_path, key, value, message):
    spec = copy.deepcopy(built["llama3"][0])
    spec["pre_tokenizer"]["pretokenizers"][0][key] = value
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="tokenizer.json: " + message):
        Tokenizer.from_huggingface(tmp_path)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer.json: not found"):
        Tokenizer.from_huggingface(tmp_path)


def _abc_spec(ignore_merges: bool) -> dict:
    """Merges b+c, then a+b, then ab+c: 'abc' is listed as ab+c, but a+bc also forms it."""
    char = bytes_to_unicode()
    vocab = {char[b]: b for b in range(256)}
    vocab.update({"bc": 256, "ab": 257, "abc": 258})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": ignore_merges, "vocab": vocab, "merges": [["b", "c"], ["a", "b"], ["ab", "c"]]}}


def test_merges_tiktoken_cannot_follow_are_refused(tmp_path):
    # HF: "zabc" -> b+c first, then a+bc is not a listed merge: z, a, bc. tiktoken joins a+bc
    # into abc (a token), so ranks straight from this file would give z, abc: refused instead.
    for ignore_merges, field in ((True, "model.merges"), (False, "model.ignore_merges")):
        d = _hf_dir(tmp_path / str(ignore_merges), _abc_spec(ignore_merges))
        with pytest.raises(UserError, match=f"tokenizer.json: {field}: .*'abc'"):
            Tokenizer.from_huggingface(d)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "True")
    naive = Tokenizer({bytes([b]): b for b in range(256)} | {b"bc": 256, b"ab": 257, b"abc": 258}, pattern="gpt2")
    assert hf_ids(hf, "zabc") == [ord("z"), ord("a"), 256] != naive.encode("zabc") == [ord("z"), 258]


# --- gptstack import --from hf -------------------------------------------------------------------


def _llama(d, vocab_size: int):
    import torch

    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def llama_dir(built, tmp_path_factory):
    """A tiny Llama with as many embeddings as the llama3-style tokenizer has ids."""
    return _llama(tmp_path_factory.mktemp("llama"), built["llama3"][2].vocab_size)


def _copy_tokenizer(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


def test_cli_import_writes_the_tokenizer(built, llama_dir, tmp_path, capsys):
    from gptstack.cli import main
    from gptstack.rundir import load_stage

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    _copy_tokenizer(llama_dir, model_dir)
    _, d, ours, _ = built["llama3"]
    _copy_tokenizer(d, model_dir)
    assert main(["import", "--from", "hf", str(model_dir), str(tmp_path / "run")]) == 0
    model, cfg, tok = load_stage(tmp_path / "run" / "pretrain")
    # the default --chat gptstack: DIR's tokenizer plus gptstack's chat specials (tests/test_hf_import_chat.py)
    assert tok.identity == ours.with_chat_specials()[0].identity == cfg.tokenizer.identity
    assert tok.encode(CORPUS) == ours.encode(CORPUS) and tok.bos_id == ours.special_tokens["<|begin_of_text|>"]
    # importing again into the same run is fine; another tokenizer there is refused, nothing written
    assert main(["import", "--from", "hf", str(model_dir), str(tmp_path / "run")]) == 0
    other = _llama(tmp_path / "other", built["gpt2"][2].vocab_size)
    _copy_tokenizer(built["gpt2"][1], other)
    before = (tmp_path / "run" / "pretrain" / "model.safetensors").stat().st_mtime_ns
    assert main(["import", "--from", "hf", str(other), str(tmp_path / "run")]) == 2
    assert "holds another tokenizer" in capsys.readouterr().err
    assert (tmp_path / "run" / "pretrain" / "model.safetensors").stat().st_mtime_ns == before


def test_cli_import_refuses_before_writing(built, llama_dir, tmp_path, capsys):
    from gptstack.cli import main

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    _copy_tokenizer(llama_dir, model_dir)
    spec = copy.deepcopy(built["gpt2"][0])
    spec["normalizer"] = {"type": "NFKC"}
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    assert main(["import", "--from", "hf", str(model_dir), str(tmp_path / "run")]) == 2
    assert f"{model_dir / 'tokenizer.json'}: normalizer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # a tokenizer with more ids than the model has embeddings (fewer is a padded checkpoint: test_hf_import_chat)
    small = _llama(tmp_path / "small", built["gpt2"][2].vocab_size - 1)
    _copy_tokenizer(built["gpt2"][1], small)
    assert main(["import", "--from", "hf", str(small), str(tmp_path / "run2")]) == 2
    assert f"vocab_size is {built['gpt2'][2].vocab_size - 1}: the model has no rows" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()


def test_cli_import_without_tokenizer_json_writes_none(llama_dir, tmp_path):
    from gptstack.cli import main

    assert main(["import", "--from", "hf", str(llama_dir), str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "pretrain" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "tokenizer").exists()
