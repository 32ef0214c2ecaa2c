"""The evaluation protocol (DESIGN.md): one function every policy stage reports through.

On the world's fixed held-out eval set (100 prompts per family, never trained on):
  - `eval/accuracy`: greedy decoding, final answer correct; per family and with a Wilson 95 %
    interval (`eval/accuracy_ci95`), so a claim that one stage beats another can say whether the
    intervals separate;
  - `eval/gold_reward`, `eval/format_ok`, `eval/pass@k`: k samples per prompt at T = 1, and what
    those samples are like: `eval/pass@1` (their accuracy), `eval/length` (mean words),
    `eval/style/<style>` (share in each response style, world/styles.py) and `eval/entropy` (mean
    nats per response: minus its log-likelihood, a Monte-Carlo estimate of the policy's entropy);
    greedy accuracy shows the mode, these show the distribution RL reweights;
  - `eval/kl_to_sft`: KL(policy || SFT) on those samples, summed over response tokens, averaged
    over samples (0 for the SFT model itself);
  - everything at a fixed seed, so two stages see the same prompts and the same random draws,
    and two stages' greedy answers pair up prompt by prompt (`paired_comparison`: the sharper test
    of "one beats the other" than two separate intervals; the report card states it beside its claims).

A chat model is prompted with the chat template and stops at <|assistant_end|>. A base model is
prompted few-shot in the plain-text layout its pretraining documents use ("Question: ...\\nAnswer:
\\n...", up to `eval.few_shot` examples, as many as fit the context) and its answer ends at the
first blank line (the example separator of those documents).
"""
from __future__ import annotations

import math
from collections import defaultdict

from .. import world
from ..tokenizer import ASSISTANT_END, Tokenizer
from .config import EvalConfig


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> list[float]:
    """95 % Wilson score interval for a binomial proportion (sound near 0 and 1, unlike p ± 2σ)."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def paired_comparison(a_correct: list[bool], b_correct: list[bool]) -> dict:
    """Two policies graded on the same prompts (a_correct[i], b_correct[i]: prompt i): the paired test,
    stronger than two independent Wilson intervals because it looks only where the policies disagree.

    b = prompts A gets right and B wrong, c = the reverse, n = prompts. Returns {"n", "b", "c",
    "difference": (b - c) / n (= accuracy A - accuracy B), "ci95": [lo, hi], "p_mcnemar"}.

    The interval is Newcombe's method 10 (Newcombe 1998, Stat. Med. 17:2635, "square and add"): the
    Wilson intervals [l1, u1] of p1 = accuracy A and [l2, u2] of p2 = accuracy B, combined with the
    correlation phi of the 2x2 table (r = both right, b, c, s = both wrong; the margins' product
    M = (r + b)(c + s)(r + c)(b + s)), with d = (b - c) / n:
        lo = d - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        hi = d + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)
    phi = (rs - bc - n/2) / sqrt(M) when rs - bc > n/2, 0 when 0 <= rs - bc <= n/2, (rs - bc) / sqrt(M)
    when rs - bc < 0, and 0 when M = 0 (as Newcombe, and Altman et al., Statistics with Confidence,
    2000). p_mcnemar: McNemar's exact two-sided test, the binomial probability of a split of the
    b + c discordant prompts at least as uneven as b : c at 1/2 (1 when b + c = 0)."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired_comparison: {len(a_correct)} and {len(b_correct)} answers; pairs need the same prompts")
    n = len(a_correct)
    if n == 0:
        raise ValueError("paired_comparison: no prompts")
    both = sum(1 for x, y in zip(a_correct, b_correct) if x and y)
    b = sum(1 for x, y in zip(a_correct, b_correct) if x and not y)
    c = sum(1 for x, y in zip(a_correct, b_correct) if y and not x)
    neither = n - both - b - c
    p1, p2 = (both + b) / n, (both + c) / n
    (l1, u1), (l2, u2) = wilson_interval(both + b, n), wilson_interval(both + c, n)
    margins = (both + b) * (c + neither) * (both + c) * (b + neither)
    cross = both * neither - b * c
    phi = 0.0
    if margins:
        phi = (cross - n / 2 if cross > n / 2 else min(cross, 0)) / math.sqrt(margins)
    d = (b - c) / n
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    m = b + c
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1))
    return {"n": n, "b": b, "c": c, "difference": d, "ci95": [max(-1.0, lo), min(1.0, hi)],
            "p_mcnemar": min(1.0, 2 * tail / 2 ** m)}


def few_shot_prompt(tokenizer: Tokenizer, question: str, shots: list[list[int]], budget: int) -> list[int]:
    """<|bos|> + as many of the fixed worked examples as fit in `budget` tokens + the question.

    The examples come from the training stream (never eval items), in the layout of the
    pretraining documents; a long question gets fewer of them rather than a truncated one."""
    tail = tokenizer.encode(f"Question: {question}\nAnswer:\n")
    used: list[int] = []
    for shot in shots:
        if 1 + len(used) + len(shot) + len(tail) > budget:
            break
        used += shot
    return [tokenizer.bos_id, *used, *tail]


def _cut_base_response(text: str) -> tuple[str, bool]:
    cut = text.find("\n\n")
    return (text[:cut], True) if cut >= 0 else (text, False)


def evaluate_policy(model, tokenizer: Tokenizer, world_config: world.WorldConfig, cfg: EvalConfig,
                    chat: bool = True, reference_model=None, prefix: str = "eval",
                    reward_model=None) -> tuple[dict, list[dict]]:
    """The protocol's figures for `model` (see the module docstring) as flat summary.json keys,
    and the greedy response to every eval prompt (for eval_samples.jsonl: look, don't just count)."""
    from ..engine import generate  # noqa: PLC0415 (the engine pulls in the model; configs import this package)

    model.eval()
    tasks = world.eval_set(world_config)
    if cfg.limit:
        tasks = tasks[: cfg.limit]
    if chat:
        prompts = [tokenizer.render_prompt([{"role": "user", "content": t.prompt}]) for t in tasks]
        stop = [tokenizer.special(ASSISTANT_END)]
    else:
        shots = [tokenizer.encode(world.task_document(t) + "\n\n")
                 for t in world.train_tasks(cfg.few_shot, seed=12345, config=world_config)]
        budget = model.config.block_size - cfg.max_new_tokens
        prompts = [few_shot_prompt(tokenizer, t.prompt, shots, budget) for t in tasks]
        stop = []

    def texts(completions) -> list[tuple[str, bool]]:
        out = []
        for c in completions:
            tokens = c.tokens[:-1] if c.finished and chat else c.tokens
            text = tokenizer.decode(tokens)
            out.append((text, c.finished) if chat else _cut_base_response(text))
        return out

    greedy = generate(model, prompts, cfg.max_new_tokens, n=1, temperature=0.0, stop_ids=stop,
                      seed=cfg.seed, batch_size=cfg.batch_size)
    sampled = generate(model, prompts, cfg.max_new_tokens, n=cfg.k, temperature=1.0, stop_ids=stop,
                       seed=cfg.seed + 1, batch_size=cfg.batch_size)

    correct_by_family: dict[str, list[bool]] = defaultdict(list)
    gold_scores, passes, samples_out, sample_texts_all = [], [], [], []
    for task, g, samples in zip(tasks, greedy, sampled):
        (text, _), = texts(g)
        correct_by_family[task.family].append(world.is_correct(task, text))
        sample_texts = texts(samples)
        scored = [world.score(task, t, ended) for t, ended in sample_texts]
        gold_scores += scored
        passes.append(any(s.correct for s in scored))
        sample_texts_all += [t for t, _ in sample_texts]
        samples_out.append({"family": task.family, "difficulty": task.difficulty, "prompt": task.prompt,
                            "response": text, "correct": correct_by_family[task.family][-1]})

    n_correct = sum(sum(v) for v in correct_by_family.values())
    n = len(tasks)
    gold = world.summarize(gold_scores)
    out = {
        f"{prefix}/accuracy": n_correct / n,
        f"{prefix}/accuracy_ci95": wilson_interval(n_correct, n),
        **{f"{prefix}/accuracy/{fam}": sum(v) / len(v) for fam, v in sorted(correct_by_family.items())},
        f"{prefix}/gold_reward": gold["gold/reward"],
        f"{prefix}/format_ok": gold["gold/format_ok"],
        f"{prefix}/pass@{cfg.k}": sum(passes) / n,
        f"{prefix}/pass@1": gold["gold/accuracy"],
        f"{prefix}/entropy": -sum(sum(c.logprobs) for samples in sampled for c in samples) / len(sample_texts_all),
        **{f"{prefix}/{k}": v for k, v in world.describe(sample_texts_all).items()},
        f"{prefix}/n_prompts": n,
    }
    if reward_model is not None:  # the proxy's view of the same T = 1 samples (RL stages: eval/proxy_score)
        from ..model.heads import score_ids
        scores = score_ids(reward_model, [p + c.tokens for p, samples in zip(prompts, sampled) for c in samples],
                           cfg.batch_size)
        out[f"{prefix}/proxy_score"] = sum(scores) / len(scores)
    if reference_model is None:
        out[f"{prefix}/kl_to_sft"] = 0.0
    else:
        flat_prompts = [p for p, samples in zip(prompts, sampled) for _ in samples]
        flat_tokens = [c.tokens for samples in sampled for c in samples]
        from ..engine.rollout import sequence_logprobs  # noqa: PLC0415 (as generate above)
        policy_lp = sequence_logprobs(model, flat_prompts, flat_tokens)
        ref_lp = sequence_logprobs(reference_model, flat_prompts, flat_tokens)
        out[f"{prefix}/kl_to_sft"] = sum(a - b for a, b in zip(policy_lp, ref_lp)) / len(flat_tokens)
    return out, samples_out
