"""Comparison collection: K responses per prompt from the SFT policy, ranked by the simulated labeler.

    gptstack prefs --from runs/tiny/sft --out runs/tiny                     # world prompts, K = 4
    gptstack prefs --from runs/tiny/sft --k 8 --prompts 500 --out runs/tiny
    gptstack prefs --rankings comparisons.jsonl --out runs/tiny             # labels from a file instead
    gptstack prefs export runs/tiny --out prefs.jsonl [--kwise]             # labels collected in `gptstack serve`

Prompts are world training tasks (a stream of their own, never an eval item). Each gets K samples
at prefs.temperature from the engine; the labeler (world/labeler.py: Bradley–Terry noise and a
liking for length, both pinned by the recipe's [world] section) ranks them. Before ranking, a
prompt's samples are de-duplicated (same text and same ended: a comparison of a response with
itself teaches nothing) and empty ones dropped; a prompt left with fewer than 2 distinct responses
is skipped; all of it is counted in summary.json.

Writes RUN/prefs/prefs.jsonl, one K-wise row per prompt in the ranking format every reader takes
(data/formats.py; the RM and DPO stages read it):
    {"prompt": [{"role": "user", "content": ...}], "responses": [K strings], "ranking": [best first],
     "ended": [K booleans], "gold": [K gold rewards], "family": ..., "difficulty": ...}
With --rankings, the file's comparisons (TRL prompt/chosen/rejected, hh-rlhf, K-wise rankings) are
validated and written in the same form (gold added for world prompts). An existing prefs.jsonl is
never overwritten without --fresh: labels already collected are kept.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

from tqdm.auto import tqdm

from .. import world
from ..common import UserError, atomic_write_text
from ..config import Config
from ..data.comparisons import load_preferences
from ..data.feedback import gold_agreement
from ..rundir import write_config, write_summary
from ..train.dist import print0

STAGE = "prefs"
BLOCK = 256  # prompts per generate call (a progress-bar step)


def distinct_responses(texts: list[str], ended: list[bool]) -> tuple[list[int], int, int]:
    """Indices of the first of each distinct non-empty (text, ended), and how many were
    (duplicates, empty)."""
    seen, keep, duplicates, empty = set(), [], 0, 0
    for i, (t, e) in enumerate(zip(texts, ended)):
        if not t.strip():
            empty += 1
        elif (t, e) in seen:
            duplicates += 1
        else:
            seen.add((t, e))
            keep.append(i)
    return keep, duplicates, empty


def collect(policy, tok, cfg: Config) -> tuple[list[dict], dict]:
    """Sample, de-duplicate and rank: -> (rows, counts)."""
    from ..engine import generate  # noqa: PLC0415
    from ..engine.sampling import stream_seed  # noqa: PLC0415

    pc = cfg.prefs
    tasks = world.train_tasks(pc.prompts, seed=pc.seed, config=cfg.world)
    labeler = world.Labeler.from_config(cfg.world)
    ends = tok.turn_end_ids
    rows, counts = [], {"prefs/duplicates": 0, "prefs/empty": 0, "prefs/skipped/fewer_than_2_distinct": 0}
    policy.eval()
    bar = tqdm(total=len(tasks), desc="prefs", unit="prompt", dynamic_ncols=True, mininterval=1.0)
    for c0 in range(0, len(tasks), BLOCK):
        chunk = tasks[c0 : c0 + BLOCK]
        prompts = [tok.render_prompt([{"role": "user", "content": t.prompt}]) for t in chunk]
        # the engine keys its random streams by the index within a call: a seed per fixed block of
        # prompts keeps the samples independent of prefs.batch_size
        samples = generate(policy, prompts, pc.max_new_tokens, n=pc.k, temperature=pc.temperature, stop_ids=ends,
                           seed=stream_seed(pc.seed, c0, 1 << 20), batch_size=pc.batch_size)
        for i, (task, completions) in enumerate(zip(chunk, samples), start=c0):
            texts = [tok.decode([x for x in c.tokens if x not in ends]).strip() for c in completions]
            ended = [c.finished for c in completions]
            keep, dup, empty = distinct_responses(texts, ended)
            counts["prefs/duplicates"] += dup
            counts["prefs/empty"] += empty
            if len(keep) < 2:
                counts["prefs/skipped/fewer_than_2_distinct"] += 1
                continue
            responses, ended = [texts[j] for j in keep], [ended[j] for j in keep]
            judgement = labeler.judge(task, responses, random.Random(f"prefs/{pc.seed}/{i}"), ended=ended)
            rows.append({"prompt": [{"role": "user", "content": task.prompt}], "responses": responses,
                         "ranking": judgement.ranking, "ended": ended, "gold": judgement.gold,
                         "family": task.family, "difficulty": task.difficulty})
        bar.update(len(chunk))
    bar.close()
    counts["prefs/prompts"] = len(tasks)
    return rows, counts


def label_stats(rows: list[dict]) -> dict:
    """How the collected comparisons look against gold: responses right, and how often the labels
    order a pair as gold does when gold differs (the ceiling the reward model can learn)."""
    responses = sum(len(r["responses"]) for r in rows)
    out = {"prefs/rows": len(rows), "prefs/responses": responses,
           "prefs/pairs": sum(len(r["responses"]) * (len(r["responses"]) - 1) // 2 for r in rows)}
    with_gold = [r for r in rows if "gold" in r]
    if with_gold:
        agree, differ = gold_agreement([(r["ranking"], r["gold"]) for r in with_gold])
        golds = [x for r in with_gold for x in r["gold"]]
        out.update({"prefs/gold_mean": sum(golds) / len(golds),
                    "prefs/labeler_gold_agreement": agree / differ if differ else None})
        right = [world.is_correct(t, x) for r in with_gold if (t := world.task_from_messages(r["prompt"]))
                 for x in r["responses"]]
        if right:
            out["prefs/response_accuracy"] = sum(right) / len(right)
    return out


def run(cfg: Config, source: str | Path | None, out: str | Path, rankings: str | Path | None = None,
        fresh: bool = False, skip_bad_rows: bool = False) -> dict:
    t_start = time.perf_counter()
    pc = cfg.prefs
    if pc.threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(pc.threads)
    if source is None and rankings is None:
        raise UserError("prefs: expected --from RUN/sft (sample and rank) or --rankings FILE (read labels)")
    stage_dir = Path(out) / STAGE
    target = stage_dir / "prefs.jsonl"
    if target.exists() and not fresh:
        print0(f"prefs: {target} exists; keeping the labels it holds (--fresh to collect again)")
        summary_path = stage_dir / "summary.json"
        return json.loads(summary_path.read_text()) if summary_path.exists() else label_stats(
            [json.loads(line) for line in target.read_text().splitlines() if line.strip()])

    if rankings is not None:  # labels from a file: validate (before any work), normalise, add gold
        rows, counts = load_preferences(rankings, skip_bad_rows)
        for row in rows:
            task = world.task_from_messages(row["prompt"])
            if task is not None and "gold" not in row:
                ended = row.get("ended") or [True] * len(row["responses"])
                row["gold"] = [world.gold(task, r, e) for r, e in zip(row["responses"], ended)]
        counts["prefs/source"] = str(rankings)
    else:
        import torch  # noqa: PLC0415

        from ..rundir import load_stage  # noqa: PLC0415

        policy, source_cfg, tok = load_stage(source)
        with torch.inference_mode():
            rows, counts = collect(policy, tok, cfg)
        if not rows:
            raise UserError(f"{source}: no prompt gave 2 distinct responses out of {pc.k}; sample more (prefs.k) "
                            "or at a higher prefs.temperature")
        counts["prefs/source"] = str(source)

    atomic_write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_config(stage_dir, cfg.to_dict())
    summary = {**label_stats(rows), **counts, "wall_seconds": time.perf_counter() - t_start}
    write_summary(stage_dir, summary)
    agree = summary.get("prefs/labeler_gold_agreement")
    print0(f"prefs: {len(rows):,} ranked prompts ({summary['prefs/pairs']:,} pairs)"
           + (f", labels agree with gold on {agree:.1%} of pairs whose gold differs" if agree is not None else "")
           + f"; wrote {target}")
    return summary
