"""Fault injection: kill -9 anywhere (also inside a checkpoint write), NaN gradients, bad settings,
swapped tokenizers, shadowed recipes, unwritable and full disks. Each defect of the fault audit
(issue 20) has a test here that failed before its fix."""
import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptstack.cli import main
from gptstack.common import NonFiniteWeights, TrainingDiverged, UserError
from gptstack.config import build_config
from gptstack.stages import pretrain
from gptstack.train.checkpoint import load_checkpoint, save_checkpoint
from gptstack.rundir import load_stage
from gptstack.train.loop import resume_state
from gptstack.train.metrics import read_metrics

HERE = Path(__file__).parent
STAGES = ("pretrain", "sft", "rm", "ppo", "grpo")
# every stage checkpoints often, so a kill can land between checkpoints as well as in one
SETS = ["pretrain.checkpoint_every=2", "sft.checkpoint_every=2", "rm.checkpoint_every=2", "ppo.checkpoint_every=1",
        "grpo.checkpoint_every=1"]


def _run(out: Path, env: dict) -> subprocess.CompletedProcess:
    argv = ["run", "--recipe", "micro", "--out", str(out), "--stages", "pretrain,sft,prefs,rm,ppo,grpo", "--no-report"]
    argv += [x for s in SETS for x in ("--set", s)]
    return subprocess.run([sys.executable, str(HERE / "fault_run.py"), *argv], cwd=out.parent, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def _summary(stage_dir: Path) -> dict:
    summary = json.loads((stage_dir / "summary.json").read_text())
    return {k: v for k, v in summary.items() if "seconds" not in k}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_anywhere_then_rerun_gives_the_uninterrupted_weights(tmp_path, seed):
    log = tmp_path / "writes.json"
    ref = _run(tmp_path / "ref", {"FAULT_LOG": str(log)})
    assert ref.returncode == 0, ref.stderr[-2000:]
    writes = json.loads(log.read_text())

    def count(match: str) -> int:
        return sum(match in w for w in writes)

    rng = random.Random(seed)
    run = tmp_path / "killed"
    plan = [  # (which writes, kill before or after the rename, at which of them)
        ("pretrain/checkpoint/state.pt", "before", rng.randint(1, count("pretrain/checkpoint/state.pt"))),
        ("sft/", "after", rng.randint(1, count("sft/"))),
        # after rm's last checkpoint, before its weights and summary: the resume must normalise once
        ("rm/checkpoint/state.pt", "after", count("rm/checkpoint/state.pt")),
        ("ppo/checkpoint/state.pt", "before", rng.randint(1, count("ppo/checkpoint/state.pt"))),
        ("grpo/", rng.choice(["before", "after"]), rng.randint(1, count("grpo/"))),
    ]
    for match, when, at in plan:
        killed = _run(run, {"FAULT_MATCH": f"killed/{match}", "FAULT_WHEN": when, "FAULT_AT": str(at)})
        assert killed.returncode == -9, (match, when, at, killed.stderr[-2000:])
    done = _run(run, {})
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in STAGES:
        # equal tensors give equal bytes (sorted header), so this is the weights and their metadata
        assert (run / stage / "model.safetensors").read_bytes() == (tmp_path / "ref" / stage / "model.safetensors").read_bytes(), stage
        assert _summary(run / stage) == _summary(tmp_path / "ref" / stage), stage
    assert not [p for p in run.rglob("*.tmp")], "temporary files of the killed writes are cleaned up"


def _nan_grads(monkeypatch, calls):
    """clip_grad_norm_ sees NaN gradients on the steps in `calls` (1-based): a finite loss whose
    gradient is NaN, as a too-large lr gives."""
    real, n = torch.nn.utils.clip_grad_norm_, [0]

    def clip(params, max_norm, *a, **k):
        n[0] += 1
        params = list(params)
        if n[0] in calls:
            for p in params:
                p.grad.fill_(float("nan"))
        return real(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)


def _all_finite(path: Path) -> bool:
    tensors = torch.load(path, weights_only=False)["model"] if path.suffix == ".pt" else load_file(str(path))
    return all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_a_nan_gradient_step_is_skipped_and_counted(tmp_path, monkeypatch):
    cfg = build_config("micro", sets=["pretrain.max_steps=8", "pretrain.log_every=1"])
    _nan_grads(monkeypatch, {3})
    pretrain.run(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run/pretrain/metrics.jsonl")
    assert [(r["step"], r["train/skipped_steps"]) for r in rows if "train/skipped_steps" in r] == [(3, 1)]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 4, 5, 6, 7, 8]
    assert _all_finite(tmp_path / "run/pretrain/model.safetensors")


def test_nan_gradients_never_reach_a_checkpoint(tmp_path, monkeypatch):
    """The audit's defect 1: a finite loss with a NaN gradient was applied and checkpointed."""
    cfg = build_config("micro", sets=["pretrain.max_steps=20", "pretrain.checkpoint_every=2", "pretrain.max_bad_steps=3"])
    _nan_grads(monkeypatch, range(6, 100))  # from step 6 on: stop after the third in a row
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row \(to step 8\).*state.pt \(step 4\)"):
        pretrain.run(cfg, tmp_path / "run")
    ckpt = tmp_path / "run/pretrain/checkpoint/state.pt"
    assert load_checkpoint(tmp_path / "run/pretrain")["step"] == 4 and _all_finite(ckpt)
    assert not (tmp_path / "run/pretrain/model.safetensors").exists()
    monkeypatch.undo()
    pretrain.run(cfg, tmp_path / "run")  # the rerun resumes from the finite checkpoint and finishes
    assert _all_finite(tmp_path / "run/pretrain/model.safetensors")


def test_the_nan_stop_is_one_error_line(tmp_path, capsys):
    """The audit's reproduction: lr 1e4 gives a finite loss and a NaN gradient norm at step 5."""
    out = tmp_path / "R"
    rc = main(["pretrain", "--recipe", "micro", "--out", str(out), "--set", "pretrain.lr=1e4", "--set",
               "pretrain.checkpoint_every=2", "--set", "pretrain.max_steps=20"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: pretrain:") and "Traceback" not in err
    step = load_checkpoint(out / "pretrain")["step"]
    assert f"(step {step})" in err and _all_finite(out / "pretrain/checkpoint/state.pt")


def test_non_finite_weights_are_never_written(tmp_path):
    model = {"w": torch.ones(3)}
    save_checkpoint(tmp_path, model, {}, 1, {})
    before = (tmp_path / "checkpoint/state.pt").read_bytes()
    with pytest.raises(NonFiniteWeights, match="w"):
        save_checkpoint(tmp_path, {"w": torch.tensor([1.0, float("inf"), 0.0])}, {}, 2, {})
    assert (tmp_path / "checkpoint/state.pt").read_bytes() == before


@pytest.mark.parametrize("setting", ["pretrain.lr=-1", "pretrain.lr=nan", "pretrain.grad_clip=-1",
                                     "pretrain.warmup_steps=-5", "data.val_fraction=1.5", "model.n_layer=0",
                                     "model.n_head=0", "pretrain.log_every=0", "pretrain.beta2=1.0",
                                     "sft.lr=inf", "rm.eval_fraction=1", "ppo.clip=0", "grpo.samples_per_prompt=0",
                                     "dpo.label_smoothing=0.5", "prefs.k=1", "bon.n=[1,0]", "world.labeler_tau=-1"])
def test_harmful_settings_stop_before_anything_is_written(tmp_path, capsys, setting):
    out = tmp_path / "R"
    rc = main(["pretrain", "--recipe", "micro", "--out", str(out), "--set", setting])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: --set {setting}: {setting.split('=')[0]}")
    assert not out.exists()


def test_a_builtin_recipe_name_is_not_shadowed_by_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "micro").mkdir()  # e.g. `gptstack run --recipe micro --out micro`
    assert build_config("micro").name == "micro"
    (tmp_path / "mine.toml").mkdir()
    with pytest.raises(UserError, match="mine.toml: is a directory"):
        build_config("mine.toml")
    (tmp_path / "own").write_text('name = "own"\n')
    with pytest.raises(UserError, match="no such recipe.*ends in .toml"):
        build_config("own")


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("micro") / "A"
    pretrain.run(build_config("micro"), run)
    return run


def _other_tokenizer(run: Path, into: Path, text: str) -> None:
    """A tokenizer of the same size with other merges (trained on other text)."""
    from gptstack.tokenizer import Tokenizer
    mine = Tokenizer.load(run / "tokenizer")
    other = Tokenizer.train(text[:50_000], mine.vocab_size, pattern="digits")
    assert other.vocab_size == mine.vocab_size and other.identity != mine.identity
    other.save(into)


def test_a_swapped_tokenizer_of_the_same_size_is_refused(micro_run, tmp_path, real_texts):
    import shutil
    run = tmp_path / "A"
    shutil.copytree(micro_run, run)
    _other_tokenizer(micro_run, run / "tokenizer", real_texts["tinyshakespeare"])
    with pytest.raises(UserError, match=r"trained with tokenizer sha256:.*but .*tokenizer is sha256:"):
        load_stage(run / "pretrain")


def test_a_stage_never_overwrites_another_tokenizer_of_its_run(micro_run, tmp_path, capsys, real_texts):
    _other_tokenizer(micro_run, tmp_path / "B/tokenizer", real_texts["tinyshakespeare"])
    before = (tmp_path / "B/tokenizer/gptstack.json").read_bytes()
    rc = main(["sft", "--recipe", "micro", "--from", str(micro_run / "pretrain"), "--out", str(tmp_path / "B")])
    assert rc == 2 and "holds another tokenizer" in capsys.readouterr().err
    assert (tmp_path / "B/tokenizer/gptstack.json").read_bytes() == before and not (tmp_path / "B/sft").exists()


def test_equal_tensors_give_equal_bytes_in_every_process(tmp_path):
    code = ("import sys, torch; from gptstack.rundir import save_model; torch.manual_seed(0); "
            "save_model(sys.argv[1], {'a': torch.randn(4), 'b': torch.randn(2, 3)}, {}, "
            "{'gptstack_head': 'reward', 'gptstack_lm_head': 'true', 'x': '1', 'y': '2'})")
    for i in range(3):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / str(i))], check=True)
    data = [(tmp_path / str(i) / "model.safetensors").read_bytes() for i in range(3)]
    assert data[0] == data[1] == data[2]
    assert load_file(str(tmp_path / "0/model.safetensors")).keys() == {"a", "b"}


def test_temp_files_of_a_killed_write_are_removed_at_the_next_start(tmp_path):
    stage = tmp_path / "run/pretrain"
    save_checkpoint(stage, {"w": torch.ones(2)}, {}, 1, {})
    (stage / "checkpoint/.state.pt.k3j9x.tmp").write_bytes(b"half")
    (stage / ".model.safetensors.a1.tmp").write_bytes(b"half")
    (stage / "keep.tmp").write_bytes(b"not ours")  # only our hidden temp names are touched
    from gptstack.train.dist import DistInfo
    assert resume_state(stage, False, DistInfo())["step"] == 1
    assert sorted(p.name for p in stage.rglob("*")) == ["checkpoint", "keep.tmp", "state.pt"]


def test_unwritable_output_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc = main(["pretrain", "--recipe", "micro", "--out", str(tmp_path / "file/run")])
    assert rc == 2 and "is a file, not a directory" in capsys.readouterr().err


def test_a_full_disk_is_one_error_line_and_keeps_what_was_written(micro_run, tmp_path, capsys, monkeypatch):
    import shutil
    run = tmp_path / "A"
    shutil.copytree(micro_run, run)
    real = os.fsync
    calls = [0]

    def fsync(fd):
        calls[0] += 1
        if calls[0] > 2:  # the disk fills up part way into the stage's writes
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rc = main(["sft", "--recipe", "micro", "--from", str(run / "pretrain"), "--out", str(run),
               "--set", "sft.checkpoint_every=1"])
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert rc == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {run}") and "No space left on device" in last
    load_stage(run / "pretrain")  # what was there is intact
    assert not [p for p in run.rglob("*.tmp")]
