"""`gptstack run` end to end on the micro recipe: the run-directory contract (DESIGN.md) for every
stage, each summary's keys, skip-when-complete, and resume after an interruption during PPO giving
the same summary as an uninterrupted run."""
import json

import pytest

from gptstack import pipeline
from gptstack.common import UserError
from gptstack.config import build_config

POLICY_KEYS = ("eval/accuracy", "eval/accuracy_ci95", "eval/gold_reward", "eval/format_ok", "eval/kl_to_sft",
               "wall_seconds", "eval/pass@1", "eval/length", "eval/entropy",
               "eval/style/terse", "eval/style/standard", "eval/style/explained", "eval/style/checked", "eval/style/chatty")
KEYS = {
    "pretrain": ("val_loss", "val_bpb", "tokens_seen", "params"),
    "sft": POLICY_KEYS + ("base/eval/accuracy", "base/eval/accuracy_ci95", "base/eval/gold_reward"),
    "rm": ("eval/accuracy", "eval/correct_vs_wrong_accuracy", "eval/gold_spearman", "eval/labeler_gold_agreement",
           "policy/accuracy"),
    "bon": ("by_n", "fit/alpha", "fit/beta", "fit/r2"),
    "ppo": POLICY_KEYS + ("eval/proxy_score",),
    "overopt": ("points", "fit/alpha", "fit/beta", "fit/r2", "gold_peak_d"),
    "grpo": POLICY_KEYS,
    "dpo": POLICY_KEYS,
    "search": ("accuracy", "tokens"),
}
TRAINED = ("pretrain", "sft", "rm", "ppo", "overopt", "grpo", "dpo", "prm")


def _summary(run, stage):
    return json.loads((run / stage / "summary.json").read_text())


@pytest.mark.slow
def test_micro_pipeline_contract_skip_and_resume(tmp_path):
    run = tmp_path / "run"
    spent = pipeline.run(build_config("micro"), run, report=False)
    assert list(spent) == list(pipeline.STAGES)
    assert (run / "tokenizer/tokenizer.json").exists() and (run / "tokenizer/gptstack.json").exists()
    for stage in pipeline.STAGES:
        d = run / stage
        assert (d / "summary.json").exists(), stage
        if stage in TRAINED:
            for name in ("model.safetensors", "config.json", "metrics.jsonl", "checkpoint/state.pt"):
                assert (d / name).exists(), f"{stage}/{name}"
        summary = _summary(run, stage)
        for key in KEYS.get(stage, ()):
            assert key in summary, f"{stage}: {key}"
    for row in _summary(run, "bon")["by_n"]:
        assert set(row) >= {"n", "kl", "d", "proxy", "gold", "accuracy"}
    for row in _summary(run, "overopt")["points"]:
        assert set(row) >= {"step", "kl", "d", "proxy", "gold", "length"}
    search = _summary(run, "search")
    assert set(search["accuracy"]) == {"prm", "orm", "rm", "majority", "prm_search"} == set(search["tokens"])

    # complete stages are skipped
    assert pipeline.run(build_config("micro"), run, report=False) == {}

    # PPO interrupted (stop_at = a kill between checkpoints), then the same command: same summary
    ppo_sets = ["ppo.updates=3", "ppo.checkpoint_every=1"]
    stopped = tmp_path / "stopped"
    for stage in ("tokenizer", "pretrain", "sft", "prefs", "rm"):
        __import__("shutil").copytree(run / stage, stopped / stage)
    pipeline.run(build_config("micro", sets=ppo_sets + ["ppo.stop_at=2"]), stopped, stages="ppo", report=False)
    assert not (stopped / "ppo/summary.json").exists()
    pipeline.run(build_config("micro", sets=ppo_sets), stopped, stages="ppo", report=False)
    whole = tmp_path / "whole"
    for stage in ("tokenizer", "pretrain", "sft", "prefs", "rm"):
        __import__("shutil").copytree(run / stage, whole / stage)
    pipeline.run(build_config("micro", sets=ppo_sets), whole, stages="ppo", report=False)
    a, b = _summary(stopped, "ppo"), _summary(whole, "ppo")
    a.pop("wall_seconds"), b.pop("wall_seconds")
    assert a == b


def test_unknown_stage_is_refused():
    with pytest.raises(UserError, match="unknown stage"):
        pipeline.parse_stages("sft,ppo,rlhf")
    assert pipeline.parse_stages("grpo,sft") == ["sft", "grpo"]


def test_progress_line_eta_from_the_recipe_table_and_none_without(tmp_path, monkeypatch, capsys):
    def fake(stage, cfg, run):   # a stage that writes its summary at once
        (run / stage).mkdir(parents=True)
        (run / stage / "summary.json").write_text("{}")

    monkeypatch.setattr(pipeline, "_call", fake)
    cfg = build_config("micro", sets=["run.eta.sft=60", "run.eta.prefs=120"])
    cfg.run.eta.pop("pretrain")
    pipeline.run(cfg, tmp_path / "a", stages="pretrain,sft,prefs", report=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[1/3] pretrain: starting (no ETA; pipeline ETA 3m00s + 1 stage(s) without one, elapsed")
    assert lines[1].startswith("[2/3] sft: starting (~") and "pipeline ETA" in lines[1]
    cfg.run.eta.clear()   # a recipe without a [run.eta] table
    pipeline.run(cfg, tmp_path / "b", stages="pretrain,sft", report=False)
    assert capsys.readouterr().out.splitlines()[0].startswith("[1/2] pretrain: starting (no ETA; elapsed")
