"""The RL loop (stages/ppo.py): it learns (a stub reward rises), resumes bit-exactly, refuses bad
input before any rollout, and the over-optimization fit recovers known coefficients."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from gptstack.common import UserError
from gptstack.config import Config, build_config
from gptstack.eval.fits import fit_gao_rl
from gptstack.model.gpt import GPT, GPTConfig
from gptstack.model.heads import ScalarModel
from gptstack.rundir import save_model, save_scalar_model
from gptstack.stages import ppo
from gptstack.tokenizer import Tokenizer

TEXT = "What is 2 + 3? The answer is 5. Which is larger, 58 or 85? Count the letters. " * 50


def _make_run(root, seed=0, text=TEXT, vocab=270, block_size=96):
    """RUN/tokenizer + a random-weight RUN/sft policy + RUN/rm reward model, in seconds."""
    tok = Tokenizer.train(text, vocab, progress=False)
    tok.save(root / "tokenizer")
    cfg = Config()
    cfg.model = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=block_size)
    torch.manual_seed(seed)
    policy = GPT(cfg.model)
    save_model(root / "sft", policy.state_dict(), cfg.to_dict())
    rm = ScalarModel.from_policy(policy)
    torch.nn.init.normal_(rm.head.weight, std=0.3)
    save_scalar_model(root / "rm", rm, cfg.to_dict())
    return tok


SMALL = ["ppo.prompts_per_update=16", "ppo.max_new_tokens=12", "ppo.epochs=2", "ppo.minibatches=2",
         "ppo.checkpoint_every=1", "ppo.eval_every=0", "eval.limit=10", "eval.k=1", "eval.max_new_tokens=12", "ppo.threads=1"]


def count_a(prompts, responses):
    return [r.count("a") for r in responses]


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_a_stub_reward_rises_within_a_few_dozen_updates(tmp_path, advantage):
    _make_run(tmp_path)
    sets = SMALL + ["ppo.updates=30", "ppo.lr=3e-3", "ppo.penalize_no_end=false", "ppo.kl_coef=0", f"ppo.advantage={advantage}",
                    "eval.limit=0"]
    if advantage == "grpo":
        sets += ["ppo.samples_per_prompt=4", "ppo.prompts_per_update=4"]
    cfg = build_config("tiny", sets=sets)
    cfg.eval.limit = 5
    ppo.run(cfg, tmp_path / "sft", tmp_path, reward=count_a)
    rows = [json.loads(line) for line in (tmp_path / "ppo/metrics.jsonl").read_text().splitlines()]
    scores = [r["objective/scores"] for r in rows if "objective/scores" in r]
    assert len(scores) == 30
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 1.0, (first, last)


@pytest.mark.parametrize("lora", [[], ["ppo.lora_rank=4", "ppo.lr=1e-2"]], ids=["full", "lora"])
def test_resume_is_bit_exact_and_the_saved_model_is_the_policy(tmp_path, lora):
    # LoRA: the checkpoint holds the policy's and the critic's adapters and the critic's head only
    for name in ("a", "b"):
        _make_run(tmp_path / name)
    sets = SMALL + ["ppo.updates=4", "ppo.kl_target=1.0", "ppo.kl_coef=0.1", *lora]
    ppo.run(build_config("tiny", sets=sets), tmp_path / "a/sft", tmp_path / "a", rm_dir=tmp_path / "a/rm")
    stopped = ppo.run(build_config("tiny", sets=sets + ["ppo.stop_at=2"]), tmp_path / "b/sft", tmp_path / "b",
                      rm_dir=tmp_path / "b/rm")
    assert stopped == {"stopped_at_update": 2}
    ppo.run(build_config("tiny", sets=sets), tmp_path / "b/sft", tmp_path / "b", rm_dir=tmp_path / "b/rm")
    a, b = load_file(str(tmp_path / "a/ppo/model.safetensors")), load_file(str(tmp_path / "b/ppo/model.safetensors"))
    assert a.keys() == b.keys() and "tok_emb.weight" in a and not any(k.startswith("critic") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = json.loads((tmp_path / "a/ppo/summary.json").read_text())
    sb = json.loads((tmp_path / "b/ppo/summary.json").read_text())
    assert sa["final/kl_coef"] == sb["final/kl_coef"] != 0.1   # the adaptive beta moved, and was restored
    for key in ("eval/accuracy", "eval/accuracy_ci95", "eval/gold_reward", "eval/format_ok", "eval/kl_to_sft",
                "eval/proxy_score", "wall_seconds"):
        assert key in sa, key
    assert sa["eval/accuracy"] == sb["eval/accuracy"] and sa["eval/proxy_score"] == sb["eval/proxy_score"]
    rows = [json.loads(line) for line in (tmp_path / "a/ppo/metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "objective/kl" in r]   # update rows (held-out rows are logged apart)
    trl_names = {"objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                 "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
                 "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens", "gold/reward",
                 "gold/accuracy", "hack/repetition", "hack/length", "hack/proxy_gold_gap"}
    assert trl_names <= set(rows[0]), trl_names - set(rows[0])


@pytest.mark.parametrize("bad, match", [
    ("ppo.kl_coef=-0.1", r"ppo.kl_coef: expected a value in \[0, inf\)"),
    ("ppo.clip=-0.2", "clip"),
    ("ppo.advantage=foo", "advantage must be one of"),
])
def test_bad_settings_are_refused_before_any_rollout(tmp_path, bad, match):
    _make_run(tmp_path)
    with pytest.raises(UserError, match=match):
        ppo.run(build_config("tiny", sets=SMALL + [bad]), tmp_path / "sft", tmp_path, rm_dir=tmp_path / "rm")
    assert not (tmp_path / "ppo").exists()


def test_grpo_needs_two_samples_per_prompt(tmp_path):
    _make_run(tmp_path)
    with pytest.raises(UserError, match="samples_per_prompt"):
        ppo.run(build_config("tiny", sets=["grpo.samples_per_prompt=1"]), tmp_path / "sft", tmp_path,
                reward="gold", stage="grpo")


def test_an_rm_that_is_not_an_rm_or_of_another_tokenizer_is_refused(tmp_path):
    _make_run(tmp_path / "a")
    _make_run(tmp_path / "b", text=TEXT.upper())
    with pytest.raises(UserError, match="expected a reward model, found a language model"):
        ppo.run(build_config("tiny", sets=SMALL), tmp_path / "a/sft", tmp_path / "a", rm_dir=tmp_path / "a/sft")
    with pytest.raises(UserError, match="tokenizer"):
        ppo.run(build_config("tiny", sets=SMALL), tmp_path / "a/sft", tmp_path / "a", rm_dir=tmp_path / "b/rm")
    assert not (tmp_path / "a/ppo").exists()


def test_gao_rl_fit_recovers_known_coefficients():
    alpha, beta, base = 0.8, 0.5, 0.3
    points = [{"d": 0.0, "gold": base}] + [
        {"d": d, "gold": base + d * (alpha - beta * math.log(d))} for d in (0.2, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)]
    fit = fit_gao_rl(points)
    assert fit["fit/alpha"] == pytest.approx(alpha) and fit["fit/beta"] == pytest.approx(beta)
    assert fit["fit/r2"] == pytest.approx(1.0)
    assert fit["fit/peak_d"] == pytest.approx(math.exp(alpha / beta - 1))


def test_grpo_runs_on_a_gsm8k_file_and_reports_answer_accuracy(tmp_path, shared_data):
    rows = (shared_data / "gsm8k/train.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    (tmp_path / "gsm8k.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    # a context that holds every question with room for the answer: grpo skips a prompt it would cut
    _make_run(tmp_path, text="\n".join(rows), vocab=300, block_size=384)
    from gptstack.cli import main
    rc = main(["grpo", "--policy", str(tmp_path / "sft"), "--reward", str(tmp_path / "gsm8k.jsonl"), "--out", str(tmp_path),
               "--set", "grpo.updates=2", "--set", "grpo.prompts_per_update=2", "--set", "grpo.samples_per_prompt=4",
               "--set", "grpo.max_new_tokens=16", "--set", "eval.max_new_tokens=16", "--set", "grpo.threads=1"])
    assert rc == 0
    summary = json.loads((tmp_path / "grpo/summary.json").read_text())
    # about 10 % held out by a hash of the prompt (data/split.py): 4 of these 40
    assert summary["eval/n_prompts"] == 4 and 0 <= summary["eval/accuracy"] <= 1
    assert summary["reward"] == "answer"
    rows = [json.loads(line) for line in (tmp_path / "grpo/metrics.jsonl").read_text().splitlines()]
    assert "frac_reward_zero_std" in rows[0]   # a random policy answers nothing right: every group has zero spread
    assert rows[0]["frac_reward_zero_std"] == 1.0


def test_grpo_refuses_a_verifiable_file_with_a_non_numeric_final_answer(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\\n#### 4"}\n'
                                        '{"question": "Name a colour.", "answer": "#### blue"}\n', encoding="utf-8")
    _make_run(tmp_path)
    with pytest.raises(UserError, match=r"bad.jsonl:2: answer"):
        ppo.run(build_config("tiny"), tmp_path / "sft", tmp_path, reward="answer", prompts=str(tmp_path / "bad.jsonl"),
                stage="grpo")
    assert not (tmp_path / "grpo").exists()


@pytest.mark.parametrize("sets, ref_used", [
    (["ppo.kl_coef=0"], False),                           # beta = 0, no KL loss: the reference is never run
    (["ppo.kl_coef=0.05"], True),
    (["ppo.kl_coef=0", "ppo.kl_loss_coef=0.1"], True),
    (["ppo.kl_coef=0", "ppo.kl_target=1.0"], True),      # an adaptive controller needs the KL to move beta
])
def test_the_reference_forward_runs_only_when_a_kl_term_reads_it(tmp_path, monkeypatch, sets, ref_used):
    _make_run(tmp_path)
    calls = {"ref": 0, "policy": 0}
    real = ppo.token_logprobs

    def counting(model, batch, *a, **k):
        calls["ref" if getattr(model, "_is_ref", False) else "policy"] += 1
        return real(model, batch, *a, **k)

    monkeypatch.setattr(ppo, "token_logprobs", counting)
    real_load = ppo.load_stage
    loads = []

    def marking_load(*a, **k):   # the second load of the policy directory is the frozen reference
        out = real_load(*a, **k)
        loads.append(out[0])
        if len(loads) == 2:
            out[0]._is_ref = True
        return out

    monkeypatch.setattr(ppo, "load_stage", marking_load)
    cfg = build_config("tiny", sets=SMALL + ["ppo.updates=2", "ppo.advantage=grpo", "ppo.samples_per_prompt=4",
                                             "ppo.prompts_per_update=4", "ppo.checkpoint_every=0"] + sets)
    cfg.eval.limit = 2
    ppo.run(cfg, tmp_path / "sft", tmp_path, reward=count_a)
    rows = [json.loads(line) for line in (tmp_path / "ppo/metrics.jsonl").read_text().splitlines()]
    updates = [r for r in rows if "objective/scores" in r]
    assert len(updates) == 2
    assert (calls["ref"] > 0) == ref_used, calls
    assert all(("objective/kl" in r) == ref_used for r in updates)


def test_under_lora_the_reward_model_is_the_critics_frozen_trunk_with_its_own_head(tmp_path):
    """PPO + LoRA: the critic starts from the RM and keeps its trunk frozen, so the RM is that trunk
    with the RM's saved head (stages/ppo.py), not a second copy; it scores as the RM loaded alone,
    however the critic's head has moved."""
    from gptstack.model.lora import apply_lora, without_adapters
    from gptstack.rundir import load_scalar_head, load_scalar_model

    _make_run(tmp_path)
    alone, _ = load_scalar_model(tmp_path / "rm", "reward")
    critic = apply_lora(load_scalar_model(tmp_path / "rm", "reward")[0], rank=4, alpha=8, seed=0)
    with torch.no_grad():
        critic.head.weight.add_(1.0)
        for m in critic.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_()
    rm = without_adapters(critic)
    assert not rm.load_state_dict(load_scalar_head(tmp_path / "rm"), strict=False).unexpected_keys
    assert rm.trunk.tok_emb.weight is critic.trunk.tok_emb.weight
    ids = torch.randint(0, alone.config.vocab_size, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(rm.score(ids), alone.eval().score(ids), rtol=0, atol=0)
