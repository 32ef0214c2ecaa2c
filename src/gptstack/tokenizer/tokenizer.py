"""The tokenizer: BPE ranks + a pre-split regex + special tokens, encoded by tiktoken.

Encoding goes through a `tiktoken.Encoding` built from the learned ranks: tiktoken's Rust core
is the fastest byte-level BPE encoder there is, so there is no reason to write a slower one.
Ordinary text never becomes a special token: `encode("<|bos|>")` is the plain characters, and
specials enter only by id (`tok.special("<|bos|>")`), so a user typing a control string into a
chat cannot forge a turn boundary. (An imported model's own chat template is the exception: its
rendered text is tokenized as transformers tokenizes it, every special string matched, so the ids
are the ones the model was tuned on.)
"""
from __future__ import annotations

import base64
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken

from ..common import UserError, atomic_write_json
from .bpe import PATTERNS, count_chunks, resolve_pattern, train_bpe

BOS = "<|bos|>"
USER_START, USER_END = "<|user_start|>", "<|user_end|>"
ASSISTANT_START, ASSISTANT_END = "<|assistant_start|>", "<|assistant_end|>"
# Separates the steps of a solution, so a process reward model can score each step's end.
STEP = "<|step|>"
DEFAULT_SPECIALS = (BOS, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END, STEP)

# 2: text_tokens; 3: chat_template; 4: normalizer (a file without them is written as before, byte
# for byte; a reader too old for one refuses the file rather than encode or render wrongly)
FORMAT_VERSION = 4
NORMALIZERS = ("nfc",)


class Tokenizer:
    """Byte-level BPE tokenizer. Token id == BPE rank; special tokens have ids of their own (after
    the ranks, but for imported vocabularies that put them first)."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        pattern: str | None = "gpt4",
        special_tokens: dict[str, int] | Sequence[str] = (),
        name: str = "gptstack",
        text_tokens: Sequence[str] = (),
        special_roles: dict[str, str] | None = None,
        chat_template: str | None = None,
        normalizer: str | None = None,
    ):
        """`text_tokens`: specials that `encode` also matches in text (HF's non-special added tokens,
        kept so an imported tokenizer gives HF's ids); every other special enters only by id.
        `special_roles`: {"bos_token"|"eos_token"|"pad_token": special} as an imported tokenizer's
        HF files name them; `bos_id` falls back to bos_token where there is no <|bos|>.
        `chat_template`: an imported model's own Jinja chat template (`gptstack import --chat model`);
        chats then render through it, as transformers' `apply_chat_template` does.
        `normalizer`: "nfc" = Unicode NFC before encoding (Qwen2's tokenizer.json), or None."""
        self.pattern_name = pattern if pattern in PATTERNS else ("none" if pattern is None else "custom")
        self.pattern = resolve_pattern(pattern)
        if not isinstance(special_tokens, dict):
            special_tokens = {s: len(mergeable_ranks) + i for i, s in enumerate(special_tokens)}
        self.mergeable_ranks = dict(mergeable_ranks)
        self.special_tokens = dict(special_tokens)
        self.name = name
        self.text_tokens = list(dict.fromkeys(text_tokens))
        self.special_roles = dict(special_roles or {})
        self.chat_template = chat_template or None
        if normalizer not in (None, *NORMALIZERS):
            raise UserError(f"tokenizer: normalizer: expected one of {', '.join(NORMALIZERS)} or none, got {normalizer!r}")
        self.normalizer = normalizer
        for field, names in (("text_tokens", self.text_tokens), ("special_roles", self.special_roles.values())):
            if unknown := [s for s in names if s not in self.special_tokens]:
                raise UserError(f"tokenizer: {field}: {unknown} are not special tokens")
        # leftmost, then longest, as HF matches added tokens
        self._text_split = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(self.text_tokens, key=len, reverse=True)) + ")"
        ) if self.text_tokens else None
        missing = [b for b in range(256) if bytes([b]) not in self.mergeable_ranks]
        if missing:
            raise UserError(f"tokenizer: byte-level BPE needs all 256 single bytes; missing {missing[:5]}...")
        try:
            self._enc = tiktoken.Encoding(
                name=name,
                pat_str=self.pattern,
                mergeable_ranks=self.mergeable_ranks,
                special_tokens=self.special_tokens,
            )
        except Exception as e:  # tiktoken's Rust regex is stricter than Python's on a few constructs
            raise UserError(f"pattern: tiktoken cannot compile {self.pattern!r}: {e}") from None
        self._id_to_bytes = {i: t for t, i in self.mergeable_ranks.items()}
        self._id_to_bytes.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        self._all_split = None  # built on first use by `encode_with_specials`
        self._turn_end_ids: list[int] | None = None
        if self.chat_template is not None:
            from .chat_template import compile_template
            compile_template(self.chat_template)  # bad Jinja is refused here, not at the first chat

    # --- training ---------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: str | Iterable[str],
        vocab_size: int,
        pattern: str | None = "gpt4",
        special_tokens: Sequence[str] = DEFAULT_SPECIALS,
        progress: bool | None = None,
        num_workers: int | None = None,
    ) -> "Tokenizer":
        """Train byte-level BPE so the vocabulary (bytes + merges + specials) has `vocab_size` tokens.

        `pattern`: a built-in name (gpt2, gpt4, digits, none) or any regex; None = no pre-split.
        A corpus too small to support that many merges gives a smaller vocabulary.
        `num_workers` processes scan the text (default: all cores).
        """
        special_tokens = list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens):
            raise UserError(f"special_tokens: duplicates in {special_tokens}")
        if vocab_size < 256 + len(special_tokens):
            raise UserError(
                f"vocab_size: {vocab_size} is too small, expected at least {256 + len(special_tokens)} "
                f"(256 byte tokens + {len(special_tokens)} special tokens)"
            )
        regex_str = resolve_pattern(pattern)
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        counts = count_chunks(texts, regex_str, num_workers)
        covered = sum(len(chunk) * n for chunk, n in counts.items())
        total = sum(len(t) for t in texts)  # sanitizing keeps lengths: one surrogate -> one U+FFFD
        if covered != total:
            raise UserError(
                f"pattern: regex {regex_str!r} leaves {total - covered} of {total} characters outside "
                "every chunk; that text would be silently dropped by encode()"
            )
        chunk_counts = {chunk.encode("utf-8"): n for chunk, n in counts.items()}
        num_merges = vocab_size - 256 - len(special_tokens)
        vocab = train_bpe(chunk_counts, num_merges, progress=progress)
        ranks = {token: rank for rank, token in enumerate(vocab)}
        return cls(ranks, pattern=pattern, special_tokens=special_tokens)

    # --- encoding / decoding ----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", text) if self.normalizer == "nfc" else text

    def encode(self, text: str) -> list[int]:
        """Ordinary text -> ids. Special-token strings in `text` stay plain text (but `text_tokens`)."""
        return self._encode(self.normalize(text), self._text_split)

    def encode_with_specials(self, text: str) -> list[int]:
        """Text with every special-token string in it matched as that special (leftmost, then longest),
        the rest BPE: how HF tokenizes a rendered chat template. Only for text the chat template
        renders; everywhere else `encode` keeps special strings plain."""
        if self._all_split is None and self.special_tokens:
            self._all_split = re.compile("(" + "|".join(
                re.escape(t) for t in sorted(self.special_tokens, key=len, reverse=True)) + ")")
        return self._encode(self.normalize(text), self._all_split)

    def _encode(self, text: str, specials: "re.Pattern | None") -> list[int]:
        """BPE between the matches of `specials` (a capturing alternation of special strings), each
        match its special's id."""
        if specials is None:
            return self._enc.encode_ordinary(text)
        ids: list[int] = []
        for k, piece in enumerate(specials.split(text)):
            if k % 2:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids += self._enc.encode_ordinary(piece)
        return ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Many texts at once, on `num_threads` threads (tiktoken releases the GIL)."""
        if self._text_split is not None:
            return [self.encode(t) for t in texts]
        return self._enc.encode_ordinary_batch([self.normalize(t) for t in texts], num_threads=num_threads or os.cpu_count() or 1)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """ids -> bytes; an id past the vocabulary (a padding row of an imported model, which sampling
        can still pick) decodes as U+FFFD rather than failing."""
        ids = list(ids)
        if ids and max(ids) >= self.vocab_size:
            known = self.vocab_size
            return b"".join(self._enc.decode_bytes([i]) if i < known else "\ufffd".encode() for i in ids)
        return self._enc.decode_bytes(ids)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """ids -> text; bytes that are not valid UTF-8 (a token cut mid-character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_bytes(self, token_id: int) -> bytes:
        return self._id_to_bytes[token_id]

    def special(self, name: str) -> int:
        """The id of special token `name` (e.g. "<|bos|>")."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise UserError(
                f"tokenizer has no special token {name!r}; it has {sorted(self.special_tokens)}"
            ) from None

    @property
    def bos_id(self) -> int:
        """<|bos|>; in an imported tokenizer without it, the special its HF files name bos_token.
        A model imported with its own chat template and no bos_token (Qwen) starts documents (pretrain,
        `sample`, few-shot prompts) with <|endoftext|>, its pretraining separator, else its eos_token;
        its chats start as its template says."""
        if BOS not in self.special_tokens and "bos_token" in self.special_roles:
            return self.special_tokens[self.special_roles["bos_token"]]
        if BOS not in self.special_tokens and self.chat_template is not None:
            for name in ("<|endoftext|>", self.special_roles.get("eos_token")):
                if name in self.special_tokens:
                    return self.special_tokens[name]
        return self.special(BOS)

    # --- chat template ----------------------------------------------------------------------

    def render_conversation(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """Messages -> (ids, loss_mask) for supervised training.

        <|bos|> <|user_start|> u <|user_end|> <|assistant_start|> a <|assistant_end|> ...
        The mask is 1 exactly on assistant content and its <|assistant_end|> (what the model must
        learn to produce, including when to stop), 0 elsewhere. A leading system message is
        prepended to the first user turn (the model has no separate system role).
        With a model's own chat template: `apply_chat_template(messages)`'s ids, the mask 1 on each
        assistant turn's content and its end-of-turn token (`_template_conversation`).
        """
        turns = _validate_messages(messages, final_role=None)
        if self.chat_template is not None:
            return self._template_conversation(messages)
        ids, mask = [self.bos_id], [0]
        for role, content in turns:
            if role == "user":
                part = [self.special(USER_START), *self.encode(content), self.special(USER_END)]
                ids += part
                mask += [0] * len(part)
            else:
                body = self.encode(content)
                ids += [self.special(ASSISTANT_START), *body, self.special(ASSISTANT_END)]
                mask += [0] + [1] * (len(body) + 1)
        return ids, mask

    def render_prompt(self, messages: Sequence[dict]) -> list[int]:
        """Messages ending with a user turn -> ids ending in <|assistant_start|> (with a model's own
        template: its generation prompt, e.g. ChatML's "<|im_start|>assistant" and a newline), ready to sample."""
        _validate_messages(messages, final_role="user")
        if self.chat_template is not None:
            return self.encode_with_specials(self._render(messages, add_generation_prompt=True))
        ids, _ = self.render_conversation(messages)
        return ids + [self.special(ASSISTANT_START)]

    @property
    def turn_end_ids(self) -> list[int]:
        """The ids that end an assistant turn, the turn's own end token first (what a finished
        response ends with): <|assistant_end|>, or with a model's own template the special it writes
        right after the assistant's content (<|im_end|>, <|eot_id|>), then the eos_token where that
        differs. Generation stops on any of them."""
        if self._turn_end_ids is None:
            eos = self.special_roles.get("eos_token")
            if self.chat_template is None:
                first = self.special(ASSISTANT_END)
            else:
                # the first special after an assistant's content in a probe chat
                probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
                head, full = self._render(probe[:1], True), self._render(probe, False)
                tail = self.encode_with_specials(full[len(head):] if full.startswith(head) else "")
                ends = [i for i in tail if i in self.special_tokens.values()]
                if not ends and eos is None:
                    raise UserError(f"chat template of {self.name}: cannot tell which token ends an assistant "
                                    "turn (no special token follows its content, and there is no eos_token)")
                first = ends[0] if ends else self.special_tokens[eos]
            ids = [first] + ([self.special_tokens[eos]] if eos is not None else [])
            self._turn_end_ids = list(dict.fromkeys(ids))
        return list(self._turn_end_ids)

    def with_chat_template(self, template: str | None) -> "Tokenizer":
        """This tokenizer rendering chats with `template` (a model's own Jinja chat template; None:
        gptstack's format): same ids for text, a new identity (chats render differently)."""
        return Tokenizer(self.mergeable_ranks, pattern=self.pattern_name if self.pattern_name in PATTERNS else self.pattern,
                         special_tokens=self.special_tokens, name=self.name, text_tokens=self.text_tokens,
                         special_roles=self.special_roles, chat_template=template, normalizer=self.normalizer)

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        from .chat_template import render

        return render(self.chat_template, messages, self.special_roles, add_generation_prompt, self.name)

    def _template_conversation(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """(ids, mask) through the model's own template. Few templates mark the assistant's text
        ({% generation %}), so each assistant turn is found by rendering prefixes: messages[:i]
        with the generation prompt, then messages[:i+1]; the text between them is turn i (content,
        end-of-turn token, whatever the template writes after it). That needs a prefix-stable
        template (rendering more messages only appends), which is checked."""
        full = self._render(messages, add_generation_prompt=False)
        ids = self.encode_with_specials(full)
        starts, at = [], 0  # byte offset of each token in `full`
        for i in ids:
            starts.append(at)
            at += len(self._id_to_bytes[i])
        mask = [0] * len(ids)
        ends = set(self.turn_end_ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            upto = self._render(messages[: i + 1], add_generation_prompt=False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise UserError(
                    f"chat template of {self.name}: not prefix-stable at messages[{i}] (rendering the chat up to "
                    "an assistant turn is not the start of rendering it further), so the assistant's tokens "
                    "cannot be found for the loss mask; this template cannot be used to train")
            # offsets in the text as encoded (normalized: NFC changes byte lengths, never across the
            # template's own markup between turns)
            lo, hi = len(self.normalize(before).encode("utf-8")), len(self.normalize(upto).encode("utf-8"))
            span = [k for k, s in enumerate(starts) if lo <= s < hi]
            # through the turn's end token; what the template writes after it (ChatML's "\n") is 0
            last = max((k for k in span if ids[k] in ends), default=None)
            for k in span:
                if last is None or k <= last:
                    mask[k] = 1
        return ids, mask

    def with_chat_specials(self) -> tuple["Tokenizer", list[str]]:
        """(this tokenizer with gptstack's chat specials, the specials it added): each of
        DEFAULT_SPECIALS it lacks becomes a new special id after the current largest id (an
        imported vocabulary's ids stay as they are; tiktoken needs no contiguous specials), so the
        vocabulary grows by len(added) and the identity changes: it is a new tokenizer.

        <|bos|> is not added where the HF files name a bos_token: `bos_id` already falls back to
        it, so chats and documents start with the token the model was pretrained to see first
        (Llama 3's <|begin_of_text|>, GPT-2's <|endoftext|>), and the exported chat template writes
        that token. Once the turn markers are added, eos becomes <|assistant_end|>, where a gptstack
        chat turn ends (HF generation stops there)."""
        mapped = BOS not in self.special_tokens and "bos_token" in self.special_roles
        added = [s for s in DEFAULT_SPECIALS if s not in self.special_tokens and not (s == BOS and mapped)]
        if not added:
            return self, []
        start = max([*self.mergeable_ranks.values(), *self.special_tokens.values()]) + 1
        specials = {**self.special_tokens, **{s: start + k for k, s in enumerate(added)}}
        roles = {**self.special_roles, "eos_token": ASSISTANT_END}
        return Tokenizer(self.mergeable_ranks, pattern=self.pattern_name if self.pattern_name in PATTERNS else self.pattern,
                         special_tokens=specials, name=self.name, text_tokens=self.text_tokens,
                         special_roles=roles, normalizer=self.normalizer), added

    # --- persistence ------------------------------------------------------------------------

    @property
    def identity(self) -> str:
        """sha256 of what decides the ids (ranks, pre-split pattern, special tokens, and a model's own
        chat template with the bos/eos/pad strings it renders): two tokenizers with equal identities
        encode every text and chat alike. Stages stamp it into their config.json."""
        if getattr(self, "_identity", None) is None:
            from .formats import ranks_sorted
            ranks = [[base64.b64encode(t).decode("ascii"), r] for t, r in ranks_sorted(self.mergeable_ranks)]
            self._identity = content_identity(ranks, self.pattern, self.special_tokens, self.text_tokens,
                                              self.chat_template, self.special_roles, self.normalizer)
        return self._identity

    def save(self, directory: str | os.PathLike) -> None:
        """Write gptstack.json (ranks, pattern, specials) and tokenizer.json (HF format)."""
        from .formats import ranks_sorted, to_huggingface

        directory = Path(directory)
        ranks = ranks_sorted(self.mergeable_ranks)
        data = {
            "format": "gptstack-tokenizer",
            "version": 4 if self.normalizer else 3 if self.chat_template else 2 if self.text_tokens else 1,
            "name": self.name,
            "pattern_name": self.pattern_name,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
        }
        if self.text_tokens:
            data["text_tokens"] = self.text_tokens
        if self.special_roles:
            data["special_roles"] = self.special_roles
        if self.chat_template:
            data["chat_template"] = self.chat_template
        if self.normalizer:
            data["normalizer"] = self.normalizer
        # [base64 token bytes, rank]; ranks of imported vocabularies need not start at 0
        # for single bytes (GPT-2's do not), so both are stored.
        data["ranks"] = [[base64.b64encode(t).decode("ascii"), r] for t, r in ranks]
        atomic_write_json(directory / "gptstack.json", data, indent=None)
        to_huggingface(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        path = Path(directory) / "gptstack.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: no tokenizer here (expected gptstack.json from `gptstack tokenizer train`)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        if data.get("format") != "gptstack-tokenizer":
            raise UserError(f"{path}: format: expected 'gptstack-tokenizer', got {data.get('format')!r}")
        if data.get("version", 0) > FORMAT_VERSION:
            raise UserError(f"{path}: version {data['version']} is newer than this gptstack reads ({FORMAT_VERSION})")
        ranks = {base64.b64decode(t): r for t, r in data["ranks"]}
        name = data.get("pattern_name")
        pattern = name if name in PATTERNS else data["pattern"]
        tok = cls(ranks, pattern=pattern, special_tokens=data["special_tokens"], name=data.get("name", "gptstack"),
                  text_tokens=data.get("text_tokens", ()), special_roles=data.get("special_roles"),
                  chat_template=data.get("chat_template"), normalizer=data.get("normalizer"))
        if tok.pattern != data["pattern"]:
            raise UserError(f"{path}: pattern {name!r} differs from the stored regex; the file was edited by hand?")
        return tok

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> "Tokenizer":
        """GPT-2's released encoder.json + vocab.bpe -> the same ids as tiktoken's "gpt2"."""
        from .formats import load_gpt2_files

        ranks, specials = load_gpt2_files(encoder_json, vocab_bpe)
        return cls(ranks, pattern="gpt2", special_tokens=specials, name="gpt2")

    @classmethod
    def from_huggingface(cls, directory: str | os.PathLike) -> "Tokenizer":
        """A HF fast tokenizer (a directory with tokenizer.json, or the file) -> the same ids as
        `transformers.AutoTokenizer` with add_special_tokens=False and split_special_tokens=True.

        Byte-level BPE only (GPT-2, Llama 3, SmolLM style); what tiktoken cannot reproduce is
        refused with the file and field named (see `hf_import`). Added tokens keep their ids: the
        special ones as specials, the others as `text_tokens`; bos/eos/pad go to `special_roles`.
        """
        from .hf_import import read_huggingface, tokenizer_file

        kwargs = read_huggingface(directory)
        try:
            return cls(**kwargs)
        except UserError as e:  # the Split regex tiktoken's engine cannot compile
            field = "pre_tokenizer: " if str(e).startswith("pattern:") else ""
            raise UserError(f"{tokenizer_file(directory)}: {field}{e}") from None

    @classmethod
    def from_tiktoken_file(
        cls, path: str | os.PathLike, pattern: str = "cl100k", special_tokens: dict[str, int] | None = None
    ) -> "Tokenizer":
        """A tiktoken rank file ("<base64 token> <rank>" per line) -> a Tokenizer.

        With pattern "cl100k" (and no special_tokens given) cl100k_base's specials are added, so
        the cl100k_base.tiktoken file reproduces tiktoken's "cl100k_base" exactly.
        """
        from .formats import KNOWN_SPECIALS, load_tiktoken_file

        ranks = load_tiktoken_file(path)
        if special_tokens is None:
            special_tokens = KNOWN_SPECIALS.get(pattern, lambda n: {})(len(ranks))
        return cls(ranks, pattern=pattern, special_tokens=special_tokens, name=Path(path).stem)

    def to_huggingface(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json (+ tokenizer_config.json when `path` is a directory) for HF."""
        from .formats import to_huggingface

        return to_huggingface(self, path)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, pattern={self.pattern_name}, "
                f"specials={len(self.special_tokens)})")


_ROLES = ("system", "user", "assistant")


def _validate_messages(messages: Sequence[dict], final_role: str | None) -> list[tuple[str, str]]:
    """Check roles alternate user/assistant (after an optional leading system message) and
    return (role, content) turns with the system message folded into the first user turn."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError("messages: expected a non-empty list of {'role', 'content'} dicts")
    turns: list[tuple[str, str]] = []
    system = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r}")
        role, content = m["role"], m["content"]
        if role not in _ROLES:
            raise UserError(f"messages[{i}].role: expected one of {_ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise UserError(f"messages[{i}].content: expected a string, got {type(content).__name__}")
        if role == "system":
            if i != 0:
                raise UserError(f"messages[{i}].role: 'system' is only allowed as the first message")
            system = content
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise UserError(
                f"messages[{i}].role: expected {expected!r} (turns alternate user, assistant, ...), got {role!r}"
            )
        if system is not None and not turns:
            content = system + "\n\n" + content
        turns.append((role, content))
    if not turns:
        raise UserError("messages: only a system message; expected at least one user turn")
    if final_role is not None and turns[-1][0] != final_role:
        raise UserError(f"messages[-1].role: expected {final_role!r} to end a prompt, got {turns[-1][0]!r}")
    return turns


def content_identity(ranks: list, pattern: str, special_tokens: dict, text_tokens: Sequence[str] = (),
                     chat_template: str | None = None, special_roles: dict | None = None,
                     normalizer: str | None = None) -> str:
    """The identity of a tokenizer as gptstack.json stores it ([b64 token, rank] pairs by rank)."""
    import hashlib

    content = {"ranks": ranks, "pattern": pattern, "special_tokens": special_tokens}
    if text_tokens:  # absent otherwise, so tokenizers without them keep their identity
        content["text_tokens"] = list(text_tokens)
    if chat_template:  # likewise; the roles count only here, as the template renders their strings
        content["chat_template"] = chat_template
        content["special_roles"] = dict(special_roles or {})
    if normalizer:
        content["normalizer"] = normalizer
    blob = json.dumps(content, sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def stored_identity(directory: str | os.PathLike) -> str | None:
    """The identity of the tokenizer saved in `directory` (without building it), None if there is none."""
    try:
        data = json.loads((Path(directory) / "gptstack.json").read_text(encoding="utf-8"))
        return content_identity(data["ranks"], data["pattern"], data["special_tokens"], data.get("text_tokens", ()),
                                data.get("chat_template"), data.get("special_roles"), data.get("normalizer"))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{Path(directory) / 'gptstack.json'}: not a gptstack tokenizer ({e})") from None
