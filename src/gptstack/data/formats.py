"""Readers, with validation, for the data files users bring to every stage.

    ds = read_dataset("prefs.jsonl.gz", expect=("preference", "ranking"), skip_bad_rows=False)
    ds.kind, ds.source, ds.rows, ds.usable, ds.skipped     # Counter: reason -> rows skipped
    ds.describe()   # "prefs.jsonl.gz: preference, 2354 rows (2326 usable, 28 skipped: ...)"
    ds.summary()    # flat keys for summary.json: data/rows, data/usable, data/skipped/<reason>

Files: JSONL (one object per line), JSON (an array of objects, or JSONL named .json), either one
gzipped (.gz), and plain text (.txt: one "text" row). With the `datasets` extra (pip install
'gptstack[datasets]'), also Parquet (.parquet) and `datasets` save_to_disk folders (a Dataset, or a
DatasetDict's train split): their rows are numbered from 1 in place of lines, and a null column of a
row counts as an absent key. The format is recognised from the keys of the first row and every row
is then held to it:

  kind        source          keys                                       normalised row
  text        text            text                                       {"text"}
  sft         trl             messages                                   {"messages"}
  sft         trl             prompt + completion (str or messages)      {"messages"}
  sft         self-instruct   instruction + instances[{input, output}]   {"messages"} per instance
  sft         alpaca          instruction + output (+ input)             {"messages"}
  sft         world           prompt + reference (`gptstack world sample`) {"messages"}
  prompt      trl             prompt (prompt-only)                       {"prompt"}
  preference  trl             prompt + chosen + rejected                 {"prompt", "chosen", "rejected"}
  preference  trl             chosen + rejected (implicit prompt)        same: the shared prefix is the prompt
  preference  hh-rlhf         chosen + rejected "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts
  verifiable  gsm8k           question + answer ("... #### 72")          {"prompt", "answer", "solution"}
  verifiable  trl             prompt + answer                            {"prompt", "answer"}
  ranking     ranking         prompt + responses + ranking (best first)  {"prompt", "responses", "ranking"}
  stepwise    trl             prompt + completions (steps) + labels      {"prompt", "completions", "labels", "outcome", "ended"}

"prompt" in a normalised row is always a list of messages ending with the user's turn, and
"chosen"/"rejected" are the assistant's reply text, so stages never care where data came from.

Two kinds of trouble, handled differently (DESIGN.md, "Bad input"):
  - structural errors (not UTF-8, not JSON, JSON nested too deeply, a key twice in one object,
    lone UTF-16 surrogates, missing keys, wrong types, NaN or infinite numbers) are collected for
    every bad line as "file:line: key: what was expected" and raised together as one UserError
    (one line when one row is bad) before any work, unless skip_bad_rows=True, which skips and
    counts them ("bad row");
  - irregular but well-formed rows (an empty final assistant turn, chosen and rejected with
    different prompts, the same role twice in a row, ...) are skipped and counted by reason.
A file left with no usable row is a UserError too (`require_rows`). A UTF-8 byte-order mark
opening a file is ignored; CRLF line ends are fine. TRL's unpaired preference (KTO) rows,
prompt + completion + label, are refused rather than read as demonstrations.

GSM8K-style answers are checked with `check_answer(response, answer)`, which reads the final
answer from "The answer is X", "#### X" or else the last number, and compares numerically.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..common import UserError, read_bytes_file

KINDS = ("text", "sft", "prompt", "preference", "verifiable", "ranking", "stepwise")
ROLES = ("system", "user", "assistant")
BAD_ROW = "bad row"
MAX_ERRORS_IN_MESSAGE = 100


@dataclass
class Dataset:
    path: str
    kind: str                     # one of KINDS
    source: str                   # trl, hh-rlhf, gsm8k, self-instruct, alpaca, world, ranking, text
    rows: list[dict]              # normalised rows (see the module docstring)
    n_rows: int = 0               # records read (lines or array items; blank lines not counted)
    usable: int = 0               # records that gave at least one row
    skipped: Counter = field(default_factory=Counter)   # reason -> records skipped
    errors: list[str] = field(default_factory=list)     # structural errors, "file:line: key: expected"
    lines: list[int] = field(default_factory=list)      # the line (or array item's line) of each row

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def describe(self) -> str:
        """"FILE: KIND, N rows (M usable, K skipped: reason ×count, ...)" (and the source)."""
        reasons = ", ".join(f"{r} ×{c}" for r, c in self.skipped.most_common())
        skipped = f"{self.n_skipped} skipped" + (f": {reasons}" if reasons else "")
        extra = f"; {len(self.rows)} examples" if len(self.rows) != self.usable else ""
        return f"{self.path}: {self.kind}, {self.n_rows} rows ({self.usable} usable, {skipped}){extra} [{self.source}]"

    def summary(self, prefix: str = "data") -> dict:
        """Flat counts for a stage's summary.json."""
        out = {f"{prefix}/rows": self.n_rows, f"{prefix}/usable": self.usable, f"{prefix}/skipped": self.n_skipped}
        for reason, count in self.skipped.items():
            out[f"{prefix}/skipped/{reason.replace(' ', '_')}"] = count
        return out

    def as_sft(self) -> list[list[dict]]:
        """Conversations to fine-tune on: sft rows; preference rows as prompt + chosen; GSM8K with
        its solution."""
        if self.kind == "sft":
            return [r["messages"] for r in self.rows]
        if self.kind == "preference":
            return [r["prompt"] + [{"role": "assistant", "content": r["chosen"]}] for r in self.rows]
        if self.kind == "ranking":
            return [r["prompt"] + [{"role": "assistant", "content": r["responses"][r["ranking"][0]]}] for r in self.rows]
        if self.kind == "verifiable" and all("solution" in r for r in self.rows):
            return [r["prompt"] + [{"role": "assistant", "content": r["solution"]}] for r in self.rows]
        raise UserError(f"{self.path}: {self.kind} rows ({self.source}) have no responses to fine-tune on; "
                        "expected sft, preference, ranking or GSM8K data")

    def prompts(self) -> list[list[dict]]:
        """The prompts of any kind but text (for sampling, preference collection or RL)."""
        if self.kind == "text":
            raise UserError(f"{self.path}: plain text has no prompts; expected chat, preference or prompt data")
        if self.kind == "sft":
            out = []
            for r in self.rows:
                msgs = r["messages"]
                out.append(msgs[: max(i for i, m in enumerate(msgs) if m["role"] == "assistant")])
            return out
        return [r["prompt"] for r in self.rows]


class _Bad(Exception):
    """A structural error in one row: `key` and what was expected."""

    def __init__(self, key: str, expected: str, end: int | None = None):
        super().__init__(f"{key}: {expected}")
        self.end = end  # where a JSON value that parsed but cannot be used ends (JSON arrays read on)


class _Irregular(Exception):
    """A well-formed row that cannot be used as is; the message is the reason (counted)."""


def warn(message: str, info=None) -> None:
    """A data warning, `warning: ...` on stderr as `gptstack data check` prints them (on the main
    process only when given a DistInfo)."""
    if info is None or info.is_main:
        print(f"warning: {message}", file=sys.stderr)


# --- reading records ------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    data = read_bytes_file(path, "a data file")
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path}: not a valid gzip file ({e}); expected gzipped JSON or JSONL") from None
    return data


def _type(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list) -> dict:
    """json's object_pairs_hook: an object naming a key twice is an error (json.loads would keep
    the last value silently, other readers the first)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate(value) -> str | None:
    """The key path of the first string (or key) of a parsed value holding a lone UTF-16
    surrogate ("\\ud800" escapes, which JSON parses but UTF-8 cannot encode), or None."""
    stack = [("row", value)]
    while stack:  # iterative: a value nested ~1000 deep parses, and must not overflow here
        where, v = stack.pop()
        if isinstance(v, str):
            if any(0xD800 <= ord(c) <= 0xDFFF for c in v):
                return where
        elif isinstance(v, dict):
            for k, x in v.items():
                name = k if where == "row" else f"{where}.{k}"
                if any(0xD800 <= ord(c) <= 0xDFFF for c in k):
                    return name
                stack.append((name, x))
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", x) for i, x in reversed(list(enumerate(v))))
    return None


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _decode(text: str, start: int = 0, whole: bool = True):
    """One JSON value of `text` at `start` (after any whitespace) -> (value, end). Raises what
    json raises for invalid JSON (with the whole text left after it when `whole`: "Extra data"),
    and _Bad for what json accepts but a row cannot hold: a key twice in one object, nesting
    deeper than Python's recursion limit (RecursionError inside json), a lone surrogate."""
    start = _JSON_SPACE.match(text, start).end()
    try:
        value, end = _DECODER.raw_decode(text, start)
    except _DuplicateKey as e:
        raise _Bad(str(e.args[0]), "the same key twice in one object; expected each key once") from None
    except RecursionError:
        raise _Bad("json", f"nested too deeply to read (over {sys.getrecursionlimit()} levels of [ and {{); "
                           "expected rows of objects a few levels deep") from None
    if whole and _JSON_SPACE.match(text, end).end() != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    if _SURROGATE_ESCAPE.search(text, start, end):
        where = _lone_surrogate(value)
        if where is not None:
            raise _Bad(where, "a lone UTF-16 surrogate (\\ud800-\\udfff escape without its pair); expected "
                              "valid Unicode text", end)
    return value, end


def read_records(path: str | os.PathLike) -> tuple[list[tuple[int, object]], list[str], str]:
    """All records of a JSON/JSONL(.gz) or text file: ([(line, value)], structural errors, layout).

    Never stops at the first bad line: every undecodable or unparsable line is reported. Parquet
    files and `datasets` save_to_disk folders: see `_read_table`.
    """
    path = Path(path)
    if path.suffix == ".parquet" or path.is_dir():
        return _read_table(path)
    data = _read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors write one)
        data = data[3:]
    stem = path.name[:-3] if path.name.endswith(".gz") else path.name
    errors: list[str] = []
    if stem.endswith((".txt", ".md")):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise UserError(f"{path}:{line}: bytes: expected UTF-8 text (byte 0x{data[e.start]:02x} "
                            f"at offset {e.start})") from None
        return ([(1, {"text": text})] if text.strip() else []), errors, "text"
    if stem.endswith(".json") and data.lstrip()[:1] == b"[":
        return _read_json_array(path, data) + ("json",)
    records = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append(f"{path}:{lineno}: bytes: expected UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
            continue
        try:
            value, _ = _decode(line)
        except json.JSONDecodeError as e:
            errors.append(f"{path}:{lineno}: json: expected one JSON object per line: {e.msg} (column {e.colno})")
            continue
        except _Bad as e:
            errors.append(f"{path}:{lineno}: {e}")
            continue
        records.append((lineno, value))
    return records, errors, "jsonl"


NEEDS_DATASETS = "needs the datasets extra: pip install 'gptstack[datasets]'"
# pyarrow's errors subclass these (ArrowInvalid: ValueError, ArrowIOError: OSError, ArrowNotImplementedError: ...)
_TABLE_ERRORS = (OSError, ValueError, KeyError, IndexError, TypeError, NotImplementedError)


def _read_table(path: Path) -> tuple[list[tuple[int, object]], list[str], str]:
    """The rows of a .parquet file or a `datasets` save_to_disk folder (a Dataset: dataset_info.json
    + state.json; a DatasetDict: dataset_dict.json, whose train split is read), numbered from 1 as
    lines are, so errors read `file:row: key: expected`. A row's null columns are left out: a table
    has every column in every row, where a JSON row would not have the key. Both need the
    `datasets` extra (which brings pyarrow); without it, one UserError says how to install it."""
    if path.is_dir():
        if not ((path / "dataset_dict.json").is_file()
                or ((path / "dataset_info.json").is_file() and (path / "state.json").is_file())):
            raise UserError(f"{path}: is a directory, expected a data file (JSONL, JSON, text, parquet) or a datasets "
                            "save_to_disk folder (with dataset_info.json and state.json, or dataset_dict.json)")
        try:
            import datasets
        except ImportError:
            raise UserError(f"{path}: reading a datasets save_to_disk folder {NEEDS_DATASETS}") from None
        folder = path
        if (path / "dataset_dict.json").is_file():
            try:
                splits = json.loads(read_bytes_file(path / "dataset_dict.json"))["splits"]
                splits = [str(s) for s in splits]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path / 'dataset_dict.json'}: expected a JSON object with a list of \"splits\"") from None
            if "train" not in splits:
                raise UserError(f"{path}: a DatasetDict with the splits {', '.join(splits) or '(none)'} and no train "
                                f"split; expected a train split, or pass one split's folder"
                                + (f" ({path / splits[0]})" if splits else ""))
            folder = path / "train"
        try:
            rows = datasets.load_from_disk(str(folder)).to_list()
        except _TABLE_ERRORS as e:
            raise UserError(f"{folder}: cannot read the save_to_disk folder ({type(e).__name__}: {e})") from None
        layout = "arrow"
    else:
        try:
            import pyarrow
            import pyarrow.parquet
        except ImportError:
            raise UserError(f"{path}: reading parquet {NEEDS_DATASETS}") from None
        data = read_bytes_file(path, "a parquet file")
        try:
            rows = pyarrow.parquet.read_table(pyarrow.BufferReader(data)).to_pylist()
        except _TABLE_ERRORS as e:
            raise UserError(f"{path}: not a valid parquet file ({type(e).__name__}: {e})") from None
        layout = "parquet"
    return [(i, {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(rows, start=1)], [], layout


def _read_json_array(path: Path, data: bytes) -> tuple[list, list]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: bytes: expected UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    records, errors = [], []
    i = text.index("[") + 1
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def stop(pos: int, expected: str) -> None:
        errors.append(f"{path}:{line_at(pos)}: json: expected {expected}")

    # strict JSON: '[' (value (',' value)*)? ']' and nothing after; an array cannot be
    # re-synchronised after a syntax error, so the first one is reported and reading stops
    state = "first"  # "first" after '[', "value" after ',', "sep" after an item
    while True:
        i = _JSON_SPACE.match(text, i).end()
        if i >= len(text):
            stop(len(text), "']' to close the array (the file ends early)")
            break
        c = text[i]
        if c == "]" and state != "value":
            if _JSON_SPACE.match(text, i + 1).end() != len(text):
                stop(i, "nothing after the closing ']'")
            break
        if state == "sep":
            if c != ",":
                stop(i, f"',' or ']' after an array item, got {c!r}")
                break
            i, state = i + 1, "value"
            continue
        if c in ",]":
            after = "'['" if state == "first" else "','"
            stop(i, f"a value after {after}" + (" (a trailing comma before ']')" if c == "]" else f", got {c!r}"))
            break
        try:
            value, end = _decode(text, i, whole=False)
        except json.JSONDecodeError as e:
            errors.append(f"{path}:{e.lineno}: json: expected a JSON array of objects: {e.msg} (column {e.colno})")
            break
        except _Bad as e:
            errors.append(f"{path}:{line_at(i)}: {e}")
            if e.end is None:  # the item could not be read to its end
                break
            i, state = e.end, "sep"
            continue
        records.append((line_at(i), value))
        i, state = end, "sep"
    return records, errors


# --- messages ---------------------------------------------------------------------------------


def _string(row: dict, key: str) -> str:
    if key not in row:
        raise _Bad(key, "missing, expected a string")
    v = row[key]
    if not isinstance(v, str):
        raise _Bad(key, f"expected a string, got {_type(v)}")
    return v


def _messages(value, key: str) -> list[dict]:
    """Structural check of a TRL conversational value: a list of {role, content} objects."""
    if not isinstance(value, list):
        raise _Bad(key, f"expected a list of {{role, content}} messages, got {_type(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _Bad(f"{key}[{i}]", f"expected a {{role, content}} object, got {_type(m)}")
        for k in ("role", "content"):
            if k not in m:
                raise _Bad(f"{key}[{i}].{k}", "missing, expected a string")
            if not isinstance(m[k], str):
                raise _Bad(f"{key}[{i}].{k}", f"expected a string, got {_type(m[k])}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _conversation(msgs: list[dict], final: str, strict_key: str | None = None) -> list[dict]:
    """Irregularities of a conversation that must end with role `final`; returns it stripped.

    Transcripts mined from real data (hh-rlhf) have such rows and they are skipped and counted.
    A conversation a user wrote for fine-tuning (`strict_key`, the row's key) is held to the
    format: the same problems are errors naming the message, like any structural error.
    """
    def irregular(reason: str, index: int | None = None, expected: str = ""):
        if strict_key is None:
            return _Irregular(reason)
        where = strict_key if index is None else f"{strict_key}[{index}]"
        return _Bad(where, f"{reason}; expected {expected}" if expected else reason)

    if not msgs:
        raise irregular("empty conversation", expected=f"at least a user and an {final} turn")
    for i, m in enumerate(msgs):
        if m["role"] not in ROLES:
            if strict_key is not None:
                raise _Bad(f"{strict_key}[{i}].role", f"expected one of {', '.join(ROLES)}, got {m['role']!r}")
            raise _Irregular("unsupported role")
    for i, m in enumerate(msgs[1:], start=1):
        if m["role"] == "system":
            raise irregular("system message after the start", i, "system only as the first message")
    offset = 1 if msgs[0]["role"] == "system" else 0
    turns = msgs[offset:]
    if not turns or turns[0]["role"] != "user":
        raise irregular("does not start with a user turn", offset, "role 'user'")
    for i, (a, b) in enumerate(zip(turns, turns[1:]), start=offset + 1):
        if a["role"] == b["role"]:
            raise irregular("same role twice in a row", i, "user and assistant turns to alternate")
    if turns[-1]["role"] != final:
        raise irregular(f"does not end with a{'n' if final == 'assistant' else ''} {final} turn", len(msgs) - 1,
                        f"the last message to be the {final}'s")
    if not turns[-1]["content"].strip():
        raise irregular(f"empty final {final} turn", len(msgs) - 1, "non-empty content")
    for i, m in enumerate(turns[:-1], start=offset):
        if not m["content"].strip():
            raise irregular("empty turn", i, "non-empty content")
    return [{"role": m["role"], "content": m["content"].strip()} for m in msgs]


def _prompt(value, key: str = "prompt") -> list[dict]:
    """A TRL prompt (a string, or messages) -> messages ending with the user's turn."""
    if isinstance(value, str):
        if not value.strip():
            raise _Irregular("empty prompt")
        return [{"role": "user", "content": value.strip()}]
    return _conversation(_messages(value, key), "user")


def _completion(value, key: str) -> str:
    """A TRL completion (a string, or a list holding one assistant message) -> its text."""
    if isinstance(value, str):
        text = value
    else:
        msgs = _messages(value, key)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise _Irregular("completion is not one assistant turn")
        text = msgs[0]["content"]
    if not text.strip():
        raise _Irregular("empty final assistant turn")
    return text.strip()


# --- hh-rlhf transcripts ------------------------------------------------------------------------

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def is_transcript(text) -> bool:
    return isinstance(text, str) and "Human:" in text and "\n\nAssistant:" in text


def parse_transcript(text: str) -> list[dict]:
    """"\\n\\nHuman: hi\\n\\nAssistant: hello" -> [{"role": "user", ...}, {"role": "assistant", ...}].

    Turns are kept as they are (possibly empty, possibly the same role twice): judging them is
    the caller's business. Text before the first turn raises _Irregular.
    """
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise _Irregular("text before the first turn")
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]


def _split_pair(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], str, str]:
    """Implicit prompt: the shared leading turns are the prompt, then one assistant turn each."""
    chosen = _conversation(chosen, "assistant")
    rejected = _conversation(rejected, "assistant")
    if chosen[:-1] != rejected[:-1]:
        raise _Irregular("chosen and rejected have different prompts")
    if chosen[-1] == rejected[-1]:
        raise _Irregular("chosen equals rejected")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


# --- one parser per format --------------------------------------------------------------------


def _row_text(row: dict) -> list[dict]:
    text = _string(row, "text")
    if not text.strip():
        raise _Irregular("empty text")
    return [{"text": text}]


def _row_messages(row: dict) -> list[dict]:
    if "messages" not in row:
        raise _Bad("messages", "missing, expected a list of {role, content} messages")
    return [{"messages": _conversation(_messages(row["messages"], "messages"), "assistant", strict_key="messages")}]


def _prompt_or_messages(row: dict, key: str):
    if key not in row:
        raise _Bad(key, "missing, expected a string or a list of {role, content} messages")
    v = row[key]
    if not isinstance(v, (str, list)):
        raise _Bad(key, f"expected a string or a list of {{role, content}} messages, got {_type(v)}")
    return v


def _row_prompt_completion(row: dict) -> list[dict]:
    p, c = _prompt_or_messages(row, "prompt"), _prompt_or_messages(row, "completion")
    if isinstance(c, str):
        messages = _prompt(p) + [{"role": "assistant", "content": _completion(c, "completion")}]
    else:
        messages = (_messages(p, "prompt") if isinstance(p, list) else [{"role": "user", "content": p}]) \
            + _messages(c, "completion")
    return [{"messages": _conversation(messages, "assistant", strict_key="messages")}]


def _row_prompt_only(row: dict) -> list[dict]:
    return [{"prompt": _prompt(_prompt_or_messages(row, "prompt"))}]


def _row_preference(row: dict) -> list[dict]:
    c, r = _prompt_or_messages(row, "chosen"), _prompt_or_messages(row, "rejected")
    if "prompt" in row:
        prompt = _prompt(_prompt_or_messages(row, "prompt"))
        chosen, rejected = _completion(c, "chosen"), _completion(r, "rejected")
        if chosen == rejected:
            raise _Irregular("chosen equals rejected")
        return [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]
    if isinstance(c, list) and isinstance(r, list):
        prompt, chosen, rejected = _split_pair(_messages(c, "chosen"), _messages(r, "rejected"))
    elif isinstance(c, str) and isinstance(r, str):
        # Standard implicit prompt, as TRL's extract_prompt: the longest common prefix, less a
        # trailing space (which stays with the completions).
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        if c == r:
            raise _Irregular("chosen equals rejected")
        if 0 < n < min(len(c), len(r)) and c[n - 1] == " ":
            n -= 1
        if not c[:n].strip():
            raise _Irregular("no shared prompt")
        prompt = _prompt(c[:n])
        chosen, rejected = _completion(c[n:], "chosen"), _completion(r[n:], "rejected")
    else:
        raise _Bad("rejected", f"expected the same type as chosen ({_type(c)}), got {_type(r)}")
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]


def _row_hh(row: dict) -> list[dict]:
    c, r = _string(row, "chosen"), _string(row, "rejected")
    for key, v in (("chosen", c), ("rejected", r)):
        if not is_transcript(v):
            raise _Bad(key, 'expected a "\\n\\nHuman: ... \\n\\nAssistant: ..." transcript')
    prompt, chosen, rejected = _split_pair(parse_transcript(c), parse_transcript(r))
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]


_GSM_CALC = re.compile(r"<<[^<>]*>>")
_GSM_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)
_NUMBER = re.compile(r"^[-+]?\$?\d[\d,]*(?:\.\d+)?$")


def _number(text: str) -> str:
    return text.replace(",", "").replace("$", "").lstrip("+")


def _row_gsm8k(row: dict) -> list[dict]:
    q, a = _string(row, "question"), _string(row, "answer")
    m = _GSM_FINAL.search(a)
    if not m or not _NUMBER.match(m.group(1).strip()):
        raise _Bad("answer", "expected a solution ending in '#### <number>'")
    if not q.strip():
        raise _Irregular("empty prompt")
    answer = _number(m.group(1).strip())
    body = _GSM_CALC.sub("", a[: m.start()]).strip()
    solution = (body + "\n" if body else "") + f"The answer is {answer}."
    return [{"prompt": [{"role": "user", "content": q.strip()}], "answer": answer, "solution": solution}]


def _row_prompt_answer(row: dict) -> list[dict]:
    prompt = _prompt(_prompt_or_messages(row, "prompt"))
    if "answer" not in row:
        raise _Bad("answer", "missing, expected a string or number")
    a = row["answer"]
    if isinstance(a, bool) or not isinstance(a, (str, int, float)):
        raise _Bad("answer", f"expected a string or number, got {_type(a)}")
    if isinstance(a, float) and not math.isfinite(a):  # json.loads reads NaN, Infinity and 1e999
        raise _Bad("answer", f"expected a finite number, got {a}")
    if not str(a).strip():
        raise _Irregular("empty answer")
    return [{"prompt": prompt, "answer": str(a).strip()}]


def _user_turn(instruction: str, inp: str) -> str:
    return instruction.strip() + (f"\n\n{inp.strip()}" if inp.strip() else "")


def _row_self_instruct(row: dict) -> list[dict]:
    instruction = _string(row, "instruction")
    if "instances" not in row:
        raise _Bad("instances", "missing, expected a list of {input, output} objects")
    instances = row["instances"]
    if not isinstance(instances, list):
        raise _Bad("instances", f"expected a list of {{input, output}} objects, got {_type(instances)}")
    out = []
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise _Bad(f"instances[{i}]", f"expected an {{input, output}} object, got {_type(inst)}")
        inp = _string(inst, "input") if "input" in inst else ""
        try:
            output = _string(inst, "output")
        except _Bad as e:
            raise _Bad(f"instances[{i}].output", str(e).split(": ", 1)[1]) from None
        if output.strip() and instruction.strip():
            out.append({"messages": [{"role": "user", "content": _user_turn(instruction, inp)},
                                     {"role": "assistant", "content": output.strip()}]})
    if not out:
        raise _Irregular("empty instruction or output")
    return out


def _row_alpaca(row: dict) -> list[dict]:
    instruction, output = _string(row, "instruction"), _string(row, "output")
    inp = _string(row, "input") if "input" in row else ""
    if not instruction.strip() or not output.strip():
        raise _Irregular("empty instruction or output")
    return [{"messages": [{"role": "user", "content": _user_turn(instruction, inp)},
                          {"role": "assistant", "content": output.strip()}]}]


def _row_world(row: dict) -> list[dict]:
    prompt, reference = _string(row, "prompt"), _string(row, "reference")
    if not prompt.strip() or not reference.strip():
        raise _Irregular("empty prompt or reference")
    return [{"messages": [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": reference.strip()}]}]


def _row_ranking(row: dict) -> list[dict]:
    prompt_value = _prompt_or_messages(row, "prompt")
    if "responses" not in row:
        raise _Bad("responses", "missing, expected a list of at least 2 strings")
    responses = row["responses"]
    if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(x, str) for x in responses):
        got = (f"{len(responses)} string{'s' if len(responses) != 1 else ''} (a ranking of one response has "
               "nothing to compare)" if isinstance(responses, list) and all(isinstance(x, str) for x in responses)
               else _type(responses))
        raise _Bad("responses", f"expected a list of at least 2 strings, got {got}")
    if "ranking" not in row:
        raise _Bad("ranking", "missing, expected a list of response indices, best first")
    ranking = row["ranking"]
    if not isinstance(ranking, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ranking) \
            or sorted(ranking) != list(range(len(responses))):
        # a tie ([0, 0, 1] or [[0, 1], 2]) has no order to learn from: the format cannot hold one
        tie = isinstance(ranking, list) and (any(isinstance(x, list) for x in ranking) or len(set(map(str, ranking))) < len(ranking))
        raise _Bad("ranking", f"expected a permutation of 0..{len(responses) - 1} (response indices, best first"
                              + ("; ties cannot be expressed: write tied responses as separate rows or leave one out"
                                 if tie else "") + f"), got {json.dumps(ranking)[:60]}")
    prompt = _prompt(prompt_value)
    extras = {}
    # optional per-response extras (`gptstack prefs` writes them): whether the response ended with
    # the end token, and its gold reward for world prompts; other keys are ignored
    for key, ok, what in (("ended", lambda v: isinstance(v, bool), "booleans"),
                          ("gold", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "numbers")):
        if key in row:
            v = row[key]
            if not isinstance(v, list) or len(v) != len(responses) or not all(ok(x) for x in v):
                raise _Bad(key, f"expected a list of {len(responses)} {what} (one per response), got "
                                f"{json.dumps(v)[:60]}")
            if key == "gold" and not all(math.isfinite(x) for x in v):  # json.loads reads NaN, Infinity, 1e999
                raise _Bad(key, f"expected finite numbers, got {json.dumps(v)[:60]} (NaN and Infinity are not JSON)")
            extras[key] = list(v)
    if any(not x.strip() for x in responses):
        raise _Irregular("empty response")
    return [{"prompt": prompt, "responses": [x.strip() for x in responses], "ranking": list(ranking), **extras}]


def _unit(v, key: str) -> float:
    if isinstance(v, bool):
        return float(v)
    if not isinstance(v, (int, float)) or not 0 <= v <= 1:  # NaN fails the comparison too
        raise _Bad(key, f"expected a boolean, 0/1 or a number in [0, 1], got {json.dumps(v)[:40]}")
    return float(v)


def _row_stepwise(row: dict) -> list[dict]:
    """TRL's stepwise (process supervision) format: one label per reasoning step. Labels may be
    booleans (checker or human labels) or fractions (Monte-Carlo estimates, Math-Shepherd's soft
    labels). Optional extras, as `gptstack prm` writes them: `outcome` (the final answer's
    correctness; default the last step's label) and `ended` (the response ended; default true)."""
    steps, labels = row.get("completions"), row.get("labels")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        raise _Bad("completions", f"expected a non-empty list of step strings, got {_type(steps)}")
    if not isinstance(labels, list):
        raise _Bad("labels", f"expected a list of {len(steps)} labels (one per step), got {_type(labels)}")
    if len(labels) != len(steps):
        raise _Bad("labels", f"expected {len(steps)} labels (one per step of completions), got {len(labels)}")
    labels = [_unit(v, f"labels[{i}]") for i, v in enumerate(labels)]
    outcome = _unit(row["outcome"], "outcome") if "outcome" in row else labels[-1]
    ended = row.get("ended", True)
    if not isinstance(ended, bool):
        raise _Bad("ended", f"expected a boolean, got {_type(ended)}")
    prompt = _prompt(_prompt_or_messages(row, "prompt"))
    if any(not s.strip() for s in steps):
        raise _Irregular("empty step")
    return [{"prompt": prompt, "completions": [s.strip() for s in steps], "labels": labels, "outcome": outcome,
             "ended": ended}]


# (name, kind, source, keys that identify it, parser); the first whose keys are all present wins.
FORMATS = (
    ("ranking", "ranking", "ranking", {"responses", "ranking"}, _row_ranking),
    ("preference", "preference", "trl", {"chosen", "rejected"}, _row_preference),
    ("messages", "sft", "trl", {"messages"}, _row_messages),
    ("prompt-completion", "sft", "trl", {"prompt", "completion"}, _row_prompt_completion),
    ("stepwise", "stepwise", "trl", {"prompt", "completions", "labels"}, _row_stepwise),
    ("gsm8k", "verifiable", "gsm8k", {"question", "answer"}, _row_gsm8k),
    ("self-instruct", "sft", "self-instruct", {"instruction", "instances"}, _row_self_instruct),
    ("alpaca", "sft", "alpaca", {"instruction", "output"}, _row_alpaca),
    ("prompt-answer", "verifiable", "trl", {"prompt", "answer"}, _row_prompt_answer),
    ("world", "sft", "world", {"prompt", "reference"}, _row_world),
    ("text", "text", "text", {"text"}, _row_text),
    ("prompt-only", "prompt", "trl", {"prompt"}, _row_prompt_only),
)
_KNOWN = " | ".join("+".join(sorted(keys)) for _, _, _, keys, _ in FORMATS)


def _detect(path: Path, line: int, row: dict):
    if {"completion", "label"} <= row.keys():
        raise UserError(f"{path}:{line}: label: TRL's unpaired preference (KTO) rows (prompt, completion, label) are "
                        "not supported (read as demonstrations, the label-false completions would be trained on); expected "
                        "paired preferences (prompt, chosen, rejected), K-wise rankings, or prompt + completion "
                        "rows without a label")
    for fmt in FORMATS:
        if fmt[3] <= row.keys():
            if fmt[0] == "preference" and "prompt" not in row and is_transcript(row.get("chosen")):
                return ("hh-rlhf", "preference", "hh-rlhf", fmt[3], _row_hh)
            return fmt
    raise UserError(f"{path}:{line}: keys {', '.join(sorted(row)) or '(none)'}: expected the keys of a known "
                    f"format ({_KNOWN})")


def read_dataset(path: str | os.PathLike, expect: tuple[str, ...] | str | None = None,
                 skip_bad_rows: bool = False, require_rows: bool = True) -> Dataset:
    """Read and validate a data file (see the module docstring). Raises UserError, before any
    work, on a file that cannot be used: listing every structural error unless `skip_bad_rows`,
    when the file's kind is not in `expect`, and (`require_rows`) when no row is usable."""
    path = Path(path)
    records, errors, layout = read_records(path)
    fmt = None
    for line, value in records:
        if isinstance(value, dict):
            fmt = _detect(path, line, value)
            break
    if fmt is None and not errors and not records:
        raise UserError(f"{path}: no data; expected at least one row")
    name, kind, source, _, parser = fmt or ("unknown", "unknown", "unknown", set(), None)
    if isinstance(expect, str):
        expect = (expect,)
    if expect and fmt is not None and kind not in expect:
        raise UserError(f"{path}: expected {' or '.join(expect)} data, found {kind} rows ({name} format, keys "
                        f"{'+'.join(sorted(fmt[3]))})")
    ds = Dataset(str(path), kind, source, [], n_rows=len(records) + len(errors))
    bad_lines = len(errors)
    for line, value in records:
        try:
            if not isinstance(value, dict):
                raise _Bad("row", f"expected a JSON object, got {_type(value)}")
            rows = parser(value)
        except _Bad as e:
            errors.append(f"{path}:{line}: {e}")
            bad_lines += 1
            continue
        except _Irregular as e:
            ds.skipped[str(e)] += 1
            continue
        ds.rows.extend(rows)
        ds.lines.extend([line] * len(rows))
        ds.usable += 1
    prefix = len(str(path)) + 1
    ds.errors = sorted(errors, key=lambda e: int(re.match(r"\d*", e[prefix:]).group() or 0))  # in line order
    errors = ds.errors
    if errors:
        if not skip_bad_rows and len(errors) == 1:  # one line: file:line: key: expected
            raise UserError(f"{errors[0]} (1 bad row" + (f", {name} format" if fmt else "")
                            + "; fix it or pass --skip-bad-rows to skip and count it)")
        if not skip_bad_rows:
            shown = errors[:MAX_ERRORS_IN_MESSAGE]
            more = len(errors) - len(shown)
            raise UserError(
                f"{path}: {len(errors)} bad row{'s' if len(errors) != 1 else ''} ({name} format); fix "
                f"{'it' if len(errors) == 1 else 'them'} or pass --skip-bad-rows to skip and count them:\n"
                + "\n".join(shown) + (f"\n... and {more} more (`gptstack data check {path}` lists all)" if more else ""))
        ds.skipped[BAD_ROW] += bad_lines
    if require_rows and not ds.usable:
        reasons = ", ".join(f"{r} ×{c}" for r, c in ds.skipped.most_common())
        raise UserError(f"{path}: no usable rows ({ds.n_rows} read, all skipped: {reasons}); expected at least one "
                        f"usable {'' if fmt is None else kind + ' '}row")
    return ds


# --- answers --------------------------------------------------------------------------------

_FINAL_PATTERNS = (re.compile(r"the answer is\s*:?\s*\$?(-?[\d,]*\.?\d+)", re.I), re.compile(r"####\s*\$?(-?[\d,]*\.?\d+)"))


def extract_final_answer(text: str) -> str | None:
    """The final numeric answer of a response: the last "The answer is X" or "#### X", else the
    last number in the text; commas and $ removed. None when there is no number."""
    for pattern in _FINAL_PATTERNS:
        found = pattern.findall(text)
        if found:
            return _number(found[-1])
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return _number(numbers[-1]).rstrip(".") if numbers else None


def check_answer(response: str, answer: str) -> bool:
    """Whether `response`'s final answer equals `answer` numerically (GSM8K-style), or as text."""
    got = extract_final_answer(response)
    if got is None:
        return False
    try:
        return abs(float(got) - float(_number(str(answer)))) < 1e-6
    except ValueError:
        return got.strip().lower() == str(answer).strip().lower()
