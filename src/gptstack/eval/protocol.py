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

from collections import defaultdict

from .. import world
from ..tokenizer import Tokenizer
from .config import EvalConfig
from .problems import cut_base_response, greedy_accuracy, world_problems
from .stats import paired_comparison, wilson_interval

__all__ = ["evaluate_policy", "few_shot_prompt", "paired_comparison", "wilson_interval"]


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
        stop = tokenizer.turn_end_ids
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
            out.append((text, c.finished) if chat else cut_base_response(text))
        return out

    _, greedy = greedy_accuracy(model, tokenizer, world_problems(tasks), cfg.max_new_tokens, prompts=prompts, chat=chat,
                                seed=cfg.seed, batch_size=cfg.batch_size, truncate=False)
    sampled = generate(model, prompts, cfg.max_new_tokens, n=cfg.k, temperature=1.0, stop_ids=stop,
                       seed=cfg.seed + 1, batch_size=cfg.batch_size)

    correct_by_family: dict[str, list[bool]] = defaultdict(list)
    gold_scores, passes, samples_out, sample_texts_all = [], [], [], []
    for task, g, samples in zip(tasks, greedy, sampled):
        correct_by_family[task.family].append(g["correct"])
        sample_texts = texts(samples)
        scored = [world.score(task, t, ended) for t, ended in sample_texts]
        gold_scores += scored
        passes.append(any(s.correct for s in scored))
        sample_texts_all += [t for t, _ in sample_texts]
        samples_out.append({"family": task.family, "difficulty": task.difficulty, "prompt": task.prompt,
                            "response": g["response"], "correct": g["correct"]})

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
