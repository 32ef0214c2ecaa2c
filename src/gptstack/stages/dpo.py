"""Direct preference optimisation: fine-tune the SFT policy on preference pairs, no reward model.

    gptstack dpo --policy runs/tiny/sft --prefs runs/tiny/prefs --out runs/tiny        # the world's rankings
    gptstack dpo --policy runs/tiny/sft --prefs ../shared/data/hh-rlhf/helpful-base/test.jsonl.gz --out runs/hh
    torchrun --nproc_per_node=2 -m gptstack.cli dpo --policy runs/tiny/sft --prefs runs/tiny/prefs --out runs/tiny

Rafailov et al. (2023): with the frozen SFT model as reference and h = (log π(y_w) − log π_ref(y_w))
− (log π(y_l) − log π_ref(y_l)) (sums over response tokens), the loss is −log σ(β h) — the
Bradley–Terry likelihood of the labels under the implicit reward β log π/π_ref. Options, as TRL's
`loss_type`: "sigmoid" (with `label_smoothing` ε: conservative DPO, −(1−ε) log σ(βh) − ε log σ(−βh))
and "ipo" ((h − 1/(2β))², on per-token mean logprobs, as TRL computes it). `rpo_alpha` α adds
α × the per-token NLL of the chosen responses (TRL's `rpo_alpha`, Pang et al. 2024): plain DPO can
lower the likelihood of chosen and rejected alike, and a small policy with noisy labels does (docs/LOG.md).

Data: TRL prompt/chosen/rejected, hh-rlhf transcripts, or K-wise ranking rows (`gptstack prefs`
writes RUN/prefs/prefs.jsonl), which give all K(K−1)/2 pairs of each ranking, or with
`dpo.pairs` the best response against each other one, or against the worst only. A prompt too long
for the context loses its oldest turns; a pair that still does not fit is skipped and counted. A
slice of the prompts (`dpo.heldout_fraction`, chosen by a hash of the prompt as in every stage:
data/split.py) is held out: the implicit-reward accuracy on pairs never trained on (`eval_rewards/accuracies`) says whether the preferences generalise.

The reference never changes, so its logprobs are computed once, before training, from the policy
weights as loaded (which are the reference). Metrics use TRL's names: `loss`, `rewards/chosen`,
`rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`
(eval_ prefix for the held-out pairs), beside train/lr, train/grad_norm and train/epoch; W&B
(log.wandb) also gets them as TRL's trainers write them there: train/loss, train/rewards/chosen,
..., eval/rewards/accuracies, train/learning_rate. summary.json: the policy keys of the eval
protocol, KL to the SFT model included, plus those figures. Writes RUN/dpo.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..common import UserError, atomic_write_text
from ..config import Config
from ..data.batches import batch_indices
from ..data.comparisons import PAIR_MODES, ranking_pairs
from ..data.formats import Dataset, read_dataset, warn
from ..data.split import is_heldout
from ..engine.rollout import sequence_logprobs, summed_logprobs
from ..eval import protocol
from ..model.lora import without_adapters
from ..tokenizer import Tokenizer
from ..rundir import adopt_model, adopt_tokenizer, load_model, load_stage
from ..train.dist import all_reduce_mean, cleanup, init_distributed, print0
from ..train.loop import Session, resume_state
from ..train.metrics import trl_names

STAGE = "dpo"
LOSS_TYPES = ("sigmoid", "ipo")
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


# --- the loss ----------------------------------------------------------------------------------


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence logprobs (B,) of chosen and rejected under the policy and the reference ->
    (mean loss, implicit rewards β(log π − log π_ref) of chosen and of rejected, detached)."""
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type: expected one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    return losses.mean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def chosen_nll(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The mean negative log-likelihood per chosen-response token (RPO's extra term): summed
    sequence logprobs (B,) and their token counts (B,) -> a scalar."""
    return -policy_chosen.sum() / chosen_tokens.sum().clamp(min=1)


def pair_metrics(loss: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                 policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """TRL's DPO metrics (batch means) for one batch."""
    return {
        f"{prefix}loss": loss.detach().item(),
        f"{prefix}rewards/chosen": chosen_rewards.mean().item(),
        f"{prefix}rewards/rejected": rejected_rewards.mean().item(),
        f"{prefix}rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        f"{prefix}rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        f"{prefix}logps/chosen": policy_chosen.detach().mean().item(),
        f"{prefix}logps/rejected": policy_rejected.detach().mean().item(),
    }


# --- data --------------------------------------------------------------------------------------


@dataclass
class Pairs:
    """Token sequences (each prompt's responses once) and the (chosen, rejected) pairs over them."""
    prompts: list[list[int]]         # per sequence: the rendered prompt, ending in <|assistant_start|>
    responses: list[list[int]]       # per sequence: response tokens (+ <|assistant_end|> if it ended)
    pairs: np.ndarray                # (P, 2) sequence indices: chosen, rejected
    group: np.ndarray                # (P,) the prompt (row) each pair comes from, for a held-out split


def resolve_prefs(prefs: str | Path) -> tuple[Path, Path | None]:
    """--prefs FILE | RUN/prefs -> (the file, the prefs stage directory when it is one)."""
    path = Path(prefs)
    if path.is_dir():
        file = path / "prefs.jsonl"
        if not file.exists():
            raise UserError(f"--prefs {path}: no prefs.jsonl in this directory (expected RUN/prefs from "
                            "`gptstack prefs`, or a preference file)")
        return file, path
    if not path.exists():
        raise UserError(f"--prefs {path}: no such file or directory")
    if path.name == "prefs.jsonl" and (path.parent.parent / "tokenizer").is_dir():
        return path, path.parent
    return path, None


def fit_prompt(tok: Tokenizer, prompt: list[dict], room: int) -> list[int] | None:
    """The rendered prompt in at most `room` tokens, dropping the oldest user/assistant turns
    (a system message stays); None when even the last user turn does not fit."""
    system = prompt[:1] if prompt[0]["role"] == "system" else []
    turns = prompt[len(system):]
    while turns:
        ids = tok.render_prompt(system + turns)
        if len(ids) <= room:
            return ids
        turns = turns[2:]
    return None


def encode_pairs(tok: Tokenizer, ds: Dataset, block_size: int, mode: str = "all") -> tuple[Pairs, dict]:
    """Normalised preference or ranking rows -> Pairs, and counts for summary.json. A ranking row
    gives its pairs (`ranking_pairs`), each response in them encoded once. A response that did
    not end (a ranking row's "ended" false) gets no <|assistant_end|> (`tok.turn_end_ids[0]`)."""
    end = tok.turn_end_ids[0]
    prompts, responses, pairs, group = [], [], [], []
    too_long = 0
    for row_index, row in enumerate(ds.rows):
        if ds.kind == "ranking":
            row_pairs = ranking_pairs(row["ranking"], mode)
            used = sorted({i for pair in row_pairs for i in pair})
            ended = row.get("ended") or [True] * len(row["responses"])
            texts, ended = [row["responses"][i] for i in used], [ended[i] for i in used]
            row_pairs = [(used.index(a), used.index(b)) for a, b in row_pairs]
        else:
            texts, ended, row_pairs = [row["chosen"], row["rejected"]], [True, True], [(0, 1)]
        bodies = [tok.encode(t) + ([end] if e else []) for t, e in zip(texts, ended)]
        prompt = fit_prompt(tok, row["prompt"], block_size - max(len(b) for b in bodies))
        if prompt is None:
            too_long += 1
            continue
        first = len(prompts)
        prompts += [prompt] * len(bodies)
        responses += bodies
        pairs += [(first + a, first + b) for a, b in row_pairs]
        group += [row_index] * len(row_pairs)
    counts = {**ds.summary(), "data/pairs": len(pairs)}
    if too_long:
        counts["data/skipped/longer_than_context"] = too_long
    return Pairs(prompts, responses, np.asarray(pairs, dtype=np.int64).reshape(-1, 2),
                 np.asarray(group, dtype=np.int64)), counts


def split_heldout(data: Pairs, rows: list[dict], fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Pair indices (train, held-out): a pair is held out when its row's prompt is (the one rule,
    data/split.py), so no held-out prompt is trained on."""
    held_rows = np.array([is_heldout(row["prompt"], fraction) for row in rows], dtype=bool)
    is_held = held_rows[data.group]
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def sorted_logprobs(model, data: Pairs, seqs: np.ndarray, batch_size: int, desc: str) -> np.ndarray:
    """sequence_logprobs of the sequences `seqs`, batched by length (less padding), in their order."""
    order = sorted(range(len(seqs)), key=lambda i: len(data.prompts[seqs[i]]) + len(data.responses[seqs[i]]))
    values = sequence_logprobs(model, [data.prompts[seqs[i]] for i in order],
                               [data.responses[seqs[i]] for i in order], batch_size=batch_size, desc=desc)
    out = np.empty(len(seqs))
    out[order] = values
    return out


# --- the stage ---------------------------------------------------------------------------------


def run(cfg: Config, policy: str | Path, prefs: str | Path, out: str | Path, fresh: bool = False,
        skip_bad_rows: bool = False) -> dict:
    t_start = time.perf_counter()
    tc = cfg.dpo
    if tc.loss_type not in LOSS_TYPES:
        raise UserError(f"dpo.loss_type: expected one of {', '.join(LOSS_TYPES)}, got {tc.loss_type!r}")
    if tc.pairs not in PAIR_MODES:
        raise UserError(f"dpo.pairs: expected one of {', '.join(PAIR_MODES)}, got {tc.pairs!r}")
    info = init_distributed()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    policy_dir, run_dir = Path(policy), Path(out)
    stage_dir = run_dir / STAGE
    prefs_file, prefs_stage = resolve_prefs(prefs)
    if prefs_stage is not None:  # responses sampled by another run's model: refuse a tokenizer mismatch
        from ..rundir import check_same_tokenizer
        check_same_tokenizer(prefs_stage, policy_dir)
    model, source_cfg, tok = load_stage(policy_dir, info.device)
    cfg = adopt_model(cfg, source_cfg)  # the architecture is the policy's, whatever the recipe says

    # --- data: read and validate everything before any training ---------------------------------
    ds = read_dataset(prefs_file, expect=("preference", "ranking"), skip_bad_rows=skip_bad_rows)
    if ds.n_skipped:
        warn(ds.describe(), info)
    data, counts = encode_pairs(tok, ds, tc.context(cfg.model.block_size), tc.pairs)
    if too_long := counts.get("data/skipped/longer_than_context"):
        warn(f"{prefs_file}: {too_long} row(s) do not fit the context ({tc.context(cfg.model.block_size)} tokens) even "
             "without their earlier turns; skipped", info)
    if not len(data.pairs):
        raise UserError(f"{prefs_file}: no preference pair to train on ({ds.describe()})")
    train, heldout = split_heldout(data, ds.rows, tc.heldout_fraction)
    if not len(train):
        raise UserError(f"{prefs_file}: every pair is held out; lower dpo.heldout_fraction")
    counts |= {"data/train_pairs": len(train), "data/heldout_pairs": len(heldout)}
    lengths = torch.tensor([len(r) for r in data.responses], dtype=torch.float32)

    def per_token(logps: torch.Tensor, seqs) -> torch.Tensor:  # IPO is defined on mean, not summed, logprobs
        return logps / lengths[seqs].clamp(min=1).to(logps.device) if tc.loss_type == "ipo" else logps

    if info.is_main:
        adopt_tokenizer(policy_dir.parent / "tokenizer", run_dir)
    state = resume_state(stage_dir, fresh, info)

    # --- the frozen reference's logprobs, once: the weights as loaded are the reference -------------
    model.eval()
    ref_logps = torch.from_numpy(sorted_logprobs(model, data, np.arange(len(data.responses)), tc.ref_batch_size,
                                                 desc="reference logprobs")).float()
    ref_logps = per_token(ref_logps, slice(None))

    def heldout_metrics() -> dict[str, float]:
        """The DPO figures on the held-out pairs (TRL's eval_ names), under the current policy."""
        seqs = np.unique(data.pairs[heldout])
        logps = torch.zeros(len(data.responses))
        logps[seqs] = torch.from_numpy(sorted_logprobs(model, data, seqs, tc.ref_batch_size, desc=None)).float()
        logps = per_token(logps, slice(None))
        c, r = data.pairs[heldout, 0], data.pairs[heldout, 1]
        loss, rc, rr = dpo_loss(logps[c], logps[r], ref_logps[c], ref_logps[r], tc.beta, tc.loss_type,
                                tc.label_smoothing)
        return pair_metrics(loss, rc, rr, logps[c], logps[r], prefix="eval_")

    # --- train ------------------------------------------------------------------------------------
    model.train()
    session = Session.start(tc, STAGE, model, stage_dir, info, cfg.to_dict(), state,
                            aliases=trl_names(METRICS + ("nll_loss",)))
    session.epoch_size = len(train)
    print0(f"dpo: {len(train):,} pairs from {len(np.unique(data.group[train])):,} prompts ({len(heldout):,} held "
           f"out), beta {tc.beta}, {tc.loss_type} loss, batch {tc.batch_size} x {tc.grad_accum} x {info.world}, "
           f"{tc.max_steps} steps = {tc.max_steps * tc.batch_size * tc.grad_accum * info.world / len(train):.2f} "
           "epochs", info=info)
    window: dict[str, list[float]] = {}  # batch metrics since the last log line
    last_train: dict[str, float] = {}  # stays empty when a finished run is resumed (no step left to take)

    def micro_loss(step: int, micro: int) -> torch.Tensor:
        rows = train[batch_indices(len(train), tc.batch_size, tc.seed, step, micro, tc.grad_accum, info.rank, info.world)]
        chosen, rejected = torch.from_numpy(data.pairs[rows, 0]), torch.from_numpy(data.pairs[rows, 1])
        seqs = torch.cat([chosen, rejected])  # chosen and rejected in one forward, as TRL does
        summed = summed_logprobs(session.step_model, [data.prompts[s] for s in seqs.tolist()],
                                 [data.responses[s] for s in seqs.tolist()])
        logps = per_token(summed, seqs)
        pc, pr = logps[: len(rows)], logps[len(rows):]
        loss, rc, rr = dpo_loss(pc, pr, ref_logps[chosen].to(pc.device), ref_logps[rejected].to(pc.device),
                                tc.beta, tc.loss_type, tc.label_smoothing)
        metrics = pair_metrics(loss, rc, rr, pc, pr)
        if tc.rpo_alpha:
            nll = chosen_nll(summed[: len(rows)], lengths[chosen].to(summed.device))
            loss = loss + tc.rpo_alpha * nll
            metrics |= {"loss": loss.detach().item(), "nll_loss": nll.detach().item()}
        for k, v in metrics.items():
            window.setdefault(k, []).append(v)
        return loss

    for step in session.steps():
        result = session.step(step, lambda micro: micro_loss(step, micro))
        if result is None:
            window = {}
            continue
        lr, loss, grad_norm = result
        done = step + 1
        if done % tc.log_every == 0 or done == tc.max_steps:
            means = {k: all_reduce_mean(float(np.mean(v)), info) for k, v in window.items()}
            window = {}
            session.log(done, {"loss": f"{means['loss']:.3f}", "acc": f"{means['rewards/accuracies']:.2f}"},
                        **means, **{"train/lr": lr, "train/grad_norm": grad_norm}, **session.epoch(done))
            last_train = means
        if tc.eval_every and done % tc.eval_every == 0 and done != tc.max_steps and info.is_main and len(heldout):
            session.log(done, **heldout_metrics())
            model.train()
        if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done != tc.max_steps:
            session.checkpoint(done)
    if session.stopped_early():
        cleanup(info)
        return {"stopped_at": session.last_step}

    # --- final evaluation, weights, summary --------------------------------------------------------
    summary: dict = {}
    if info.is_main:
        # the SFT model, for eval/kl_to_sft (under LoRA: the policy's frozen weights without its adapters)
        reference = without_adapters(model) if tc.lora_rank else load_model(policy_dir, info.device)[0]
        figures, samples = protocol.evaluate_policy(model, tok, cfg.world, cfg.eval, reference_model=reference)
        atomic_write_text(stage_dir / "eval_samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        summary = {**figures, **(heldout_metrics() if len(heldout) else {}), **last_train, "steps": tc.max_steps,
                   **counts, "wall_seconds": time.perf_counter() - t_start}
    session.finish(summary, **{k: v for k, v in summary.items() if isinstance(v, float) and k.startswith("eval")})
    if info.is_main:
        heldout_acc = summary.get("eval_rewards/accuracies")
        print0(f"dpo: accuracy {summary['eval/accuracy']:.1%} (95% {summary['eval/accuracy_ci95'][0]:.1%}-"
               f"{summary['eval/accuracy_ci95'][1]:.1%}), gold {summary['eval/gold_reward']:.3f}, KL to SFT "
               f"{summary['eval/kl_to_sft']:.2f}" + (f", held-out pair accuracy {heldout_acc:.1%}" if heldout_acc
                                                      is not None else "") + f"; wrote {stage_dir}")
    cleanup(info)
    return summary
