"""Read a Hugging Face fast tokenizer (tokenizer.json) as gptstack's tiktoken-backed Tokenizer.

Only what tiktoken reproduces id for id is accepted; anything else is refused with one UserError
naming the file and the field, before the caller writes anything:

- model: byte-level BPE (`type: BPE`, every token a string over GPT-2's byte alphabet, all 256
  single bytes present), no dropout, byte_fallback, continuing_subword_prefix or end_of_word_suffix.
  tiktoken takes a token's id as its merge priority, so the ids of the merges' results must rise in
  the order of `model.merges` (true of GPT-2, of every HF-trained BPE and of tiktoken conversions
  such as Llama 3's), and every vocabulary token longer than a byte must be some merge's result.
  tiktoken joins any two adjacent tokens that form a token, HF only listed pairs: a token that also
  splits into an unlisted pair must come out of both alike. tiktoken takes a pre-split chunk that
  is a whole token as that token (HF's `ignore_merges: true`); with `ignore_merges: false` every
  token must come out of its own merges as itself. (Both hold for GPT-2's 50k tokens.)
- normalizer: none, or NFC (Qwen2's).
- pre_tokenizer: ByteLevel (with use_regex: GPT-2's split; without: no split), or a Sequence of a
  regex Split (behavior Isolated, as Llama 3 and Qwen2) or Digits (as SmolLM and StarCoder)
  followed by ByteLevel; add_prefix_space false.
- decoder: ByteLevel.
- added tokens: special ones become specials (entered by id only, their strings in text stay text,
  as `split_special_tokens=True` makes HF do); non-special ones are matched in text as HF does
  (the Tokenizer's `text_tokens`), without lstrip/rstrip/single_word.
- bos/eos/pad: from tokenizer_config.json (special_tokens_map.json fills what it lacks) into the
  Tokenizer's `special_roles`, where the token is an added token. A non-special added token that
  these files name (as a role, or special in added_tokens_decoder) is special, as transformers
  (5.x) loads it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..common import UserError
from .formats import bytes_to_unicode

# HF tokenizers' ByteLevel(use_regex=true) split, verbatim (GPT-2's regex in Oniguruma syntax,
# which tiktoken's regex engine reads the same way).
BYTELEVEL_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
ROLE_KEYS = ("bos_token", "eos_token", "pad_token")
SPECIAL_KEYS = ("unk_token", "sep_token", "cls_token", "mask_token")


def digits_bytelevel_pattern(individual_digits: bool) -> str:
    r"""Digits then ByteLevel(use_regex) as one regex. Digits cuts the text around every digit
    (each alone, or each run), then GPT-2's regex splits the pieces between: its `\p{N}+`
    alternative now sees digit pieces only, and a whitespace run before a digit ends its piece, so
    `\s+(?!\S)` keeps the whole run there."""
    digits = r"\p{N}" if individual_digits else r"\p{N}+"
    return r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|" + digits + r"| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"


# Qwen2's pre-tokenizer regex, which transformers >= 5 rebuilds for every qwen2 model directory
# (Qwen2Tokenizer), whatever its tokenizer.json says
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                 r"\s+(?!\S)|\s+")


def is_qwen2_layout(tok) -> bool:
    """Whether `tok` pre-tokenizes as Qwen2Tokenizer does (NFC, then Qwen2's Split regex)."""
    return tok.normalizer == "nfc" and tok.pattern in (QWEN2_PATTERN, with_gaps(QWEN2_PATTERN))


def with_gaps(pattern: str) -> str:
    """HF's Split (Isolated) keeps the text between matches as pieces of their own; tiktoken drops
    it. This regex matches what `pattern` matches, and else each maximal run of positions where
    `pattern` does not match (no cost where `pattern` always matches: that alternative is never tried)."""
    return f"(?:{pattern})|(?:(?!(?:{pattern}))[\\s\\S])+"


def tokenizer_file(directory: str | os.PathLike) -> Path:
    path = Path(directory)
    return path if path.suffix == ".json" and not path.is_dir() else path / "tokenizer.json"


def read_huggingface(directory: str | os.PathLike) -> dict:
    """A HF tokenizer directory (or its tokenizer.json) -> keyword arguments for `Tokenizer`."""
    file = tokenizer_file(directory)
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{file}: not found (expected a HF fast tokenizer's tokenizer.json; slow-only "
                        "tokenizers, such as sentencepiece's tokenizer.model, are not supported)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: cannot read as JSON ({e})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise UserError(f"{file}: model: expected an object (is this a tokenizers tokenizer.json?)")

    def refuse(field: str, message: str) -> UserError:
        return UserError(f"{file}: {field}: {message}")

    model = spec["model"]
    if model.get("type") != "BPE":
        raise refuse("model.type", f"{model.get('type')!r} is not supported; gptstack reads byte-level BPE only")
    normalizer = _normalizer(spec.get("normalizer"))
    if normalizer is False:
        raise refuse("normalizer", f"{_kind(spec['normalizer'])} is not supported (only null and NFC, Qwen2's)")
    if model.get("dropout") not in (None, 0, 0.0):
        raise refuse("model.dropout", f"{model['dropout']}: BPE dropout is random; only null is supported")
    if model.get("byte_fallback"):
        raise refuse("model.byte_fallback", "true is not supported (sentencepiece-style <0x..> byte tokens); "
                     "gptstack reads byte-level BPE only")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise refuse(f"model.{key}", f"{model[key]!r} is not supported; only null is")
    pattern = _pattern(spec.get("pre_tokenizer"), refuse)
    decoder = spec.get("decoder")
    if not (isinstance(decoder, dict) and decoder.get("type") == "ByteLevel"):
        raise refuse("decoder", f"{_kind(decoder)} is not supported; only ByteLevel is (gptstack decodes bytes)")

    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise refuse("model", "expected a 'vocab' object and a 'merges' list")
    added = spec.get("added_tokens") or []
    special_tokens, text_tokens = _added_tokens(added, vocab, refuse)
    roles, marked_special = _configs(file.parent, special_tokens)
    # transformers makes special what these files call special, whatever tokenizer.json says
    text_tokens = [t for t in text_tokens if t not in marked_special]
    ranks = _ranks(vocab, merges, set(special_tokens), model.get("ignore_merges", False), refuse)
    taken = {i: s for s, i in special_tokens.items()}
    for token, i in ranks.items():
        if i in taken:
            raise refuse("added_tokens", f"{taken[i]!r} has id {i}, which model.vocab gives to {token!r}")
    return {
        "mergeable_ranks": ranks,
        "pattern": pattern,
        "special_tokens": special_tokens,
        "text_tokens": text_tokens,
        "special_roles": roles,
        "name": file.parent.name or "hf",
        "normalizer": normalizer,
    }


def _normalizer(spec) -> str | None | bool:
    """tokenizer.json's normalizer -> None (none), "nfc", or False (one gptstack cannot reproduce)."""
    if spec is None:
        return None
    if isinstance(spec, dict) and spec.get("type") == "Sequence" and len(spec.get("normalizers") or []) == 1:
        spec = spec["normalizers"][0]
    return "nfc" if isinstance(spec, dict) and spec.get("type") == "NFC" else False


def _kind(obj) -> str:
    return repr(obj.get("type")) if isinstance(obj, dict) else repr(obj)


def _pattern(pre, refuse) -> str:
    """The pre-tokenizer as one pre-split regex."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not steps or not all(isinstance(s, dict) for s in steps) or steps[-1].get("type") != "ByteLevel":
        raise refuse("pre_tokenizer", f"{_describe(pre)} is not supported; expected ByteLevel, or a Sequence "
                     "of Split or Digits then ByteLevel")
    byte_level, before = steps[-1], steps[:-1]
    if byte_level.get("add_prefix_space"):
        raise refuse("pre_tokenizer", "ByteLevel add_prefix_space: true is not supported (gptstack adds no "
                     "space before text)")
    use_regex = byte_level.get("use_regex", True)
    if not before:
        return BYTELEVEL_PATTERN if use_regex else None
    if len(before) > 1:
        raise refuse("pre_tokenizer", f"{_describe(pre)}: more than one step before ByteLevel is not supported")
    step = before[0]
    if step.get("type") == "Digits" and use_regex:
        return digits_bytelevel_pattern(bool(step.get("individual_digits")))
    if step.get("type") == "Split" and not use_regex:
        regex = step.get("pattern", {}).get("Regex") if isinstance(step.get("pattern"), dict) else None
        if regex is None:
            raise refuse("pre_tokenizer", f"Split pattern {step.get('pattern')!r}: only a Regex pattern is supported")
        if step.get("behavior") != "Isolated" or step.get("invert"):
            raise refuse("pre_tokenizer", f"Split behavior {step.get('behavior')!r} invert {step.get('invert')!r}: "
                         "only Isolated without invert is supported")
        if re.search(r"\{\d+(?:,\d*)?\}\+", regex):
            # Oniguruma (Ruby syntax) reads X{1,3}+ as (X{1,3})+; tiktoken's engine as possessive
            raise refuse("pre_tokenizer", f"Split regex {regex!r}: a bounded repeat followed by '+' reads "
                         "differently in tiktoken's regex engine; not supported")
        return with_gaps(regex)
    raise refuse("pre_tokenizer", f"{_describe(pre)} is not supported; expected ByteLevel, Split (Regex) then "
                 "ByteLevel(use_regex: false), or Digits then ByteLevel(use_regex: true)")


def _describe(pre) -> str:
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        return "Sequence[" + ", ".join(_describe(s) for s in pre.get("pretokenizers") or []) + "]"
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel":
        return f"ByteLevel(use_regex: {str(pre.get('use_regex', True)).lower()})"
    return str(pre.get("type")) if isinstance(pre, dict) else repr(pre)


def _added_tokens(added, vocab: dict, refuse) -> tuple[dict[str, int], list[str]]:
    """added_tokens -> (every added token: id, the non-special ones), checked against the vocab."""
    specials: dict[str, int] = {}
    text_tokens: list[str] = []
    if not isinstance(added, list):
        raise refuse("added_tokens", "expected a list")
    for k, a in enumerate(added):
        if not isinstance(a, dict) or not isinstance(a.get("content"), str) or not isinstance(a.get("id"), int):
            raise refuse(f"added_tokens[{k}]", f"expected an object with 'id' and 'content', got {a!r}")
        content, i = a["content"], a["id"]
        if not content:
            raise refuse(f"added_tokens[{k}]", "empty content")
        if content in vocab and vocab[content] != i:
            raise refuse(f"added_tokens[{k}]", f"{content!r} has id {i} but model.vocab gives it {vocab[content]}")
        if content in specials and specials[content] != i:
            raise refuse(f"added_tokens[{k}]", f"{content!r} is listed twice, with ids {specials[content]} and {i}")
        specials[content] = i
        if not a.get("special", False):
            for flag in ("lstrip", "rstrip", "single_word"):
                if a.get(flag):
                    raise refuse(f"added_tokens[{k}].{flag}", f"true on the non-special token {content!r} is not "
                                 "supported (gptstack matches such tokens in text exactly as written)")
            if content not in text_tokens:
                text_tokens.append(content)
    if len(set(specials.values())) != len(specials):
        raise refuse("added_tokens", "two tokens share one id")
    return specials, text_tokens


def _ranks(vocab: dict, merges: list, added: set[str], ignore_merges: bool, refuse) -> dict[bytes, int]:
    """model.vocab (less the added tokens) as bytes -> id, checked to encode as HF's merges do."""
    decode_char = {c: b for b, c in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, i in vocab.items():
        if token in added:
            continue
        if not isinstance(i, int) or i < 0:
            raise refuse("model.vocab", f"{token!r}: id {i!r} is not a non-negative integer")
        try:
            ranks[bytes(decode_char[c] for c in token)] = i
        except KeyError as e:
            raise refuse("model.vocab", f"{token!r} (id {i}): character {e.args[0]!r} is not in the byte-level "
                         "alphabet; not a byte-level BPE vocabulary") from None
    if len(set(ranks.values())) != len(ranks):
        raise refuse("model.vocab", "two tokens share one id")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise refuse("model.vocab", f"{len(missing)} of the 256 single bytes are missing (e.g. byte {missing[0]}, "
                     f"{bytes_to_unicode()[missing[0]]!r}); byte-level BPE needs all of them")

    pairs: dict[tuple[str, str], int] = {}
    merged: set[str] = set()
    last_id, last = -1, None
    for k, m in enumerate(merges):
        pair = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise refuse(f"model.merges[{k}]", f"expected 'left right' or [left, right], got {m!r}")
        left, right = pair
        for part in (left, right, left + right):
            if part not in vocab or part in added:
                raise refuse(f"model.merges[{k}]", f"{left!r} + {right!r}: {part!r} is " + (
                    "an added token, which gptstack keeps out of BPE" if part in added else "not in model.vocab"))
        i = vocab[left + right]
        if i < last_id:
            raise refuse(f"model.merges[{k}]", f"{left!r} + {right!r} makes id {i}, after an earlier merge made "
                         f"{last!r} (id {last_id}): gptstack's encoder (tiktoken) takes a token's id as its merge "
                         "priority, so the ids merges make must rise in the order of model.merges")
        last_id, last = i, left + right
        pairs.setdefault((left, right), k)
        merged.add(left + right)
    for token in vocab:
        if len(token) > 1 and token not in added and token not in merged:
            raise refuse("model.vocab", f"{token!r} (id {vocab[token]}) is no merge's result: HF's BPE makes it "
                         "only from a whole word, gptstack's encoder also from any two tokens that join into it")
    if not ignore_merges:
        # HF then builds even a chunk that is a whole token by merges; tiktoken takes it whole.
        for token in merged:
            if (got := _merge(token, pairs.get)) != [token]:
                raise refuse("model.ignore_merges", f"false, and the merges build {token!r} as {got}, not as "
                             "itself: gptstack's encoder takes a chunk that is a whole token as that token "
                             "(ignore_merges: true)")
    # tiktoken joins any two adjacent tokens that form a token (by the joined token's id); HF only
    # the listed pairs. Where a token also splits into a pair the merges do not list, both must
    # still build it alike from its bytes (they do for trained BPE; tiktoken conversions list all).
    ids = {t: i for t, i in vocab.items() if t not in added}
    for token in merged:
        if any(token[:k] in ids and token[k:] in ids and (token[:k], token[k:]) not in pairs
               for k in range(1, len(token))):
            hf, ours = _merge(token, pairs.get), _merge(token, lambda lr: ids.get(lr[0] + lr[1]))
            if hf != ours:
                raise refuse("model.merges", f"they build {token!r} as {hf}, but gptstack's encoder (which joins "
                             f"any two tokens that form a token, not only listed pairs) builds {ours}")
    return ranks


def _merge(word: str, priority) -> list[str]:
    """BPE on one word: join the adjacent pair of lowest `priority((left, right))` (None: never),
    leftmost on ties. HF's priority is the pair's place in the merges; tiktoken's the joined id."""
    parts = list(word)
    while len(parts) > 1:
        best, at = None, -1
        for j in range(len(parts) - 1):
            r = priority((parts[j], parts[j + 1]))
            if r is not None and (best is None or r < best):
                best, at = r, j
        if best is None:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


def _configs(directory: Path, specials: dict[str, int]) -> tuple[dict[str, str], set[str]]:
    """(bos/eos/pad roles, the added tokens transformers loads as special) from tokenizer_config.json,
    then special_tokens_map.json for the roles it lacks. A role is kept where its string is an added
    token (HF may name a plain vocabulary token). Every role string (bos, eos, unk, sep, pad, cls,
    mask) and every `added_tokens_decoder` entry with special: true is special to transformers."""
    roles: dict[str, str] = {}
    marked: set[str] = set()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: cannot read as JSON ({e})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a JSON object")
        for key in ROLE_KEYS + SPECIAL_KEYS:
            value = data.get(key)
            if isinstance(value, dict):  # a serialized AddedToken
                value = value.get("content")
            if not isinstance(value, str):
                continue
            marked.add(value)
            if key in ROLE_KEYS and key not in roles and value in specials:
                roles[key] = value
        decoder = data.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            marked.update(t["content"] for t in decoder.values()
                          if isinstance(t, dict) and t.get("special") and isinstance(t.get("content"), str))
    return roles, marked
