"""Tokenizer file formats: GPT-2's encoder.json + vocab.bpe, tiktoken rank files, HF tokenizer.json."""
from __future__ import annotations

import base64
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..common import UserError, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

ENDOFTEXT = "<|endoftext|>"
# Specials of the public tiktoken encodings, placed relative to the number of ranks.
KNOWN_SPECIALS = {
    "gpt2": lambda n: {ENDOFTEXT: n},
    "cl100k": lambda n: {
        ENDOFTEXT: n + 1,  # cl100k_base leaves rank 100256 unused
        "<|fim_prefix|>": n + 2,
        "<|fim_middle|>": n + 3,
        "<|fim_suffix|>": n + 4,
        "<|endofprompt|>": n + 20,
    },
}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used by vocab.bpe and HF's ByteLevel.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...) map to
    chr(256 + k) in byte order, so every token is a string of visible characters.
    """
    printable = [b for b in range(256) if (33 <= b <= 126) or (161 <= b <= 172) or (174 <= b <= 255)]
    mapping = {b: chr(b) for b in printable}
    k = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + k)
            k += 1
    return mapping


def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _bytes_to_str(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def load_gpt2_files(encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> tuple[dict[bytes, int], dict[str, int]]:
    """Ranks and specials from GPT-2's release files, checked against each other.

    The ranks come from the merges in vocab.bpe (single bytes first, in GPT-2's byte order, then
    one rank per merge); encoder.json must give every token that same id, since tiktoken-style
    encoding takes the rank of a token to be its merge priority.
    """
    decode_char = _unicode_to_bytes()

    def to_bytes(s: str, where: str) -> bytes:
        try:
            return bytes(decode_char[c] for c in s)
        except KeyError as e:
            raise UserError(f"{where}: character {e.args[0]!r} is not in GPT-2's byte alphabet") from None

    vocab_bpe = Path(vocab_bpe)
    try:
        lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{vocab_bpe}: cannot read ({e})") from None
    # GPT-2's byte ranks: printable bytes (but space) in byte order, then the rest in byte order.
    byte_order = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    byte_order += [b for b in range(256) if b not in set(byte_order)]
    ranks = {bytes([b]): i for i, b in enumerate(byte_order)}
    start = 1 if lines and lines[0].startswith("#version") else 0
    for lineno, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise UserError(f"{vocab_bpe}:{lineno}: expected 'left right' (one merge per line), got {line!r}")
        token = to_bytes(parts[0], f"{vocab_bpe}:{lineno}") + to_bytes(parts[1], f"{vocab_bpe}:{lineno}")
        ranks[token] = len(ranks)

    encoder_json = Path(encoder_json)
    try:
        encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{encoder_json}: cannot read as JSON ({e})") from None
    specials = {}
    for s in (ENDOFTEXT, "<|startoftext|>"):
        if s in encoder:
            specials[s] = encoder.pop(s)
    for key, value in encoder.items():
        token = to_bytes(key, f"{encoder_json}: key {key!r}")
        if ranks.get(token) != value:
            raise UserError(
                f"{encoder_json}: key {key!r}: id {value} but vocab.bpe's merges give rank {ranks.get(token)}; "
                "the two files are not from the same tokenizer"
            )
    if len(encoder) != len(ranks):
        raise UserError(f"{encoder_json}: {len(encoder)} tokens but {vocab_bpe} defines {len(ranks)}")
    return ranks, specials


def load_tiktoken_file(path: str | os.PathLike) -> dict[bytes, int]:
    """A tiktoken rank file: one "<base64 token> <rank>" per line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read as a tiktoken rank file ({e})") from None
    ranks = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise UserError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:80]!r}") from None
    if not ranks:
        raise UserError(f"{path}: no ranks in file")
    return ranks


def dump_tiktoken_file(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write ranks in tiktoken's format (what `tiktoken.load.load_tiktoken_bpe` reads)."""
    lines = [f"{base64.b64encode(t).decode('ascii')} {r}" for t, r in ranks_sorted(ranks)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """HF BPE merges that reproduce tiktoken's rank-based encoding.

    tiktoken merges the adjacent pair whose *concatenation* has the lowest rank, whatever split
    it came from; HF applies listed (left, right) merges. Listing, for each token in rank order,
    every split of it into two tokens makes the two agree (the conversion transformers' own
    TikTokenConverter uses). With `ignore_merges` (a whole chunk that is a token is taken as is,
    as tiktoken does) the ids are identical.
    """
    merges = []
    for token, rank in ranks_sorted(ranks):
        if len(token) < 2:
            continue
        splits = [
            (token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks
        ]
        splits.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges.extend(splits)
    return merges


def oniguruma_pattern(pattern: str) -> str:
    r"""The pre-split regex as HF tokenizers (Oniguruma, Ruby syntax) reads it the same way.

    In Ruby syntax `X{1,3}+` is not possessive: it means `(X{1,3})+`, so tiktoken's
    `\p{N}{1,3}+` would group all digits of "1600" into one chunk. Where a bounded repeat ends
    its alternative (as in every built-in pattern) possessive and greedy match the same text, so
    the `+` is dropped. (`?+`, `*+`, `++` are possessive in Oniguruma too.)
    """
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def to_huggingface(tok: "Tokenizer", path: str | os.PathLike) -> Path:
    """Write a `tokenizers` tokenizer.json with the same ids as `tok`.

    `path` is a directory (tokenizer.json + tokenizer_config.json, loadable by
    `AutoTokenizer.from_pretrained`) or a file name ending in .json.
    """
    from .bpe import NO_SPLIT_PATTERN

    path = Path(path)
    directory, file = (path.parent, path) if path.suffix == ".json" else (path, path / "tokenizer.json")
    vocab = {_bytes_to_str(t): r for t, r in ranks_sorted(tok.mergeable_ranks)}
    # `tokenizers` gives an added token that is not in the BPE vocab the next free id, whatever its
    # "id" says: specials below the largest rank (vocabularies HF trained put them first) go in the
    # vocab too, as HF's own files have them; those after the ranks stay added tokens only
    top = max(tok.mergeable_ranks.values())
    vocab.update({s: i for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]) if i < top and s not in vocab})
    merges = [[_bytes_to_str(a), _bytes_to_str(b)] for a, b in merges_from_ranks(tok.mergeable_ranks)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    if tok.pattern == NO_SPLIT_PATTERN:
        pre_tokenizer = byte_level
    else:
        pre_tokenizer = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": oniguruma_pattern(tok.pattern)}, "behavior": "Isolated",
                 "invert": False},
                byte_level,
            ],
        }
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": s not in tok.text_tokens}   # an imported tokenizer's text tokens stay text
            for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
        ],
        "normalizer": {"type": "NFC"} if tok.normalizer == "nfc" else None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": _bos_post_processor(tok),
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
            "vocab": vocab, "merges": merges,
        },
    }
    atomic_write_json(file, spec, indent=None)
    if path.suffix != ".json":
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 1_000_000_000,
            "clean_up_tokenization_spaces": False,
        }
        specials = hf_special_tokens(tok)
        for key in ("bos_token", "eos_token", "pad_token"):
            if specials[key] is not None:
                config[key] = specials[key]
        if tok.chat_template:  # an imported model's own template, rendered with its own bos/eos/pad
            config["chat_template"] = tok.chat_template
        elif specials["chat"]:
            config["chat_template"] = chat_template(specials["chat_bos"])
        # transformers prefers a chat_template.jinja to the config's template: one left from an
        # earlier save here would shadow this one
        (directory / "chat_template.jinja").unlink(missing_ok=True)
        atomic_write_json(directory / "tokenizer_config.json", config)
    return file


# gptstack's chat rendering (Tokenizer.render_conversation / render_prompt) as a Jinja chat template,
# for `apply_chat_template`: <|bos|>, then <|user_start|> u <|user_end|> <|assistant_start|> a
# <|assistant_end|> per turn, a leading system message joined to the first user turn with a blank
# line, and <|assistant_start|> as the generation prompt. Roles are checked as gptstack checks them.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- if not turns -%}{{- raise_exception('messages: expected at least one user turn') -}}{%- endif -%}"
    "<|bos|>"
    "{%- for m in turns -%}"
    "{%- if m['role'] != ['user', 'assistant'][loop.index0 % 2] -%}"
    "{{- raise_exception('messages: after an optional leading system message, roles alternate user, assistant, ...; got ' + m['role'] + ' at turn ' + loop.index0|string) -}}"
    "{%- endif -%}"
    "{%- if m['content'] is not string -%}{{- raise_exception('messages: content must be a string') -}}{%- endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "<|user_start|>{%- if loop.first and system is not none -%}{{- system + '\\n\\n' -}}{%- endif -%}"
    "{{- m['content'] -}}<|user_end|>"
    "{%- else -%}<|assistant_start|>{{- m['content'] -}}<|assistant_end|>{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def chat_template(bos: str) -> str:
    """CHAT_TEMPLATE starting with `bos`, the token `Tokenizer.bos_id` starts a chat with: <|bos|>,
    or an imported tokenizer's own bos_token (Llama 3's <|begin_of_text|>) where it has no <|bos|>."""
    if bos == "<|bos|>":
        return CHAT_TEMPLATE
    return CHAT_TEMPLATE.replace("<|bos|>", "{{- " + json.dumps(bos) + " -}}", 1)


def hf_special_tokens(tok: "Tokenizer") -> dict:
    """Which specials HF's files name: bos/eos/pad token strings, and whether the chat template
    applies (the tokenizer has all the chat specials).

    eos is <|assistant_end|> (where a chat turn ends; gptstack's chat stops there); the export's
    generation_config.json also ends generation on <|bos|>, which begins every pretraining document
    and so is what a model emits where its text ends. pad is a special that never occurs in rendered
    text: <|step|> (reserved, never inserted), else the last special outside BOS and the chat turn
    markers. Not <|bos|>: every sequence starts with it, and `generate` given no attention mask
    would take it for padding. Not <|assistant_end|>: collators mask the labels of pad tokens, so a
    model fine-tuned on such batches would not learn to stop.
    """
    from .tokenizer import ASSISTANT_END, ASSISTANT_START, BOS, STEP, USER_END, USER_START

    have = tok.special_tokens
    chat_tokens = (USER_START, USER_END, ASSISTANT_START, ASSISTANT_END)
    roles = tok.special_roles  # an imported tokenizer's own bos/eos/pad come back as they were
    bos = roles.get("bos_token") or (BOS if BOS in have else (ENDOFTEXT if ENDOFTEXT in have else None))
    eos = roles.get("eos_token") or (ASSISTANT_END if ASSISTANT_END in have else (ENDOFTEXT if ENDOFTEXT in have else None))
    if tok.chat_template:  # a model's own template renders bos_token/eos_token: exactly its own, or none
        bos, eos = roles.get("bos_token"), roles.get("eos_token")
    unused = [s for s, _ in sorted(have.items(), key=lambda kv: kv[1])
              if s not in (BOS, *chat_tokens) and s not in tok.text_tokens]
    pad = roles.get("pad_token") or (STEP if STEP in unused else (unused[-1] if unused else None))
    # a chat starts with `Tokenizer.bos_id`: <|bos|>, else the imported tokenizer's own bos_token
    chat_bos = BOS if BOS in have else roles.get("bos_token")
    return {"bos_token": bos, "eos_token": eos, "pad_token": pad, "chat_bos": chat_bos,
            "chat": chat_bos is not None and all(s in have for s in chat_tokens)}


def _bos_post_processor(tok: "Tokenizer") -> dict | None:
    """`tokenizer(text)` starts with <|bos|>, as every sequence gptstack feeds its model does (each
    pretraining document, `sample`'s prompt, each rendered chat); `encode` itself adds none, so
    `add_special_tokens=False` gives gptstack's `encode` ids. The chat template writes its own
    <|bos|> and `apply_chat_template` encodes without special tokens, so chats get one BOS."""
    from .tokenizer import BOS

    if BOS not in tok.special_tokens:
        return None
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {BOS: {"id": BOS, "ids": [tok.special_tokens[BOS]], "tokens": [BOS]}},
    }


def ranks_sorted(ranks: dict[bytes, int]) -> list[tuple[bytes, int]]:
    return sorted(ranks.items(), key=lambda kv: kv[1])
