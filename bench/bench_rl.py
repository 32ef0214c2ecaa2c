"""RL benchmark: a gptstack PPO update and GRPO step vs TRL's trainers on the same tiny model.

Both sides start from the same random-init Llama (vocab 512, hidden 128, 4 layers, 4 heads,
intermediate 512: 1.18 M parameters) and the same tokenizer (a 512-token BPE trained here on
world text, exported with `Tokenizer.to_huggingface`), as ../shared/ANCHORS.md prescribes:
- PPO vs TRL 1.12.0 `trl.experimental.ppo.PPOTrainer` (the last TRL with PPO): policy, frozen
  reference, value model and reward model (trunk = the policy's, head = a random linear head,
  the same on both sides), batch 16, 4 epochs over one minibatch, 64-token responses at T = 1;
- GRPO vs TRL 1.16 `GRPOTrainer`: one world prompt x 8 completions of 64 tokens per step, the
  world's gold reward, beta = 0 (no reference).
The gptstack side is the CLI itself (`gptstack ppo` / `gptstack grpo`) on a run directory built
from the same weights (RUN/tokenizer, RUN/sft, RUN/rm); it logs `time/update_s` for every update
in RUN/<stage>/metrics.jsonl. The TRL side runs bench/trl_rl.py inside its own venv, which this
script creates on first use (bench/.cache/venv-trl-<version>: torch pinned to the project's exact
CPU build first, then trl; later runs reuse it) and times updates with a TrainerCallback.

Each round runs a whole process per side (the order alternates A B, B A, ...); each process
times `--warmup` + `--updates` updates and the warm-up ones are dropped. Prints per-run medians
and, last, the ratio of medians of samples per second (gptstack / TRL) per algorithm:

    RESULT rl samples_per_s_ratio=<smaller of the two> ppo_ratio=<r> grpo_ratio=<r>

A side that cannot run (a gptstack command not written yet) is reported and its ratio is nan.

Equal: weights (checked logit- and reward-exact through HF), prompts (the same rendered ids),
batch, epochs, minibatches, response length, T = 1 with no top-k/top-p, fp32, threads, KL
coefficient (0.05 PPO, 0 GRPO), no gradient checkpointing. Not equal, by each side's design:
TRL generates exactly 64 tokens (PPO: no stop token; GRPO: min_new_tokens = 64), gptstack stops
a row at <|assistant_end|> (a random model ends ~1 row in 8 early; a batch still runs 64 steps);
both take the old logprobs from generation (gptstack since 2026-11-24) and skip the reference
forward when no KL term reads it (GRPO at beta = 0); TRL calls gc.collect() twice per PPO update; TRL's interval includes its per-update logging, gptstack's
`time/update_s` ends at the last optimizer step. On a random model the gold reward is 0 for
every completion, so GRPO's advantages are 0: both sides still run the full forward and backward.

Run: python bench/bench_rl.py [--rounds 3] [--updates 8] [--warmup 2] [--algos ppo,grpo] [--threads N]
     python bench/bench_rl.py --setup-only      # create the TRL venvs (timed) and the fixture, no timing
     python bench/bench_rl.py --phases          # where an update's time goes, per phase, both sides
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
TRL_FOR = {"ppo": "1.12.0", "grpo": "1.16.0"}  # PPOTrainer was removed from TRL in 1.13
MODEL = dict(vocab_size=512, n_layer=4, n_head=4, n_embd=128, intermediate_size=512, block_size=256)
SAMPLES = {"ppo": 16, "grpo": 8}  # rollouts per PPO update; completions per GRPO step
NEW_TOKENS, PPO_EPOCHS = 64, 4
PAD = "<|step|>"  # the 512-token vocabulary has no pad token; <|step|> never occurs in a prompt

# The gptstack side's settings (config.RLConfig), matching trl_rl.py's: one rollout batch per update,
# `epochs` passes of `minibatches` optimizer steps over it; no penalty for responses that never end
# (TRL's missing_eos_penalty is None); metrics every update; no periodic eval, no checkpoint but
# the last. The final eval protocol that every policy stage runs after training is not timed (only
# `time/update_s` is read), so it is cut to a few prompts to save wall time.
GPTSTACK_SETS = {
    "ppo": {"prompts_per_update": SAMPLES["ppo"], "samples_per_prompt": 1, "epochs": PPO_EPOCHS, "minibatches": 1},
    "grpo": {"prompts_per_update": 1, "samples_per_prompt": SAMPLES["grpo"], "epochs": 1, "minibatches": 1,
             "kl_coef": 0.0, "kl_loss_coef": 0.0},
}
COMMON_SETS = {"max_new_tokens": NEW_TOKENS, "temperature": 1.0, "penalize_no_end": "false", "log_every": 1,
               "eval_every": 0, "checkpoint_every": 0}
EVAL_SETS = {"eval.limit": 8, "eval.k": 1}


# --- the TRL venvs ---------------------------------------------------------------------------------


def trl_venv(version: str) -> Path:
    """bench/.cache/venv-trl-<version> with torch == the project's exact build and trl == version.
    Created once (timed); reused while both versions still match."""
    venv = CACHE / f"venv-trl-{version}"
    py = venv / "bin/python"
    probe = "import torch, trl; print(torch.__version__, trl.__version__)"
    if py.exists():
        out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.split() == [torch.__version__, version]:
            print(f"trl {version}: reusing {venv.relative_to(ROOT)}", flush=True)
            return venv
        shutil.rmtree(venv)
    print(f"trl {version}: creating {venv.relative_to(ROOT)} ...", flush=True)

    def pip(*a: str) -> None:
        proc = subprocess.run([str(py), "-m", "pip", "install", "-q", *a], capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"pip install {' '.join(a)} failed:\n{proc.stderr[-3000:]}")

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # torch first and exactly the project's build (e.g. 2.13.0+cpu from the local wheel): a looser
    # spec lets pip resolve a CUDA build of several GB. The constraint keeps trl's resolve off it.
    pip(f"torch=={torch.__version__}")
    t1 = time.perf_counter()
    constraints = venv / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__}\n")
    pip("-c", str(constraints), f"trl=={version}")
    t2 = time.perf_counter()
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=True)
    if out.stdout.split() != [torch.__version__, version]:
        sys.exit(f"{venv}: expected torch {torch.__version__} and trl {version}, got {out.stdout.strip()}")
    print(f"trl {version}: installed in {t2 - t0:.0f} s (torch {t1 - t0:.0f} s, trl and its deps {t2 - t1:.0f} s)",
          flush=True)
    return venv


# --- the shared fixture: one tokenizer, one set of weights, both formats ------------------------------


def build_fixture(work: Path, seed: int, n_prompts: int = 512) -> None:
    """work/run (gptstack's run directory: tokenizer, sft, rm) and work/fixture (HF exports +
    rendered prompts for TRL), from one seed. Checks that HF computes the same logits and rewards."""
    import transformers

    from gptstack import world
    from gptstack.config import Config
    from gptstack.model import GPT, GPTConfig
    from gptstack.model.heads import ScalarModel, save_scalar_model
    from gptstack.model.hf import export_hf
    from gptstack.tokenizer import DEFAULT_SPECIALS, Tokenizer
    from gptstack.train.checkpoint import save_model

    transformers.logging.set_verbosity_error()
    shutil.rmtree(work, ignore_errors=True)
    run, fixture = work / "run", work / "fixture"
    tok = Tokenizer.train(world.documents(300_000, seed=seed), vocab_size=MODEL["vocab_size"], pattern="digits",
                          special_tokens=DEFAULT_SPECIALS, progress=False)
    assert tok.vocab_size == MODEL["vocab_size"], tok.vocab_size
    tok.save(run / "tokenizer")

    torch.manual_seed(seed)
    cfg = Config(name="bench-rl")
    cfg.model = GPTConfig(**MODEL)
    cfg.tokenizer.vocab_size = tok.vocab_size
    policy = GPT(cfg.model).eval()
    rm = ScalarModel.from_policy(policy, "reward").eval()
    torch.nn.init.normal_(rm.head.weight, std=cfg.model.init_std)  # a random head (zero-init scores all 0)
    save_model(run / "sft", policy.state_dict(), cfg.to_dict())
    save_scalar_model(run / "rm", rm, cfg.to_dict())  # head bias 0: HF's score head has no bias

    export_hf(policy, fixture / "hf/policy", tok)
    hf_rm = transformers.LlamaForSequenceClassification.from_pretrained(
        fixture / "hf/policy", num_labels=1, dtype=torch.float32, pad_token_id=tok.special(PAD))
    with torch.no_grad():
        hf_rm.score.weight.copy_(rm.head.weight)
    hf_rm.save_pretrained(fixture / "hf/reward")

    tasks = world.train_tasks(n_prompts, seed=seed, config=cfg.world)
    rows = []
    for t in tasks:
        ids = tok.render_prompt([{"role": "user", "content": t.prompt}])
        rows.append({"ids": ids, "text": tok.decode(ids), "task_prompt": t.prompt})
    (fixture / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (fixture / "fixture.json").write_text(json.dumps({
        "pad_token": PAD, "eos_token": "<|assistant_end|>", "gptstack_src": str(ROOT / "src"), "seed": seed}))

    # same model on both sides: logits and rewards agree on a batch of prompts
    hf_lm = transformers.LlamaForCausalLM.from_pretrained(fixture / "hf/policy", dtype=torch.float32).eval()
    hf_rm.eval()
    n = min(len(r["ids"]) for r in rows[:8])
    x = torch.tensor([r["ids"][:n] for r in rows[:8]])
    with torch.no_grad():
        dl = (policy(x) - hf_lm(x).logits).abs().max().item()
        dr = (rm.score(x) - hf_rm(x).logits[:, 0]).abs().max().item()
    assert dl < 1e-4 and dr < 1e-4, f"HF export differs: logits {dl:.2e}, rewards {dr:.2e}"
    lengths = sorted(len(r["ids"]) for r in rows)
    print(f"fixture: {policy.num_params() / 1e6:.2f} M params, {len(rows)} world prompts of "
          f"{lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}); HF logits/rewards match "
          f"(max diff {dl:.1e} / {dr:.1e})", flush=True)


# --- one timed run of each side ---------------------------------------------------------------------------


def run_trl(algo: str, venv: Path, fixture: Path, n: int, threads: int, phases: bool = False) -> dict:
    """-> TIMES (+ PHASES with phases=True) of one TRL process."""
    cmd = [str(venv / "bin/python"), str(HERE / "trl_rl.py"), algo, str(fixture), "--updates", str(n),
           "--threads", str(threads), "--batch", str(SAMPLES["ppo"]), "--epochs", str(PPO_EPOCHS),
           "--generations", str(SAMPLES["grpo"]), "--new-tokens", str(NEW_TOKENS)] + (["--phases"] if phases else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = {ln.split(" ", 1)[0]: json.loads(ln.split(" ", 1)[1]) for ln in proc.stdout.splitlines()
             if ln.startswith(("TIMES ", "PHASES "))}
    if proc.returncode or "TIMES" not in found:
        raise RuntimeError(f"TRL {algo} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return found


def gptstack_available(algo: str) -> str | None:
    """None when `gptstack <algo>` exists, else why not."""
    proc = subprocess.run([sys.executable, "-m", "gptstack.cli", algo, "--help"], capture_output=True, text=True, check=False)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["no output"])[-1]


def gptstack_args(algo: str, base_run: Path, work: Path, n: int, threads: int, extra: list[str]) -> tuple[list[str], Path]:
    """A fresh copy of the run directory and the CLI arguments of `gptstack <algo>` on it."""
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(base_run, run)
    stage_sets = {**COMMON_SETS, **GPTSTACK_SETS[algo], "updates": n, "threads": threads}
    sets = {**{f"{algo}.{k}": v for k, v in stage_sets.items()}, **EVAL_SETS}
    inputs = ["--policy", str(run / "sft")] + (["--rm", str(run / "rm")] if algo == "ppo" else ["--reward", "gold"])
    return [algo, *inputs, "--out", str(run), "--fresh", *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")],
            *[x for s in extra for x in ("--set", s)]], run


def update_times(algo: str, run: Path, n: int) -> list[float]:
    rows = [json.loads(ln) for ln in (run / algo / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    times = [r["time/update_s"] for r in rows if "time/update_s" in r]
    if len(times) != n:
        raise RuntimeError(f"gptstack {algo}: expected {n} rows with time/update_s in metrics.jsonl, got {len(times)}")
    return times


def run_gptstack(algo: str, base_run: Path, work: Path, n: int, threads: int, extra: list[str]) -> list[float]:
    argv, run = gptstack_args(algo, base_run, work, n, threads, extra)
    proc = subprocess.run([sys.executable, "-m", "gptstack.cli", *argv], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"gptstack {algo} failed (exit {proc.returncode}): {' '.join(argv)}\n{proc.stderr[-4000:]}")
    return update_times(algo, run, n)


def gptstack_phases(algo: str, base_run: Path, work: Path, n: int, threads: int, extra: list[str]) -> dict:
    """One gptstack run in this process with trl_rl.Phases around the stage's work functions."""
    from trl_rl import Phases

    import gptstack.stages.ppo as stage
    from gptstack import cli

    phases = Phases()
    phases.wrap(stage, "rollout", "generate")
    phases.wrap(stage, "token_logprobs", phases.forward_label)
    phases.wrap(stage, "token_values", phases.forward_label)
    phases.wrap(stage.Rewarder, "__call__",
                lambda self, *a, **k: "forwards, scoring (no grad)" if self.kind == "rm" else "reward function")
    phases.install_common()
    argv, run = gptstack_args(algo, base_run, work, n, threads, extra)
    if cli.main(argv):
        raise RuntimeError(f"gptstack {algo} failed: {' '.join(argv)}")
    return {"total": sum(update_times(algo, run, n)), **phases.seconds}


def show_phases(algo: str, venv: Path, work: Path, n: int, threads: int, extra: list[str]) -> None:
    """Where an update's time goes, both sides (one run each, all n updates, the first included)."""
    trl = run_trl(algo, venv, work / "fixture", n, threads, phases=True)["PHASES"]
    ours = gptstack_phases(algo, work / "run", work / f"gptstack-{algo}", n, threads, extra)
    print(f"\n{algo}: ms per update (mean of {n}, {threads} threads)    TRL {TRL_FOR[algo]:>8s}   gptstack")
    for side in (trl, ours):
        side["other (Python, logging, GAE, ...)"] = side["total"] - sum(v for k, v in side.items() if k != "total")
    for phase in [k for k in dict.fromkeys([*trl, *ours]) if k != "total"] + ["total"]:
        print(f"  {phase:36s} {trl.get(phase, 0) / n * 1e3:10.0f} {ours.get(phase, 0) / n * 1e3:10.0f}")


# --- main -------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="processes per side and algorithm (order alternates)")
    ap.add_argument("--updates", type=int, default=8, help="timed updates per process")
    ap.add_argument("--warmup", type=int, default=2, help="untimed updates at the start of each process")
    ap.add_argument("--algos", default="ppo,grpo", help="comma-separated subset of: ppo,grpo")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="extra --set for the gptstack side (experiments)")
    ap.add_argument("--setup-only", action="store_true", help="create the venvs and the fixture, then stop")
    ap.add_argument("--phases", action="store_true", help="instead of the timing rounds: one run per side with "
                    "the time of each phase of an update (generation, scoring forwards, training, ...)")
    args = ap.parse_args()
    algos = [a for a in args.algos.split(",") if a]
    if not set(algos) <= set(SAMPLES):
        sys.exit(f"--algos: expected a subset of {','.join(SAMPLES)}, got {args.algos}")

    venvs = {a: trl_venv(TRL_FOR[a]) for a in algos}
    work = CACHE / "rl"
    build_fixture(work, args.seed)
    if args.setup_only:
        return
    if args.phases:
        for algo in algos:
            show_phases(algo, venvs[algo], work, args.warmup + args.updates, args.threads, args.set)
        return
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} threads both sides, {os.cpu_count()} cores, load average "
          f"{load:.2f} at start; {args.rounds} rounds x ({args.warmup} warm-up + {args.updates} timed) updates",
          flush=True)

    n = args.warmup + args.updates
    ratios: dict[str, float] = {}
    for algo in algos:
        missing = gptstack_available(algo)
        if missing:
            print(f"{algo}: gptstack side not available ({missing}); timing TRL only", flush=True)
        sides = ["trl", "gptstack"] if not missing else ["trl"]
        times: dict[str, list[float]] = {s: [] for s in sides}
        for r in range(args.rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                if side == "trl":
                    t = run_trl(algo, venvs[algo], work / "fixture", n, args.threads)["TIMES"]["update_s"]
                else:
                    t = run_gptstack(algo, work / "run", work / f"gptstack-{algo}", n, args.threads, args.set)
                timed = t[args.warmup:]
                times[side] += timed
                print(f"{algo} round {r + 1} {side:8s}: median {statistics.median(timed):.3f} s/update "
                      f"({min(timed):.3f}-{max(timed):.3f}; warm-up {', '.join(f'{x:.2f}' for x in t[:args.warmup])}) "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
        med = {s: statistics.median(v) for s, v in times.items()}
        per_s = {s: SAMPLES[algo] / m for s, m in med.items()}
        ratios[algo] = per_s["gptstack"] / per_s["trl"] if "gptstack" in per_s else math.nan
        what = "rollouts" if algo == "ppo" else "completions"
        print(f"{algo}: TRL {TRL_FOR[algo]} {med['trl']:.3f} s/update = {per_s['trl']:.1f} {what}/s"
              + (f"; gptstack {med['gptstack']:.3f} s/update = {per_s['gptstack']:.1f} {what}/s; "
                 f"ratio {ratios[algo]:.2f}" if "gptstack" in med else "; gptstack: not run"), flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    smaller = min(ratios.values()) if ratios and not any(math.isnan(v) for v in ratios.values()) else math.nan
    print(f"RESULT rl samples_per_s_ratio={smaller:.3f} " + " ".join(f"{a}_ratio={v:.3f}" for a, v in ratios.items()))


if __name__ == "__main__":
    main()
