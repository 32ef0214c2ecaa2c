"""Pretraining documents: the world's language mixed with real English.

documents(n_chars, seed, config, split="train") -> list[str] returns independent documents (the
corpus code separates them with <|bos|>) totalling about `n_chars` characters, shuffled:

  - worked examples (half of the world's share): a few training tasks with their step-by-step
    solutions, in varied layouts ("Question:/Answer:", "Q:/A:", "Problem 1." ...), so the base
    model has seen the answer line and the step format before any fine-tuning;
  - tables: addition, subtraction and times tables, comparisons, spellings, sorted lists, units;
  - explanations: short prose on how each kind of problem is solved, with fresh small examples;
  - English: contiguous passages of the shipped tinyshakespeare (`config.doc_english_fraction`
    of the characters; public domain, see data/texts/LICENSE.md), so the model is a real LM too.

split="train" uses the first 90 % of the English text and one task stream; split="val" the last
10 % and another stream, for a validation loss on text the model has not trained on.
Small corpora repeat: 1.1 MB of Shakespeare is reused when more English is asked for.

No document contains a held-out eval prompt: worked examples come from `task_stream` (which skips
eval items) and every world document is checked against the eval index before it is kept.
"""
from __future__ import annotations

import functools
import random
from importlib import resources

from .tasks import FAMILIES, ITEMS, NAMES, WORDS, Task, WorldConfig, eval_index, list_output, task_stream

ENGLISH_FILE = "tinyshakespeare.txt"
VAL_FRACTION = 0.1


@functools.lru_cache(maxsize=1)
def english_text() -> str:
    """The English text shipped with the package (tinyshakespeare, public domain)."""
    return (resources.files("gptstack.data") / "texts" / ENGLISH_FILE).read_text(encoding="utf-8")


def english_documents(n_chars: int, seed: int = 0, split: str = "train") -> list[str]:
    """Contiguous passages (500-3000 characters, starting at a line) of the split's English text."""
    text = english_text()
    cut = text.rfind("\n", 0, int(len(text) * (1 - VAL_FRACTION))) + 1
    text = text[:cut] if split == "train" else text[cut:]
    rng = random.Random(f"gptstack-world/english/{split}/{seed}")
    docs, total = [], 0
    while total < n_chars:
        size = min(rng.randint(500, 3000), n_chars - total, len(text))
        start = rng.randrange(0, max(1, len(text) - size))
        start = text.rfind("\n", 0, start) + 1  # begin at a line
        doc = text[start : start + size].strip()
        if doc:
            docs.append(doc)
            total += len(doc)
    return docs


# --- world documents ------------------------------------------------------------------------------

_LAYOUTS = (
    lambda i, t: f"Question: {t.prompt}\nAnswer:\n{t.reference}",
    lambda i, t: f"Q: {t.prompt}\nA: {' '.join(t.steps)}",
    lambda i, t: f"Problem {i}. {t.prompt}\nSolution.\n{t.reference}",
    lambda i, t: f"{t.prompt}\n{t.reference}",
)
_TITLES = ("Worked examples", "Practice problems with solutions", "Exercises", "Homework answers",
           "Examples", "Step by step")


def _worked(rng: random.Random, tasks) -> str:
    layout = rng.choice(_LAYOUTS)
    examples = [layout(i + 1, next(tasks)) for i in range(rng.randint(2, 6))]
    return rng.choice(_TITLES) + "\n\n" + "\n\n".join(examples)


def _table(rng: random.Random) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        n = rng.randint(1, 20)
        return f"Adding {n}\n" + "\n".join(f"{n} + {k} = {n + k}" for k in range(1, rng.randint(10, 20) + 1))
    if kind == 1:
        n = rng.randint(10, 40)
        return f"Taking away from {n}\n" + "\n".join(f"{n} - {k} = {n - k}" for k in range(1, min(n, 15) + 1))
    if kind == 2:
        n = rng.randint(2, 12)
        return f"Times table of {n}\n" + "\n".join(f"{n} * {k} = {n * k}" for k in range(1, 13))
    if kind == 3:
        pairs = [rng.sample(range(1, rng.choice((20, 100, 1000))), 2) for _ in range(rng.randint(5, 12))]
        return "Comparing numbers\n" + "\n".join(
            f"{a} {'<' if a < b else '>'} {b}, so {max(a, b)} is larger and {min(a, b)} is smaller." for a, b in pairs)
    if kind == 4:
        words = rng.sample(WORDS, rng.randint(5, 12))
        return "Spelling\n" + "\n".join(f"{w}: {', '.join(w)} ({len(w)} letters)" for w in words)
    if kind == 5:
        lines = []
        for _ in range(rng.randint(3, 8)):
            items = tuple(map(str, rng.sample(range(1, 100), rng.randint(3, 6))))
            op = rng.choice(("ascending", "descending", "reverse"))
            lines.append(f"{', '.join(items)} {_LIST_WORDS[op]}: {', '.join(list_output((op, items)))}")
        return "Lists\n" + "\n".join(lines)
    facts = ["1 meter = 100 centimeters", "1 hour = 60 minutes", "1 dozen = 12", "1 week = 7 days",
             "1 minute = 60 seconds", "1 day = 24 hours", "1 dollar = 100 cents"]
    rng.shuffle(facts)
    n = rng.randint(2, 9)
    return "Units\n" + "\n".join(facts) + f"\nSo {n} meters = {n * 100} centimeters and {n} hours = {n * 60} minutes."


_LIST_WORDS = {"ascending": "from smallest to largest", "descending": "from largest to smallest", "reverse": "reversed"}


def _explanation(rng: random.Random) -> str:
    family = rng.choice(FAMILIES)
    a, b, c = rng.randint(2, 30), rng.randint(2, 9), rng.randint(1, 20)
    name = rng.choice(sorted(NAMES))
    if family == "arithmetic":
        return (f"How to work out a sum. Multiply first, then add and subtract from left to right, one step "
                f"at a time. Take {a} + {b} * {c}. First {b} * {c} = {b * c}. Then {a} + {b * c} = {a + b * c}. "
                f"Write each step on its own line and finish with the answer line: The answer is {a + b * c}.")
    if family == "compare":
        x, y, z = rng.sample(range(1, 100), 3)
        top = max(x, y, z)
        return (f"To find the largest number, keep the best one so far and compare it with the next. "
                f"With {x}, {y} and {z}: {x} {'<' if x < y else '>'} {y}, so keep {max(x, y)}. "
                f"Then {max(x, y)} {'<' if max(x, y) < z else '>'} {z}, so the largest is {top}. "
                f"The smallest works the same way, keeping the smaller one each time.")
    if family == "count":
        w = rng.choice(WORDS)
        letter = rng.choice(w)
        k = w.count(letter)
        return (f"To count a letter in a word, spell the word out and count each time the letter comes up. "
                f"The word {w} is spelled {', '.join(w)}. The letter {letter} comes up "
                f"{k} {'time' if k == 1 else 'times'}, so the answer is {k}.")
    if family == "lists":
        items = tuple(map(str, rng.sample(range(1, 50), 4)))
        out = list_output(("ascending", items))
        return (f"To sort a list from smallest to largest, find the smallest item, then the next smallest, and so on. "
                f"For {', '.join(items)} the smallest is {out[0]}, next is {out[1]}, then {out[2]} and {out[3]}. "
                f"Reversing a list reads it from the end: {', '.join(items)} reversed is {', '.join(reversed(items))}.")
    item = rng.choice(ITEMS)
    return (f"A story problem hides a sum. {name} has {a} {item} and gets {b} bags with {c} {item} in each bag. "
            f"The bags hold {b} * {c} = {b * c} {item}, so {name} has {a} + {b * c} = {a + b * c} {item}. "
            f"Units work the same way: there are 60 minutes in an hour and 100 centimeters in a meter.")


def world_documents(n_chars: int, seed: int = 0, config: WorldConfig | None = None, split: str = "train") -> list[str]:
    """Documents in the world's language (worked examples, tables, explanations), ~`n_chars` in all."""
    config = (config or WorldConfig()).validate()
    index = eval_index(config)
    rng = random.Random(f"gptstack-world/docs/{split}/{seed}")
    tasks = task_stream(seed, config, namespace=f"docs-{split}")
    docs, total = [], 0
    while total < n_chars:
        r = rng.random()
        doc = _worked(rng, tasks) if r < 0.5 else _table(rng) if r < 0.75 else _explanation(rng)
        if index.contains(doc):  # never happens by construction; checked so it cannot
            continue
        docs.append(doc)
        total += len(doc)
    return docs


def documents(n_chars: int, seed: int = 0, config: WorldConfig | None = None, split: str = "train") -> list[str]:
    """World documents and English passages, ~`n_chars` characters in all, shuffled (see module doc)."""
    config = (config or WorldConfig()).validate()
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    n_english = int(n_chars * config.doc_english_fraction)
    docs = world_documents(n_chars - n_english, seed, config, split) + english_documents(n_english, seed, split)
    random.Random(f"gptstack-world/mix/{split}/{seed}").shuffle(docs)
    return docs


def task_document(task: Task) -> str:
    """One task as a plain-text worked example (the first layout), e.g. for few-shot prompts."""
    return _LAYOUTS[0](1, task)
