"""Problems with checkable answers, and the one greedy-accuracy evaluator every stage uses.

    problems = world_problems(world.eval_set(config))        # world tasks: world.is_correct
    problems = file_problems(read_dataset("gsm8k.jsonl").rows)  # prompt + answer rows: check_answer
    figures, samples = greedy_accuracy(policy, tok, problems, max_new_tokens=64)

A Problem is what a stage needs to grade a response to a prompt: whether a response is right, and
its final answer in a canonical form (for a majority vote). The eval protocol (protocol.py), the
RM stage's policy accuracy, the RL stages' held-out answer accuracy and the search stage all grade
through these.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import world
from ..data.formats import check_answer, extract_final_answer
from ..engine import generate
from ..tokenizer import Tokenizer
from .stats import wilson_interval


@dataclass
class Problem:
    messages: list[dict]                  # the prompt, ending with the user's turn
    is_right: Callable[[str], bool]       # checks a full response text
    answer_key: Callable[[str], object]   # the final answer, normalised (majority vote); None: no answer
    answer: str | None = None             # the reference answer
    task: world.Task | None = None        # world prompts: the task

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


def world_problems(tasks: Sequence[world.Task]) -> list[Problem]:
    return [Problem([{"role": "user", "content": t.prompt}], lambda text, t=t: world.is_correct(t, text),
                    lambda text, t=t: world.answer_key(t, text), t.answer, t) for t in tasks]


def numeric_key(text: str):
    """A GSM8K-style final answer as a number (as text when it is not one); None: no answer."""
    got = extract_final_answer(text)
    if got is None:
        return None
    try:
        return float(got)
    except ValueError:
        return got.strip().lower()


def file_problem(messages: list[dict], answer: str) -> Problem:
    """A prompt with a reference answer, checked like GSM8K (`check_answer`)."""
    return Problem(messages, lambda text, a=answer: check_answer(text, a), numeric_key, answer)


def file_problems(rows: Sequence[dict]) -> list[Problem]:
    """Verifiable rows ({"prompt": messages, "answer": ...}) -> Problems."""
    return [file_problem(r["prompt"], r["answer"]) for r in rows]


def cut_base_response(text: str) -> tuple[str, bool]:
    """A base model's answer ends at the first blank line (the separator of its few-shot examples)."""
    cut = text.find("\n\n")
    return (text[:cut], True) if cut >= 0 else (text, False)


def greedy_accuracy(model, tok: Tokenizer, problems: Sequence[Problem], max_new_tokens: int, *,
                    prompts: Sequence[Sequence[int]] | None = None, chat: bool = True, seed: int = 0,
                    batch_size: int | None = None, truncate: bool = True, prefix: str = "eval") -> tuple[dict, list[dict]]:
    """Greedy decoding of every problem, graded -> ({prefix}/accuracy, /accuracy_ci95 (Wilson),
    /n_prompts}, one {"prompt", "response", "answer", "correct"} per problem).

    prompts: the rendered prompts (default: each problem's messages through the chat template); a
    chat model stops at <|assistant_end|>, a base model (chat=False) at the first blank line."""
    model.eval()
    ends = tok.turn_end_ids if chat else []
    if prompts is None:
        prompts = [tok.render_prompt(p.messages) for p in problems]
    out = generate(model, prompts, max_new_tokens, n=1, temperature=0.0, stop_ids=ends, seed=seed,
                   batch_size=batch_size, truncate=truncate)
    texts = [tok.decode([t for t in c.tokens if t not in ends]) if chat else cut_base_response(tok.decode(c.tokens))[0]
             for (c,) in out]
    samples = [{"prompt": p.prompt, "response": text, "answer": p.answer, "correct": p.is_right(text)}
               for p, text in zip(problems, texts)]
    n_correct = sum(s["correct"] for s in samples)
    return {f"{prefix}/accuracy": n_correct / len(problems), f"{prefix}/accuracy_ci95": wilson_interval(n_correct, len(problems)),
            f"{prefix}/n_prompts": len(problems)}, samples
