"""Process reward model (PRM) and an outcome reward model (ORM), trained on the same samples.

    gptstack prm --from runs/tiny/sft --out runs/tiny                        # world prompts, checker labels
    gptstack prm --from runs/tiny/sft --set prm.labels=mc --out runs/tiny    # Monte-Carlo labels instead
    gptstack prm --from runs/tiny/sft --data gsm8k.jsonl --out runs/tiny     # no checker: Monte-Carlo labels
    gptstack prm --from runs/tiny/sft --data steps.jsonl --out runs/tiny     # TRL stepwise rows as they are
    torchrun --nproc_per_node=2 -m gptstack.cli prm --from runs/tiny/sft --out runs/tiny

Step data. The SFT policy answers `prm.prompts` training prompts `prm.samples` times (T = 1): the
PRM learns to judge the policy's own mistakes ("Let's Verify Step by Step" trains on samples of the
generator it verifies). A response's steps are its lines: the world writes one step per line, and
TRL's PRMTrainer joins steps with "\\n". A step's label comes from
  - checker: the world's step checker (`world.check_steps`): 1 while every step so far is right, 0
    from the first wrong one on (a chain is only as good as its first error); a line holding
    several of the checker's steps is right when all of them are;
  - mc (Math-Shepherd): for data without a checker (GSM8K-style prompt + answer), the fraction of
    `prm.mc_rollouts` policy rollouts from the prefix ending at that step that reach the right
    answer; the last step's label is the response's own correctness.
The data is written to RUN/prm/steps.jsonl in TRL's stepwise format (`prompt`, `completions`,
`labels`, plus `outcome` and `ended`); `--data` reads such files back, with file:line errors for
labels whose count differs from the steps' or that lie outside [0, 1].

Models. Both are ScalarModels (model/heads.py) with the SFT policy's trunk, trained with binary
cross-entropy on the same responses with the same batch, steps and learning rate. The PRM (kind
"prm") reads one logit per step at the step's last token: its "\\n", or <|assistant_end|> for the
final step of a response that ended. The ORM (kind "orm") reads one logit per response at its last
token, trained on the final answer's correctness only. No <|step|> marker is inserted: the newline
that ends every step is already a token of every world response and in distribution for the SFT
trunk, while a marker would be an embedding the trunk never trained, plus one more token per step
to generate and score at search time.

Writes RUN/prm (the PRM), RUN/prm/orm (the ORM), RUN/prm/steps.jsonl, and summary.json with both
verifiers' figures on held-out prompts (step accuracy, AUROC of right vs wrong responses).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import world
from ..common import UserError, atomic_write_json, atomic_write_text
from ..config import Config
from ..data.batches import batch_indices
from ..data.formats import check_answer, read_dataset, warn
from ..data.split import is_heldout
from ..engine import generate
from ..engine.scoring import render_steps, response_steps
from ..eval.verifiers import verifier_figures
from ..model.heads import ScalarModel
from ..tokenizer import Tokenizer
from ..train.checkpoint import load_checkpoint
from ..rundir import adopt_model, adopt_tokenizer, load_stage, write_summary
from ..train.dist import cleanup, init_distributed, print0
from ..train.loop import Session, resume_state

STAGE = "prm"
LABELS = ("auto", "checker", "mc")


# --- step labels ----------------------------------------------------------------------------------


def checker_labels(task, steps: Sequence[str]) -> list[int]:
    """1/0 per line from the world's step checker: a line is right when all the checker's steps
    in it are (the checker also splits a line after each ". ")."""
    marks = world.check_steps(task, "\n".join(steps)).correct
    out, i = [], 0
    for step in steps:
        n = max(1, len(world.split_steps(step)))
        out.append(int(all(marks[i : i + n])))
        i += n
    return out


@dataclass
class Response:
    prompt_ids: list[int]
    steps: list[str]
    correct: bool                       # the final answer's correctness
    is_right: Callable[[str], bool]     # checks a full response text to the same prompt


def monte_carlo_labels(model, tok: Tokenizer, responses: Sequence[Response], rollouts: int, max_new_tokens: int,
                       temperature: float = 1.0, seed: int = 0, generate_fn=generate) -> list[list[float]]:
    """Math-Shepherd's soft labels, per response: step j's value is the fraction of `rollouts`
    samples from the prefix ending at step j (its newline included) whose full text `is_right`;
    the last step's value is the response's own correctness. One batched engine call for all
    prefixes of all responses."""
    prefixes, owners = [], []
    for r in responses:
        for j in range(len(r.steps) - 1):
            prefixes.append(render_steps(tok, r.prompt_ids, r.steps[: j + 1], ended=False, last_complete=True).ids)
            owners.append((r, j))
    labels: list[list[float]] = [[] for _ in responses]
    if prefixes:
        ends = tok.turn_end_ids
        outs = generate_fn(model, prefixes, max_new_tokens, n=rollouts, temperature=temperature, stop_ids=ends,
                           seed=seed, truncate=True)
        index = {id(r): i for i, r in enumerate(responses)}
        for (r, j), samples in zip(owners, outs):
            head = "\n".join(r.steps[: j + 1]) + "\n"
            right = [r.is_right(head + tok.decode([t for t in c.tokens if t not in ends])) for c in samples]
            labels[index[id(r)]].append(sum(right) / len(right))
    return [lab + [float(r.correct)] for lab, r in zip(labels, responses)]


# --- step data ------------------------------------------------------------------------------------


def sample_step_data(cfg: Config, policy, tok: Tokenizer, dataset, labels: str, info) -> tuple[list[dict], dict]:
    """Sample the policy on training prompts and label every step -> stepwise rows and counts."""
    pc = cfg.prm
    ends = tok.turn_end_ids
    if dataset is None:
        tasks = world.train_tasks(pc.prompts, seed=pc.seed, config=cfg.world, families=pc.families)
        items = [(t.prompt, [{"role": "user", "content": t.prompt}], t) for t in tasks]
    else:
        items = [(r["prompt"], r["prompt"], r["answer"]) for r in dataset.rows[: pc.prompts]]
    policy.eval()
    rows, skipped = [], {"empty_response": 0, "longer_than_context": 0}
    chunks = range(0, len(items), pc.gen_batch_size)
    bar = tqdm(total=len(items), desc="prm data", unit="prompt", disable=not info.is_main, dynamic_ncols=True)
    for c0 in chunks:
        chunk = items[c0 : c0 + pc.gen_batch_size]
        prompts = [tok.render_prompt(messages) for _, messages, _ in chunk]
        outs = generate(policy, prompts, pc.max_new_tokens, n=pc.samples, temperature=pc.temperature,
                        stop_ids=ends, seed=pc.seed + c0, truncate=True)
        new, new_rows, tasks_of = [], [], []
        for (prompt, _, check), prompt_ids, samples in zip(chunk, prompts, outs):
            if isinstance(check, world.Task):
                def is_right(text, task=check):
                    return world.is_correct(task, text)
            else:
                def is_right(text, answer=check):
                    return check_answer(text, answer)
            for c in samples:
                steps, _ = response_steps(tok.decode([t for t in c.tokens if t not in ends]))
                if not steps:
                    skipped["empty_response"] += 1
                    continue
                if len(render_steps(tok, prompt_ids, steps, c.finished).ids) > policy.config.block_size:
                    skipped["longer_than_context"] += 1
                    continue
                correct = is_right("\n".join(steps))
                new.append(Response(prompt_ids, steps, correct, is_right))
                tasks_of.append(check)
                new_rows.append({"prompt": prompt, "completions": steps, "outcome": correct, "ended": c.finished})
        if labels == "checker":
            step_labels = [[bool(v) for v in checker_labels(row_task, r.steps)] for r, row_task in zip(new, tasks_of)]
        else:
            step_labels = monte_carlo_labels(policy, tok, new, pc.mc_rollouts, pc.max_new_tokens, pc.temperature,
                                             seed=pc.seed + 7919 * (c0 + 1))
        rows += [{**row, "labels": lab} for row, lab in zip(new_rows, step_labels)]
        bar.update(len(chunk))
    bar.close()
    return rows, {f"data/skipped/{k}": v for k, v in skipped.items() if v}


@dataclass
class Example:
    ids: np.ndarray          # rendered prompt + response
    ends: list[int]          # per step, where the PRM reads it
    labels: list[float]      # per step
    outcome: float           # the final answer's correctness (the ORM's label, read at the last token)
    held_out: bool
    prompt: str = ""         # the prompt, as a key (responses to one prompt are compared with each other)


def make_examples(tok: Tokenizer, rows: list[dict], block_size: int, eval_fraction: float) -> tuple[list[Example], int]:
    """Stepwise rows -> rendered examples; rows longer than the context are dropped and counted."""
    out, too_long = [], 0
    for r in rows:
        prompt_ids = tok.render_prompt(r["prompt"]) if isinstance(r["prompt"], list) else \
            tok.render_prompt([{"role": "user", "content": r["prompt"]}])
        rendered = render_steps(tok, prompt_ids, r["completions"], r.get("ended", True))
        if len(rendered.ids) > block_size:
            too_long += 1
            continue
        key = json.dumps(r["prompt"]) if not isinstance(r["prompt"], str) else r["prompt"]
        out.append(Example(np.asarray(rendered.ids, dtype=np.int64), rendered.ends, [float(v) for v in r["labels"]],
                           float(r["outcome"]), is_heldout(r["prompt"], eval_fraction), key))
    return out, too_long


def get_batch(examples: list[Example], outcome: bool, batch_size: int, seed: int, step: int, micro: int = 0,
              rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, (B, T) targets and (B, T) bool mask of the labelled positions: every
    step's end for the PRM, the last token for the ORM. Like SFT, the draw depends only on
    (seed, step, micro, rank), so a resumed run sees the same batches."""
    rows = batch_indices(len(examples), batch_size, seed, step, micro, rank=rank, world=world_size, replace=True)
    length = max(len(examples[r].ids) for r in rows)
    x = torch.zeros(len(rows), length, dtype=torch.long)
    target = torch.zeros(len(rows), length)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        ex = examples[r]
        x[i, : len(ex.ids)] = torch.from_numpy(ex.ids)
        if outcome:
            target[i, len(ex.ids) - 1], mask[i, len(ex.ids) - 1] = ex.outcome, True
        else:
            target[i, ex.ends], mask[i, ex.ends] = torch.tensor(ex.labels), True
    return x, target, mask


def read_step_rows(path: str | Path, skip_bad_rows: bool = False):
    """A data file for `gptstack prm --data`: TRL stepwise rows, or prompts with answers
    (GSM8K, prompt + answer) to sample and label by Monte-Carlo rollouts."""
    ds = read_dataset(path, expect=("stepwise", "verifiable"), skip_bad_rows=skip_bad_rows)
    if ds.n_skipped:
        warn(ds.describe())
    return ds


# --- the stage ------------------------------------------------------------------------------------


def _train(cfg: Config, model: ScalarModel, stage_dir: Path, state, examples: list[Example], outcome: bool, info,
           name: str) -> Session:
    pc = cfg.prm
    model.train()
    session = Session.start(pc, STAGE, model, stage_dir, info, cfg.to_dict(), state)
    session.bar.set_description(name)

    def micro_loss(step: int, micro: int) -> torch.Tensor:
        x, target, mask = get_batch(examples, outcome, pc.batch_size, pc.seed, step, micro, info.rank, info.world)
        logits = session.step_model(x.to(info.device))
        return F.binary_cross_entropy_with_logits(logits[mask.to(info.device)], target.to(info.device)[mask])

    session.run_steps(micro_loss)
    return session


def run(cfg: Config, source: str | Path, out: str | Path, data: str | None = None, fresh: bool = False,
        skip_bad_rows: bool = False) -> dict:
    t_start = time.perf_counter()
    pc = cfg.prm
    info = init_distributed()
    if pc.threads:
        torch.set_num_threads(pc.threads)
    if pc.labels not in LABELS:
        raise UserError(f"prm.labels: expected one of {', '.join(LABELS)}, got {pc.labels!r}")
    source, run_dir = Path(source), Path(out)
    stage_dir, orm_dir = run_dir / STAGE, run_dir / STAGE / "orm"
    policy, policy_cfg, tok = load_stage(source, info.device)
    cfg = adopt_model(cfg, policy_cfg)  # the trunk is the policy's
    dataset = read_step_rows(data, skip_bad_rows) if data not in (None, "world") else None
    labels = pc.labels
    if dataset is not None and dataset.kind == "stepwise":
        labels = "file"
    elif labels == "auto":
        labels = "checker" if dataset is None else "mc"
    elif labels == "checker" and dataset is not None:
        raise UserError(f"{data}: prm.labels=checker needs the world's step checker; prompts with answers "
                        "are labelled by Monte-Carlo rollouts (prm.labels=mc or auto)")
    if dataset is None and any(f not in world.FAMILIES for f in pc.families):
        raise UserError(f"prm.families: expected a list of {', '.join(world.FAMILIES)}, got {pc.families!r}")

    if info.is_main:
        adopt_tokenizer(source.parent / "tokenizer", run_dir)
    state = resume_state(stage_dir, fresh, info)

    # --- step data: sampled and labelled once, kept in steps.jsonl (a resumed run reads it back) ---
    steps_file, counts_file = stage_dir / "steps.jsonl", stage_dir / "data.json"
    if labels == "file":
        rows, counts = dataset.rows, {**dataset.summary(), "data/labels": "file"}
    else:
        if info.is_main and not steps_file.exists():
            rows, counts = sample_step_data(cfg, policy, tok, dataset, labels, info)
            atomic_write_json(counts_file, {**counts, "data/labels": labels})
            atomic_write_text(steps_file, "".join(json.dumps(r) + "\n" for r in rows))
        if info.enabled:
            torch.distributed.barrier()
        rows = read_dataset(steps_file, expect="stepwise").rows
        counts = json.loads(counts_file.read_text()) if counts_file.exists() else {}
    examples, too_long = make_examples(tok, rows, cfg.model.block_size, pc.eval_fraction)
    if too_long:
        counts["data/skipped/longer_than_context"] = counts.get("data/skipped/longer_than_context", 0) + too_long
    train_ex = [ex for ex in examples if not ex.held_out]
    eval_ex = [ex for ex in examples if ex.held_out]
    if not train_ex:
        raise UserError(f"{data or 'world'}: no step data to train on ({len(examples)} usable responses, "
                        f"{len(eval_ex)} of them held out)")
    n_steps = sum(len(ex.labels) for ex in train_ex)
    print0(f"prm: {len(train_ex):,} responses ({n_steps:,} steps, {sum(sum(ex.labels) for ex in train_ex) / n_steps:.1%}"
           f" labelled right; outcome right {sum(ex.outcome for ex in train_ex) / len(train_ex):.1%}), "
           f"{len(eval_ex):,} held out; labels: {labels}", info=info)

    # --- the PRM, then the ORM: same trunk, responses, batches, steps and learning rate -----------
    prm = ScalarModel.from_policy(policy, kind="prm")
    orm = ScalarModel.from_policy(policy, kind="orm")
    del policy
    session = _train(cfg, prm, stage_dir, state, train_ex, outcome=False, info=info, name="prm")
    if session.stopped_early():
        cleanup(info)
        return {"stopped_at": session.last_step}
    session.checkpoint(pc.max_steps)  # a crash while the ORM trains does not retrain the PRM
    orm_session = _train(cfg, orm, orm_dir, load_checkpoint(orm_dir), train_ex, outcome=True, info=info, name="orm")
    if orm_session.stopped_early():
        cleanup(info)
        return {"stopped_at": orm_session.last_step}
    orm_session.finish({}, metadata={"gptstack_head": "orm"})

    # --- held-out figures, weights, summary --------------------------------------------------------
    summary: dict = {}
    if info.is_main:
        n_steps = sum(len(ex.labels) for ex in examples)
        summary = {**counts, "data/responses": len(examples), "data/steps": n_steps,
                   "data/step_label_mean": sum(sum(ex.labels) for ex in examples) / max(1, n_steps),
                   "data/outcome_mean": sum(ex.outcome for ex in examples) / max(1, len(examples)),
                   **verifier_figures(prm, orm, eval_ex, pc.score_batch_size),
                   "steps": pc.max_steps, "wall_seconds": time.perf_counter() - t_start}
    session.finish(summary, metadata={"gptstack_head": "prm"},
                   **{k: v for k, v in summary.items() if "/eval/" in k})
    if info.is_main:
        write_summary(orm_dir, {k: v for k, v in summary.items() if not k.startswith("prm/")})
        print0(f"prm: held-out outcome AUROC PRM {summary.get('prm/eval/outcome_auroc', float('nan')):.3f} "
               f"(min over steps), ORM {summary.get('orm/eval/outcome_auroc', float('nan')):.3f}; "
               f"step accuracy {summary.get('prm/eval/step_accuracy', float('nan')):.1%}; wrote {stage_dir}")
    cleanup(info)
    return summary
