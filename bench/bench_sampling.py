"""Sampling benchmark: gptstack's engine vs `transformers` `generate` on the same exported weights.

For each of the two ANCHORS.md configs (Llama, vocab 512: hidden 128 / 4 layers / 4 heads /
intermediate 512, 1.18 M params; hidden 384 / 6 / 6 / 1536, 14.6 M), a gptstack GPT is
initialised with a fixed seed, exported with `gptstack.model.hf.export_hf` and loaded back with
`transformers.LlamaForCausalLM.from_pretrained(attn_implementation="sdpa")`, fp32. Both sides then
generate from the same batch of random prompts (batch 16 x 16 tokens) exactly 128 new tokens by
sampling (temperature 1, no top-k / top-p) with a KV cache: HF with min_new_tokens =
max_new_tokens and no eos, gptstack with no stop ids. Runs are interleaved (A B B A ...) after one
warm-up run each, in one process, both with torch's thread setting (2 on the reference machine).

Prints per-run new tokens/s and, last, the ratio of medians (gptstack / HF) per config:

    RESULT sampling speed_ratio=<min of the two> small=<ratio> large=<ratio>

Run: python bench/bench_sampling.py [--runs 5] [--batch 16] [--prompt-len 16] [--new-tokens 128]
     [--configs small,large]   (the smoke test uses tiny sizes; the figures in RESULTS.md use the defaults)
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import transformers

from gptstack.engine import generate
from gptstack.model import GPT, GPTConfig
from gptstack.model.hf import export_hf

CONFIGS = {
    "small": dict(vocab_size=512, n_layer=4, n_head=4, n_embd=128, intermediate_size=512, block_size=256),
    "large": dict(vocab_size=512, n_layer=6, n_head=6, n_embd=384, intermediate_size=1536, block_size=256),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each side per config")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--configs", default="small,large", help="comma-separated subset of: " + ",".join(CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores; batch {args.batch} x {args.prompt_len}-token prompts -> {args.new_tokens} new tokens")

    ratios = {}
    for name in args.configs.split(","):
        torch.manual_seed(args.seed)
        model = GPT(GPTConfig(**CONFIGS[name])).eval()
        with tempfile.TemporaryDirectory() as tmp:
            export_hf(model, tmp)
            hf = transformers.LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa",
                                                               dtype=torch.float32).eval()
        n_params = sum(p.numel() for p in hf.parameters())
        assert n_params == model.num_params(), (n_params, model.num_params())
        prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(args.seed))
        prompt_lists = prompts.tolist()
        new = args.new_tokens

        def run_hf(run: int) -> int:
            torch.manual_seed(run)
            with torch.inference_mode():
                out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                                  top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, use_cache=True,
                                  pad_token_id=0, eos_token_id=None)
            return (out.size(1) - args.prompt_len) * out.size(0)

        def run_ours(run: int) -> int:
            out = generate(model, prompt_lists, new, temperature=1.0, seed=run)
            return sum(len(c.tokens) for cs in out for c in cs)

        sides = [("hf", run_hf), ("gptstack", run_ours)]
        for label, fn in sides:  # warm-up
            assert fn(-1) == args.batch * new, label
        speed: dict[str, list[float]] = {"hf": [], "gptstack": []}
        for run in range(args.runs):
            for label, fn in sides if run % 2 == 0 else sides[::-1]:
                t0 = time.perf_counter()
                tokens = fn(run)
                speed[label].append(tokens / (time.perf_counter() - t0))
            print(f"{name} ({n_params / 1e6:.2f} M) run {run + 1}: hf {speed['hf'][-1]:,.0f} tok/s, "
                  f"gptstack {speed['gptstack'][-1]:,.0f} tok/s", flush=True)
        med = {k: statistics.median(v) for k, v in speed.items()}
        ratios[name] = med["gptstack"] / med["hf"]
        print(f"{name}: median hf {med['hf']:,.0f} tok/s, gptstack {med['gptstack']:,.0f} tok/s, "
              f"ratio {ratios[name]:.2f} (range of runs: hf {min(speed['hf']):,.0f}-{max(speed['hf']):,.0f}, "
              f"gptstack {min(speed['gptstack']):,.0f}-{max(speed['gptstack']):,.0f})", flush=True)
    print(f"RESULT sampling speed_ratio={min(ratios.values()):.3f} "
          + " ".join(f"{k}={v:.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
