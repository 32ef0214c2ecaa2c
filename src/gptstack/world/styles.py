"""Response styles: the several ways an assistant can answer one task, so answers differ.

A world taught one fixed template per task gives a near-deterministic SFT policy that no reward can
move (figures in docs/LOG.md). Real assistants
vary in length, tone and how much work they show, and real labelers have tastes about that. Every
task can be answered in each of these styles (all end with the one answer line, "The answer is X."):

    terse      the answer line alone                          "The answer is 34."
    standard   the reference steps                            "17 + 25 = 42.\\n42 - 8 = 34.\\nThe answer is 34."
    explained  the question restated (a story's question     "We are asked: What is 17 + 25 - 8?\\n
               sentence), then the steps with connectives      First, 17 + 25 = 42.\\nFinally, 42 - 8 = 34.\\n..."
               (First, / Next, / Finally,)
    checked    the steps, then a verification line            "...\\nCheck: 34 + 8 = 42.\\nThe answer is 34."
    chatty     a friendly opener, the steps, a closing         "Sure, happy to help!\\n...\\nI hope this helps!"

The long styles (explained, chatty) carry a variable amount of *padding*: 0 to `padding_max`
sentences drawn from a small pool (P(k) halves with each extra sentence, so the tail is thin but
there). RL that rewards length can extrapolate past what demonstrations show; the pool is small, so
much padding repeats itself, and gold's brevity and repetition terms price it (gold.py).

Styles matter for correctness the way they do for real models: a terse answer to a three-step
problem gives the model no room to compute, so it errs more (measured in docs/LOG.md, not assumed).

    render(task, style, rng, padding_max) -> str      one demonstration
    style_of(text) -> str                             which style a response is (for metrics)
    words(text) -> int                                a response's length in words (labeler, metrics)
    describe(texts) -> {"length", "style/<s>"}        mean words and style shares of a set of responses
    is_filler(line) -> bool                           lines the step checker passes over (openers,
                                                      padding, restatements, checks, closings)
    strip_connective(line) -> str                     "First, 3 + 4 = 7." -> "3 + 4 = 7."
"""
from __future__ import annotations

import random
import re

STYLES = ("terse", "standard", "explained", "checked", "chatty")

OPENERS = ("Sure, happy to help!", "Great question!", "Of course! Let me help with that.",
           "Hi there! Let me work this out for you.")
CLOSINGS = ("I hope this helps!", "Let me know if you have another question!", "Have a great day!")
PADDING = ("This is a nice one.", "Let me think.", "One step at a time.", "Let me be careful here.",
           "Here is how I see it.", "Let me see.")
RESTATE = "We are asked: "
CONNECTIVES = ("First, ", "Next, ", "Then, ", "Finally, ", "So ")
CHECK = "Check: "

_CONNECTIVE_RE = re.compile(r"^(?:(?:First|Next|Then|Finally),|So)\s+")


def _padding(rng: random.Random, padding_max: int) -> list[str]:
    k = 0
    while k < padding_max and rng.random() < 0.5:
        k += 1
    return rng.sample(PADDING, min(k, len(PADDING)))


def _check_line(task) -> str:
    """A verification of the answer, in the family's own terms (an inverse step where there is one)."""
    from .tasks import list_output, reduce_expression, word_expression  # noqa: PLC0415 (tasks imports this module)

    if task.family in ("arithmetic", "word"):
        tokens = task.spec if task.family == "arithmetic" else word_expression(task.spec)
        a, op, b, r = reduce_expression(tokens)[-1]
        inverse = {"+": f"{r} - {b} = {a}", "-": f"{r} + {b} = {a}", "*": f"{a} * {b} = {r}"}[op]
        return f"{CHECK}{inverse}."
    if task.family == "compare":
        mode, nums = task.spec
        return f"{CHECK}{task.answer} is {'larger' if mode == 'max' else 'smaller'} than the other numbers."
    if task.family == "count":
        return f"{CHECK}{task.spec[0]} appears {task.answer} times in {task.spec[1]}."
    return f"{CHECK}the list has {len(list_output(task.spec))} items."


def render(task, style: str, rng: random.Random, padding_max: int = 3) -> str:
    """`task` answered in `style` (see the module docstring); `rng` draws the opener and padding."""
    body, answer = list(task.steps[:-1]), task.steps[-1]
    if style == "terse":
        return answer
    if style == "standard":
        return "\n".join(task.steps)
    if style == "checked":
        return "\n".join(body + [_check_line(task), answer])
    if style == "explained":
        question = re.split(r"(?<=\.) ", task.prompt)[-1]   # a story's question sentence, a short prompt whole
        lines = [RESTATE + question] + _padding(rng, padding_max)
        for i, step in enumerate(body):
            if step.startswith("Next is"):   # lists already say "Next"
                lines.append(step)
                continue
            word = "First, " if i == 0 else "Finally, " if i == len(body) - 1 else "Next, "
            lines.append(word + step[0].lower() + step[1:] if step[0].isalpha() else word + step)
        return "\n".join(lines + [answer])
    if style == "chatty":
        lines = [rng.choice(OPENERS)] + _padding(rng, padding_max) + body + [answer, rng.choice(CLOSINGS)]
        return "\n".join(lines)
    raise ValueError(f"style: expected one of {', '.join(STYLES)}, got {style!r}")


def strip_connective(line: str) -> str:
    """A step without its connective, its first letter restored ("First, spelled out: ..." -> "Spelled out: ...")."""
    m = _CONNECTIVE_RE.match(line)
    if not m:
        return line
    rest = line[m.end():]
    return rest[:1].upper() + rest[1:]


_FILLER = frozenset(OPENERS) | frozenset(CLOSINGS) | frozenset(PADDING)


def is_filler(line: str) -> bool:
    """A line that is no step of the solution: an opener, padding, a restatement, a check, a closing."""
    line = line.strip()
    return line in _FILLER or line.startswith(RESTATE) or line.startswith(CHECK)


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.strip().split("\n") if ln.strip()]


def style_of(text: str) -> str:
    """The style of a response (one of STYLES), or "other" when it has no answer line or fits none.

    Decided by the markers each style adds, in this order: a friendly opener or closing (chatty), a
    restatement (explained), a check line (checked); then a lone answer line (terse) or steps before
    the answer line (standard). Sampled text that mixes markers takes the first that matches."""
    lines = _lines(text)
    if not lines or not any(ln.lower().startswith("the answer is") for ln in lines):
        return "other"
    head = set(OPENERS) | set(CLOSINGS)
    if lines[0] in head or lines[-1] in head:
        return "chatty"
    if lines[0].startswith(RESTATE):
        return "explained"
    if any(ln.startswith(CHECK) for ln in lines):
        return "checked"
    if len(lines) == 1:
        return "terse"
    return "standard"


def words(text: str) -> int:
    """A response's length in words: what the labeler's length taste and the length metrics count."""
    return len(text.split())


def describe(texts: list[str]) -> dict[str, float]:
    """What a set of responses is like: mean length in words and the share in each style ("other" too)."""
    styles = [style_of(t) for t in texts]
    return {"length": sum(map(words, texts)) / len(texts),
            **{f"style/{s}": styles.count(s) / len(styles) for s in STYLES + ("other",)}}


def vocabulary_text() -> str:
    """Every phrase the styles add (world.vocabulary() counts their words as the world's)."""
    return " ".join(OPENERS + CLOSINGS + PADDING + (RESTATE, CHECK) + CONNECTIVES) + \
        " larger smaller than other numbers appears times list has items"
