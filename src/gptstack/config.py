"""Typed configs: dataclasses with help text, TOML recipes, and `--set section.key=value`.

A run's config is built in three layers, later ones winning:
  1. the dataclass defaults below,
  2. the recipe (`--recipe tiny` = the packaged recipes/tiny.toml, or a path to any .toml),
  3. the command's own flags, then each `--set key=value` in order.
Every key is checked against the dataclasses: a typo stops the run before any work, naming the key
and the closest valid ones. The fully resolved config is saved beside the weights (config.json).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .common import UserError, read_bytes_file
from .model.gpt import PRESETS, GPTConfig
from .model.lora import parse_targets
from .world.tasks import WorldConfig
from .eval.config import EvalConfig
from .serve.config import ServeConfig
from .sampling_config import SamplingConfig
from .report.config import ReportConfig


@dataclass
class TokenizerConfig:
    vocab_size: int = field(default=4096, metadata={"range": "[257, inf)", "help": "total vocabulary: 256 bytes + merges + specials"})
    pattern: str = field(default="digits", metadata={"help": "pre-split regex: gpt4, gpt2, digits, none or a regex"})
    max_train_chars: int = field(default=20_000_000, metadata={"range": "[1, inf)", "help": "train BPE on at most this many characters of the corpus"})
    identity: str = field(default="", metadata={"help": "written by the stages: sha256 of the run's tokenizer, checked when a stage is loaded (leave empty)"})


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list, metadata={"help": "text/JSONL files; empty = the recipe's built-in corpus"})
    builtin: str = field(default="world", metadata={"help": "built-in corpus when no paths are given: world (the task world's documents + English) or tinyshakespeare"})
    world_chars: int = field(default=3_000_000, metadata={"range": "[1, inf)", "help": "characters of the built-in world corpus (train split; val is val_fraction of it)"})
    val_fraction: float = field(default=0.1, metadata={"range": "(0, 1)", "help": "fraction held out for validation"})
    split: str = field(default="auto", metadata={"help": "tail: last fraction of the text (nanoGPT); docs: last fraction of documents; auto: tail for one document"})
    doc_separator: str = field(default="", metadata={"help": "split .txt files into documents at this string (empty: one document per file)"})


@dataclass
class TrainConfig:
    batch_size: int = field(default=12, metadata={"range": "[1, inf)", "help": "sequences per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"range": "[1, inf)", "help": "micro-batches per optimizer step"})
    max_steps: int = field(default=2000, metadata={"range": "[1, inf)", "help": "optimizer steps"})
    lr: float = field(default=1e-3, metadata={"range": "(0, inf)", "help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"range": "[0, 1]", "help": "final lr as a fraction of the peak"})
    warmup_steps: int = field(default=100, metadata={"range": "[0, inf)", "help": "linear warmup steps"})
    schedule: str = field(default="cosine", metadata={"help": "cosine | wsd (warmup-stable-decay) | constant"})
    decay_fraction: float = field(default=0.3, metadata={"range": "[0, 1]", "help": "wsd: fraction of steps spent decaying"})
    weight_decay: float = field(default=0.1, metadata={"range": "[0, inf)", "help": "AdamW decoupled weight decay (matrices only)"})
    beta1: float = field(default=0.9, metadata={"range": "[0, 1)", "help": "AdamW beta1"})
    beta2: float = field(default=0.99, metadata={"range": "[0, 1)", "help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"range": "[0, inf)", "help": "clip the global grad norm (0 = off)"})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 (autocast; auto = bf16 on CUDA, fp32 on CPU)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: FSDP2 (fully_shard) instead of DDP"})
    eval_every: int = field(default=0, metadata={"range": "[0, inf)", "help": "estimate val loss every N steps (0 = only at the end)"})
    eval_batches: int = field(default=20, metadata={"range": "[1, inf)", "help": "batches per periodic val estimate (the final eval uses the full split)"})
    log_every: int = field(default=10, metadata={"range": "[1, inf)", "help": "write metrics every N steps"})
    checkpoint_every: int = field(default=500, metadata={"range": "[0, inf)", "help": "write a resumable checkpoint every N steps (0 = only at the end)"})
    seed: int = field(default=1337, metadata={"range": "[0, inf)", "help": "seed for init and data order"})
    threads: int = field(default=0, metadata={"range": "[0, inf)", "help": "torch CPU threads (0 = all cores)"})
    peak_flops: float = field(default=0.0, metadata={"range": "[0, inf)", "help": "peak FLOP/s for MFU (0 = measure a matmul at start)"})
    max_bad_steps: int = field(default=5, metadata={"range": "[1, inf)", "help": "stop after this many consecutive non-finite losses"})
    stop_at: int = field(default=0, metadata={"range": "[0, inf)", "help": "stop after this step with a checkpoint, the schedule still spanning max_steps (time-boxed sessions; rerun to resume)"})
    max_length: int = field(default=0, metadata={"range": "[0, inf)", "help": "tokens per training sequence (TRL's max_length): longer examples are skipped and counted; 0 = the model's context (model.block_size, an import's max_position_embeddings: 32k for Qwen2.5)"})

    def context(self, block_size: int) -> int:
        """Tokens per training sequence: max_length, capped by the model's context."""
        return min(block_size, self.max_length) if self.max_length else block_size
    lora_rank: int = field(default=0, metadata={"range": "[0, inf)", "help": "LoRA: rank of the adapters on each block's linears, the rest frozen (0 = off: full fine-tuning); the saved model is merged, plain weights"})
    lora_alpha: float = field(default=16.0, metadata={"range": "(0, inf)", "help": "LoRA: the update is scaled by lora_alpha / lora_rank (PEFT's scaling)"})
    lora_dropout: float = field(default=0.0, metadata={"range": "[0, 1)", "help": "LoRA: dropout on the adapters' input"})
    lora_targets: str = field(default="qkv,proj,gate_up,down", metadata={"help": "LoRA: the linears adapted, comma-separated among qkv, proj, gate_up, down"})

    def check_lora(self, section: str) -> list[str]:
        """The LoRA target names, or a UserError naming the key: an unknown module, or LoRA asked of
        pretraining. Pretraining refuses it rather than ignoring it: LoRA adapts a trained model, and
        a random model whose weights stay frozen cannot be pretrained through rank-r updates."""
        if section == "pretrain" and self.lora_rank:
            raise UserError("pretrain.lora_rank: LoRA adapts a trained model, pretraining trains every weight; "
                            "leave it 0 (LoRA is for sft, rm, dpo, ppo, grpo: --set sft.lora_rank=16)")
        try:
            return parse_targets(self.lora_targets)
        except ValueError as e:
            raise UserError(f"{section}.lora_targets: {e}") from None


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: the training fields of TrainConfig with fine-tuning defaults."""

    batch_size: int = field(default=32, metadata={"range": "[1, inf)", "help": "conversations per micro-batch per process"})
    max_steps: int = field(default=600, metadata={"range": "[1, inf)", "help": "optimizer steps"})
    lr: float = field(default=1e-3, metadata={"range": "(0, inf)", "help": "peak learning rate"})
    warmup_steps: int = field(default=20, metadata={"range": "[0, inf)", "help": "linear warmup steps"})
    eval_every: int = field(default=0, metadata={"range": "[0, inf)", "help": "run the eval protocol every N steps (0 = only at the end)"})
    checkpoint_every: int = field(default=200, metadata={"range": "[0, inf)", "help": "write a resumable checkpoint every N steps"})
    demos: int = field(default=20000, metadata={"range": "[1, inf)", "help": "world demonstrations to fine-tune on (when no --data file)"})
    packing: bool = field(default=True, metadata={"help": "pack each batch's conversations into rows of up to block_size tokens, attention kept within each (the padded batch's loss without computing most of its padding); false: one padded row each"})
    heldout_fraction: float = field(default=0.05, metadata={"range": "[0, 1)", "help": "--data FILE: fraction of its prompts held out, never trained on, for heldout/loss (and heldout/accuracy on GSM8K rows); split by a hash of the prompt (data/split.py); 0 = none. The world demonstrations hold out nothing: the eval protocol measures them"})
    data: str = field(default="", metadata={"help": "a conversation file to fine-tune on (TRL messages / prompt-completion, GSM8K, ...; what `sft --data` takes); empty or world = the world's demonstrations"})


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation (stages/dpo.py): the training fields with DPO defaults."""

    batch_size: int = field(default=16, metadata={"range": "[1, inf)", "help": "preference pairs per micro-batch per process (each pair = 2 sequences)"})
    max_steps: int = field(default=300, metadata={"range": "[1, inf)", "help": "optimizer steps"})
    lr: float = field(default=1e-5, metadata={"range": "(0, inf)", "help": "peak learning rate"})
    warmup_steps: int = field(default=10, metadata={"range": "[0, inf)", "help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"range": "[0, inf)", "help": "AdamW decoupled weight decay (TRL's default for DPO: 0)"})
    eval_every: int = field(default=0, metadata={"range": "[0, inf)", "help": "DPO metrics on the held-out pairs every N steps (0 = only at the end)"})
    checkpoint_every: int = field(default=100, metadata={"range": "[0, inf)", "help": "write a resumable checkpoint every N steps"})
    beta: float = field(default=0.1, metadata={"range": "(0, inf)", "help": "DPO beta: strength of the implicit KL to the reference (higher = closer to SFT)"})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO) | ipo (identity preference optimisation, on per-token mean logprobs)"})
    label_smoothing: float = field(default=0.0, metadata={"range": "[0, 0.5)", "help": "sigmoid loss: assumed label-noise rate eps in [0, 0.5) (conservative DPO)"})
    pairs: str = field(default="all", metadata={"help": "pairs of a K-wise ranking: all (K(K-1)/2) | best_vs_rest | best_worst"})
    rpo_alpha: float = field(default=0.0, metadata={"range": "[0, inf)", "help": "weight of the chosen responses' per-token NLL added to the loss (TRL's rpo_alpha; 0 = plain DPO)"})
    heldout_fraction: float = field(default=0.05, metadata={"range": "[0, 1)", "help": "fraction of prompts whose pairs are held out for eval_rewards/accuracies"})
    ref_batch_size: int = field(default=64, metadata={"range": "[1, inf)", "help": "sequences per batch when computing reference / held-out logprobs"})
    prefs: str = field(default="", metadata={"help": "`gptstack run`: the preference file DPO trains on (what `dpo --prefs` takes); empty = RUN/prefs"})


@dataclass
class PrefsConfig:
    """Comparison collection (stages/prefs.py): K sampled responses per prompt, ranked by the labeler."""

    prompts: int = field(default=2000, metadata={"range": "[1, inf)", "help": "world training prompts to collect comparisons on"})
    k: int = field(default=4, metadata={"range": "[2, inf)", "help": "responses sampled (and ranked) per prompt"})
    temperature: float = field(default=1.0, metadata={"range": "[0, inf)", "help": "sampling temperature of the K responses"})
    max_new_tokens: int = field(default=96, metadata={"range": "[1, inf)", "help": "response length limit"})
    batch_size: int = field(default=64, metadata={"range": "[1, inf)", "help": "prompts decoded together (each with k rows; the samples do not depend on it)"})
    seed: int = field(default=2, metadata={"range": "[0, inf)", "help": "seed of the prompts, the samples and the labeler's noise"})
    threads: int = field(default=0, metadata={"range": "[0, inf)", "help": "torch CPU threads (0 = all cores)"})


@dataclass
class RMConfig(TrainConfig):
    """Reward model training (stages/rm.py): the training fields of TrainConfig with RM defaults."""

    batch_size: int = field(default=16, metadata={"range": "[1, inf)", "help": "prompts per micro-batch per process (each with all its K responses and C(K,2) pairs)"})
    max_steps: int = field(default=0, metadata={"range": "[0, inf)", "help": "optimizer steps (0 = derived from epochs)"})
    epochs: float = field(default=1.0, metadata={"range": "(0, inf)", "help": "passes over the training prompts when max_steps is 0 (InstructGPT: 1; more overfits)"})
    lr: float = field(default=3e-4, metadata={"range": "(0, inf)", "help": "peak learning rate"})
    warmup_steps: int = field(default=10, metadata={"range": "[0, inf)", "help": "linear warmup steps"})
    log_every: int = field(default=10, metadata={"range": "[1, inf)", "help": "write metrics every N steps"})
    eval_every: int = field(default=0, metadata={"range": "[0, inf)", "help": "held-out pair accuracy every N steps (0 = only at the end)"})
    checkpoint_every: int = field(default=200, metadata={"range": "[0, inf)", "help": "write a resumable checkpoint every N steps"})
    eval_fraction: float = field(default=0.1, metadata={"range": "(0, 1)", "help": "fraction of prompts held out for evaluation (split by a hash of the prompt)"})
    norm_prompts: int = field(default=256, metadata={"range": "[1, inf)", "help": "prompts the SFT policy answers (one sample each, T = 1) to normalise the reward to mean 0, std 1"})
    max_new_tokens: int = field(default=96, metadata={"range": "[1, inf)", "help": "response length limit of the policy samples (normalisation, policy/accuracy)"})
    score_batch_size: int = field(default=64, metadata={"range": "[1, inf)", "help": "sequences per scoring batch (evaluation, normalisation)"})
    lm_coef: float = field(default=0.0, metadata={"range": "[0, inf)", "help": "weight of a language-modelling loss on each prompt's best response, through the trunk's LM head (Cobbe et al. 2021's joint verifier objective; 0 = off)"})
    likelihood_score: bool = field(default=False, metadata={"help": "score = head + c x the response's mean token log-likelihood under the RM's own LM head, c learned (generative verifier / DPO-style implicit reward)"})
    likelihood_init: float = field(default=0.0, metadata={"help": "rm.likelihood_score: the starting c (0: scores start at 0; 1: the RM starts as its trunk's own likelihood judge)"})
    prefs: str = field(default="", metadata={"help": "`gptstack run`: the comparisons the RM trains on (what `rm --prefs` takes); empty = RUN/prefs"})


@dataclass
class BonConfig:
    """Best-of-N (stages/bon.py): sample max(n) per held-out prompt, pick the RM's argmax among n."""

    n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64], metadata={"range": "[1, inf)", "help": "the n values of best-of-n (comma-separated on --set)"})
    temperature: float = field(default=1.0, metadata={"range": "[0, inf)", "help": "sampling temperature"})
    max_new_tokens: int = field(default=96, metadata={"range": "[1, inf)", "help": "response length limit"})
    prompts: int = field(default=0, metadata={"range": "[0, inf)", "help": "use only the first N prompts of the world's held-out eval set (0 = all)"})
    batch_size: int = field(default=4, metadata={"range": "[1, inf)", "help": "prompts decoded together (each with max(n) rows; the samples do not depend on it)"})
    score_batch_size: int = field(default=128, metadata={"range": "[1, inf)", "help": "sequences per reward-model scoring batch"})
    seed: int = field(default=0, metadata={"range": "[0, inf)", "help": "sampling seed"})
    threads: int = field(default=0, metadata={"range": "[0, inf)", "help": "torch CPU threads (0 = all cores)"})


@dataclass
class RLConfig(TrainConfig):
    """The RL loop (stages/ppo.py) shared by ppo, overopt and grpo: rollout -> score -> advantages
    -> `epochs` passes of clipped updates over `minibatches` per rollout batch. Counted in updates
    (one rollout batch each); the optimizer takes updates x epochs x minibatches steps."""

    max_steps: int = field(default=0, metadata={"range": "[0, inf)", "help": "derived: updates x epochs x minibatches (leave 0)"})
    updates: int = field(default=60, metadata={"range": "[1, inf)", "help": "rollout + optimisation rounds"})
    prompts_per_update: int = field(default=64, metadata={"range": "[1, inf)", "help": "prompts sampled per update per process"})
    samples_per_prompt: int = field(default=1, metadata={"range": "[1, inf)", "help": "responses per prompt (GRPO's group size G)"})
    epochs: int = field(default=4, metadata={"range": "[1, inf)", "help": "passes over each rollout batch"})
    minibatches: int = field(default=4, metadata={"range": "[1, inf)", "help": "optimizer steps per epoch (the batch is split into this many)"})
    batch_size: int = field(default=0, metadata={"range": "[0, inf)", "help": "derived: rollouts per micro-batch (leave 0; set grad_accum to split a minibatch)"})
    lr: float = field(default=5e-5, metadata={"range": "(0, inf)", "help": "peak learning rate"})
    warmup_steps: int = field(default=0, metadata={"range": "[0, inf)", "help": "linear warmup, in optimizer steps"})
    schedule: str = field(default="constant", metadata={"help": "cosine | wsd | constant"})
    weight_decay: float = field(default=0.0, metadata={"range": "[0, inf)", "help": "AdamW decoupled weight decay"})
    beta2: float = field(default=0.999, metadata={"range": "[0, 1)", "help": "AdamW beta2"})
    max_new_tokens: int = field(default=64, metadata={"range": "[1, inf)", "help": "response length limit of the rollouts"})
    temperature: float = field(default=1.0, metadata={"range": "(0, inf)", "help": "rollout temperature (logprobs are recomputed at the same T)"})
    advantage: str = field(default="gae", metadata={"help": "gae (PPO, needs the critic) | grpo (group-normalised) | rloo (leave-one-out)"})
    gamma: float = field(default=1.0, metadata={"range": "[0, 1]", "help": "GAE discount"})
    lam: float = field(default=0.95, metadata={"range": "[0, 1]", "help": "GAE lambda"})
    whiten_advantages: bool = field(default=True, metadata={"help": "normalise GAE advantages over the batch"})
    clip: float = field(default=0.2, metadata={"range": "(0, 1)", "help": "PPO clip range epsilon of the policy ratio"})
    value_clip: float = field(default=0.2, metadata={"range": "(0, inf)", "help": "clip range of the value function"})
    vf_coef: float = field(default=0.1, metadata={"range": "[0, inf)", "help": "weight of the value loss"})
    critic_warmup: int = field(default=0, metadata={"range": "[0, inf)", "help": "gae: first updates that train only the critic (value head), so a cold critic does not give the first tokens wrong credit"})
    kl_coef: float = field(default=0.05, metadata={"range": "[0, inf)", "help": "beta: per-token KL penalty in the reward (InstructGPT 0.02); the initial value with kl_target"})
    kl_target: float = field(default=0.0, metadata={"range": "[0, inf)", "help": "adaptive KL controller's target sequence KL (0 = fixed beta)"})
    kl_horizon: int = field(default=10000, metadata={"range": "[1, inf)", "help": "adaptive KL controller's horizon, in rollouts"})
    kl_loss_coef: float = field(default=0.0, metadata={"range": "[0, inf)", "help": "GRPO-style KL term in the loss (k3 estimator) instead of in the reward"})
    scale_advantages: bool = field(default=True, metadata={"help": "grpo: divide each group's advantages by its reward std (TRL scale_rewards; false = Dr. GRPO, which does not blow up tiny reward differences)"})
    no_end_score: float = field(default=-3.0, metadata={"help": "score given to a response that never ends (reaches max_new_tokens)"})
    penalize_no_end: bool = field(default=True, metadata={"help": "replace the score of a response that never ends by no_end_score"})
    ptx_coef: float = field(default=0.0, metadata={"range": "[0, inf)", "help": "PPO-ptx gamma: weight of a pretraining LM loss in each update (InstructGPT 27.8)"})
    ptx_batch_size: int = field(default=8, metadata={"range": "[1, inf)", "help": "pretraining sequences per micro-batch for PPO-ptx"})
    eval_every: int = field(default=0, metadata={"range": "[0, inf)", "help": "held-out proxy / gold / KL every N updates (0 = only at the end)"})
    eval_prompts: int = field(default=100, metadata={"range": "[1, inf)", "help": "held-out prompts of the periodic evaluation (spread over the families)"})
    eval_samples: int = field(default=2, metadata={"range": "[1, inf)", "help": "samples per held-out prompt at T = 1 in the periodic evaluation"})
    checkpoint_every: int = field(default=10, metadata={"range": "[0, inf)", "help": "write a resumable checkpoint every N updates"})
    log_every: int = field(default=1, metadata={"range": "[1, inf)", "help": "write metrics every N updates"})
    hack_window: int = field(default=5, metadata={"range": "[1, inf)", "help": "updates per window of the reward-hacking alarm (proxy up, gold down)"})
    prompt_seed: int = field(default=7, metadata={"range": "[0, inf)", "help": "seed of the training prompts (world) and the rollouts"})
    prompts: str = field(default="", metadata={"help": "`gptstack run`: the training prompts (what --prompts takes: any prompt/chat/preference/GSM8K file); empty = the world's"})


@dataclass
class GRPOConfig(RLConfig):
    """GRPO on a verifiable reward: the RL loop with group advantages, no critic."""

    samples_per_prompt: int = field(default=8, metadata={"range": "[1, inf)", "help": "G: responses per prompt"})
    prompts_per_update: int = field(default=16, metadata={"range": "[1, inf)", "help": "prompts sampled per update per process"})
    advantage: str = field(default="grpo", metadata={"help": "grpo (group-normalised) | rloo (leave-one-out) | gae"})
    kl_coef: float = field(default=0.0, metadata={"range": "[0, inf)", "help": "per-token KL penalty in the reward (GRPO puts it in the loss: kl_loss_coef)"})
    kl_loss_coef: float = field(default=0.0, metadata={"range": "[0, inf)", "help": "KL to the reference in the loss (k3 estimator; DeepSeekMath 0.04, TRL default 0)"})
    epochs: int = field(default=1, metadata={"range": "[1, inf)", "help": "passes over each rollout batch"})
    minibatches: int = field(default=2, metadata={"range": "[1, inf)", "help": "optimizer steps per epoch"})
    reward: str = field(default="gold", metadata={"help": "`gptstack run`: gold (the world's) | rm (RUN/rm) | FILE (a verifiable file: its prompts are trained on, its answers checked; what `grpo --reward` takes)"})


@dataclass
class PRMConfig(TrainConfig):
    """Process and outcome reward models (stages/prm.py): step data sampled from the policy, then the
    training fields of TrainConfig, shared by the PRM and the ORM (same samples, same budget)."""

    prompts: int = field(default=2000, metadata={"range": "[1, inf)", "help": "training prompts the policy answers (world, or the first N of a --data file)"})
    samples: int = field(default=4, metadata={"range": "[1, inf)", "help": "responses sampled per prompt"})
    families: list[str] = field(default_factory=lambda: ["arithmetic"], metadata={"help": "world families of the training prompts"})
    labels: str = field(default="auto", metadata={"help": "step labels: checker (the world's step checker), mc (Monte-Carlo rollouts, Math-Shepherd) or auto (checker for the world, mc for files with answers)"})
    mc_rollouts: int = field(default=4, metadata={"range": "[1, inf)", "help": "mc labels: rollouts from each step prefix"})
    temperature: float = field(default=1.0, metadata={"range": "[0, inf)", "help": "sampling temperature of responses and rollouts"})
    max_new_tokens: int = field(default=96, metadata={"range": "[1, inf)", "help": "response length limit"})
    gen_batch_size: int = field(default=128, metadata={"range": "[1, inf)", "help": "prompts per generation batch"})
    score_batch_size: int = field(default=128, metadata={"range": "[1, inf)", "help": "sequences per scoring batch (held-out evaluation)"})
    eval_fraction: float = field(default=0.1, metadata={"range": "[0, 1)", "help": "fraction of prompts held out (split by a hash of the prompt)"})
    batch_size: int = field(default=32, metadata={"range": "[1, inf)", "help": "responses per micro-batch per process"})
    max_steps: int = field(default=300, metadata={"range": "[1, inf)", "help": "optimizer steps (each model)"})
    lr: float = field(default=3e-4, metadata={"range": "(0, inf)", "help": "peak learning rate"})
    warmup_steps: int = field(default=20, metadata={"range": "[0, inf)", "help": "linear warmup steps"})
    checkpoint_every: int = field(default=100, metadata={"range": "[0, inf)", "help": "write a resumable checkpoint every N steps"})
    seed: int = field(default=11, metadata={"range": "[0, inf)", "help": "seed of the prompts, samples, rollouts and batches"})


@dataclass
class SearchConfig:
    """Best-of-N selection and PRM-guided step-level search (stages/search.py) on held-out prompts."""

    n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64], metadata={"range": "[1, inf)", "help": "the N values (comma-separated on --set); every N divides the largest"})
    families: list[str] = field(default_factory=lambda: ["arithmetic"], metadata={"help": "world eval-set families to measure on (the held-out set, as the eval protocol has it)"})
    prompts: int = field(default=0, metadata={"range": "[0, inf)", "help": "use only the first N prompts (0 = all; for smoke tests)"})
    temperature: float = field(default=1.0, metadata={"range": "[0, inf)", "help": "sampling temperature"})
    max_new_tokens: int = field(default=96, metadata={"range": "[1, inf)", "help": "response length limit"})
    aggregate: str = field(default="min", metadata={"help": "PRM score of a response from its steps': min or product"})
    expand: int = field(default=4, metadata={"range": "[1, inf)", "help": "prm_search: children sampled per kept beam per step (N // expand beams are kept)"})
    step_tokens: int = field(default=16, metadata={"range": "[1, inf)", "help": "prm_search: token limit of one step (a longer step continues in the next round)"})
    batch_size: int = field(default=16, metadata={"range": "[1, inf)", "help": "prompts per generation batch (each decodes max(n) rows)"})
    score_batch_size: int = field(default=256, metadata={"range": "[1, inf)", "help": "sequences per scoring batch"})
    seed: int = field(default=0, metadata={"range": "[0, inf)", "help": "sampling seed"})
    threads: int = field(default=0, metadata={"range": "[0, inf)", "help": "torch CPU threads (0 = all cores)"})


@dataclass
class LogConfig:
    """Where a training stage's metrics go beside RUN/<stage>/metrics.jsonl and TensorBoard."""

    wandb: bool = field(default=False, metadata={"help": "also log every metric of metrics.jsonl to Weights & Biases, with TRL's names for SFT and DPO (needs pip install 'gptstack[wandb]'; WANDB_MODE=offline writes the run locally)"})
    wandb_project: str = field(default="gptstack", metadata={"help": "W&B project"})
    wandb_run: str = field(default="", metadata={"help": "W&B run name prefix and group: each stage's run is <prefix>/<stage> (empty: the run directory's name)"})
    wandb_entity: str = field(default="", metadata={"help": "W&B entity, a user or team (empty: your default entity)"})

    def wandb_module(self):
        """The wandb package when log.wandb is set, None when it is not; one UserError when it is
        set and the package is missing (build_config asks, so that comes before any work)."""
        if not self.wandb:
            return None
        try:
            import wandb
        except ImportError:
            raise UserError("log.wandb: needs the wandb package: pip install 'gptstack[wandb]'") from None
        return wandb


# The pipeline's stages, in order (pipeline.py runs them; [run.eta] keys are checked against them).
STAGES = ("pretrain", "sft", "prefs", "rm", "bon", "ppo", "overopt", "grpo", "dpo", "prm", "search")


@dataclass
class RunConfig:
    """`gptstack run`'s progress line. The expected seconds are the recipe's (its [run.eta] table),
    measured for that recipe on some machine; the line scales them by the pace measured on the stages
    already run. A stage without one shows no ETA."""

    eta: dict[str, float] = field(default_factory=dict, metadata={
        "range": "[0, inf)", "keys": STAGES,
        "help": "expected seconds per stage, e.g. [run.eta] sft = 490 (a stage left out: no ETA)"})
    stages: str = field(default="", metadata={"help": "the stages `gptstack run` runs without --stages, comma-separated (empty = all, in pipeline order)"})
    needs: str = field(default="", metadata={"help": "config keys the recipe needs set (comma-separated, e.g. model.from_hf): `gptstack run` stops before any stage, naming those left empty"})


@dataclass
class Config:
    name: str = field(default="tiny", metadata={"help": "recipe name"})
    model: GPTConfig = field(default_factory=GPTConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    prefs: PrefsConfig = field(default_factory=PrefsConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    bon: BonConfig = field(default_factory=BonConfig)
    ppo: RLConfig = field(default_factory=RLConfig)
    overopt: RLConfig = field(default_factory=lambda: RLConfig(updates=150, kl_coef=0.0, eval_every=10))
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    run: RunConfig = field(default_factory=RunConfig)
    prm: PRMConfig = field(default_factory=PRMConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- building a config ----------------------------------------------------------------------------


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("gptstack.recipes").iterdir() if p.name.endswith(".toml"))


def load_recipe(recipe: str) -> tuple[dict, str]:
    """A packaged recipe name or a .toml path -> (dict, where it came from). A name always means
    the built-in recipe, even beside a folder of that name (a run directory called `micro`); a
    file is a path ending in .toml."""
    if recipe.endswith(".toml"):
        path = Path(recipe)
        if not path.is_file():
            raise UserError(f"--recipe {recipe}: " + ("is a directory, expected a .toml file" if path.is_dir() else "file not found"))
        try:
            text, origin = read_bytes_file(path, "a .toml file").decode("utf-8"), str(path)
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: byte 0x{e.object[e.start]:02x} at offset {e.start} is not valid UTF-8") from None
    else:
        res = resources.files("gptstack.recipes") / f"{recipe}.toml"
        if not res.is_file():
            close = difflib.get_close_matches(recipe, recipe_names(), n=3)
            raise UserError(f"--recipe {recipe}: no such recipe; built-in recipes: {', '.join(recipe_names())}"
                            + (f" (did you mean {', '.join(close)}?)" if close else "")
                            + ("; a recipe file's name ends in .toml" if Path(recipe).is_file() else ""))
        text, origin = res.read_text(encoding="utf-8"), f"recipes/{recipe}.toml"
    try:
        return tomllib.loads(text), origin
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{origin}: invalid TOML: {e}") from None
    except RecursionError:
        raise UserError(f"{origin}: invalid TOML: nested too deeply") from None


def _field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value, typ, where: str):
    """Check/convert `value` to the annotated type; ints are fine where floats are expected."""
    origin = typing.get_origin(typ)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)
        return [_coerce(v, item, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a table of key = value, got {value!r}")
        _, item = typing.get_args(typ)
        return {k: _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (int, float) and isinstance(value, str):
        try:
            return typ(value)
        except ValueError:
            raise UserError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    if typ is str and not isinstance(value, str):
        raise UserError(f"{where}: expected a string, got {value!r}")
    if typ in (int, float) and (not isinstance(value, typ) or isinstance(value, bool)):
        raise UserError(f"{where}: expected {typ.__name__}, got {value!r}")
    return value


def _check_key(key: str, valid, where: str, prefix: str) -> None:
    if key not in valid:
        close = difflib.get_close_matches(key, list(valid), n=3)
        hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else \
            f"; valid keys: {', '.join(prefix + k for k in valid)}"
        raise UserError(f"{where}: no such key{hint}")


def _apply(obj, values: dict, origin: str, prefix: str = "") -> None:
    types = _field_types(type(obj))
    for key, value in values.items():
        where = f"{origin}: {prefix}{key}"
        for name, f in obj.__dataclass_fields__.items():  # a key of a table one level down (run.sft: run.eta.sft)
            keys = f.metadata.get("keys")
            if key not in types and keys is not None and key in keys:
                raise UserError(f"{where}: no such key; did you mean {prefix}{name}.{key}?")
        _check_key(key, types, where, prefix)
        typ = types[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise UserError(f"{where}: expected a [{prefix}{key}] section (a table), got {value!r}")
            _apply(getattr(obj, key), value, origin, f"{prefix}{key}.")
        elif typing.get_origin(typ) is dict:  # a table: its keys checked, merged into what earlier layers set
            value = _coerce(value, typ, where)
            keys = obj.__dataclass_fields__[key].metadata.get("keys")
            if keys is not None:
                for k in value:
                    _check_key(k, keys, f"{where}.{k}", f"{prefix}{key}.")
            setattr(obj, key, {**getattr(obj, key), **value})
        else:
            setattr(obj, key, _coerce(value, typ, where))


def _in_range(x: float, spec: str) -> bool:
    """`spec` is an interval as the field's metadata writes it: "[0, 1)", "(0, inf)", ..."""
    lo, hi = (float(v) for v in spec[1:-1].split(","))
    return (lo <= x if spec[0] == "[" else lo < x) and (x <= hi if spec[-1] == "]" else x < hi)


def check_ranges(obj, origin: str, prefix: str = "") -> None:
    """Every number of `obj` (a config or a section) finite and inside its field's declared "range",
    else a UserError naming the key, the range and where the value came from."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, origin, f"{key}.")
            continue
        spec = f.metadata.get("range")
        items = ([(f"{key}.{k}", x) for k, x in value.items()] if isinstance(value, dict)
                 else [(key, x) for x in (value if isinstance(value, list) else [value])])
        for where, x in items:
            if not isinstance(x, (int, float)) or isinstance(x, bool):
                continue
            if not math.isfinite(x):
                raise UserError(f"{origin}: {where}: expected a finite number, got {x}")
            if spec and not _in_range(x, spec):
                raise UserError(f"{origin}: {where}: expected a value in {spec}, got {x}")


def _parse_set(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise UserError(f"--set {item}: expected key=value, e.g. --set pretrain.lr=3e-3")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string
    return key.strip().split("."), value


def _nest(path: list[str], value) -> dict:
    out: dict = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    return out


def build_config(recipe: str = "tiny", overrides: dict | None = None, sets: list[str] = ()) -> Config:
    """defaults <- recipe <- `overrides` (nested dict from a command's flags) <- `--set` items.

    `model.preset` (nano, tiny, mini, small, 124m; see model/gpt.py PRESETS) sets the model's sizes
    where it is named, so later keys (or later --set items) still override single sizes."""
    cfg = Config()
    values, origin = load_recipe(recipe)
    layers = [(values, origin)] + ([(overrides, "flags")] if overrides else [])
    for item in sets:
        path, value = _parse_set(item)
        layers.append((_nest(path, value), f"--set {item}"))
    for layer, where in layers:
        model = layer.get("model")
        if isinstance(model, dict) and "preset" in model:  # a preset is applied where it is named
            name = model.pop("preset")
            if name not in PRESETS:
                raise UserError(f"{where}: model.preset: expected one of {', '.join(PRESETS)}, got {name!r}")
            _apply(cfg, {"model": PRESETS[name]}, f"preset {name}")
        _apply(cfg, layer, where)
        check_ranges(cfg, where)  # each layer checked as it lands, so the message names where a bad value came from
    try:
        cfg.model.validate()
    except ValueError as e:
        raise UserError(f"{origin}: {e}") from None
    cfg.world.validate()
    for f in dataclasses.fields(cfg):
        if isinstance(section := getattr(cfg, f.name), TrainConfig):
            section.check_lora(f.name)
            if section.fsdp and f.name != "pretrain":
                # a sharded model needs every rank in each forward; these stages evaluate on rank 0
                # alone and sample through the engine's own forward over whole weights
                raise UserError(f"{f.name}.fsdp: only pretraining shards with FSDP; {f.name} evaluates on rank 0 "
                                "alone, which a sharded model cannot: use DDP (the default under torchrun), and "
                                f"LoRA ({f.name}.lora_rank) for a model too large to replicate in full training state")
    cfg.log.wandb_module()  # a missing optional package stops the run here, before any work
    return cfg


# Sections whose seeds are not a run's randomness: the eval protocol's draws and the world's held-out
# set stay fixed so every seed is measured on the same items; serving, the interactive commands'
# sampling and the report are not training.
_FIXED_SEED_SECTIONS = ("eval", "world", "serve", "sampling", "report")
SEED_STRIDE = 1_000_003


def apply_run_seed(cfg: Config, seed: int) -> Config:
    """`gptstack run --seed N`: every stage's seeds (init, data order and training stream, sampling,
    the labeler's noise, RL prompts) derived from N, the eval set and its draws kept fixed. N = 0 is
    the recipe as written; seed = recipe seed + N x 1,000,003, so stages stay independent streams."""
    if seed == 0:
        return cfg
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if f.name in _FIXED_SEED_SECTIONS or not dataclasses.is_dataclass(section):
            continue
        for name in ("seed", "prompt_seed"):
            if hasattr(section, name):
                setattr(section, name, getattr(section, name) + seed * SEED_STRIDE)
    return cfg


def apply_sets(cfg: Config, sets: list[str]) -> Config:
    """`--set key=value` items onto an existing config (e.g. one loaded from a stage's config.json)."""
    for item in sets:
        path, value = _parse_set(item)
        _apply(cfg, _nest(path, value), f"--set {item}")
        check_ranges(cfg, f"--set {item}")
    return cfg


def config_from_dict(values: dict) -> Config:
    """A saved config.json back into a Config (the keys were valid when it was written)."""
    run = values.get("run")
    if isinstance(run, dict) and "eta" not in run:  # written when the ETAs were fields: run.<stage> = seconds
        values = {**values, "run": {"eta": run}}
    cfg = Config()
    _apply(cfg, values, "config.json")
    check_ranges(cfg, "config.json")
    cfg.model.validate()
    return cfg
