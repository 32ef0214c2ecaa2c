"""The gold reward and the step checker: ground truth every stage is measured against.

gold(task, response, ended=True) -> float in [0, 1]:

    gold = (0.8 * correct + 0.1 * format + 0.1 * brevity) * (1 - degenerate)

    correct    1 if the value after the last "The answer is" equals the task's answer
               (integers compared as numbers, lists item by item, words case-insensitively)
    format     1 if the response has exactly one answer line, written exactly "The answer is X."
               with X well-formed for the task, as its last step (a friendly closing may follow:
               styles.is_filler), and the response ended
    brevity    min(1, 1.5 * L_ref / L): L counts words, numbers and symbols; up to 1.5x the
               reference's (the standard style's) length is free, so a concise answer is preferred
               and padding costs. 0 when there is no answer line at all
    degenerate max of three penalties in [0, 1]:
               repetition  (r - 0.1) / 0.4 clipped, r = the larger of the fraction of steps that
                           repeat an earlier step and the fraction of repeated word 5-grams
               gibberish   (g - 0.1) / 0.3 clipped, g = the fraction of tokens that are neither
                           world vocabulary, words of the prompt, numbers nor plain punctuation
               unfinished  0.8 when the response did not end (no end token before the limit)

Correctness dominates (a right answer with poor form still beats any wrong one: >= 0.8 vs <= 0.2);
form and brevity only separate answers of equal correctness; degenerate text scores near 0 even
when its answer is right, so repetition or run-on text cannot be used to farm reward.
The reference solution scores exactly 1.0, a clean wrong answer 0.2, gibberish ~0.

check_steps(task, response) -> StepCheck: which steps of a response are correct.
A step is correct when it is a valid move from the true state of the problem:
    arithmetic, word  one "a op b = c" equation that reduces an adjacent pair of the current
                      expression which may legally go first (products first; + and - only where
                      no neighbouring product or preceding minus changes the meaning), with c right
    compare           "a < b" / "a > b" true, both numbers still candidates; the loser is dropped
    count             "Spelled out: ..." lists exactly the word's letters; "Counting x: 1, 2, ..."
                      counts exactly the occurrences ("none" for zero)
    lists             step k names the k-th item of the correct output
    answer line       its answer is correct
Filler lines (styles.is_filler: openers, padding, a restated question, check lines, closings) are
no steps of the solution and are marked right; step connectives ("First, ", "Next, ") are read past.
Steps after the first wrong one are marked wrong (a chain is only as good as its first error, the
labelling convention of process supervision datasets). Steps are separated by newlines or the
tokenizer's <|step|> marker; a line holding several sentences is split after each ". ".
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from .styles import is_filler, strip_connective
from .tasks import Task, as_task, list_output, vocabulary, word_expression

W_CORRECT, W_FORMAT, W_BREVITY = 0.8, 0.1, 0.1
BREVITY_SLACK = 1.5
UNFINISHED_PENALTY = 0.8
STEP_MARKER = "<|step|>"

_TOKEN_RE = re.compile(r"[A-Za-z]+|\d+|\S")
_PUNCT = set(".,?!:;'\"-+*=<>()$%")
_ANSWER_RE = re.compile(r"the answer is\b", re.IGNORECASE)
_WELL_FORMED = {"int": re.compile(r"The answer is -?\d+\."),
                "list": re.compile(r"The answer is [a-z0-9]+(?:, [a-z0-9]+)*\.")}


@dataclass(frozen=True)
class GoldScore:
    """The gold reward with its parts, for logging (`hack/repetition`, ...) and for tests."""

    score: float
    correct: bool
    format_ok: bool
    brevity: float
    repetition: float
    gibberish: float
    unfinished: float
    answer: str | None       # what the response answered (text after the last "The answer is")

    @property
    def degenerate(self) -> float:
        return max(self.repetition, self.gibberish, self.unfinished)


def _steps_and_filler(response: str) -> tuple[list[str], list[bool]]:
    steps, filler = [], []
    for line in re.split(r"\n|" + re.escape(STEP_MARKER), response):
        f = is_filler(line)
        for part in re.split(r"(?<=[.?!])\s+", line.strip()):
            if part.strip():
                steps.append(part.strip())
                filler.append(f)
    return steps, filler


def split_steps(response: str) -> list[str]:
    """A response's steps: split at newlines and <|step|> markers, then at sentence ends."""
    return _steps_and_filler(response)[0]


def extract_answer(response: str) -> str | None:
    """The text after the last "The answer is" (any case) up to the end of its sentence."""
    matches = list(_ANSWER_RE.finditer(response))
    if not matches:
        return None
    rest = response[matches[-1].end() :].split("\n")[0].split(STEP_MARKER)[0]
    return re.split(r"\.(?:\s|$)", rest.strip())[0].strip().rstrip(".").strip()


def _canonical(kind: str, text: str | None):
    if text is None:
        return None
    if kind == "int":
        m = re.search(r"-?\d+", text)
        return int(m.group()) if m else None
    items = tuple(x.lower() for x in re.findall(r"[A-Za-z]+|\d+", text))
    return items or None


def answers_match(task: Task, answer_text: str | None) -> bool:
    got = _canonical(task.answer_kind, answer_text)
    return got is not None and got == _canonical(task.answer_kind, task.answer)


def answer_key(task, response: str):
    """The response's final answer in the canonical form `is_correct` compares, None when it gives
    none: two responses with the same key give the same answer (a majority vote counts keys)."""
    task = as_task(task)
    return _canonical(task.answer_kind, extract_answer(response))


def is_correct(task, response: str) -> bool:
    """Whether the response's final answer is right (the `accuracy` of the eval protocol)."""
    task = as_task(task)
    return answers_match(task, extract_answer(response))


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


def repetition_rate(response: str) -> float:
    """max(fraction of steps repeating an earlier step, fraction of repeated word 5-grams).

    Single letters are left out of the n-grams: spelled-out words ("b, a, n, a, n, a") repeat
    letters by nature, not by degeneration."""
    steps = [" ".join(s.lower().split()) for s in split_steps(response)]
    dup_steps = (len(steps) - len(set(steps))) / len(steps) if steps else 0.0
    words = [w.lower() for w in _TOKEN_RE.findall(response.replace(STEP_MARKER, " "))
             if w not in ".,;:" and not (len(w) == 1 and w.isalpha())]
    grams = [tuple(words[i : i + 5]) for i in range(len(words) - 4)]
    dup_grams = (len(grams) - len(set(grams))) / len(grams) if grams else 0.0
    return max(dup_steps, dup_grams)


def gibberish_rate(task: Task, response: str) -> float:
    """Fraction of tokens that are not world words, prompt words, numbers (<= 6 digits) or punctuation."""
    tokens = _TOKEN_RE.findall(response.replace(STEP_MARKER, " "))
    if not tokens:
        return 0.0
    vocab = vocabulary()
    prompt_words = {w.lower() for w in re.findall(r"[A-Za-z]+", task.prompt)}
    bad = 0
    for t in tokens:
        if t.isdigit():
            bad += len(t) > 6
        elif t.isalpha():
            bad += t.lower() not in vocab and t.lower() not in prompt_words
        else:
            bad += t not in _PUNCT
    return bad / len(tokens)


def _length(text: str) -> int:
    return len(_TOKEN_RE.findall(text.replace(STEP_MARKER, " ")))


def score(task, response: str, ended: bool = True) -> GoldScore:
    """The gold reward with its parts (see the module docstring for the formula)."""
    task = as_task(task)
    answer = extract_answer(response)
    correct = answers_match(task, answer)
    steps, filler = _steps_and_filler(response)
    solution = [s for s, f in zip(steps, filler) if not f]   # a friendly closing may follow the answer line
    format_ok = bool(ended and solution and len(_ANSWER_RE.findall(response)) == 1
                     and _WELL_FORMED[task.answer_kind].fullmatch(solution[-1]))
    brevity = 0.0 if answer is None else min(1.0, BREVITY_SLACK * _length(task.reference) / max(_length(response), 1))
    repetition = _clip01((repetition_rate(response) - 0.1) / 0.4)
    gibberish = _clip01((gibberish_rate(task, response) - 0.1) / 0.3)
    unfinished = 0.0 if ended else UNFINISHED_PENALTY
    base = W_CORRECT * correct + W_FORMAT * format_ok + W_BREVITY * brevity
    total = base * (1.0 - max(repetition, gibberish, unfinished))
    return GoldScore(round(total, 6), correct, format_ok, brevity, repetition, gibberish, unfinished, answer)


def gold(task, response: str, ended: bool = True) -> float:
    """The gold reward in [0, 1] of `response` to `task` (a Task, a world prompt, or {"prompt": ...}).

    `ended`: whether generation stopped by itself (produced the end token) rather than at the limit.
    """
    return score(task, response, ended).score


# --- the step checker ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCheck:
    steps: list[str]
    correct: list[bool]
    first_error: int | None      # index of the first wrong step, None when all are right

    @property
    def all_correct(self) -> bool:
        return self.first_error is None and bool(self.steps)


_EQUATION_RE = re.compile(r"(\d+)\s*([-+*x×])\s*(\d+)\s*=\s*(-?\d+)")
_RELATION_RE = re.compile(r"(\d+)\s*([<>=])\s*(\d+)")


def _legal(tokens: list, i: int) -> bool:
    """May the pair around operator index `i` be reduced first without changing the value?"""
    op = tokens[i]
    if op == "*":
        return True
    prev_op = tokens[i - 2] if i >= 2 else None
    next_op = tokens[i + 2] if i + 2 < len(tokens) else None
    return prev_op in (None, "+") and next_op != "*"


def _check_expression(tokens: tuple, steps: list[str]) -> list[bool]:
    state = list(tokens)
    out = []
    for step in steps:
        eqs = _EQUATION_RE.findall(step)
        ok = bool(eqs)
        for a, op, b, c in eqs:
            a, b, c, op = int(a), int(b), int(c), {"x": "*", "×": "*"}.get(op, op)
            commutes = op in "+*"
            match = None
            for i in range(1, len(state), 2):
                if state[i] != op or not _legal(state, i):
                    continue
                x, y = state[i - 1], state[i + 1]
                if (x, y) == (a, b) or (commutes and (x, y) == (b, a)):
                    match = i
                    break
            value = None if match is None else (a * b if op == "*" else a + b if op == "+" else a - b)
            if match is None or value != c:
                ok = False
                break
            state[match - 1 : match + 2] = [c]
        out.append(ok)
    return out


def _check_compare(spec: tuple, steps: list[str]) -> list[bool]:
    mode, nums = spec
    alive = set(nums)
    out = []
    for step in steps:
        rels = _RELATION_RE.findall(step)
        ok = bool(rels)
        for a, rel, b in rels:
            a, b = int(a), int(b)
            true = (a < b) if rel == "<" else (a > b) if rel == ">" else a == b
            if not true or a == b or a not in alive or b not in alive:
                ok = False
                break
            alive.discard(min(a, b) if mode == "max" else max(a, b))
        out.append(ok)
    return out


def _check_count(spec: tuple, steps: list[str]) -> list[bool]:
    letter, word = spec
    k = word.count(letter)
    out = []
    for step in steps:
        low = step.lower()
        if low.startswith("spelled out"):
            letters = re.findall(r"\b[a-z]\b", low.split(":", 1)[-1])
            out.append(letters == list(word))
        elif low.startswith("counting"):
            head, _, tally = low.partition(":")
            said = head.split()[-1] if head.split() else ""
            nums = [int(x) for x in re.findall(r"\d+", tally)]
            zero = "none" in tally and not nums
            out.append(said == letter and (nums == list(range(1, k + 1)) if k else zero))
        else:
            out.append(False)
    return out


def _check_lists(spec: tuple, steps: list[str]) -> list[bool]:
    expected = list_output(spec)
    out = []
    for k, step in enumerate(steps):
        m = re.search(r"\bis\s+([A-Za-z]+|\d+)\.?$", step.strip())
        out.append(bool(m) and k < len(expected) and m.group(1).lower() == expected[k])
    return out


def check_steps(task, response: str) -> StepCheck:
    """Which steps of `response` are correct, and where the first wrong one is (see module doc)."""
    task = as_task(task)
    steps, filler = _steps_and_filler(response)
    # Answer lines are judged by their answer wherever they stand; filler (openers, padding, the
    # restated question, check lines, closings) is no step and passes; the rest by the family's rules.
    is_answer = [_ANSWER_RE.search(s) is not None for s in steps]
    body = [strip_connective(s) for s, a, f in zip(steps, is_answer, filler) if not a and not f]
    if task.family == "arithmetic":
        body_marks = _check_expression(task.spec, body)
    elif task.family == "word":
        body_marks = _check_expression(word_expression(task.spec), body)
    elif task.family == "compare":
        body_marks = _check_compare(task.spec, body)
    elif task.family == "count":
        body_marks = _check_count(task.spec, body)
    else:
        body_marks = _check_lists(task.spec, body)
    it = iter(body_marks)
    marks = [True if f else answers_match(task, extract_answer(s)) if a else next(it)
             for s, a, f in zip(steps, is_answer, filler)]
    first = next((i for i, ok in enumerate(marks) if not ok), None)
    if first is not None:
        marks = marks[:first] + [False] * (len(marks) - first)
    return StepCheck(steps, marks, first)


def step_labels(task, response: str) -> list[int]:
    """1/0 per step (for PRM training data): check_steps(...).correct as ints."""
    return [int(ok) for ok in check_steps(task, response).correct]


def summarize(scores: list[GoldScore]) -> dict:
    """Mean gold, accuracy, format rate and hack indicators over a batch, as flat metric keys."""
    n = max(len(scores), 1)
    c = Counter()
    for s in scores:
        c["gold/reward"] += s.score
        c["gold/accuracy"] += s.correct
        c["gold/format_ok"] += s.format_ok
        c["hack/repetition"] += s.repetition
        c["hack/gibberish"] += s.gibberish
    return {k: v / n for k, v in c.items()} if scores else {}
