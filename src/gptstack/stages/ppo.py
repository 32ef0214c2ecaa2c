"""The RL loop: PPO-RLHF (InstructGPT), the over-optimization study, and GRPO/RLOO — one loop.

    gptstack ppo     --policy runs/tiny/sft --rm runs/tiny/rm --out runs/tiny    # RM reward, KL penalty, critic
    gptstack overopt --policy runs/tiny/sft --rm runs/tiny/rm --out runs/tiny    # PPO run long at low beta
    gptstack grpo    --policy runs/tiny/sft --reward gold --out runs/tiny        # verifiable reward, groups

Each update (CleanRL's ppo.py, with InstructGPT's reward):
  1. rollout: `prompts_per_update` prompts x `samples_per_prompt` responses from the engine;
  2. score: the reward model at the response's last token (or the gold / verifiable reward); a
     response that never ends gets `no_end_score`; with world prompts the *gold* reward is always
     logged beside the proxy, which is what shows reward hacking;
  3. advantages: GAE on r_t = -beta (log pi - log pi_ref) + score at the end, with the critic (value
     head initialised from the RM), whitened; or group-normalised (GRPO) / leave-one-out (RLOO);
  4. `epochs` passes of `minibatches` clipped-surrogate steps (+ clipped value loss, + PPO-ptx's
     pretraining loss, + GRPO's k3 KL term), all on train/loop.py's Session (DDP, checkpoints,
     NaN guard); the adaptive KL controller then moves beta.
Checkpoints fall on update boundaries and every random draw is a function of (seed, update), so a
resumed run is bit-identical to an uninterrupted one. Metric names follow TRL (objective/kl, ...);
with GAE, val/explained_variance = 1 - Var(returns - values) / Var(returns) says how well the critic
predicted the returns of the rollouts (CleanRL's losses/explained_variance).

The prompts come from train/sources.py, the scores and gold of the rollouts from eval/rewards.py,
the held-out points of the over-optimization curve from eval/heldout.py and their fit from
eval/fits.py; this file is the loop.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..common import UserError, atomic_write_bytes, atomic_write_text
from ..config import Config, RLConfig
from ..data.corpus import get_batch
from ..engine.rollout import Batch, rollout, token_logprobs, token_values
from ..eval import protocol
from ..eval.fits import fit_gao_rl
from ..eval.heldout import file_point, heldout_items, heldout_point
from ..eval.problems import file_problem, greedy_accuracy
from ..eval.rewards import Rewarder, gold_and_hacks, response_texts
from ..model.heads import ScalarModel
from ..model.lora import without_adapters
from ..rundir import (adopt_model, adopt_tokenizer, check_same_tokenizer, load_scalar_head, load_scalar_model,
                      load_stage)
from ..tokenizer import Tokenizer
from ..train import rl
from ..train.sources import Item, Prompts, update_seed
from ..train.dist import cleanup, init_distributed, print0
from ..train.loop import Session, resume_state

ADVANTAGES = ("gae", "grpo", "rloo")


def validate(tc: RLConfig, section: str) -> None:
    """Bad combinations stop the stage before any rollout (single values are checked against their
    declared ranges when the config is built)."""
    checks = [
        (tc.advantage in ADVANTAGES, f"advantage must be one of {', '.join(ADVANTAGES)}"),
        (tc.critic_warmup < tc.updates or tc.advantage != "gae", "critic_warmup must leave some updates for the policy"),
        (tc.advantage == "gae" or tc.samples_per_prompt >= 2,
         f"{tc.advantage} compares the samples of a prompt: samples_per_prompt (G) must be >= 2"),
        ((tc.prompts_per_update * tc.samples_per_prompt) % (tc.minibatches * tc.grad_accum) == 0,
         "prompts_per_update x samples_per_prompt must divide into minibatches x grad_accum"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(f"{section}: {message}")


# --- the model being trained: policy (+ critic) ------------------------------------------------------


class PolicyAndCritic(nn.Module):
    """One module, so the Session wraps, checkpoints and optimises policy and critic together."""

    def __init__(self, policy: nn.Module, critic: ScalarModel | None):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, batch: Batch, temperature: float, ptx: tuple | None = None):
        """-> (logp, entropy, values or None, pretraining loss or None); one forward call, so DDP
        sees every parameter that gets a gradient."""
        logp, entropy = token_logprobs(self.policy, batch, temperature, with_entropy=True)
        values = token_values(self.critic, batch) if self.critic is not None else None
        ptx_loss = self.policy(ptx[0], targets=ptx[1]) if ptx is not None else None
        return logp, entropy, values, ptx_loss


@dataclass
class Experience:
    update: int
    items: list[Item]
    batch: Batch
    texts: list[str]
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None   # None when nothing reads it (no KL penalty or loss)
    advantages: torch.Tensor
    old_values: torch.Tensor | None
    returns: torch.Tensor | None
    scores: torch.Tensor
    stats: dict


def uses_reference(tc: RLConfig) -> bool:
    """Whether anything reads the reference model's logprobs: a KL penalty (fixed or adaptive) or a
    KL loss. Without one (GRPO/DAPO-style beta = 0, as TRL) its forward pass is skipped and
    objective/kl is not logged."""
    return tc.kl_coef > 0 or tc.kl_loss_coef > 0 or tc.kl_target > 0


def seed_of(tc: RLConfig, update: int, rank: int, what: int) -> int:
    """The seed of one random draw of an update (0: rollouts, 1 + epoch: minibatch order)."""
    return update_seed(tc, update, rank) * 7 + what


@torch.no_grad()
def make_experience(update: int, tc: RLConfig, model: PolicyAndCritic, ref: nn.Module, rewarder: Rewarder,
                    prompts: Prompts, tok: Tokenizer, rank: int, kl_coef: float, device) -> Experience:
    model.eval()
    items = prompts.draw(update, rank)
    prompt_ids = [tok.render_prompt(it.messages) for it in items]
    batch = rollout(model.policy, prompt_ids, tc.samples_per_prompt, tc.max_new_tokens, temperature=tc.temperature,
                    stop_ids=tok.turn_end_ids, seed=seed_of(tc, update, rank, 0), truncate=True).to(device)
    texts = response_texts(tok, batch)
    extra = gold_and_hacks(items, batch, texts)
    scores = rewarder(items, batch, texts, extra).float().to(device)
    if tc.penalize_no_end:
        scores = torch.where(batch.finished, scores, torch.full_like(scores, tc.no_end_score))
    # TRL's practice: the old logprobs are the sampler's own (same weights, same T; they agree with a
    # fresh forward to ~1e-5), which saves a forward pass of the policy per update
    old_logp = batch.logprobs
    ref_logp = token_logprobs(ref, batch, tc.temperature)[0] if uses_reference(tc) else None
    kl = (old_logp - ref_logp) * batch.mask if ref_logp is not None else torch.zeros_like(old_logp)
    old_values = returns = explained = None
    if tc.advantage == "gae":
        old_values = token_values(model.critic, batch)
        rewards = rl.per_token_rewards(scores, kl, kl_coef, batch.mask)
        advantages, returns = rl.gae(rewards, old_values, batch.mask, tc.gamma, tc.lam)
        explained = rl.explained_variance(old_values, returns, batch.mask)  # the critic, before this update
        if tc.whiten_advantages:
            advantages = rl.masked_whiten(advantages, batch.mask)
    else:
        # GRPO/RLOO: a sequence-level advantage; a KL penalty, if any, goes into the score
        shaped = scores - kl_coef * kl.sum(1)
        advantages = (rl.group_advantages(shaped, tc.samples_per_prompt, tc.scale_advantages) if tc.advantage == "grpo"
                      else rl.rloo_advantages(shaped, tc.samples_per_prompt))
    non_score = (-kl_coef * kl).sum(1)
    stats = {
        **({"objective/kl": kl.sum(1).mean().item()} if ref_logp is not None else {}),
        "objective/entropy": (-old_logp).sum(1).mean().item(),
        "objective/non_score_reward": non_score.mean().item(),
        "objective/rlhf_reward": (scores + non_score).mean().item(),
        "objective/scores": scores.mean().item(),
        "objective/kl_coef": kl_coef,
        "val/num_eos_tokens": int(batch.finished.sum()),
        **({"val/explained_variance": explained} if explained is not None else {}),
        "hack/length": extra["length"].mean().item(),
    }
    if "gold" in extra:
        stats.update({"gold/reward": extra["gold"].mean().item(), "gold/accuracy": extra["correct"].mean().item(),
                      "hack/repetition": extra["repetition"].mean().item()})
    if tc.samples_per_prompt > 1:
        spread = scores.view(-1, tc.samples_per_prompt).std(dim=1)
        stats["frac_reward_zero_std"] = (spread < 1e-6).float().mean().item()  # TRL: groups that teach nothing
        stats["reward_std"] = spread.mean().item()
    return Experience(update, items, batch, texts, old_logp, ref_logp, advantages, old_values, returns, scores,
                      {**stats, "_gold": extra.get("gold"), "_scores": scores.cpu()})


def minibatch_loss(model_fn, exp: Experience, rows: torch.Tensor, tc: RLConfig, ptx_batch, acc: dict) -> torch.Tensor:
    """The clipped PPO objective on `rows` of the experience (+ value, k3-KL and ptx terms)."""
    mb = exp.batch.select(rows)
    mask = mb.mask
    logp, entropy, values, ptx = model_fn(mb, tc.temperature, ptx_batch)
    adv = exp.advantages[rows]
    pg_loss, clipfrac, approxkl = rl.clipped_policy_loss(logp, exp.old_logp[rows], adv, mask, tc.clip)
    # critic warm-up: the first updates train the value head alone (the policy's loss is left out, so
    # with no gradient AdamW leaves it exactly where it was) before its advantages steer the policy
    warming = values is not None and exp.update < tc.critic_warmup
    loss = pg_loss * 0.0 if warming else pg_loss
    if values is not None:
        vf_loss, vf_clipfrac = rl.clipped_value_loss(values, exp.old_values[rows], exp.returns[rows], mask, tc.value_clip)
        loss = loss + tc.vf_coef * vf_loss
        acc["loss/value_avg"].append(vf_loss.item())
        acc["val/clipfrac_avg"].append(vf_clipfrac.item())
    if tc.kl_loss_coef:
        log_r = exp.ref_logp[rows] - logp   # k3 = r - log r - 1 with r = pi_ref / pi: unbiased, >= 0
        k3 = torch.exp(log_r) - log_r - 1
        loss = loss + tc.kl_loss_coef * rl.masked_mean(k3, mask)
    if ptx is not None:
        loss = loss + tc.ptx_coef * ptx
        acc["loss/ptx_avg"].append(ptx.item())
    with torch.no_grad():
        acc["loss/policy_avg"].append(pg_loss.item())
        acc["policy/approxkl_avg"].append(approxkl.item())
        acc["policy/clipfrac_avg"].append(clipfrac.item())
        acc["policy/entropy_avg"].append(rl.masked_mean(entropy, mask).item())
        acc["val/ratio"].append(rl.masked_mean(torch.exp(logp - exp.old_logp[rows]), mask).item())
    return loss


# --- the loop ------------------------------------------------------------------------------------------


def reward_source(reward: str, prompts: str | None) -> tuple[str, str | None]:
    """`--reward` / grpo.reward gold | rm | FILE, and the prompts -> (reward, prompts): a verifiable
    FILE is both the prompts and the answers they are checked against (reward "answer")."""
    return (reward, prompts) if reward in ("gold", "rm") else ("answer", reward)


def run(cfg: Config, policy_dir: str | Path, out: str | Path, rm_dir: str | Path | None = None,
        reward: str = "rm", prompts: str | None = None, stage: str = "ppo", fresh: bool = False,
        skip_bad_rows: bool = False) -> dict:
    t_start = time.perf_counter()
    tc: RLConfig = getattr(cfg, stage)
    validate(tc, stage)
    if reward == "rm" and rm_dir is None:
        raise UserError(f"{stage}: the reward model's reward needs --rm RUN/rm")
    if not callable(reward) and reward not in ("rm", "gold", "answer"):
        raise UserError(f"{stage}: reward must be rm, gold or answer, got {reward!r}")
    info = init_distributed()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = info.device
    policy_dir, run_dir = Path(policy_dir), Path(out)
    stage_dir = run_dir / stage

    # --- models and data, all checked before any rollout -------------------------------------------
    policy, policy_cfg, tok = load_stage(policy_dir, device)
    cfg = adopt_model(cfg, policy_cfg)
    # the frozen SFT model; under LoRA the policy's own frozen weights without its adapters (below)
    ref = None if tc.lora_rank else load_stage(policy_dir, device)[0].eval().requires_grad_(False)
    rm = critic = None
    # under LoRA a critic started from the RM keeps the RM's trunk frozen: the RM is then that trunk
    # with the RM's own head (below), not a second copy of the weights
    rm_from_critic = bool(tc.lora_rank) and tc.advantage == "gae" and rm_dir is not None
    if rm_dir is not None:
        check_same_tokenizer(policy_dir, rm_dir)
        if not rm_from_critic:
            rm, _ = load_scalar_model(rm_dir, "reward", device)
            rm.eval().requires_grad_(False)
    if tc.advantage == "gae":  # InstructGPT: the value function starts from the RM (else from the policy)
        critic = load_scalar_model(rm_dir, "reward", device)[0] if rm_dir else ScalarModel.from_policy(policy)
        critic.kind = "value"
    source = Prompts(cfg, tc, prompts, skip_bad_rows, tok=tok, expect=("verifiable",) if reward == "answer" else None)
    if reward == "gold" and source.items is not None:
        raise UserError(f"{stage}: --reward gold needs world prompts; for a GSM8K-format file use --reward answer")
    if reward == "answer" and (source.items is None or any(it.answer is None for it in source.items)):
        raise UserError(f"{stage}: --reward answer needs a verifiable prompt file (question/answer rows)")
    rewarder = Rewarder(reward, rm)
    reward_name = reward if isinstance(reward, str) else getattr(reward, "__name__", "function")
    ptx_tokens = None
    if tc.ptx_coef:
        from ..data.corpus import build_corpus
        from ..train.sources import Corpus
        corpus = Corpus(policy_cfg)
        ptx_tokens = build_corpus(corpus.splits, corpus.fingerprint, tok, policy_dir.parent / "data")["train"].tokens
    if info.is_main:
        adopt_tokenizer(policy_dir.parent / "tokenizer", run_dir)

    state = resume_state(stage_dir, fresh, info)
    model = PolicyAndCritic(policy, critic)
    per_update = tc.epochs * tc.minibatches
    rows = tc.prompts_per_update * tc.samples_per_prompt
    mb_rows = rows // tc.minibatches
    session_tc = dataclasses.replace(tc, max_steps=tc.updates * per_update, stop_at=tc.stop_at * per_update,
                                     batch_size=mb_rows // tc.grad_accum)
    session = Session.start(session_tc, stage, model, stage_dir, info, cfg.to_dict(), state)
    if ref is None:
        ref = without_adapters(policy)
    if rm_from_critic:   # the critic's frozen trunk (the RM's) with the RM's head as saved, not as trained
        rm = without_adapters(critic)
        head = load_scalar_head(rm_dir, device)
        assert not rm.load_state_dict(head, strict=False).unexpected_keys
        rm.kind, rewarder.rm = "reward", rm
    saved = (state or {}).get("extra", {})
    kl_ctl = rl.AdaptiveKLController(tc.kl_coef, tc.kl_target or None, tc.kl_horizon)
    kl_ctl.value = saved.get("kl_coef", tc.kl_coef)
    alarm = rl.HackAlarm(tc.hack_window, saved.get("hack_history"))
    points: list[dict] = saved.get("points", [])
    gold_ref: list | None = saved.get("gold_ref")   # SFT's gold mean/std on the first rollouts
    heldout = heldout_items(cfg.world, tc.eval_prompts) if source.items is None else []
    print0(f"{stage}: {tc.updates} updates x {rows} rollouts ({tc.prompts_per_update} prompts x "
           f"{tc.samples_per_prompt}), {tc.epochs} epochs x {tc.minibatches} minibatches, advantage {tc.advantage}, "
           f"reward {reward_name}, beta {kl_ctl.value}", info=info)

    def evaluate_point(update: int) -> None:
        if heldout and info.is_main:
            point = {"step": update, **heldout_point(policy, ref, rm, heldout, tok, tc, cfg.eval.seed)}
            points.append(point)
            session.log(update * per_update, **{f"heldout/{k}": v for k, v in point.items() if k not in ("step", "samples")})

    if session.start_step == 0 and tc.eval_every:
        evaluate_point(0)

    exp: Experience | None = None
    acc: dict = {}
    for step in session.steps():
        update, k = divmod(step, per_update)
        if exp is None or exp.update != update:
            t_update = time.perf_counter()
            exp = make_experience(update, tc, model, ref, rewarder, source, tok, info.rank, kl_ctl.value, device)
            if gold_ref is None and exp.stats["_gold"] is not None:
                g = exp.stats["_gold"]
                gold_ref = [g.mean().item(), g.std().item() or 1.0]
            acc = {k_: [] for k_ in ("loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "policy/approxkl_avg",
                                     "policy/clipfrac_avg", "policy/entropy_avg", "val/ratio", "loss/ptx_avg")}
            model.train()
        epoch, m = divmod(k, tc.minibatches)
        perm = torch.randperm(rows, generator=torch.Generator().manual_seed(seed_of(tc, update, info.rank, 1 + epoch)))
        mb = perm[m * mb_rows : (m + 1) * mb_rows]

        def micro_loss(micro: int) -> torch.Tensor:
            part = mb[micro * session_tc.batch_size : (micro + 1) * session_tc.batch_size].to(device)
            ptx = None
            if ptx_tokens is not None:
                x, y = get_batch(ptx_tokens, tc.ptx_batch_size, cfg.model.block_size, tc.seed, step, micro,
                                 info.rank, info.world)
                ptx = (x.to(device), y.to(device))
            return minibatch_loss(session.step_model, exp, part, tc, ptx, acc)

        session.step(step, micro_loss)
        if k != per_update - 1:
            continue

        # --- end of an update: beta, metrics, alarm, evaluation, checkpoint --------------------------
        done = update + 1
        if "objective/kl" in exp.stats:
            kl_ctl.update(exp.stats["objective/kl"], rows * info.world)
        elapsed = time.perf_counter() - t_update
        stats = {k_: v for k_, v in exp.stats.items() if not k_.startswith("_")}
        stats.update({k_: sum(v) / len(v) for k_, v in acc.items() if v})
        stats.update({"time/update_s": elapsed, "time/rollouts_per_s": rows / elapsed, "episode": done * rows})
        if gold_ref is not None and "gold/reward" in stats:
            gold_z = (stats["gold/reward"] - gold_ref[0]) / gold_ref[1]
            stats["hack/proxy_gold_gap"] = (stats["objective/scores"] if reward == "rm" else gold_z) - gold_z
        if done % tc.log_every == 0 or done == tc.updates:
            postfix = {"score": f"{stats['objective/scores']:.2f}"}
            if "objective/kl" in stats:
                postfix["kl"] = f"{stats['objective/kl']:.2f}"
            if "gold/reward" in stats:
                postfix["gold"] = f"{stats['gold/reward']:.3f}"
            session.log(step + 1, postfix, **stats)
        if reward == "rm" and alarm.update(done, stats["objective/scores"], stats.get("gold/reward")) and info.is_main:
            worst = max(range(len(exp.texts)), key=lambda i: float(exp.scores[i]) - float(exp.stats["_gold"][i]))
            print0(f"\nwarning: reward hacking? over the last {tc.hack_window} updates the RM score rose while "
                   f"the gold reward fell (update {done}: proxy {stats['objective/scores']:.2f}, gold "
                   f"{stats['gold/reward']:.3f}). Highest proxy-minus-gold sample:\n  prompt: "
                   f"{exp.items[exp.batch.prompt_index[worst]].messages[-1]['content']}\n  response: "
                   f"{exp.texts[worst]!r}\n  proxy {float(exp.scores[worst]):.2f}, gold "
                   f"{float(exp.stats['_gold'][worst]):.3f}", info=info)
        if tc.eval_every and done % tc.eval_every == 0:
            evaluate_point(done)
            model.train()
        if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done != tc.updates:
            session.checkpoint(step + 1, extra={"kl_coef": kl_ctl.value, "hack_history": alarm.history,
                                                "points": points, "gold_ref": gold_ref})
    extra = {"kl_coef": kl_ctl.value, "hack_history": alarm.history, "points": points, "gold_ref": gold_ref}
    if session.stopped_early(extra=extra):
        cleanup(info)
        return {"stopped_at_update": session.last_step // per_update}

    # --- final evaluation through the shared protocol, weights (the policy), summary -------------------
    summary: dict = {}
    if info.is_main:
        if source.items is None:
            figures, samples = protocol.evaluate_policy(policy, tok, cfg.world, cfg.eval, reference_model=ref,
                                                        reward_model=rm)
        else:
            problems = [file_problem(it.messages, it.answer) for it in source.heldout if it.answer is not None]
            figures, samples = (greedy_accuracy(policy, tok, problems, cfg.eval.max_new_tokens, seed=cfg.eval.seed)
                                if problems else ({}, []))
            if source.heldout:  # no gold in a user's file: the RM's score against SFT's, and the KL paid for it
                figures |= file_point(policy, ref, rm, [it.messages for it in source.heldout[: tc.eval_prompts]],
                                      tok, tc, cfg.eval.seed)
        atomic_write_text(stage_dir / "eval_samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        summary.update(figures)
        summary.update({"updates": tc.updates, "rollouts": tc.updates * rows * info.world, "reward": reward_name,
                        "final/kl_coef": kl_ctl.value, "wall_seconds": time.perf_counter() - t_start})
        if points:
            fit = fit_gao_rl(points)
            summary.update({"points": points, **fit})
            best = max(points, key=lambda p: p["gold"])
            summary["gold_peak_d"] = fit["fit/peak_d"] if "fit/peak_d" in fit else best["d"]
            summary["gold_peak_d_observed"] = best["d"]
            from ..report.plots import overoptimization  # noqa: PLC0415 (matplotlib: only when there are points)
            plot_fit = None if fit["fit/alpha"] is None else {k: fit[f"fit/{k}"] for k in ("alpha", "beta", "r2", "gold_at_d0")}
            atomic_write_bytes(stage_dir / "overopt.png", overoptimization(points, plot_fit, summary["gold_peak_d"], None, None,
                                                                         None, cfg.report.dpi))
    session.finish(summary, extra=extra, weights=lambda sd: {k[len("policy."):]: v for k, v in sd.items() if k.startswith("policy.")},
                   **{k: v for k, v in summary.items() if isinstance(v, float) and k.startswith("eval/")})
    if info.is_main:
        shown = {"accuracy": "eval/accuracy", "gold": "eval/gold_reward", "proxy": "eval/proxy_score",
                 "SFT's proxy": "eval/sft_proxy_score",
                 "KL to SFT": "eval/kl_to_sft", "gold peak at d": "gold_peak_d"}
        print0(f"{stage}: " + ", ".join(f"{name} {summary[key]:.3f}" for name, key in shown.items() if key in summary)
               + f"; wrote {stage_dir}")
    cleanup(info)
    return summary
