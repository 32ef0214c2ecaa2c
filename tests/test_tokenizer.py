"""BPE training, encoding and the chat template: known answers and a reference implementation."""
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptstack.common import UserError
from gptstack.tokenizer import (
    ASSISTANT_END,
    ASSISTANT_START,
    BOS,
    DEFAULT_SPECIALS,
    USER_END,
    USER_START,
    Tokenizer,
)
from gptstack.tokenizer.bpe import PATTERNS, count_chunks, sanitize, train_bpe


# --- a reference trainer: minbpe's recount-everything loop, same tie rule -------------------


def naive_train(chunk_counts: dict[bytes, int], num_merges: int) -> list[bytes]:
    words = {tuple(c): n for c, n in chunk_counts.items()}
    vocab = [bytes([b]) for b in range(256)]
    index = {t: i for i, t in enumerate(vocab)}
    done = 0
    while done < num_merges:
        stats = Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                stats[p] += n
        if not stats:
            break
        best = min(stats, key=lambda p: (-stats[p], p))
        merged = vocab[best[0]] + vocab[best[1]]
        new = index.get(merged)
        if new is None:
            new = index[merged] = len(vocab)
            vocab.append(merged)
            done += 1
        merged_words = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged_words[tuple(out)] += n
        words = merged_words
    return vocab


def test_minbpe_known_example():
    # minbpe's test: 3 merges on "aaabdaaabac" with the basic (no pre-split) trainer.
    tok = Tokenizer.train("aaabdaaabac", vocab_size=256 + 3, pattern=None, special_tokens=())
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.decode([258, 100, 258, 97, 99]) == "aaabdaaabac"
    assert tok.token_bytes(256) == b"aa"


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", "digits"])
def test_incremental_trainer_equals_recount_reference(real_texts, pattern):
    text = real_texts["tinyshakespeare"][:60_000] + real_texts["gsm8k"][:20_000]
    counts = {c.encode(): n for c, n in count_chunks([text], PATTERNS[pattern], 1).items()}
    assert train_bpe(counts, 300, progress=False) == naive_train(counts, 300)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(alphabet="abc d\n", max_size=30), min_size=1, max_size=8), st.integers(1, 40))
def test_incremental_trainer_equals_reference_on_random_corpora(texts, merges):
    # Tiny alphabets force long runs ("aaaa"), overlapping pairs, ties and token-byte collisions.
    counts = {c.encode(): n for c, n in count_chunks(texts, PATTERNS["gpt2"], 1).items()}
    assert train_bpe(counts, merges, progress=False) == naive_train(counts, merges)


def test_parallel_chunk_count_equals_serial(real_texts):
    text = real_texts["tinyshakespeare"] + real_texts["tinystories"]
    for name in ("gpt2", "gpt4", "digits"):
        assert count_chunks([text], PATTERNS[name], 2) == count_chunks([text], PATTERNS[name], 1)


def test_training_is_deterministic_and_fills_vocab(real_texts):
    text = real_texts["tinyshakespeare"][:200_000]
    a = Tokenizer.train(text, 1000, progress=False)
    b = Tokenizer.train([text[:100_000], text[100_000:]], 1000, progress=False, num_workers=1)
    assert a.vocab_size == 1000 and a.mergeable_ranks == b.mergeable_ranks
    assert a.special_tokens == {s: 1000 - len(DEFAULT_SPECIALS) + k for k, s in enumerate(DEFAULT_SPECIALS)}
    # the learned merges compress: well under one token per byte on held-out text of the same kind
    held_out = real_texts["tinyshakespeare"][-50_000:]
    assert len(a.encode(held_out)) < 0.45 * len(held_out.encode())


def test_digits_pattern_splits_numbers():
    tok = Tokenizer.train("12345 678 9012 " * 50, 300, pattern="digits", special_tokens=(), progress=False)
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    gpt4 = Tokenizer.train("12345 678 9012 " * 50, 300, pattern="gpt4", special_tokens=(), progress=False)
    assert len(gpt4.encode("123")) == 1


# --- round trips ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(real_texts):
    return Tokenizer.train(real_texts["tinyshakespeare"][:300_000] + "héllo wörld 日本語 🙂🚀", 2048, progress=False)


ANY_CHAR = st.characters(codec=None, exclude_categories=())  # every code point, lone surrogates too


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=ANY_CHAR, max_size=60))
def test_roundtrip_arbitrary_unicode(tok, text):
    ids = tok.encode(text)
    # lone surrogates cannot be UTF-8: they become U+FFFD, as in tiktoken; all else is exact
    assert tok.decode(ids) == sanitize(text)
    assert tok.decode_bytes(ids) == sanitize(text).encode("utf-8")
    assert all(0 <= i < tok.vocab_size - len(tok.special_tokens) for i in ids)


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab 12\n🙂é'sT.")), max_size=80))
def test_roundtrip_dense_alphabet(tok, text):
    assert tok.decode(tok.encode(text)) == text


SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.one_of(SURROGATE, st.sampled_from(list("a 1🙂\n"))), min_size=1, max_size=40))
def test_lone_surrogates_become_replacement_chars(tok, text):
    # Like tiktoken: a high+low surrogate pair is the astral character it encodes (UTF-16 rules),
    # a lone surrogate becomes U+FFFD.
    expected, i = [], 0
    while i < len(text):
        c = ord(text[i])
        nxt = ord(text[i + 1]) if i + 1 < len(text) else 0
        if 0xD800 <= c <= 0xDBFF and 0xDC00 <= nxt <= 0xDFFF:
            expected.append(chr(0x10000 + ((c - 0xD800) << 10) + (nxt - 0xDC00)))
            i += 2
            continue
        expected.append("\ufffd" if 0xD800 <= c <= 0xDFFF else text[i])
        i += 1
    assert tok.decode(tok.encode(text)) == "".join(expected)


def test_roundtrip_emoji_and_surrogates(tok):
    text = "family: 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵, skin 👍🏽, math 𝔸, zero-width \u200b, rtl שלום"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("bad \ud800 surrogate")) == "bad \ufffd surrogate"


@settings(max_examples=500, deadline=None)
@given(st.lists(st.integers(0, 2047 - len(DEFAULT_SPECIALS)), max_size=30))
def test_decode_arbitrary_ids_replaces_invalid_utf8(tok, ids):
    raw = b"".join(tok.token_bytes(i) for i in ids)
    assert tok.decode_bytes(ids) == raw
    assert tok.decode(ids) == raw.decode("utf-8", errors="replace")


def test_batch_encode_equals_single(tok, real_texts):
    docs = real_texts["hh-rlhf"].split("\n\nHuman:")[:300]
    assert tok.encode_batch(docs, num_threads=2) == [tok.encode(d) for d in docs]


# --- special tokens and the chat template -----------------------------------------------------


def test_special_token_strings_stay_plain_text(tok):
    for s in DEFAULT_SPECIALS:
        ids = tok.encode(f"say {s} now")
        assert tok.special(s) not in ids
        assert tok.decode(ids) == f"say {s} now"
    assert tok.decode([tok.bos_id]) == BOS


def test_render_conversation_ids_and_mask(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi <|assistant_start|>"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]
    ids, mask = tok.render_conversation(messages)
    s = tok.special
    u1, a1, u2, a2 = (tok.encode(t) for t in ("Be brief.\n\nHi <|assistant_start|>", "Hello.", "Bye", "Bye!"))
    expected = (
        [s(BOS), s(USER_START), *u1, s(USER_END), s(ASSISTANT_START), *a1, s(ASSISTANT_END),
         s(USER_START), *u2, s(USER_END), s(ASSISTANT_START), *a2, s(ASSISTANT_END)]
    )
    assert ids == expected
    expected_mask = ([0] * (3 + len(u1)) + [0] + [1] * (len(a1) + 1)
                     + [0] * (2 + len(u2)) + [0] + [1] * (len(a2) + 1))
    assert mask == expected_mask
    # a user typing a control string never produces the control token
    assert ids.count(s(ASSISTANT_START)) == 2
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == f"Hello.{ASSISTANT_END}Bye!{ASSISTANT_END}"


def test_render_prompt_ends_with_assistant_start(tok):
    ids = tok.render_prompt([{"role": "user", "content": "2+2?"}])
    assert ids[-1] == tok.special(ASSISTANT_START) and ids[0] == tok.bos_id
    with pytest.raises(UserError, match=r"messages\[-1\].role"):
        tok.render_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty list"),
        ([{"role": "assistant", "content": "x"}], r"messages\[0\].role: expected 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], r"messages\[1\].role: expected 'assistant'"),
        ([{"role": "bot", "content": "a"}], r"messages\[0\].role: expected one of"),
        ([{"role": "user", "content": 3}], r"messages\[0\].content: expected a string"),
        ([{"role": "user"}], r"messages\[0\]: expected a dict"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only allowed as the first"),
    ],
)
def test_render_conversation_rejects_bad_roles(tok, messages, match):
    with pytest.raises(UserError, match=match):
        tok.render_conversation(messages)


# --- persistence and bad input ----------------------------------------------------------------


def test_save_load_roundtrip(tok, tmp_path, real_texts):
    tok.save(tmp_path / "t")
    back = Tokenizer.load(tmp_path / "t")
    assert back.mergeable_ranks == tok.mergeable_ranks and back.special_tokens == tok.special_tokens
    assert back.pattern == tok.pattern
    text = real_texts["gsm8k"][:20_000]
    assert back.encode(text) == tok.encode(text)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["gptstack.json", "tokenizer.json", "tokenizer_config.json"]


def test_bad_training_arguments():
    with pytest.raises(UserError, match="vocab_size: 260 is too small, expected at least 262"):
        Tokenizer.train("hello", 260)
    with pytest.raises(UserError, match="pattern: invalid regex"):
        Tokenizer.train("hello", 300, pattern="([a-z")
    with pytest.raises(UserError, match="matches the empty string"):
        Tokenizer.train("hello", 300, pattern="a*")
    with pytest.raises(UserError, match="outside every chunk"):
        Tokenizer.train("hello world", 300, pattern=r"\p{L}+")


def test_load_rejects_missing_and_corrupt(tmp_path):
    with pytest.raises(UserError, match="no tokenizer here"):
        Tokenizer.load(tmp_path)
    (tmp_path / "gptstack.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Tokenizer.load(tmp_path)
