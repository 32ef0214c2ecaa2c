"""`gptstack run`: the whole pipeline in one resumable command, then the report card.

    gptstack run --out runs/tiny                         # every stage on the tiny recipe
    gptstack run --out runs/tiny --stages ppo,grpo       # a subset (their inputs must exist)
    gptstack run --recipe micro --out /tmp/smoke         # seconds: the smoke test's recipe

Stages run in pipeline order, each through the same function its own command calls, with the
run directory's conventional paths (RUN/sft is the policy, RUN/rm the reward model, ...). A stage
whose summary.json exists is complete and skipped; one that was interrupted resumes from its
checkpoint (each stage's own resume), so killing `gptstack run` and running it again continues
where it stopped. The progress line names the stage and an ETA from the recipe's per-stage
estimates (its [run.eta] table of seconds), scaled by this machine's measured pace; a stage the
table leaves out has no ETA.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .common import UserError
from .config import STAGES, Config
from .train.dist import print0



def _call(stage: str, cfg: Config, run: Path) -> dict:
    from .stages import bon, dpo, ppo, prefs, pretrain, prm, rm, search, sft

    policy = run / "sft"
    grpo_reward, grpo_prompts = ppo.reward_source(cfg.grpo.reward, _file(cfg.grpo.prompts))
    calls = {
        "pretrain": lambda: _import(cfg, run) if cfg.model.from_hf else pretrain.run(cfg, run),
        "sft": lambda: sft.run(cfg, run / "pretrain", run),   # its data: sft.data, read by the stage
        "prefs": lambda: prefs.run(cfg, policy, run),
        "rm": lambda: rm.run(cfg, policy, _file(cfg.rm.prefs) or run / "prefs", run),
        "bon": lambda: bon.run(cfg, policy, run / "rm", run),
        "ppo": lambda: ppo.run(cfg, policy, run, rm_dir=run / "rm", stage="ppo", prompts=_file(cfg.ppo.prompts)),
        "overopt": lambda: ppo.run(cfg, policy, run, rm_dir=run / "rm", stage="overopt",
                                   prompts=_file(cfg.overopt.prompts)),
        "grpo": lambda: ppo.run(cfg, policy, run, rm_dir=run / "rm" if grpo_reward == "rm" else None,
                                reward=grpo_reward, prompts=grpo_prompts, stage="grpo"),
        "dpo": lambda: dpo.run(cfg, policy, _file(cfg.dpo.prefs) or run / "prefs", run),
        "prm": lambda: prm.run(cfg, policy, run),
        "search": lambda: search.run(cfg, policy, run / "prm", run, rm_dir=run / "rm"),
    }
    return calls[stage]()


def _file(value: str) -> str | None:
    """A config's data key: empty (or "world") = the built-in world's data (RUN/prefs for comparisons)."""
    return None if value in ("", "world") else value


def _import(cfg: Config, run: Path) -> dict:
    """model.from_hf in place of pretraining: rank 0 writes RUN/pretrain and RUN/tokenizer (the others
    wait for it in `_wait_for_rank0`, as after every stage)."""
    from .stages import hf_import
    from .train.dist import init_distributed

    return hf_import.run(cfg.model.from_hf, run) if init_distributed().is_main else {}


# a user's model (model.from_hf) learns from the user's data: each of these stages needs its key set
# (to "world" for the built-in world's — the world's stages, prefs to search, run on any model);
# checked before the first stage runs
USER_DATA = {"sft": ("sft.data",), "rm": ("rm.prefs",), "dpo": ("dpo.prefs",), "ppo": ("ppo.prompts",),
             "grpo": ("grpo.reward",)}


def check_user_data(cfg: Config, chosen: list[str]) -> None:
    empty = [key for key in (k.strip() for k in cfg.run.needs.split(",")) if key and not _configured(cfg, key)]
    if empty:
        raise UserError(f"recipe {cfg.name}: set {', '.join(empty)} (--set KEY=VALUE; run.needs)")
    if not cfg.model.from_hf:
        return
    missing = [key for s in chosen for key in USER_DATA.get(s, ()) if not _configured(cfg, key)]
    if missing:
        raise UserError(f"model.from_hf: set {', '.join(missing)} (your data files: --set KEY=FILE; "
                        "KEY=world for the built-in world's)")


def _configured(cfg: Config, key: str) -> bool:
    section, _, name = key.partition(".")
    try:
        value = getattr(getattr(cfg, section), name)
    except AttributeError:
        raise UserError(f"run.needs: {key!r} is not a config key (expected section.key)") from None
    return bool(value) and not (key == "grpo.reward" and value == "gold")


def _wait_for_rank0() -> None:
    """Under torchrun every rank runs the pipeline, and rank 0 alone writes a stage's summary.json:
    the others wait for it before they look (a rank that looked early took a finished stage for a
    stopped one and left the next stage's collectives hanging)."""
    import torch.distributed

    from .train.dist import init_distributed

    if init_distributed().enabled:
        torch.distributed.barrier()


def parse_stages(spec: str | None) -> list[str]:
    if not spec:
        return list(STAGES)
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {', '.join(unknown)}; the stages are {','.join(STAGES)}")
    return [s for s in STAGES if s in chosen]  # always in pipeline order


def _fmt(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _eta(estimates: dict[str, float | None], rest: list[str], pace: float) -> str:
    """The progress line's ETA part for the stage rest[0], with rest the stages still to run."""
    known = [estimates[s] for s in rest if estimates[s] is not None]
    if not known:
        return "no ETA; "
    this = "no ETA" if estimates[rest[0]] is None else f"~{_fmt(estimates[rest[0]] * pace)}"
    missing = len(rest) - len(known)
    return (f"{this}; pipeline ETA {_fmt(sum(known) * pace)}"
            + (f" + {missing} stage(s) without one" if missing else "") + ", ")


def run(cfg: Config, out: str | Path, stages: str | None = None, report: bool = True) -> dict:
    """Run (or resume, or skip) each chosen stage; -> {stage: seconds spent in this call}."""
    run_dir = Path(out)
    chosen = parse_stages(stages or cfg.run.stages)
    check_user_data(cfg, chosen)
    from .train.dist import cleanup, init_distributed, keep_process_group

    info = init_distributed()
    keep_process_group(True)   # one process group for every stage (train/dist.py)
    try:
        return _run(cfg, run_dir, chosen, report, info)
    finally:
        keep_process_group(False)
        cleanup(info)


def _run(cfg: Config, run_dir: Path, chosen: list[str], report: bool, info) -> dict:
    def say(*args):
        print0(*args, info=info)

    estimates = {s: cfg.run.eta.get(s) for s in chosen}   # None: the recipe gives no ETA for it
    todo = [s for s in chosen if not (run_dir / s / "summary.json").exists()]
    t0, spent, pace = time.perf_counter(), {}, 1.0   # pace: measured / estimated, over the stages run so far
    done_estimate = done_measured = 0.0
    for i, stage in enumerate(chosen, 1):
        if stage not in todo:
            say(f"[{i}/{len(chosen)}] {stage}: complete ({run_dir / stage / 'summary.json'}), skipped")
            continue
        say(f"[{i}/{len(chosen)}] {stage}: starting ({_eta(estimates, todo[todo.index(stage):], pace)}"
            f"elapsed {_fmt(time.perf_counter() - t0)})")
        t = time.perf_counter()
        result = _call(stage, cfg, run_dir)
        _wait_for_rank0()
        spent[stage] = time.perf_counter() - t
        if not (run_dir / stage / "summary.json").exists():   # a stage stopped early (stop_at): resume later
            say(f"{stage}: stopped before finishing ({result}); run the same command again to continue")
            return spent
        if estimates[stage]:   # the pace is measured on the stages that have an estimate
            done_estimate += estimates[stage]
            done_measured += spent[stage]
            pace = done_measured / done_estimate
    if not info.is_main:   # rank 0 writes the run's files
        return spent
    timings = run_dir / "run_times.json"
    if spent:
        old = json.loads(timings.read_text()) if timings.exists() else {}
        from .common import atomic_write_json
        atomic_write_json(timings, {**old, **{s: round(v, 1) for s, v in spent.items()}})
    if report:
        from .report import write_report
        md, html = write_report(run_dir, cfg.report)
        say(f"report: {md} and {html}")
    say(f"run: {len(spent)} stage(s) in {_fmt(time.perf_counter() - t0)}; {run_dir}")
    return spent
