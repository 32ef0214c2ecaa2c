"""What a training stage's config names as its input: the pretraining corpus and the RL prompts.

    corpus = Corpus(cfg)                                            # data.paths, the world's documents or a shipped text
    train_docs, val_docs, _ = corpus.splits()
    source = Prompts(cfg, cfg.ppo)                                  # world training tasks
    source = Prompts(cfg, cfg.grpo, "gsm8k.jsonl", tok=tok)         # a file's prompts (+ answers)
    items = source.draw(update, rank)                               # prompts_per_update Items

RL prompts: every draw derives from (prompt_seed, update, rank) (`update_seed`), so a resumed run
draws what an uninterrupted one would have. A verifiable file (prompt + answer rows) holds rows out
by the one held-out rule (data/split.py): about eval_prompts of them (at most 10 %), never trained
on, on which the answer accuracy is measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import world
from ..common import UserError
from ..data.corpus import BUILTIN_TEXTS, read_documents, split_documents
from ..data.formats import read_dataset, warn
from ..data.split import is_heldout

if TYPE_CHECKING:
    from ..config import Config, RLConfig
    from ..tokenizer import Tokenizer


class Corpus:
    """The pretraining corpus a config names: files (data.paths), the task world's documents, or a
    shipped text; read (and validated) once, lazily, and split into train / val. Pretraining trains
    on it; PPO-ptx mixes its train split into the RL loss."""

    def __init__(self, cfg: Config, skip_bad_rows: bool = False):
        self.cfg, self.skip_bad_rows = cfg, skip_bad_rows
        self.counts: dict = {}
        self._splits = None
        d = cfg.data
        if d.paths:
            self.fingerprint = {"paths": [(str(Path(p).resolve()), Path(p).stat().st_size if Path(p).exists() else -1,
                                           Path(p).stat().st_mtime_ns if Path(p).exists() else -1) for p in d.paths],
                                "doc_separator": d.doc_separator, "split": d.split, "val_fraction": d.val_fraction}
        elif d.builtin == "world":
            self.fingerprint = {"world": cfg.world.__dict__, "chars": d.world_chars, "seed": cfg.pretrain.seed,
                                "val_fraction": d.val_fraction}
        elif (BUILTIN_TEXTS / f"{d.builtin}.txt").exists():
            self.fingerprint = {"builtin": d.builtin, "split": d.split, "val_fraction": d.val_fraction}
        else:
            raise UserError(f"data.builtin: expected world or one of "
                            f"{sorted(p.stem for p in BUILTIN_TEXTS.glob('*.txt'))}, got {d.builtin!r}")

    def splits(self) -> tuple[list[str], list[str], bool]:
        if self._splits is None:
            d = self.cfg.data
            if d.paths or d.builtin != "world":
                paths = d.paths or [str(BUILTIN_TEXTS / f"{d.builtin}.txt")]
                docs, self.counts = read_documents(paths, d.doc_separator, self.skip_bad_rows)
                self._splits = split_documents(docs, d.val_fraction, d.split)
            else:
                seed = self.cfg.pretrain.seed
                self._splits = (world.documents(d.world_chars, seed, self.cfg.world, "train"),
                                world.documents(int(d.world_chars * d.val_fraction), seed, self.cfg.world, "val"), False)
        return self._splits


# --- RL prompts ----------------------------------------------------------------------------------


@dataclass
class Item:
    messages: list[dict]            # the prompt, ending with the user's turn
    task: world.Task | None = None  # world prompts: the gold reward's task
    answer: str | None = None       # verifiable files (GSM8K): the reference answer


def update_seed(tc: RLConfig, update: int, rank: int) -> int:
    """Every random draw of an update derives from (prompt_seed, update, rank): resume is exact."""
    return (tc.prompt_seed * 1_000_003 + update) * 101 + rank


class Prompts:
    """Training prompts, drawn per (update, rank): world tasks by default, or a prompt file's rows."""

    def __init__(self, cfg: Config, tc: RLConfig, data: str | None = None, skip_bad_rows: bool = False,
                 tok: Tokenizer | None = None, expect: tuple[str, ...] | None = None):
        self.cfg, self.tc, self.items, self.heldout = cfg, tc, None, []
        if data not in (None, "world"):
            ds = read_dataset(data, expect=expect or ("prompt", "sft", "preference", "ranking", "verifiable"),
                              skip_bad_rows=skip_bad_rows)
            answers = [r.get("answer") for r in ds.rows] if ds.kind == "verifiable" else [None] * len(ds.rows)
            items = [Item(m, None, a) for m, a in zip(ds.prompts(), answers)]
            if tok is not None:
                # A prompt that leaves no room for max_new_tokens would lose its start in the engine (a
                # question without its beginning, answer-checked all the same): skipped and counted. The
                # held-out rows of a verifiable file are also sampled with eval.max_new_tokens.
                new = max(tc.max_new_tokens, cfg.eval.max_new_tokens) if ds.kind == "verifiable" else tc.max_new_tokens
                room = max(1, cfg.model.block_size + 1 - new)
                sizes = [len(tok.render_prompt(it.messages)) for it in items]
                long = [(line, n) for line, n in zip(ds.lines, sizes) if n > room]
                if long and len(long) == len(items):
                    raise UserError(f"{data}:{long[0][0]}: prompt: {long[0][1]} tokens rendered; expected at most "
                                    f"{room} (model.block_size {cfg.model.block_size} + 1 - {new} new tokens): no "
                                    "prompt of this file fits")
                if long:
                    lines = ", ".join(str(line) for line, _ in long[:10]) + (", ..." if len(long) > 10 else "")
                    warn(f"{data}: {len(long)} prompt(s) longer than {room} tokens (model.block_size "
                         f"{cfg.model.block_size} + 1 - {new} new tokens) skipped, lines {lines}")
                    items = [it for it, n in zip(items, sizes) if n <= room]
            # about eval_prompts rows (at most 10 %) held out: the final evaluation samples them (the
            # answer accuracy on a verifiable file; the RM's score against SFT's and the KL on any file)
            fraction = min(tc.eval_prompts, len(items) // 10) / len(items)
            held = [is_heldout(it.messages, fraction) for it in items]
            self.heldout = [it for it, h in zip(items, held) if h]
            items = [it for it, h in zip(items, held) if not h]
            if not items:
                raise UserError(f"{data}: every prompt is held out (the file repeats one prompt?): none to train on")
            self.items = items

    def draw(self, update: int, rank: int) -> list[Item]:
        n = self.tc.prompts_per_update
        if self.items is None:
            tasks = world.train_tasks(n, seed=update_seed(self.tc, update, rank), config=self.cfg.world)
            return [Item([{"role": "user", "content": t.prompt}], t) for t in tasks]
        g = torch.Generator().manual_seed(update_seed(self.tc, update, rank))
        return [self.items[i] for i in torch.randint(len(self.items), (n,), generator=g).tolist()]
