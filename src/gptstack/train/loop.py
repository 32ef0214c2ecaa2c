"""What every training stage's loop shares, so each stage file keeps only its own algorithm:

    session = Session.start(cfg.section, "sft", model, stage_dir, info, cfg.to_dict(), state)  # resume, optimizer
    for step in session.steps():
        result = session.step(step, lambda micro: model_loss(batch(step, micro)))   # None: a skipped NaN step
        ...log / eval / session.checkpoint(step + 1)...
    session.finish(final_summary)

A Session owns: the (DDP/FSDP-wrapped) model and its optimizer, restoring both plus RNG from the
stage's checkpoint, the learning-rate schedule, gradient accumulation with the right DDP/FSDP
sync, clipping, the NaN/inf guard, atomic checkpoints, metrics and the progress bar.

LoRA (`<section>.lora_rank` > 0) is applied here, for every stage alike: adapters on the model's
GPTs before wrapping, so the optimizer holds only the trainable parameters, checkpoints hold only
the trainable tensors and their optimizer state (a resume, over the source stage's frozen weights,
is exact), the stage's own evaluation and sampling see the adapted model, and `finish` saves the
merged plain weights.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from tqdm.auto import tqdm

from ..common import TrainingDiverged, UserError, remove_stale_temps
from ..config import LogConfig, TrainConfig
from ..model.lora import apply_lora, merge_lora_state_dict, param_counts
from ..rundir import save_model, write_config, write_summary
from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint, set_rng_state
from .dist import DistInfo, all_reduce_mean, print0, wrap_model
from .metrics import MetricsLogger
from .optim import build_optimizer, lr_at
from .precision import autocast, resolve_dtype

SCHEDULES = ("cosine", "wsd", "constant")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class Session:
    tc: object                      # the stage's TrainConfig section
    section: str                    # its name in the config ("pretrain", "sft", ...)
    model: torch.nn.Module          # the plain model (eval, generation, saving)
    train_model: torch.nn.Module    # wrapped for DDP/FSDP
    step_model: torch.nn.Module     # compiled when asked
    optimizer: torch.optim.Optimizer
    info: DistInfo
    stage_dir: Path
    config: dict
    dtype: torch.dtype
    logger: MetricsLogger
    start_step: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0
    checkpoint_step: int | None = None   # the step of the checkpoint on disk
    last_loss: float | None = None       # the last finite step's loss (kept in checkpoints for the summary)
    epoch_size: int | None = None        # examples per epoch, when the stage sets it: train/epoch is logged
    trainable_params: int | None = None  # with LoRA: the adapters' (and heads') parameter count, for summary.json
    bar: tqdm | None = None
    _t_last: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, tc, section: str, model: torch.nn.Module, stage_dir: Path, info: DistInfo, config: dict,
              state: dict | None = None, aliases: dict[str, str] | None = None) -> "Session":
        """Wrap, build the optimizer, restore `state` (a loaded checkpoint) if given. `aliases`: the
        stage's metric keys -> TRL's names, logged to W&B beside ours (train/metrics.py)."""
        if tc.schedule not in SCHEDULES:
            raise UserError(f"{section}.schedule: expected one of {', '.join(SCHEDULES)}, got {tc.schedule!r}")
        try:
            dtype = resolve_dtype(tc.dtype, info.device)
        except ValueError as e:
            raise UserError(f"{section}.{e}") from None
        if tc.batch_size < 1 or tc.grad_accum < 1 or tc.max_steps < 1:
            raise UserError(f"{section}: batch_size, grad_accum and max_steps must be >= 1")
        lora_targets = tc.check_lora(section)
        if state is not None:
            check_same_lora(tc, section, state, stage_dir)
        trainable = None
        if tc.lora_rank:
            apply_lora(model, tc.lora_rank, tc.lora_alpha, lora_targets, tc.lora_dropout, seed=tc.seed)
            trainable, total = param_counts(model)
            print0(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}",
                   info=info)
        train_model = wrap_model(model, info, tc.fsdp)
        optimizer = build_optimizer(train_model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2))
        start_step = 0
        if state is not None:
            # a LoRA checkpoint holds the trainable tensors only; the frozen ones are the source
            # stage's, which the stage has just loaded (so the resume is still exact)
            set_state_dict(train_model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True, strict=not tc.lora_rank))
            start_step = state["step"]
            set_rng_state(state["rng"])
            print0(f"resuming {stage_dir} from step {start_step}", info=info)
        step_model = torch.compile(train_model) if tc.compile else train_model
        logger = MetricsLogger(stage_dir, resume_step=start_step if state is not None else None, enabled=info.is_main,
                               log=LogConfig(**config.get("log", {})), aliases=aliases, config=config)
        if info.is_main:
            write_config(stage_dir, config)
        session = cls(tc, section, model, train_model, step_model, optimizer, info, Path(stage_dir), config, dtype,
                      logger, start_step, checkpoint_step=start_step if state is not None else None,
                      last_loss=(state or {}).get("extra", {}).get("train/last_loss"), trainable_params=trainable)
        session.bar = tqdm(total=tc.max_steps, initial=start_step, desc=section, unit="step",
                           disable=not info.is_main, dynamic_ncols=True, mininterval=1.0)
        return session

    def steps(self) -> range:
        return range(self.start_step, self.last_step)

    def step(self, step: int, micro_loss: Callable[[int], torch.Tensor]) -> tuple[float, float, float] | None:
        """Set the lr for `step`, run one optimizer step, advance the progress bar.
        -> (lr, loss, grad norm), or None for a dropped non-finite step (see optimizer_step)."""
        lr = self.set_lr(step)
        result = self.optimizer_step(micro_loss, step)
        self.bar.update(1)
        return None if result is None else (lr, *result)

    @property
    def last_step(self) -> int:
        return min(self.tc.max_steps, self.tc.stop_at) if self.tc.stop_at else self.tc.max_steps

    def set_lr(self, step: int) -> float:
        tc = self.tc
        lr = lr_at(step, tc.max_steps, tc.lr, tc.warmup_steps, tc.schedule, tc.min_lr_ratio, tc.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def autocast(self):
        return autocast(self.info.device, self.dtype)

    def optimizer_step(self, micro_loss: Callable[[int], torch.Tensor], step: int) -> tuple[float, float] | None:
        """Accumulate grad_accum micro-batch losses (micro_loss(i) runs the forward), clip, step.

        Returns (mean loss over micro-batches and ranks, grad norm), or None when the loss or the
        gradient norm was not finite: the update is dropped (a finite loss can still give a NaN
        gradient, and one such step would make every weight NaN), counted in train/skipped_steps,
        and after max_bad_steps in a row the run stops; the last checkpoint on disk was written
        from finite weights, so rerunning (with a lower lr) resumes from it."""
        tc, info = self.tc, self.info
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            sync = micro == tc.grad_accum - 1
            ddp_no_sync = info.enabled and not tc.fsdp and not sync
            with self.train_model.no_sync() if ddp_no_sync else torch.enable_grad():
                if info.enabled and tc.fsdp:
                    self.train_model.set_requires_gradient_sync(sync)
                with self.autocast():
                    loss = micro_loss(micro)
                (loss / tc.grad_accum).backward()
            loss_sum += loss.item()
        loss = all_reduce_mean(loss_sum / tc.grad_accum, info)
        # the norm is computed over the synchronised gradients, so every rank takes the same decision
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.train_model.parameters(), tc.grad_clip or float("inf"))) \
            if math.isfinite(loss) else float("nan")
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self.skipped_steps += 1
            if info.is_main:
                tqdm.write(f"{self.section}: step {step + 1}: loss {loss:.4g}, grad norm {grad_norm}; update skipped "
                           f"({self.bad_steps} in a row)")
            self.logger.log(step + 1, **{"train/skipped_steps": self.skipped_steps})
            if self.bad_steps >= tc.max_bad_steps:
                self.bar.close()
                raise TrainingDiverged(
                    f"{self.section}: loss {loss:.4g} / grad norm {grad_norm} not finite for {self.bad_steps} steps in "
                    f"a row (to step {step + 1}); stopped. {self.last_good()}; rerun with a lower {self.section}.lr "
                    f"(--set {self.section}.lr=...) to resume from it, or --fresh to start over")
            return None
        self.bad_steps = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def last_good(self) -> str:
        """Where a stopped run resumes from, for the stop message."""
        if self.checkpoint_step is None:
            return "No checkpoint was written yet"
        return f"The last checkpoint, {self.stage_dir / CHECKPOINT} (step {self.checkpoint_step}), holds finite weights"

    def run_steps(self, micro_loss: Callable[[int, int], torch.Tensor],
                  evaluate: Callable[[], dict] | None = None) -> float | None:
        """The plain training loop most stages share: micro_loss(step, micro) per micro-batch;
        train/loss, train/lr, train/grad_norm (and train/epoch when epoch_size is set) every log_every
        steps; `evaluate()` (rank 0, its dict logged) every eval_every steps; a checkpoint every
        checkpoint_every steps.
        -> the last step's loss (restored from the checkpoint when a finished run is resumed)."""
        tc = self.tc
        for step in self.steps():
            result = self.step(step, lambda micro, step=step: micro_loss(step, micro))
            if result is None:
                continue
            lr, loss, grad_norm = result
            self.last_loss = loss
            done = step + 1
            if done % tc.log_every == 0 or done == tc.max_steps:
                self.log(done, {"loss": f"{loss:.3f}"}, **{"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm},
                         **self.epoch(done))
            if evaluate and tc.eval_every and done % tc.eval_every == 0 and done != tc.max_steps and self.info.is_main:
                self.log(done, **evaluate())
                self.model.train()
            if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done != tc.max_steps:
                self.checkpoint(done)
        return self.last_loss

    def epoch(self, done: int) -> dict[str, float]:
        """{"train/epoch": passes over the epoch_size examples after `done` steps} (TRL's `epoch`: every
        rank draws batch_size x grad_accum examples a step), or {} when the stage did not set epoch_size."""
        if not self.epoch_size:
            return {}
        return {"train/epoch": done * self.tc.batch_size * self.tc.grad_accum * self.info.world / self.epoch_size}

    def seconds_since_last_log(self) -> float:
        now = time.perf_counter()
        dt, self._t_last = now - self._t_last, now
        return dt

    def log(self, step: int, postfix: dict | None = None, **values) -> None:
        if postfix and self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
        self.logger.log(step, **values)

    def full_state_dicts(self) -> tuple[dict, dict]:
        return get_state_dict(self.train_model, self.optimizer, options=_FULL)

    def checkpoint(self, step: int, extra: dict | None = None) -> None:
        """`extra`: the stage's own resumable state (e.g. RL's adaptive beta), back in state["extra"]."""
        model_sd, optim_sd = self.full_state_dicts()
        if self.tc.lora_rank:  # adapters (and heads) only: an 8B base is not rewritten every checkpoint_every steps
            frozen = {n for n, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad}
            model_sd = {k: v for k, v in model_sd.items() if k not in frozen}
        if self.info.is_main:
            save_checkpoint(self.stage_dir, model_sd, optim_sd, step, self.config,
                            {**(extra or {}), "train/last_loss": self.last_loss})
        self.checkpoint_step = step

    def stopped_early(self, extra: dict | None = None) -> bool:
        """After the loop: True (with a checkpoint) when stop_at cut the schedule short."""
        self.bar.close()
        if self.last_step >= self.tc.max_steps:
            return False
        if self.last_step > self.start_step:
            self.checkpoint(self.last_step, extra)
        self.logger.close()
        print0(f"{self.section}: stopped at step {self.last_step} of {self.tc.max_steps} ({self.section}.stop_at); "
               "rerun to resume", info=self.info)
        return True

    def finish(self, summary: dict, metadata: dict | None = None, weights: Callable[[dict], dict] | None = None,
               extra: dict | None = None, checkpoint: bool = True, **final_metrics) -> None:
        """Final checkpoint, weights, summary.json and the last metrics line. `metadata`: extra
        entries of the weights' header (a scalar head's kind, see model/heads.py). `weights` picks
        what model.safetensors holds from the full state dict (RL: the policy, not its critic).
        checkpoint=False: the stage wrote the final checkpoint itself, before changing the weights
        after training (rm's normalisation), so a resume from it redoes that change once.
        With LoRA the weights are merged (plain keys: later stages, export and chat need nothing
        else) and `summary` gains train/trainable_params."""
        if checkpoint:
            self.checkpoint(self.tc.max_steps, extra)
        model_sd, _ = self.full_state_dicts()
        if self.tc.lora_rank:
            model_sd = merge_lora_state_dict(model_sd, self.tc.lora_alpha / self.tc.lora_rank)
            summary["train/trainable_params"] = self.trainable_params
        if self.info.is_main:
            save_model(self.stage_dir, weights(model_sd) if weights else model_sd, self.config, metadata)
            write_summary(self.stage_dir, summary)
            if final_metrics:
                self.logger.log(self.tc.max_steps, **final_metrics)
        self.logger.close()


def check_same_lora(tc, section: str, state: dict, stage_dir: Path) -> None:
    """Refuse to resume a checkpoint trained with other LoRA settings (rank and targets change the
    tensors, alpha what they mean): a clear message instead of a state-dict mismatch."""
    keys = ("lora_rank", "lora_alpha", "lora_targets")
    saved = state.get("config", {}).get(section, {})
    was = {k: saved.get(k, getattr(TrainConfig, k)) for k in keys}   # a checkpoint from before LoRA: off
    now = {k: getattr(tc, k) for k in keys}

    def adapters(d: dict):   # what decides the checkpoint's tensors and their meaning; None: no LoRA
        targets = frozenset(t.strip() for t in d["lora_targets"].split(",") if t.strip())
        return (d["lora_rank"], d["lora_alpha"], targets) if d["lora_rank"] else None

    def show(d: dict) -> str:
        return ", ".join(f"{k}={d[k]}" for k in keys)

    if adapters(was) != adapters(now):
        raise UserError(f"{section}: the checkpoint in {stage_dir} was trained with {show(was)}, this run asks for "
                        f"{show(now)}; rerun with its settings to resume, or --fresh to start over")


def resume_state(stage_dir: Path, fresh: bool, info: DistInfo) -> dict | None:
    """--fresh clears the stage directory (rank 0, before anyone reads it); else the checkpoint, if any."""
    import shutil

    if fresh and info.is_main and Path(stage_dir).exists():
        shutil.rmtree(stage_dir)
    if info.is_main:
        remove_stale_temps(stage_dir)
    if info.enabled:
        torch.distributed.barrier()
    return load_checkpoint(stage_dir)
