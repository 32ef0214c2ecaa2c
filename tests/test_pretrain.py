"""Pretraining on the shared core: run-directory contract, exact resume (also after kill -9),
atomic checkpoints, DDP == single process, FSDP2, and bad input stopped before training."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptstack.common import UserError, atomic_write_bytes
from gptstack.config import build_config
from gptstack.stages import pretrain
from gptstack.train.checkpoint import load_checkpoint
from gptstack.train.metrics import read_metrics

SMALL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "pretrain.batch_size=4",
         "pretrain.max_steps=12", "pretrain.warmup_steps=2", "pretrain.log_every=1", "pretrain.checkpoint_every=4",
         "pretrain.lr=3e-3", "tokenizer.vocab_size=300"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, real_texts) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(real_texts["tinyshakespeare"][:60_000], encoding="utf-8")
    return path


def cfg_for(corpus, *extra):
    return build_config("tiny", {"data": {"paths": [str(corpus)]}}, SMALL + list(extra))


def weights(stage: Path) -> dict:
    return load_file(str(stage / "model.safetensors"))


def test_run_directory_contract(corpus, tmp_path):
    summary = pretrain.run(cfg_for(corpus), tmp_path / "run")
    stage = tmp_path / "run/pretrain"
    for name in ("model.safetensors", "config.json", "checkpoint/state.pt", "metrics.jsonl", "summary.json"):
        assert (stage / name).exists(), name
    assert (tmp_path / "run/tokenizer/tokenizer.json").exists()
    saved = json.loads((stage / "summary.json").read_text())
    for key in ("val_loss", "val_bpb", "tokens_seen", "wall_seconds", "params"):
        assert key in saved
    assert saved == pytest.approx(summary)
    assert saved["tokens_seen"] == 12 * 4 * 32
    rows = read_metrics(stage / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 13))
    assert rows[0]["train/loss"] > rows[-2]["train/loss"]  # it learns
    assert json.loads((stage / "config.json").read_text())["model"]["vocab_size"] == 300


def test_resume_is_bit_exact(corpus, tmp_path):
    pretrain.run(cfg_for(corpus), tmp_path / "straight")
    pretrain.run(cfg_for(corpus, "pretrain.stop_at=5"), tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed/pretrain")["step"] == 5
    pretrain.run(cfg_for(corpus), tmp_path / "resumed")  # picks up at step 5
    a, b = weights(tmp_path / "straight/pretrain"), weights(tmp_path / "resumed/pretrain")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the metrics file reads as one uninterrupted run
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed/pretrain/metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 13))


def _cli(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "gptstack.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_resume_after_kill_9_is_bit_exact(corpus, tmp_path):
    sets = [x for s in SMALL + ["pretrain.max_steps=60", "pretrain.checkpoint_every=3", "model.n_embd=64"]
            for x in ("--set", s)]
    base = ["pretrain", "--data", corpus, *sets]
    straight = _cli(*base, "--out", tmp_path / "straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    victim = _cli(*base, "--out", tmp_path / "killed")
    ckpt = tmp_path / "killed/pretrain/checkpoint/state.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["step"] >= 9:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = load_checkpoint(tmp_path / "killed/pretrain")["step"]
    assert 9 <= killed_at < 60 and not (tmp_path / "killed/pretrain/model.safetensors").exists()
    resumed = _cli(*base, "--out", tmp_path / "killed")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a, b = weights(tmp_path / "straight/pretrain"), weights(tmp_path / "killed/pretrain")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_write_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint/state.pt"
    atomic_write_bytes(path, b"good")

    def crash(*a, **k):
        raise OSError("disk died mid-rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new but never completed")
    monkeypatch.undo()
    assert path.read_bytes() == b"good"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.pt"]  # no temp file left behind


def test_bad_input_stops_before_training(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="empty.txt: file is empty"):
        pretrain.run(build_config("tiny", {"data": {"paths": [str(empty)]}}, SMALL), tmp_path / "r1")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(UserError, match=r"rows.jsonl:2: text: missing"):
        pretrain.run(build_config("tiny", {"data": {"paths": [str(rows)]}}, SMALL), tmp_path / "r2")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_tokenizer_model_vocab_mismatch(corpus, tmp_path):
    pretrain.run(cfg_for(corpus, "pretrain.stop_at=2"), tmp_path / "run")
    from gptstack.tokenizer import Tokenizer

    Tokenizer.train("other text " * 100, 280, progress=False).save(tmp_path / "run/tokenizer")
    with pytest.raises(UserError, match=r"vocab_size 300 but the run's tokenizer has 2\d\d tokens"):
        pretrain.run(cfg_for(corpus), tmp_path / "run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(n: int, out: Path, corpus: Path, *sets: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={_free_port()}",
            "-m", "gptstack.cli", "pretrain", "--data", str(corpus), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_ddp_two_processes_match_one(corpus, tmp_path):
    one = _torchrun(1, tmp_path / "one", corpus, *SMALL, "pretrain.batch_size=8")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, tmp_path / "two", corpus, *SMALL, "pretrain.batch_size=4")
    assert two.returncode == 0, two.stderr[-3000:]
    curve = lambda d: [r["train/loss"] for r in read_metrics(d / "pretrain/metrics.jsonl") if "train/loss" in r]
    a, b = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert len(a) == len(b) == 12
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    fsdp = _torchrun(2, tmp_path / "fsdp", corpus, *SMALL, "pretrain.batch_size=4", "pretrain.fsdp=true")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    c = curve(tmp_path / "fsdp")
    assert c == pytest.approx(a, rel=1e-3, abs=1e-4)  # FSDP2 trains the same model the same way
    assert (tmp_path / "fsdp/pretrain/model.safetensors").exists()


def test_world_corpus_is_the_default_and_decontaminated(tmp_path):
    from gptstack import world

    cfg = build_config("tiny", sets=SMALL + ["data.world_chars=200000", "pretrain.max_steps=3"])
    assert cfg.data.builtin == "world" and not cfg.data.paths
    summary = pretrain.run(cfg, tmp_path / "run")
    assert summary["val_loss"] > 0
    # the packed training tokens decode to text that contains no held-out eval prompt
    from gptstack.tokenizer import Tokenizer
    import numpy as np

    tok = Tokenizer.load(tmp_path / "run/tokenizer")
    text = tok.decode(np.fromfile(tmp_path / "run/data/train.bin", dtype=np.uint16).tolist())
    assert "The answer is" in text  # worked examples are there
    index = world.eval_index(cfg.world)
    assert not any(index.contains(doc) for doc in text.split("<|bos|>"))
    saved = json.loads((tmp_path / "run/pretrain/config.json").read_text())
    assert saved["world"]["labeler_tau"] == cfg.world.labeler_tau  # the world settings are recorded


def test_jsonl_bad_rows_skipped_and_counted(tmp_path):
    rows = tmp_path / "rows.jsonl"
    good = json.dumps({"text": "To be or not to be, that is the question. " * 40})
    rows.write_text("\n".join([good, '{"txt": "typo"}', good, "{truncated", good]) + "\n")
    with pytest.raises(UserError, match=r"rows.jsonl:2: text: missing"):
        pretrain.run(build_config("tiny", {"data": {"paths": [str(rows)]}}, SMALL), tmp_path / "r")
    summary = pretrain.run(build_config("tiny", {"data": {"paths": [str(rows)]}}, SMALL + ["pretrain.max_steps=2",
                           "tokenizer.vocab_size=270", "model.block_size=16"]), tmp_path / "r", skip_bad_rows=True)
    assert summary["data/skipped/bad_row"] == 2 and summary["data/usable"] == 3


@pytest.mark.parametrize("sets", [["pretrain.dtype=bfloat16"],
                                  pytest.param(["pretrain.compile=true"], marks=pytest.mark.slow)])
def test_bf16_and_compile_paths_train(corpus, tmp_path, sets):
    summary = pretrain.run(cfg_for(corpus, "pretrain.max_steps=6", *sets), tmp_path / "run")
    rows = [r["train/loss"] for r in read_metrics(tmp_path / "run/pretrain/metrics.jsonl") if "train/loss" in r]
    assert len(rows) == 6 and rows[-1] < rows[0] and summary["val_loss"] < rows[0]


def test_packed_data_is_rebuilt_for_a_different_tokenizer_of_the_same_size(corpus, tmp_path):
    from gptstack.data.corpus import build_corpus
    from gptstack.tokenizer import Tokenizer

    text = corpus.read_text()
    a = Tokenizer.train(text[:30_000], 300, progress=False)
    b = Tokenizer.train(text[30_000:], 300, progress=False)
    assert a.vocab_size == b.vocab_size and a.mergeable_ranks != b.mergeable_ranks
    load = lambda: ([text[:50_000]], [text[50_000:]], True)
    first = build_corpus(load, {"k": 1}, a, tmp_path)["train"].tokens.tolist()
    second = build_corpus(load, {"k": 1}, b, tmp_path)["train"].tokens.tolist()
    assert first[1:] == a.encode(text[:50_000]) and second[1:] == b.encode(text[:50_000])
