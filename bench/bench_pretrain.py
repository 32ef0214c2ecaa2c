"""Pretraining time-to-loss: gptstack vs a nanoGPT-equivalent loop, side by side.

nanoGPT's CPU "baby GPT" (4 layers, 4 heads, 128 wide, context 64, batch 12, 2000 iters, lr 1e-3,
dropout 0, no compile) on tinyshakespeare characters ends at val loss ~1.896 on the full val
split. gptstack runs `gptstack pretrain --recipe shakespeare-char --data input.txt` (same model
size, batch and context; its own recipe) and must end at val_loss <= 1.90 on the full val split.
Runs alternate (baseline, gptstack, gptstack, baseline, ...); each is a whole command in a fresh
process, both with the machine's default threads.

    RESULT pretrain time_ratio=<gptstack/baseline> val_loss=<v> seconds_to_target=<s>

Run: python bench/bench_pretrain.py [--runs 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("GPTSTACK_SHARED_DATA", HERE.parents[1] / "shared" / "data"))
TARGET = 1.90


def run_baseline(data: Path, work: Path, max_iters: int) -> tuple[float, float]:
    t_start = time.time()
    proc = subprocess.run([sys.executable, str(HERE / "nanogpt_baseline.py"), "--data", str(data), "--out", str(work),
                           "--max-iters", str(max_iters)], capture_output=True, text=True, check=True)
    fields = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ")[0].isupper())
    seconds = float(fields["TRAIN_END"]) - t_start - float(fields["PREP_SECONDS"])
    return seconds, float(fields["VAL_LOSS"])


def run_gptstack(data: Path, work: Path, extra: list[str]) -> tuple[float, float]:
    t_start = time.time()
    subprocess.run([sys.executable, "-m", "gptstack.cli", "pretrain", "--recipe", "shakespeare-char", "--data",
                    str(data), "--out", str(work), "--fresh", *extra], capture_output=True, text=True, check=True)
    seconds = time.time() - t_start
    summary = json.loads((work / "pretrain/summary.json").read_text())
    return seconds, summary["val_loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2, help="runs of each side")
    ap.add_argument("--baseline-iters", type=int, default=2000)
    ap.add_argument("--set", action="append", default=[], help="extra --set for gptstack (experiments)")
    args = ap.parse_args()
    data = DATA / "tinyshakespeare/input.txt"
    extra = [x for s in args.set for x in ("--set", s)]
    results: dict[str, list[tuple[float, float]]] = {"baseline": [], "gptstack": []}
    with tempfile.TemporaryDirectory() as tmp:
        order = ["baseline", "gptstack"]
        for run in range(args.runs):
            for side in order if run % 2 == 0 else order[::-1]:
                work = Path(tmp) / f"{side}{run}"
                r = run_baseline(data, work, args.baseline_iters) if side == "baseline" else run_gptstack(data, work, extra)
                results[side].append(r)
                print(f"run {run + 1} {side:9s}: {r[0]:7.2f} s, val loss {r[1]:.4f} (full val split)", flush=True)
    base_s = statistics.median(s for s, _ in results["baseline"])
    ours_s = statistics.median(s for s, _ in results["gptstack"])
    ours_loss = statistics.median(v for _, v in results["gptstack"])
    base_loss = statistics.median(v for _, v in results["baseline"])
    print(f"median: baseline {base_s:.2f} s -> {base_loss:.4f}; gptstack {ours_s:.2f} s -> {ours_loss:.4f}; "
          f"target {TARGET} {'met' if ours_loss <= TARGET else 'NOT met'}")
    print(f"RESULT pretrain time_ratio={ours_s / base_s:.3f} val_loss={ours_loss:.4f} "
          f"seconds_to_target={ours_s if ours_loss <= TARGET else float('nan'):.2f}")


if __name__ == "__main__":
    main()
