"""Tokenizer benchmark: gptstack vs HF `tokenizers` (training) and vs `tiktoken` (encoding).

Trains vocab 8192 on tinyshakespeare + TinyStories repeated to ~10 MB with gptstack and with
HF's ByteLevel BPE, interleaved (A B, B A, ...), and encodes the same text with gptstack and
tiktoken. Both trainers get the same text file, the same pre-split (GPT-2's regex, which is what
ByteLevel BPE uses), the same 6 special tokens and both cores. Reports ratios of medians:

    RESULT tokenizer train_time_ratio=<gptstack/HF> encode_speed_ratio=<gptstack/tiktoken> compression_ratio=<gptstack tokens / HF tokens>

Run: python bench/bench_tokenizer.py [--runs 3] [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tokenizers import ByteLevelBPETokenizer

from gptstack.common import read_text_file
from gptstack.tokenizer import DEFAULT_SPECIALS, GPT2_PATTERN, Tokenizer

DATA = Path(os.environ.get("GPTSTACK_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each side")
    ap.add_argument("--repeat", type=int, default=5, help="copies of the 1.9 MB corpus (5 -> 9.5 MB)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args()

    base = (DATA / "tinyshakespeare/input.txt").read_text(encoding="utf-8") + (
        DATA / "tinystories/tinystories_val.txt").read_text(encoding="utf-8")
    text = base * args.repeat
    tmp = Path(tempfile.mkdtemp()) / "corpus.txt"
    tmp.write_text(text, encoding="utf-8")
    mb = len(text.encode("utf-8")) / 1e6
    print(f"corpus: {mb:.2f} MB ({args.repeat} x tinyshakespeare + TinyStories val), vocab {args.vocab_size}, "
          f"{os.cpu_count()} cores")

    # --- training: HF ByteLevel BPE vs gptstack, interleaved ------------------------------------
    def train_hf():
        hf = ByteLevelBPETokenizer()
        hf.train([str(tmp)], vocab_size=args.vocab_size, special_tokens=list(DEFAULT_SPECIALS), show_progress=False)
        return hf

    def train_ours():
        return Tokenizer.train(read_text_file(tmp), args.vocab_size, pattern="gpt2",
                               special_tokens=DEFAULT_SPECIALS, progress=False)

    times = {"hf": [], "gptstack": []}
    sides = [("hf", train_hf), ("gptstack", train_ours)]
    for run in range(args.runs):
        for name, fn in sides if run % 2 == 0 else sides[::-1]:
            seconds, result = timed(fn)
            times[name].append(seconds)
            if name == "hf":
                hf = result
            else:
                ours = result
        print(f"train run {run + 1}: hf {times['hf'][-1]:.3f} s, gptstack {times['gptstack'][-1]:.3f} s")
    assert ours.vocab_size == hf.get_vocab_size() == args.vocab_size, (ours.vocab_size, hf.get_vocab_size())
    train_ratio = statistics.median(times["gptstack"]) / statistics.median(times["hf"])

    # --- compression: tokens of each trained tokenizer on one copy of the corpus --------------
    ours_tokens = len(ours.encode(base))
    hf_tokens = len(hf.encode(base).ids)
    compression_ratio = ours_tokens / hf_tokens
    print(f"compression: gptstack {ours_tokens} tokens, hf {hf_tokens} tokens on {len(base.encode()) / 1e6:.2f} MB")

    # --- encoding: gptstack (GPT-2 files) vs tiktoken's gpt2, 1 thread, same text ---------------
    gpt2_files = DATA / "gpt2/encoder.json", DATA / "gpt2/vocab.bpe"
    ours_gpt2 = Tokenizer.from_gpt2_files(*gpt2_files)
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(gpt2_files[1]), encoder_json_file=str(gpt2_files[0]))
    ref = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    enc_times = {"tiktoken": [], "gptstack": []}
    enc_sides = [("tiktoken", lambda: ref.encode_ordinary(text)), ("gptstack", lambda: ours_gpt2.encode(text))]
    for run in range(args.runs):
        outs = {}
        for name, fn in enc_sides if run % 2 == 0 else enc_sides[::-1]:
            seconds, outs[name] = timed(fn)
            enc_times[name].append(seconds)
        assert outs["tiktoken"] == outs["gptstack"]
        print(f"encode run {run + 1}: tiktoken {mb / enc_times['tiktoken'][-1]:.2f} MB/s, "
              f"gptstack {mb / enc_times['gptstack'][-1]:.2f} MB/s")
    encode_ratio = statistics.median(enc_times["tiktoken"]) / statistics.median(enc_times["gptstack"])

    print(f"median train: gptstack {statistics.median(times['gptstack']):.3f} s, hf {statistics.median(times['hf']):.3f} s")
    print(f"RESULT tokenizer train_time_ratio={train_ratio:.3f} encode_speed_ratio={encode_ratio:.3f} "
          f"compression_ratio={compression_ratio:.4f}")


if __name__ == "__main__":
    main()
