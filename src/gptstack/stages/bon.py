"""Best-of-N: sample n responses, keep the one the reward model likes best — and watch gold.

    gptstack bon --policy runs/tiny/sft --rm runs/tiny/rm --out runs/tiny
    gptstack bon --policy runs/tiny/sft --rm runs/tiny/rm --n 1,2,4,8,16,32,64 --out runs/tiny

On the world's fixed held-out eval set (bon.prompts = 0: all of it), the policy samples N = max(n)
responses per prompt once (T = bon.temperature). For each n, the N samples are cut into N // n
disjoint consecutive subsets; in each the RM's argmax (first one on a tie) is picked, and the pick's
proxy (RM) score, gold reward and correctness are averaged over subsets and prompts. Averaging over
disjoint subsets rather than taking only the first n is the same expectation with less variance
(at n = 1 it is the mean over all N samples).

The KL of best-of-n to the policy is the analytic KL_bon = log n - (n - 1)/n (Stiennon et al. 2020;
an upper bound, tight when the samples are distinct: Beirami et al. 2024), d = sqrt(KL_bon), and
gold is fitted as in Gao et al. (2023):

    gold(n) - gold(1) = d (alpha - beta d)      least squares over the n > 1 points, with R^2

Gao et al.'s forms pass through the origin: they model the *gain* over the initial policy (d = 0 is
the policy itself), so the fit is of gold minus its n = 1 value, and R^2 is taken over the n > 1
points (n = 1 is the origin by construction and would only flatter R^2). The RM and the policy must
share a tokenizer (checked). Writes RUN/bon: summary.json (by_n, fit/*), metrics.jsonl (one line
per n, "step" = n) and samples.jsonl (per prompt the first sample and the best of N, to look at).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import world
from ..common import UserError, atomic_write_text
from ..config import Config
from ..engine.scoring import score_texts
from ..eval.fits import fit_gain, kl_bon
from ..eval.stats import pick_best
from ..rundir import (adopt_model, check_same_tokenizer, check_vocab, load_scalar_model, load_stage, stamped_config,
                      weights_digest, write_config, write_summary)
from ..train.dist import print0
from ..train.metrics import MetricsLogger

STAGE = "bon"
BLOCK = 32  # prompts per generate call (a progress-bar step)


def best_of_n_table(ns: list[int], proxy: np.ndarray, gold: np.ndarray, correct: np.ndarray) -> list[dict]:
    """(P, N) arrays -> one row per n: {"n", "kl", "d", "proxy", "gold", "accuracy", "subsets"}."""
    rows = []
    for n in ns:
        pick = pick_best(proxy, n)
        take = lambda a: float(np.take_along_axis(a, pick, axis=1).mean())  # noqa: E731
        kl = kl_bon(n)
        rows.append({"n": n, "kl": kl, "d": math.sqrt(kl), "proxy": take(proxy), "gold": take(gold),
                     "accuracy": take(correct.astype(np.float64)), "subsets": proxy.shape[1] // n})
    return rows


def run(cfg: Config, policy_dir: str | Path, rm_dir: str | Path, out: str | Path, fresh: bool = False) -> dict:
    t_start = time.perf_counter()
    bc = cfg.bon
    if bc.threads:
        torch.set_num_threads(bc.threads)
    ns = sorted(set(bc.n))
    if not ns or ns[0] < 1 or sum(n > 1 for n in ns) < 2:
        raise UserError(f"bon.n: expected positive integers with at least two above 1 (to fit d(alpha - beta d)), "
                        f"got {bc.n}")
    policy_dir, rm_dir, stage_dir = Path(policy_dir), Path(rm_dir), Path(out) / STAGE
    check_same_tokenizer(policy_dir, rm_dir)
    policy, policy_cfg, tok = load_stage(policy_dir)
    rm, _ = load_scalar_model(rm_dir, "reward")
    check_vocab(rm.config.vocab_size, tok, rm_dir)
    cfg = adopt_model(cfg, policy_cfg)
    inputs = {"inputs/policy_sha256": weights_digest(policy_dir), "inputs/rm_sha256": weights_digest(rm_dir)}
    if (stage_dir / "summary.json").exists() and not fresh and (stage_dir / "config.json").exists():
        done = json.loads((stage_dir / "summary.json").read_text())
        same_config = json.loads((stage_dir / "config.json").read_text()) == \
            json.loads(json.dumps(stamped_config(stage_dir, cfg.to_dict())))
        if same_config and all(done.get(k) == v for k, v in inputs.items()):
            print0(f"bon: {stage_dir} is done with this config, policy and RM (--fresh to run again)")
            return done

    tasks = world.eval_set(cfg.world)
    tasks = tasks[: bc.prompts] if bc.prompts else tasks
    N = ns[-1]

    # --- sample N per prompt once -----------------------------------------------------------------
    from ..engine import generate  # noqa: PLC0415
    from ..engine.sampling import stream_seed  # noqa: PLC0415

    ends = tok.turn_end_ids
    messages = [[{"role": "user", "content": t.prompt}] for t in tasks]
    texts, ended = [], []
    policy.eval()
    bar = tqdm(total=len(tasks) * N, desc=f"bon: sample {N} per prompt", unit="sample", dynamic_ncols=True,
               mininterval=1.0)
    for c0 in range(0, len(tasks), BLOCK):
        prompts = [tok.render_prompt(m) for m in messages[c0 : c0 + BLOCK]]
        # the engine keys its random streams by the index within a call: a seed per fixed block of
        # prompts keeps the samples independent of bon.batch_size
        for completions in generate(policy, prompts, bc.max_new_tokens, n=N, temperature=bc.temperature,
                                    stop_ids=ends, seed=stream_seed(bc.seed, c0, 1 << 20), batch_size=bc.batch_size):
            texts.append([tok.decode([x for x in c.tokens if x not in ends]).strip() for c in completions])
            ended.append([c.finished for c in completions])
            bar.update(N)
    bar.close()

    # --- score: proxy (the RM, as it was trained: text re-encoded) and gold -------------------------
    flat = score_texts(rm, tok, [m for m in messages for _ in range(N)], [x for row in texts for x in row],
                       [e for row in ended for e in row], bc.score_batch_size)
    proxy = np.asarray(flat, dtype=np.float64).reshape(len(tasks), N)
    scored = [[world.score(t, x, e) for x, e in zip(row, erow)] for t, row, erow in zip(tasks, texts, ended)]
    gold = np.array([[s.score for s in row] for row in scored])
    correct = np.array([[s.correct for s in row] for row in scored])

    # --- best-of-n for each n, and the fit ----------------------------------------------------------
    by_n = best_of_n_table(ns, proxy, gold, correct)
    base = float(gold.mean())  # gold at n = 1 (the mean over all N samples)
    fitted = [r for r in by_n if r["n"] > 1]
    alpha, beta, r2 = fit_gain([r["d"] for r in fitted], [r["gold"] - base for r in fitted])
    summary = {"by_n": by_n, "fit/alpha": alpha, "fit/beta": beta, "fit/r2": r2,
               "fit/target": "gold(n) - gold(1) = d (alpha - beta d), least squares over n > 1",
               "gold/n1": base, "proxy/n1": float(proxy.mean()), "prompts": len(tasks), "samples_per_prompt": N,
               **inputs, "wall_seconds": time.perf_counter() - t_start}

    best = pick_best(proxy, N)[:, 0]
    atomic_write_text(stage_dir / "samples.jsonl", "".join(json.dumps({
        "prompt": t.prompt, "family": t.family, "first": texts[i][0], "first_gold": gold[i, 0],
        "first_proxy": proxy[i, 0], f"best_of_{N}": texts[i][best[i]], "best_gold": gold[i, best[i]],
        "best_proxy": proxy[i, best[i]]}) + "\n" for i, t in enumerate(tasks)))
    write_config(stage_dir, cfg.to_dict())
    write_summary(stage_dir, summary)
    metrics = MetricsLogger(stage_dir, log=cfg.log, config=cfg.to_dict())  # one line per n ("step" = n), for plots against n
    for r in by_n:
        metrics.log(r["n"], **{f"bon/{k}": r[k] for k in ("kl", "d", "proxy", "gold", "accuracy")})
    metrics.close()
    for r in by_n:
        print0(f"bon: n={r['n']:>3}  d={r['d']:.2f}  proxy {r['proxy']:+.3f}  gold {r['gold']:.3f}  "
               f"accuracy {r['accuracy']:.1%}")
    print0(f"bon: gold gain = d ({alpha:.3f} - {beta:.3f} d), R^2 {r2 if r2 is None else round(r2, 3)}; wrote {stage_dir}")
    return summary
