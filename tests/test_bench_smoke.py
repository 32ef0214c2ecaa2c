"""The benchmarks still run and print their contract line (tiny sizes; no timing is asserted)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.slow
def test_bench_tokenizer_prints_result(shared_data):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_tokenizer.py"), "--runs", "1", "--repeat", "1", "--vocab-size", "1024"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"RESULT tokenizer train_time_ratio=([\d.]+) encode_speed_ratio=([\d.]+) compression_ratio=([\d.]+)", last)
    assert m, last
    # same regex, same most-frequent-pair rule: the token counts must agree closely
    assert abs(float(m.group(3)) - 1) < 0.02


@pytest.mark.slow
def test_bench_sampling_prints_result():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_sampling.py"), "--runs", "1", "--batch", "2", "--prompt-len", "4",
         "--new-tokens", "8"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"RESULT sampling speed_ratio=[\d.]+ small=[\d.]+ large=[\d.]+", last), last
