"""`gptstack world sample|score`: the task world from the shell, as JSONL on stdout."""
from __future__ import annotations

import argparse
import itertools
import json
import sys

from ..common import UserError


def _emit(row: dict) -> None:
    sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")


def cmd_world_sample(args: argparse.Namespace) -> int:
    from .tasks import LEVELS, WorldConfig, eval_set, task_stream

    config = WorldConfig()
    families = [args.family] if args.family else None
    if args.split == "eval":
        tasks = (t for t in eval_set(config) if (not families or t.family in families)
                 and (args.difficulty is None or t.difficulty == args.difficulty))
    else:
        if args.difficulty is not None:
            config.difficulty_mix = [float(level == args.difficulty) for level in LEVELS]
        tasks = task_stream(args.seed, config, families)
    for t in itertools.islice(tasks, args.n if args.n > 0 else None):
        row = {"prompt": t.prompt, "reference": t.reference, "family": t.family}
        if args.details:
            row.update(difficulty=t.difficulty, answer=t.answer, steps=list(t.steps))
        _emit(row)
    return 0


def cmd_world_score(args: argparse.Namespace) -> int:
    from ..data.formats import read_records
    from .gold import check_steps, score
    from .tasks import task_from_prompt

    records, errors, _ = read_records(args.file)
    good = []
    for line, row in records:
        where = f"{args.file}:{line}"
        if not isinstance(row, dict):
            errors.append(f"{where}: row: expected a JSON object with prompt and response")
            continue
        bad = next((k for k in ("prompt", "response") if not isinstance(row.get(k), str)), None)
        if bad:
            errors.append(f"{where}: {bad}: " + ("missing, expected a string" if bad not in row else "expected a string"))
            continue
        if not isinstance(row.get("ended", True), bool):
            errors.append(f"{where}: ended: expected true or false (did the response end by itself?)")
            continue
        try:
            task = task_from_prompt(row["prompt"])
        except UserError:
            errors.append(f"{where}: prompt: expected a task-world prompt (as `gptstack world sample` prints), "
                          f"got {row['prompt'][:60]!r}")
            continue
        good.append((row, task))
    if errors and not args.skip_bad_rows:
        raise UserError(f"{args.file}: {len(errors)} bad row{'s' if len(errors) != 1 else ''}; fix them or pass "
                        "--skip-bad-rows:\n" + "\n".join(errors))
    if not good and not errors:
        raise UserError(f"{args.file}: no rows; expected JSONL with prompt and response")
    total = correct = 0.0
    for row, task in good:
        s = score(task, row["response"], row.get("ended", True))
        out = dict(row, gold=s.score)
        if args.details:
            out.update(correct=s.correct, format_ok=s.format_ok, repetition=s.repetition, gibberish=s.gibberish,
                       first_wrong_step=check_steps(task, row["response"]).first_error)
        _emit(out)
        total += s.score
        correct += s.correct
    n = max(len(good), 1)
    print(f"scored {len(good)} rows: mean gold {total / n:.4f}, accuracy {correct / n:.4f}"
          + (f"; skipped {len(errors)} bad rows" if errors else ""), file=sys.stderr)
    return 0


def add_commands(commands, fmt) -> None:
    from .tasks import FAMILIES, LEVELS

    world = commands.add_parser("world", help="sample tasks from the built-in task world and score responses",
                                description="The built-in task world: prompts with verifiable answers and a "
                                            "gold reward.", formatter_class=fmt)
    sub = world.add_subparsers(dest="world_command", metavar="ACTION", required=True)

    sample = sub.add_parser("sample", help="print tasks as JSONL (prompt, reference, family)", formatter_class=fmt,
                            description="Print world tasks as JSONL: prompt, reference (the step-by-step "
                                        "solution) and family. --split train draws fresh training tasks (never "
                                        "an eval item); --split eval prints the fixed held-out eval set.")
    sample.add_argument("--family", choices=FAMILIES, default=None, help="one family (default: all)")
    sample.add_argument("--n", type=int, default=10, metavar="N", help="how many tasks (0 = all, eval split only)")
    sample.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the training stream")
    sample.add_argument("--split", choices=("train", "eval"), default="train", help="training stream or eval set")
    sample.add_argument("--difficulty", type=int, choices=LEVELS, default=None, help="one difficulty level (default: the mix)")
    sample.add_argument("--details", action="store_true", help="also print difficulty, answer and steps")
    sample.set_defaults(handler=cmd_world_sample)

    score = sub.add_parser("score", help="add the gold reward to JSONL {prompt, response} rows", formatter_class=fmt,
                           description="Read JSONL rows with prompt (a world prompt) and response (and "
                                       "optionally ended: false for a response cut off at the length limit); "
                                       "print each row with its gold reward added.")
    score.add_argument("file", metavar="FILE", help="JSONL (or .json, .gz) with prompt and response")
    score.add_argument("--details", action="store_true",
                       help="also print correct, format_ok, repetition, gibberish and first_wrong_step")
    score.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of stopping")
    score.set_defaults(handler=cmd_world_score)
