"""Text -> tokenized, packed, memory-mapped token files, and the batches drawn from them.

Documents come from .txt files (one document per file, or split at `doc_separator`), from
JSONL/JSON (`{"text": ...}` per row, .gz too; read and validated by data/formats.py), or from the
task world's document generator. Each document is encoded (on all cores) and
prefixed with <|bos|>, then all are packed end to end into `train.bin` / `val.bin` (uint16 when
the vocabulary fits, else uint32) with a `meta.json` describing them. A build is reused when its
inputs, tokenizer and split settings are unchanged.

Split, deterministic: `tail` holds out the last fraction of the *text* (nanoGPT's split of a
single file: the first 90 % of characters train, the last 10 % validate); `docs` holds out the
last fraction of the documents.

Batches are random windows, drawn from a generator seeded by (seed, step, micro-batch, rank):
the data position of a run is its step, so a resumed run draws exactly the batches the
uninterrupted run would have.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..common import UserError, atomic_write_json, read_text_file
from .batches import batch_indices
from .formats import read_dataset

BUILTIN_TEXTS = Path(__file__).resolve().parent / "texts"


@dataclass
class Split:
    tokens: np.ndarray  # memory-mapped
    n_bytes: int        # UTF-8 bytes of the text these tokens encode (for bits per byte)


def read_documents(paths: list[str], doc_separator: str = "", skip_bad_rows: bool = False) -> tuple[list[str], dict]:
    """All documents of all files, in order, and the counts for summary.json. Bad rows stop here
    (every one named as file:line: key: expected) unless `skip_bad_rows`."""
    docs: list[str] = []
    counts: dict = {}
    for p in paths:
        path = Path(p)
        if path.suffix.lower() == ".txt":
            text = read_text_file(path)
            docs += [d for d in text.split(doc_separator) if d.strip()] if doc_separator else [text]
            continue
        ds = read_dataset(path, expect="text", skip_bad_rows=skip_bad_rows)
        docs += [row["text"] for row in ds.rows if row["text"].strip()]
        for key, value in ds.summary().items():
            counts[key] = counts.get(key, 0) + value
    if not docs:
        raise UserError(f"data: no documents in {', '.join(map(str, paths))}")
    return docs, counts


def split_documents(docs: list[str], val_fraction: float, mode: str = "auto") -> tuple[list[str], list[str], bool]:
    """-> (train docs, val docs, whether val continues the last train doc (tail split))."""
    if not 0 < val_fraction < 1:
        raise UserError(f"data.val_fraction: expected a number between 0 and 1, got {val_fraction}")
    if mode == "auto":
        mode = "tail" if len(docs) == 1 else "docs"
    if mode == "tail":  # cut the concatenation at the fraction, keeping document boundaries
        total = sum(len(d) for d in docs)
        cut, acc, train, val = int(total * (1 - val_fraction)), 0, [], []
        for d in docs:
            if acc + len(d) <= cut:
                train.append(d)
            elif acc >= cut:
                val.append(d)
            else:
                train.append(d[: cut - acc])
                val.append(d[cut - acc :])
            acc += len(d)
        return train, val, True
    if mode == "docs":
        n_val = max(1, round(len(docs) * val_fraction))
        if n_val >= len(docs):
            raise UserError(f"data: {len(docs)} document(s) are too few to hold out {val_fraction:.0%} by document; use data.split=tail")
        return docs[:-n_val], docs[-n_val:], False
    raise UserError(f"data.split: expected auto, tail or docs, got {mode!r}")


def _encode_docs(tokenizer, docs: list[str], continuation_first: bool) -> np.ndarray:
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    encoded = tokenizer.encode_batch(docs)
    bos = tokenizer.bos_id
    parts = []
    for k, ids in enumerate(encoded):
        if not (k == 0 and continuation_first):
            parts.append(np.array([bos], dtype=dtype))
        parts.append(np.asarray(ids, dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def build_corpus(load_splits, fingerprint: dict, tokenizer, out_dir: Path) -> dict[str, Split]:
    """Tokenize and pack once; reuse `out_dir` when `fingerprint` (inputs + settings) is unchanged.

    `load_splits() -> (train docs, val docs, val continues the last train doc)` is only called
    when a build is needed (reading or generating a corpus can be the slow part).
    """
    out_dir = Path(out_dir)
    # the tokenizer's whole content: a retrained tokenizer of the same size must not reuse old tokens
    h = hashlib.sha256(json.dumps([sorted(tokenizer.special_tokens.items()), tokenizer.pattern]).encode())
    for token, rank in sorted(tokenizer.mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    tok_hash = h.hexdigest()[:16]
    key = dict(fingerprint, tokenizer=tok_hash, version=1)
    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return _open(out_dir, meta)
    train_docs, val_docs, continuation = load_splits()
    meta = {"key": key, "dtype": None, "splits": {}}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, split_docs, cont in (("train", train_docs, False), ("val", val_docs, continuation)):
        tokens = _encode_docs(tokenizer, split_docs, cont)
        if len(tokens) < 2:
            raise UserError(f"data: the {name} split has {len(tokens)} tokens; the corpus is too small")
        tmp = out_dir / f".{name}.bin.tmp"
        tokens.tofile(tmp)
        tmp.replace(out_dir / f"{name}.bin")
        meta["dtype"] = str(tokens.dtype)
        meta["splits"][name] = {"tokens": int(len(tokens)), "bytes": sum(len(d.encode("utf-8")) for d in split_docs),
                                "documents": len(split_docs)}
    atomic_write_json(meta_path, meta)  # written last: a build without meta.json is never reused
    return _open(out_dir, meta)


def _open(out_dir: Path, meta: dict) -> dict[str, Split]:
    return {
        name: Split(np.memmap(out_dir / f"{name}.bin", dtype=meta["dtype"], mode="r"), info["bytes"])
        for name, info in meta["splits"].items()
    }


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, seed: int, step: int, micro: int = 0,
              rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows for (step, micro-batch); the global batch is split across ranks, so N
    processes see exactly the sequences one process would (same loss curve under DDP)."""
    n_windows = len(tokens) - block_size - 1
    if n_windows < 1:
        raise UserError(f"data: {len(tokens)} tokens is shorter than one window of {block_size + 1}")
    starts = batch_indices(n_windows, batch_size, seed, step, micro, rank=rank, world=world, replace=True)
    windows = np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64)
    w = torch.from_numpy(windows)
    return w[:, :-1], w[:, 1:]


def eval_windows(tokens: np.ndarray, block_size: int):
    """Non-overlapping windows covering the whole split: every token after the first is a
    target exactly once (the "full val split" loss)."""
    n = (len(tokens) - 1) // block_size
    arr = np.asarray(tokens[: n * block_size + 1]).astype(np.int64)
    x = torch.from_numpy(arr[:-1].reshape(n, block_size))
    y = torch.from_numpy(arr[1:].reshape(n, block_size))
    rest = len(tokens) - 1 - n * block_size
    tail = None
    if rest > 0:  # the last partial window, so no token is left out
        t = torch.from_numpy(np.asarray(tokens[-(rest + 1):]).astype(np.int64))
        tail = (t[:-1].unsqueeze(0), t[1:].unsqueeze(0))
    return x, y, tail
