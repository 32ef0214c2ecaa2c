"""The TRL side of bench/bench_rl.py: time PPO updates or GRPO steps of TRL's own trainers.

Runs inside a TRL venv that bench_rl.py creates (never in the project's environment):
TRL 1.12.0's `trl.experimental.ppo.PPOTrainer` (the last TRL with PPO) or TRL 1.16's
`GRPOTrainer`, on the fixture bench_rl.py wrote: the random-init 1.18 M Llama exported from
gptstack (`hf/policy`, with its tokenizer), the reward model's trunk + head as a
`LlamaForSequenceClassification` (`hf/reward`), and world prompts already rendered with the chat
template (`prompts.jsonl`: ids and text). Settings follow ../shared/ANCHORS.md ("Running the anchors
fairly on CPU"): use_cpu, fp32, no reporting or saving, no sample generations; gradient
checkpointing off (it only recomputes activations: its best figure on CPU).

A callback stamps `time.perf_counter()` at the start of training and at every `on_step_end`; the
differences are the wall seconds of each update (PPO: rollout + reward/ref/value forwards + all
epochs + TRL's own `gc.collect()`; GRPO: generation + reward + one optimizer step). Prints one line
per update and, last, `TIMES {"update_s": [...], ...}` (JSON) for the harness. With `--phases`,
`Phases` (also used by bench_rl.py on the gptstack side) splits that time into generation,
no-grad scoring forwards, training forwards, backward, optimizer, reward function and gc.

Run (bench_rl.py does this): bench/.cache/venv-trl-1.12.0/bin/python bench/trl_rl.py ppo FIXTURE --updates 10
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch


class Phases:
    """Wall seconds per phase of an update, from wrappers around the functions that do the work.
    A call inside an already-timed call counts in the outer phase only."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._active = False

    def wrap(self, owner, name: str, label) -> None:
        """Time owner.name; `label` is a phase name or a function of the call's arguments."""
        fn = getattr(owner, name)

        def timed(*a, **k):
            if self._active:
                return fn(*a, **k)
            phase = label(*a, **k) if callable(label) else label
            self._active, t0 = True, time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[phase] += time.perf_counter() - t0
                self._active = False

        setattr(owner, name, timed)

    def forward_label(self, *_, **__) -> str:
        return "forward, training (grad)" if torch.is_grad_enabled() else "forwards, scoring (no grad)"

    def install_common(self) -> None:
        """backward and optimizer steps, wherever they are called from."""
        import torch.optim.optimizer as optim

        self.wrap(torch.Tensor, "backward", "backward")
        start = {}
        optim.register_optimizer_step_pre_hook(lambda *a: start.__setitem__(0, time.perf_counter()))
        optim.register_optimizer_step_post_hook(
            lambda *a: self.seconds.__setitem__("optimizer step", self.seconds["optimizer step"]
                                                + time.perf_counter() - start[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("algo", choices=("ppo", "grpo"))
    ap.add_argument("fixture", help="directory written by bench_rl.py (hf/policy, hf/reward, prompts.jsonl)")
    ap.add_argument("--updates", type=int, default=10, help="PPO updates / GRPO optimizer steps to time")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--batch", type=int, default=16, help="PPO: rollouts per update")
    ap.add_argument("--epochs", type=int, default=4, help="PPO: epochs over each batch")
    ap.add_argument("--generations", type=int, default=8, help="GRPO: completions per step (one prompt)")
    ap.add_argument("--new-tokens", type=int, default=64, help="response length (min = max)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phases", action="store_true", help="also time the phases of the updates (PHASES line)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import datasets
    import transformers
    import trl
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bar()
    fixture = Path(args.fixture)
    meta = json.loads((fixture / "fixture.json").read_text())
    rows = [json.loads(line) for line in (fixture / "prompts.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(fixture / "hf/policy")
    tok.pad_token = meta["pad_token"]  # the vocabulary has no pad token; see bench_rl.py
    tok.padding_side = "left"
    # the same prompt ids on both sides: HF's tokenizer must reproduce gptstack's rendering
    for r in rows[:64]:
        ids = tok(r["text"], add_special_tokens=False)["input_ids"]
        assert ids == r["ids"], ("HF tokenizer differs from gptstack's rendering", r["text"], ids, r["ids"])

    def causal_lm():
        return AutoModelForCausalLM.from_pretrained(fixture / "hf/policy", dtype=torch.float32,
                                                    attn_implementation="sdpa")

    class Stamps(TrainerCallback):
        def __init__(self):
            self.t = []

        def on_train_begin(self, *a, **k):
            self.t = [time.perf_counter()]

        def on_step_end(self, *a, **k):
            self.t.append(time.perf_counter())
            print(f"{args.algo} trl update {len(self.t) - 1}: {self.t[-1] - self.t[-2]:.3f} s", flush=True)

    stamps = Stamps()
    common = dict(output_dir=tempfile.mkdtemp(prefix="trl-bench-"), use_cpu=True, bf16=False, fp16=False,
                  report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=args.seed,
                  gradient_checkpointing=False, dataloader_num_workers=0)
    info = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "threads": torch.get_num_threads()}

    phases = Phases()
    if args.algo == "ppo":
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        def scalar_model():
            return AutoModelForSequenceClassification.from_pretrained(
                fixture / "hf/reward", num_labels=1, dtype=torch.float32, attn_implementation="sdpa")

        config = PPOConfig(**common, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                           num_mini_batches=1, num_ppo_epochs=args.epochs, response_length=args.new_tokens,
                           local_rollout_forward_batch_size=args.batch, total_episodes=args.batch * args.updates,
                           num_sample_generations=0, temperature=1.0,
                           # no stop token: every response is exactly response_length tokens (min = max)
                           stop_token=None, learning_rate=1e-5)
        train = datasets.Dataset.from_list([{"input_ids": r["ids"]} for r in rows])
        trainer = PPOTrainer(args=config, processing_class=tok, model=causal_lm(), ref_model=causal_lm(),
                             reward_model=scalar_model(), value_model=scalar_model(), train_dataset=train,
                             eval_dataset=train.select(range(args.batch)), callbacks=[stamps])
        samples_per_update = args.batch
    else:
        from trl import GRPOConfig, GRPOTrainer

        eos = tok.convert_tokens_to_ids(meta["eos_token"])
        sys.path.insert(0, meta["gptstack_src"])  # the world's gold reward: stdlib-only modules
        from gptstack import world

        def gold_reward(prompts, completions, completion_ids, task_prompt, **_):
            return [world.gold(p, c, ended=eos in ids) for p, c, ids in zip(task_prompt, completions, completion_ids)]

        config = GRPOConfig(**common, per_device_train_batch_size=args.generations, gradient_accumulation_steps=1,
                            num_generations=args.generations, max_completion_length=args.new_tokens,
                            generation_kwargs={"min_new_tokens": args.new_tokens}, temperature=1.0, top_p=1.0,
                            top_k=0, beta=0.0, max_steps=args.updates, learning_rate=1e-5, log_completions=False)
        train = datasets.Dataset.from_list([{"prompt": r["text"], "task_prompt": r["task_prompt"]} for r in rows])
        trainer = GRPOTrainer(model=causal_lm(), reward_funcs=gold_reward, args=config, train_dataset=train,
                              processing_class=tok, callbacks=[stamps])
        samples_per_update = args.generations

    if args.phases:  # installed after setup, so only the updates count
        if args.algo == "ppo":
            import gc

            from trl.experimental.ppo import ppo_trainer
            phases.wrap(ppo_trainer, "batch_generation", "generate")
            phases.wrap(ppo_trainer, "forward", phases.forward_label)
            phases.wrap(ppo_trainer, "get_reward", phases.forward_label)  # the reward and value models
            phases.wrap(gc, "collect", "gc.collect")
        else:
            phases.wrap(GRPOTrainer, "_generate_single_turn", "generate")
            phases.wrap(GRPOTrainer, "_calculate_rewards", "reward function")
            phases.wrap(GRPOTrainer, "_get_per_token_logps_and_entropies", phases.forward_label)
        phases.install_common()
    trainer.train()
    times = [b - a for a, b in zip(stamps.t, stamps.t[1:])]
    assert len(times) == args.updates, (len(times), args.updates)
    print("TIMES " + json.dumps({"update_s": times, "samples_per_update": samples_per_update, **info}), flush=True)
    if args.phases:  # over all updates, the first included
        print("PHASES " + json.dumps({"total": stamps.t[-1] - stamps.t[0], **phases.seconds}), flush=True)


if __name__ == "__main__":
    main()
