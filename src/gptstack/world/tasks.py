"""The task world: seeded generators of short problems whose answers can be checked.

Five families, four difficulty levels each (1 = easiest):
    arithmetic   "What is 5 + 3 * 4 - 2?"                       1-4 operations, * binds tighter
    compare      "Which is the largest of 47, 74 and 39?"         2-4 numbers
    count        "How many times does the letter a appear in banana?"
    lists        "Sort from smallest to largest: 3, 8, 1."       reverse / sort / alphabetical
    word         "Tom has 3 apples. He gets 4 more. How many ..."  unit-style stories, 1-4 operations

Every reference solution is a list of short steps ending in the answer line, e.g.
    ["3 * 4 = 12.", "5 + 12 = 17.", "17 - 2 = 15.", "The answer is 15."]
so a process reward model can be trained on (and the step checker in gold.py can verify) each step.

A task is a pure function of its prompt: each family renders a small `spec` to a prompt and parses
the prompt back, so `task_from_prompt(text)` recovers the task (and its answer) from text alone.
That is what lets `gold(prompt, response)` and `gptstack world score` work on bare JSONL.

Public API (re-exported by `gptstack.world`):
    WorldConfig                                  difficulty mix, eval set, labeler and document knobs
    FAMILIES, Task
    generate(family, rng, difficulty) -> Task     one task (no decontamination)
    task_stream(seed, config) -> Iterator[Task]   endless training tasks, never an eval item
    train_tasks(n, seed, config) -> list[Task]
    eval_set(config) -> list[Task]                the fixed held-out set (cached)
    EvalIndex / eval_index(config)                fast "does this text contain an eval prompt?"
    task_from_prompt(prompt) -> Task              UserError when the text is not a world prompt
    vocabulary() -> frozenset[str]                every word the world's language uses

Decontamination is by construction: training tasks (and so SFT demonstrations, preference and RL
prompts) and pretraining documents are filtered through `EvalIndex`, which rejects any text that
contains a held-out eval prompt. Elementary facts ("7 + 5 = 12") are shared skills, not items.
"""
from __future__ import annotations

import functools
import itertools
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..common import UserError
from .styles import STYLES, render, vocabulary_text

FAMILIES = ("arithmetic", "compare", "count", "lists", "word")
LEVELS = (1, 2, 3, 4)
ANSWER_PREFIX = "The answer is "


@dataclass
class WorldConfig:
    """Everything that defines the world a recipe trains and measures on (the `tiny` recipe embeds it)."""

    families: list[str] = field(default_factory=lambda: list(FAMILIES), metadata={
        "help": f"task families to draw from (of {', '.join(FAMILIES)})"})
    difficulty_mix: list[float] = field(default_factory=lambda: [0.35, 0.3, 0.2, 0.15], metadata={
        "help": "training weights of difficulty levels 1-4 (the eval set is uniform over levels)"})
    eval_per_family: int = field(default=100, metadata={"range": "[1, inf)",
        "help": "held-out eval prompts per family (contract: >= 100 per family, >= 500 in all)"})
    eval_seed: int = field(default=1234, metadata={"range": "[0, inf)", "help": "seed of the fixed held-out eval set"})
    style_mix: list[float] = field(default_factory=lambda: [0.3, 0.2, 0.15, 0.15, 0.2], metadata={
        "help": "demonstration weights of the response styles terse, standard, explained, checked, chatty (world/styles.py)"})
    padding_max: int = field(default=3, metadata={"range": "[0, inf)",
        "help": "most padding sentences a long-style demonstration (explained, chatty) carries; P(k) halves per extra one"})
    labeler_tau: float = field(default=0.35, metadata={"range": "[0, inf)",
        "help": "labeler noise: P(a > b) = sigmoid((u(a) - u(b)) / tau); 0 = a noiseless labeler"})
    labeler_length_bias: float = field(default=0.3, metadata={
        "help": "labeler utility added per doubling of a response's length in words (a liking for longer answers)"})
    labeler_style_bias: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.1, 0.1], metadata={
        "help": "labeler utility added per response style terse, standard, explained, checked, chatty (a taste for thorough-looking or friendly answers)"})
    labeler_position_bias: float = field(default=0.0, metadata={
        "help": "labeler utility added to the first-shown response, falling linearly to 0 for the last"})
    doc_english_fraction: float = field(default=0.3, metadata={"range": "[0, 1]",
        "help": "fraction of pretraining characters drawn from the shipped English text (tinyshakespeare)"})

    def validate(self) -> "WorldConfig":
        """Raise UserError naming the bad field; return self. Call after overriding fields."""
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise UserError(f"world.families: expected a non-empty list of {', '.join(FAMILIES)}, got {self.families!r}")
        mix = list(self.difficulty_mix)
        if len(mix) != len(LEVELS) or any(w < 0 for w in mix) or sum(mix) <= 0:
            raise UserError(f"world.difficulty_mix: expected {len(LEVELS)} non-negative weights "
                            f"(levels {LEVELS[0]}-{LEVELS[-1]}) with a positive sum, got {mix!r}")
        if self.eval_per_family < 1:
            raise UserError(f"world.eval_per_family: expected a positive count, got {self.eval_per_family}")
        for name in ("style_mix", "labeler_style_bias"):
            values = list(getattr(self, name))
            if len(values) != len(STYLES) or (name == "style_mix" and (any(w < 0 for w in values) or sum(values) <= 0)):
                what = "non-negative weights with a positive sum" if name == "style_mix" else "numbers"
                raise UserError(f"world.{name}: expected {len(STYLES)} {what} (styles {', '.join(STYLES)}), got {values!r}")
        if self.padding_max < 0:
            raise UserError(f"world.padding_max: expected >= 0, got {self.padding_max}")
        if self.labeler_tau < 0:
            raise UserError(f"world.labeler_tau: expected >= 0, got {self.labeler_tau}")
        if not 0 <= self.doc_english_fraction <= 1:
            raise UserError(f"world.doc_english_fraction: expected a fraction in [0, 1], got {self.doc_english_fraction}")
        return self


@dataclass(frozen=True)
class Task:
    """One problem. `steps` is the reference solution; its last step is "The answer is X."."""

    family: str
    difficulty: int          # 1-4; 0 when recovered from a prompt (the text does not say)
    prompt: str
    answer: str
    steps: tuple[str, ...]
    spec: tuple              # the family's structured form; gold.py's step checker reads it

    @property
    def reference(self) -> str:
        return "\n".join(self.steps)

    @property
    def answer_kind(self) -> str:
        """"int" (a single integer) or "list" (comma-separated numbers or words)."""
        return "list" if self.family == "lists" else "int"

    def styled(self, style: str, rng: random.Random, padding_max: int = 3) -> str:
        """This task answered in `style` (world/styles.py); `rng` draws openers and padding."""
        return render(self, style, rng, padding_max)

    def messages(self, response: str | None = None) -> list[dict]:
        """The task as a chat: the prompt, then `response` (default: the reference) as the answer."""
        return [{"role": "user", "content": self.prompt},
                {"role": "assistant", "content": self.reference if response is None else response}]

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "reference": self.reference, "family": self.family,
                "difficulty": self.difficulty, "answer": self.answer}


def _answer_line(answer) -> str:
    return f"{ANSWER_PREFIX}{answer}."


# --- arithmetic (shared with word problems) ---------------------------------------------------
# An expression is a flat tuple (17, "+", 25, "*", 3). Multiplication binds tighter; the reference
# solution reduces every product first (left to right), then sums left to right: one step each.


def reduce_expression(tokens: Sequence) -> list[tuple[int, str, int, int]]:
    """The reference reduction of an expression: a list of (a, op, b, result) steps."""
    toks = list(tokens)
    steps = []
    for ops in (("*",), ("+", "-")):
        i = 1
        while i < len(toks):
            if toks[i] in ops:
                a, op, b = toks[i - 1], toks[i], toks[i + 1]
                r = a * b if op == "*" else a + b if op == "+" else a - b
                steps.append((a, op, b, r))
                toks[i - 1 : i + 2] = [r]
            else:
                i += 2
    return steps


def _expression_steps(tokens: Sequence) -> tuple[tuple[str, ...], int]:
    red = reduce_expression(tokens)
    value = red[-1][3] if red else tokens[0]
    return tuple(f"{a} {op} {b} = {r}." for a, op, b, r in red) + (_answer_line(value),), value


def _expression_ok(tokens: Sequence, hi: int = 999) -> bool:
    """Every intermediate and the result stay in [0, hi] (small, non-negative numbers only), and no
    step repeats an earlier one ("2 * 5 = 10." twice would read as a degenerate loop to gold)."""
    steps = reduce_expression(tokens)
    return all(0 <= r <= hi for *_, r in steps) and len(set(steps)) == len(steps)


_ARITH_RANGE = {1: 20, 2: 50, 3: 99, 4: 99}
_ARITH_MAX_MUL = {1: 0, 2: 0, 3: 1, 4: 2}


def _arithmetic_spec(rng: random.Random, d: int) -> tuple:
    while True:
        ops, n_mul = [], 0
        for _ in range(d):
            # at most _ARITH_MAX_MUL products, never two in a row (a * b * c gets too big)
            if n_mul < _ARITH_MAX_MUL[d] and (not ops or ops[-1] != "*") and rng.random() < 0.3:
                ops.append("*")
                n_mul += 1
            else:
                ops.append(rng.choice("+-"))
        nums = []
        for i in range(d + 1):
            near_mul = (i > 0 and ops[i - 1] == "*") or (i < d and ops[i] == "*")
            nums.append(rng.randint(2, 12) if near_mul else rng.randint(1, _ARITH_RANGE[d]))
        tokens = tuple(itertools.chain.from_iterable(zip(nums, ops + [None])))[:-1]
        if _expression_ok(tokens):
            return tokens


def _arithmetic_render(spec: tuple) -> str:
    return "What is " + " ".join(map(str, spec)) + "?"


_ARITH_RE = re.compile(r"What is (\d+(?: [-+*] \d+){1,4})\?")


def _arithmetic_parse(prompt: str) -> tuple | None:
    m = _ARITH_RE.fullmatch(prompt)
    if not m:
        return None
    parts = m.group(1).split(" ")
    return tuple(int(p) if p.isdigit() else p for p in parts)


def _arithmetic_solve(spec: tuple) -> tuple[tuple[str, ...], str]:
    steps, value = _expression_steps(spec)
    return steps, str(value)


# --- compare ------------------------------------------------------------------------------------
# spec = (mode, numbers): mode "max" or "min". The solution keeps a running champion and writes one
# comparison per remaining number, champion first: "47 < 74.", "74 > 39.".

_COMPARE = {1: (2, 20), 2: (2, 999), 3: (3, 99), 4: (4, 999)}  # level -> (how many numbers, max)


def _compare_spec(rng: random.Random, d: int) -> tuple:
    n, hi = _COMPARE[d]
    return rng.choice(("max", "min")), tuple(rng.sample(range(1, hi + 1), n))


def _compare_render(spec: tuple) -> str:
    mode, nums = spec
    if len(nums) == 2:
        return f"Which is {'larger' if mode == 'max' else 'smaller'}, {nums[0]} or {nums[1]}?"
    listed = ", ".join(map(str, nums[:-1])) + f" and {nums[-1]}"
    return f"Which is the {'largest' if mode == 'max' else 'smallest'} of {listed}?"


_COMPARE2_RE = re.compile(r"Which is (larger|smaller), (\d+) or (\d+)\?")
_COMPAREN_RE = re.compile(r"Which is the (largest|smallest) of ((?:\d+, )+\d+) and (\d+)\?")


def _compare_parse(prompt: str) -> tuple | None:
    m = _COMPARE2_RE.fullmatch(prompt)
    if m:
        nums = (int(m.group(2)), int(m.group(3)))
        mode = "max" if m.group(1) == "larger" else "min"
    else:
        m = _COMPAREN_RE.fullmatch(prompt)
        if not m:
            return None
        nums = tuple(int(x) for x in m.group(2).split(", ")) + (int(m.group(3)),)
        mode = "max" if m.group(1) == "largest" else "min"
    if len(set(nums)) != len(nums):
        return None  # ties have no single answer; the generator never makes them
    return mode, nums


def _compare_solve(spec: tuple) -> tuple[tuple[str, ...], str]:
    mode, nums = spec
    best, steps = nums[0], []
    for x in nums[1:]:
        steps.append(f"{best} {'<' if best < x else '>'} {x}.")
        if (x > best) == (mode == "max"):
            best = x
    return tuple(steps) + (_answer_line(best),), str(best)


# --- count ----------------------------------------------------------------------------------
# spec = (letter, word). Spell the word, then count the occurrences one by one.

WORDS = tuple("""
ant bee cat dog egg fig hat ink jar key leg map net owl pan rat sun toy van web yak zoo
add all see too ball bell doll pool food wood feet kiss pass wall deer keep noon good moon book
arm bag bed box bus cup fan fox gum hen jam kit lip mud nut pig pot rug sky tea
bird cake coat door duck fish frog game goat hill kite lamp leaf lion milk nest
park pear ring road rock rose seed ship shoe sock star tree wolf yarn
apple baker beach berry bread brick chair cloud dance dream eagle fence field flame
grape green horse house juice lemon mango melon money mouse night ocean onion paper
party piano plant queen river salad sheep smile snake spoon storm sugar table tiger
train truck water whale wheel
animal banana basket bottle butter candle carpet cherry circle coffee cookie dinner
doctor dragon flower forest garden guitar hammer island jacket kitten ladder letter
marble monkey orange parrot pencil pepper pillow planet rabbit rocket silver spider
summer tomato turtle window winter yellow
balloon blanket bedroom chicken compass cabbage diamond dolphin elephant feather
giraffe holiday kitchen lantern library mailbox meadow morning mountain necklace
octopus pancake peanut penguin picture popcorn pumpkin rainbow sandwich scissors
strawberry sunflower teacher thunder tractor triangle umbrella vanilla volcano
""".split())

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _count_spec(rng: random.Random, d: int) -> tuple:
    if d == 4:
        # Random strings over a 3-letter alphabet: no word knowledge helps, counts run to 3-6.
        alphabet = rng.sample(_LETTERS, 3)
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(8, 12)))
        return rng.choice(alphabet), word
    lo, hi = {1: (3, 4), 2: (5, 7), 3: (8, 10)}[d]
    word = rng.choice([w for w in WORDS if lo <= len(w) <= hi])
    r = rng.random()
    if d == 1 or r < 0.3:
        letter = rng.choice(word)  # by position: repeated letters come up more often
    elif r < 0.8:
        # The word's most repeated letter, so answers are not nearly always 1.
        letter = max(sorted(set(word)), key=word.count)
    else:
        letter = rng.choice([c for c in _LETTERS if c not in word])
    return letter, word


def _count_render(spec: tuple) -> str:
    letter, word = spec
    return f"How many times does the letter {letter} appear in {word}?"


_COUNT_RE = re.compile(r"How many times does the letter ([a-z]) appear in ([a-z]+)\?")


def _count_parse(prompt: str) -> tuple | None:
    m = _COUNT_RE.fullmatch(prompt)
    return (m.group(1), m.group(2)) if m else None


def _count_solve(spec: tuple) -> tuple[tuple[str, ...], str]:
    letter, word = spec
    k = word.count(letter)
    tally = ", ".join(str(i) for i in range(1, k + 1)) if k else "none"
    return (f"Spelled out: {', '.join(word)}.", f"Counting {letter}: {tally}.", _answer_line(k)), str(k)


# --- lists ----------------------------------------------------------------------------------
# spec = (op, items), op in reverse / ascending / descending / alphabetical; items are strings
# (digits or words). The solution names one output item per step.

_LIST_PROMPT = {
    "reverse": "Reverse the list: ",
    "ascending": "Sort from smallest to largest: ",
    "descending": "Sort from largest to smallest: ",
    "alphabetical": "Sort in alphabetical order: ",
}
_LIST_FIRST = {"reverse": "The last is", "ascending": "The smallest is",
               "descending": "The largest is", "alphabetical": "The first is"}
_LIST_NEXT = "Next is"


def _lists_spec(rng: random.Random, d: int) -> tuple:
    if d == 1:
        return "reverse", tuple(map(str, rng.sample(range(1, 10), 3)))
    if d == 2:
        op = rng.choice(("reverse", "ascending", "descending"))
        n = 4 if op == "reverse" else 3
        return op, tuple(map(str, rng.sample(range(1, 21), n)))
    op = rng.choice(("reverse", "ascending", "descending", "alphabetical"))
    n = 4 if d == 3 else 5
    if op == "alphabetical":
        n -= 1
        if d == 3:  # distinct first letters: one comparison decides each place
            firsts = rng.sample(sorted({w[0] for w in WORDS}), n)
            return op, tuple(rng.choice([w for w in WORDS if w[0] == f]) for f in firsts)
        return op, tuple(rng.sample(WORDS, n))
    return op, tuple(map(str, rng.sample(range(1, 100), n)))


def _lists_render(spec: tuple) -> str:
    op, items = spec
    return _LIST_PROMPT[op] + ", ".join(items) + "."


def _lists_parse(prompt: str) -> tuple | None:
    for op, head in _LIST_PROMPT.items():
        if prompt.startswith(head) and prompt.endswith("."):
            items = tuple(prompt[len(head) : -1].split(", "))
            pattern = r"[a-z]+" if op == "alphabetical" else r"[1-9]\d*"
            if len(items) >= 2 and len(set(items)) == len(items) and all(re.fullmatch(pattern, x) for x in items):
                return op, items
            return None
    return None


def list_output(spec: tuple) -> tuple[str, ...]:
    op, items = spec
    if op == "reverse":
        return tuple(reversed(items))
    if op == "alphabetical":
        return tuple(sorted(items))
    return tuple(sorted(items, key=int, reverse=op == "descending"))


def _lists_solve(spec: tuple) -> tuple[tuple[str, ...], str]:
    out = list_output(spec)
    steps = [f"{_LIST_FIRST[spec[0]]} {out[0]}."] + [f"{_LIST_NEXT} {x}." for x in out[1:]]
    answer = ", ".join(out)
    return tuple(steps) + (_answer_line(answer),), answer


# --- word problems ----------------------------------------------------------------------------
# A template is a story with number slots a-e and an expression over them (and unit constants);
# the solution is the arithmetic reduction of that expression. Templates are distinct sentences,
# so exactly one matches any generated prompt (tested).

NAMES = {"Tom": "He", "Sam": "He", "Ben": "He", "Max": "He", "Leo": "He", "Jack": "He", "Noah": "He",
         "Omar": "He", "Anna": "She", "Mia": "She", "Lily": "She", "Emma": "She", "Zoe": "She",
         "Sara": "She", "Nina": "She", "Ruth": "She"}
ITEMS = ("apples", "pears", "plums", "cards", "stamps", "marbles", "stickers", "shells", "pencils",
         "cookies", "beads", "coins", "books", "rocks", "toys", "balls", "candies", "lemons", "buttons", "flowers")


@dataclass(frozen=True)
class _Template:
    level: int
    text: str
    expr: str                     # e.g. "a + b * c - d"; numbers in it are unit constants
    slots: dict                   # slot -> range or tuple of choices


_TEMPLATES = (
    _Template(1, "{name} has {a} {item}. {pron} gets {b} more. How many {item} does {name} have now?",
              "a + b", {"a": range(2, 21), "b": range(2, 21)}),
    _Template(1, "{name} has {a} {item} and gives {b} to {name2}. How many {item} does {name} have left?",
              "a - b", {"a": range(5, 31), "b": range(2, 21)}),
    _Template(1, "There are {a} bags with {b} {item} in each bag. How many {item} are there?",
              "a * b", {"a": range(2, 10), "b": range(2, 10)}),
    _Template(1, "{name} has a rope that is {a} meters long. How many centimeters long is the rope?",
              "a * 100", {"a": range(2, 31)}),
    _Template(1, "{name} watches a movie for {a} hours. How many minutes is that?",
              "a * 60", {"a": range(2, 10)}),
    _Template(2, "{name} has {a} {item}. {pron} buys {b} bags with {c} {item} in each bag. "
                 "How many {item} does {name} have now?",
              "a + b * c", {"a": range(2, 31), "b": range(2, 10), "c": range(2, 10)}),
    _Template(2, "{name} buys {a} {item} at {b} dollars each and pays with {c} dollars. "
                 "How much change does {name} get?",
              "c - a * b", {"a": range(2, 10), "b": range(2, 10), "c": (20, 50, 100)}),
    _Template(2, "{name} walks for {a} hours and {b} minutes. How many minutes is that in total?",
              "a * 60 + b", {"a": range(1, 6), "b": range(5, 60, 5)}),
    _Template(2, "{name} has {a} {item}, gives away {b} and then finds {c} more. "
                 "How many {item} does {name} have now?",
              "a - b + c", {"a": range(10, 51), "b": range(2, 21), "c": range(2, 21)}),
    _Template(2, "A tray holds {a} dozen eggs and {b} more eggs. How many eggs are on the tray?",
              "a * 12 + b", {"a": range(2, 10), "b": range(1, 12)}),
    _Template(3, "{name} has {a} {item}. {pron} buys {b} packs with {c} {item} in each pack and gives "
                 "{d} to {name2}. How many {item} does {name} have now?",
              "a + b * c - d", {"a": range(2, 31), "b": range(2, 10), "c": range(2, 10), "d": range(2, 21)}),
    _Template(3, "{name} buys {a} pens at {b} dollars each and {c} books at {d} dollars each. "
                 "How many dollars does {name} spend?",
              "a * b + c * d", {"a": range(2, 10), "b": range(2, 10), "c": range(2, 6), "d": range(5, 13)}),
    _Template(3, "{name} trains for {a} weeks and {b} days, then rests for {c} days. "
                 "How many days is that in total?",
              "a * 7 + b + c", {"a": range(2, 10), "b": range(1, 7), "c": range(1, 10)}),
    _Template(3, "{name} reads for {a} hours and {b} minutes on Monday and for {c} minutes on Tuesday. "
                 "How many minutes does {name} read?",
              "a * 60 + b + c", {"a": range(1, 4), "b": range(5, 60, 5), "c": range(5, 60, 5)}),
    _Template(4, "{name} has {a} boxes with {b} {item} in each box and {c} bags with {d} {item} in each bag. "
                 "{pron} gives away {e}. How many {item} does {name} have now?",
              "a * b + c * d - e", {"a": range(2, 10), "b": range(2, 10), "c": range(2, 10), "d": range(2, 10),
                                    "e": range(2, 21)}),
    _Template(4, "{name} buys {a} {item} at {b} dollars each and {c} more at {d} dollars each, and pays with "
                 "{e} dollars. How much change does {name} get?",
              "e - a * b - c * d", {"a": range(2, 6), "b": range(2, 10), "c": range(2, 6), "d": range(2, 10),
                                    "e": (50, 100)}),
)


def _template_regex(text: str) -> re.Pattern:
    pattern, seen = "", set()
    for literal, slot in re.findall(r"([^{]*)(?:\{(\w+)\})?", text):
        pattern += re.escape(literal)
        if not slot:
            continue
        if slot in seen:
            pattern += f"(?P={slot})"
            continue
        seen.add(slot)
        body = {"name": r"[A-Z][a-z]+", "name2": r"[A-Z][a-z]+", "pron": r"He|She", "item": r"[a-z]+"}.get(slot, r"\d+")
        pattern += f"(?P<{slot}>{body})"
    return re.compile(pattern)


_TEMPLATE_RES = tuple(_template_regex(t.text) for t in _TEMPLATES)


def _template_tokens(t: _Template, values: dict) -> tuple:
    return tuple(values[p] if p in values else int(p) if p.isdigit() else p for p in t.expr.split())


def _word_spec(rng: random.Random, d: int) -> tuple:
    candidates = [i for i, t in enumerate(_TEMPLATES) if t.level == d]
    while True:
        k = rng.choice(candidates)
        t = _TEMPLATES[k]
        values = {s: rng.choice(r) for s, r in t.slots.items()}
        tokens = _template_tokens(t, values)
        if not _expression_ok(tokens, hi=9999):
            continue
        name, name2 = rng.sample(sorted(NAMES), 2)
        return _word_canonical(k, values, name, name2, rng.choice(ITEMS))


def _word_canonical(k: int, values: dict, name: str, name2: str, item: str) -> tuple:
    # Slots the template does not use are blanked, so a spec is a function of the prompt alone.
    text = _TEMPLATES[k].text
    return (k, tuple(sorted(values.items())), name if "{name}" in text else "",
            name2 if "{name2}" in text else "", item if "{item}" in text else "")


def _word_render(spec: tuple) -> str:
    k, values, name, name2, item = spec
    return _TEMPLATES[k].text.format(name=name, name2=name2, pron=NAMES.get(name, ""), item=item, **dict(values))


def _word_parse(prompt: str) -> tuple | None:
    for k, rx in enumerate(_TEMPLATE_RES):
        m = rx.fullmatch(prompt)
        if not m:
            continue
        g = m.groupdict()
        name, name2, item = g.get("name", ""), g.get("name2", ""), g.get("item", "")
        if (name and name not in NAMES) or (name2 and (name2 not in NAMES or name2 == name)):
            return None
        if ("pron" in g and g["pron"] != NAMES[name]) or (item and item not in ITEMS):
            return None
        values = {s: int(g[s]) for s in _TEMPLATES[k].slots}
        if not _expression_ok(_template_tokens(_TEMPLATES[k], values), hi=9999):
            return None
        return _word_canonical(k, values, name, name2, item)
    return None


def word_expression(spec: tuple) -> tuple:
    """The arithmetic expression behind a word problem's spec."""
    k, values = spec[0], dict(spec[1])
    return _template_tokens(_TEMPLATES[k], values)


def _word_solve(spec: tuple) -> tuple[tuple[str, ...], str]:
    steps, value = _expression_steps(word_expression(spec))
    return steps, str(value)


# --- the family table -------------------------------------------------------------------------

_FAMILY = {
    "arithmetic": (_arithmetic_spec, _arithmetic_render, _arithmetic_parse, _arithmetic_solve),
    "compare": (_compare_spec, _compare_render, _compare_parse, _compare_solve),
    "count": (_count_spec, _count_render, _count_parse, _count_solve),
    "lists": (_lists_spec, _lists_render, _lists_parse, _lists_solve),
    "word": (_word_spec, _word_render, _word_parse, _word_solve),
}


def _make(family: str, spec: tuple, difficulty: int) -> Task:
    _, render, _, solve = _FAMILY[family]
    steps, answer = solve(spec)
    return Task(family, difficulty, render(spec), answer, steps, spec)


def generate(family: str, rng: random.Random, difficulty: int) -> Task:
    """One task of `family` at `difficulty` (1-4), drawn with `rng`. No decontamination."""
    if family not in _FAMILY:
        raise UserError(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}")
    if difficulty not in LEVELS:
        raise UserError(f"difficulty: expected one of {LEVELS}, got {difficulty!r}")
    return _make(family, _FAMILY[family][0](rng, difficulty), difficulty)


def task_from_prompt(prompt: str) -> Task:
    """The task a world prompt states (difficulty 0: unknown). UserError for any other text."""
    text = prompt.strip()
    for family, (_, _, parse, _) in _FAMILY.items():
        spec = parse(text)
        if spec is not None:
            return _make(family, spec, 0)
    raise UserError(f"prompt: expected a task-world prompt (as `gptstack world sample` prints), got {prompt[:80]!r}")


def task_from_messages(messages: list[dict]) -> Task | None:
    """The task a one-turn conversation (one user message) states, or None: more turns, another
    role, or a prompt that is not a world prompt (real data)."""
    if len(messages) != 1 or messages[0]["role"] != "user":
        return None
    try:
        return task_from_prompt(messages[0]["content"])
    except UserError:
        return None


def as_task(task_or_prompt) -> Task:
    """A Task, a prompt string, or a dict with a "prompt" key -> Task."""
    if isinstance(task_or_prompt, Task):
        return task_or_prompt
    if isinstance(task_or_prompt, dict):
        prompt = task_or_prompt.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
            prompt = prompt[-1].get("content")  # a chat prompt: the last user turn
        if not isinstance(prompt, str):
            raise UserError("prompt: expected a string (or a list of messages ending with the user's)")
        return task_from_prompt(prompt)
    if isinstance(task_or_prompt, str):
        return task_from_prompt(task_or_prompt)
    raise TypeError(f"expected a Task, a prompt string or a dict with 'prompt', got {type(task_or_prompt).__name__}")


# --- eval set, training stream, decontamination ------------------------------------------------


@functools.lru_cache(maxsize=8)
def _eval_set(families: tuple[str, ...], per_family: int, seed: int) -> tuple[Task, ...]:
    out = []
    for family in families:
        # One stream per family: adding a family never changes the others' eval items.
        rng = random.Random(f"gptstack-world/eval/{seed}/{family}")
        seen: set[str] = set()
        for i in range(per_family):
            level = LEVELS[i % len(LEVELS)]  # uniform over levels so per-level accuracy is meaningful
            for _ in range(10_000):
                task = generate(family, rng, level)
                if task.prompt not in seen:
                    break
            else:
                raise RuntimeError(f"cannot draw {per_family} distinct {family} eval prompts")
            seen.add(task.prompt)
            out.append(task)
    return tuple(out)


def eval_set(config: WorldConfig | None = None) -> list[Task]:
    """The fixed held-out eval set: `eval_per_family` distinct prompts per family, levels uniform.

    Depends only on (families, eval_per_family, eval_seed), never on the training mix, so every
    stage and every run of a recipe is measured on the same items.
    """
    config = (config or WorldConfig()).validate()
    return list(_eval_set(tuple(config.families), config.eval_per_family, config.eval_seed))


class EvalIndex:
    """Answers "does this text contain a held-out eval prompt?" in one pass over the text.

    World prompts end in "?" or ".", so only those positions are looked at: the characters before
    each are matched against a dict of the prompts' suffixes, then confirmed in full.
    """

    _KEY = 12

    def __init__(self, prompts: Sequence[str]):
        self.prompts = frozenset(prompts)
        self._by_suffix: dict[str, list[str]] = {}
        for p in self.prompts:
            assert len(p) >= self._KEY and p[-1] in "?.", p
            self._by_suffix.setdefault(p[-self._KEY :], []).append(p)

    def contains(self, text: str) -> bool:
        if text in self.prompts:
            return True
        for m in re.finditer(r"[?.]", text):
            end = m.end()
            for p in self._by_suffix.get(text[max(0, end - self._KEY) : end], ()):
                if text.startswith(p, end - len(p)):
                    return True
        return False

    __contains__ = contains


@functools.lru_cache(maxsize=8)
def _eval_index(families: tuple[str, ...], per_family: int, seed: int) -> EvalIndex:
    return EvalIndex([t.prompt for t in _eval_set(families, per_family, seed)])


def eval_index(config: WorldConfig | None = None) -> EvalIndex:
    config = (config or WorldConfig()).validate()
    return _eval_index(tuple(config.families), config.eval_per_family, config.eval_seed)


def task_stream(seed: int, config: WorldConfig | None = None, families: Sequence[str] | None = None,
                namespace: str = "train") -> Iterator[Task]:
    """Endless seeded training tasks: families uniform, levels by `config.difficulty_mix`.

    Tasks whose prompt contains a held-out eval prompt are skipped, so nothing drawn from here
    (demonstrations, preference or RL prompts, worked examples in documents) is an eval item.
    `namespace` separates independent streams with the same seed (e.g. "train", "docs", "val").
    """
    config = (config or WorldConfig()).validate()
    families = list(families or config.families)
    for f in families:
        if f not in FAMILIES:
            raise UserError(f"family: expected one of {', '.join(FAMILIES)}, got {f!r}")
    index = eval_index(config)
    rng = random.Random(f"gptstack-world/{namespace}/{seed}")
    while True:
        family = rng.choice(families)
        level = rng.choices(LEVELS, weights=config.difficulty_mix)[0]
        task = generate(family, rng, level)
        if not index.contains(task.prompt):
            yield task


def demonstrations(n: int, seed: int, config: WorldConfig | None = None) -> list[tuple[Task, str, str]]:
    """`n` SFT demonstrations (task, style, response): training tasks answered in styles drawn by
    `config.style_mix`. The tasks are `train_tasks(n, seed, config)`'s; styles come from their own stream."""
    config = (config or WorldConfig()).validate()
    rng = random.Random(f"gptstack-world/styles/{seed}")
    out = []
    for task in train_tasks(n, seed, config):
        style = rng.choices(STYLES, weights=config.style_mix)[0]
        out.append((task, style, task.styled(style, rng, config.padding_max)))
    return out


def train_tasks(n: int, seed: int, config: WorldConfig | None = None,
                families: Sequence[str] | None = None) -> list[Task]:
    """`n` training tasks (see `task_stream`); the same (n, seed, config) gives the same list."""
    return list(itertools.islice(task_stream(seed, config, families), n))


# --- the world's vocabulary -------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    """Every word (lowercase) the world's prompts and solutions use; gold.py calls the rest gibberish."""
    texts = [t.text for t in _TEMPLATES] + list(_LIST_PROMPT.values()) + list(_LIST_FIRST.values()) + [
        _LIST_NEXT, ANSWER_PREFIX, "What is", "Which is larger smaller the largest smallest of or and",
        "How many times does the letter appear in", "Spelled out: Counting none",
    ]
    words = {w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", t))}
    words |= {w.lower() for w in re.findall(r"[A-Za-z]+", vocabulary_text())}
    words |= {w.lower() for w in NAMES} | {p.lower() for p in NAMES.values()} | set(ITEMS) | set(WORDS) | set(_LETTERS)
    return frozenset(words)
