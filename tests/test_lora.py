"""LoRA (model/lora.py, applied by train/loop.py's Session): the same outputs as PEFT's LoRA on the
same adapters, training that moves only the adapters, a saved model that is the merge (plain keys),
every fine-tuning stage running with `<stage>.lora_rank`, an exact resume, and the sampling engine
using the adapted weights."""
import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from gptstack.common import UserError
from gptstack.config import Config, SFTConfig, build_config
from gptstack.engine import generate
from gptstack.model.gpt import GPT, GPTConfig
from gptstack.model.heads import ScalarModel
from gptstack.model.lora import (TARGETS, LoRALinear, apply_lora, merge_lora_state_dict, merged_weight,
                                 param_counts)
from gptstack.rundir import save_model, save_scalar_model
from gptstack.stages import dpo, ppo, prm as prm_stage, rm as rm_stage, sft
from gptstack.tokenizer import Tokenizer
from gptstack.train.dist import DistInfo
from gptstack.train.loop import Session

TINY = GPTConfig(vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32)


def randomize_adapters(model, seed=1, std=0.2):
    """B is zero at init (a LoRA model starts as its base): give it values, so equalities are not 0 = 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)
    return model


# --- the module, against PEFT ----------------------------------------------------------------------


@pytest.mark.parametrize("targets, bias", [(list(TARGETS), False), (["qkv", "down"], False), (list(TARGETS), True)])
def test_outputs_equal_peft_lora_and_the_merge(targets, bias):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = dataclasses.replace(TINY, qkv_bias=bias, proj_bias=bias, mlp_bias=bias)   # biases: an imported model's
    base = GPT(config).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=12, target_modules=targets)).eval()
    ours = apply_lora(copy.deepcopy(base), rank=4, alpha=12, targets=targets).eval()
    # the same shapes and trainable set: A (r, in), B (out, r), everything else frozen
    peft_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert param_counts(ours) == (sum(p.numel() for p in peft_params.values()),
                                  sum(p.numel() for p in theirs.parameters()))
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n.removeprefix("base_model.model.").replace(".default.weight", "") for n in peft_params}
    # the init: B zero; A kaiming-uniform(a = sqrt 5), i.e. within 1 / sqrt(fan_in), as PEFT's
    for name, m in ours.named_modules():
        if isinstance(m, LoRALinear):
            assert not m.lora_B.any() and 0 < m.lora_A.abs().max() <= m.in_features ** -0.5
            assert m.scaling == 3.0
    # PEFT's adapters (B made non-zero) copied into ours: the same logits
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_params.items():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        mine = dict(ours.named_parameters())
        for name, p in peft_params.items():
            mine[name.removeprefix("base_model.model.").replace(".default.weight", "")].copy_(p)
    idx = torch.randint(0, TINY.vocab_size, (3, 17), generator=g)
    with torch.no_grad():
        logits = ours(idx)
        assert (logits - base(idx)).abs().max() > 1e-2   # the adapters do change the outputs
        torch.testing.assert_close(logits, theirs(idx), rtol=0, atol=1e-5)
        # the merge: a plain GPT with W + scaling B A gives the LoRA model's logits (and PEFT's merge)
        merged_sd = merge_lora_state_dict(ours.state_dict(), 3.0)
        assert merged_sd.keys() == base.state_dict().keys()
        plain = GPT(config).eval()
        plain.load_state_dict(merged_sd)
        torch.testing.assert_close(plain(idx), logits, rtol=0, atol=1e-5)
        peft_merged = theirs.merge_and_unload().state_dict()
        for key, value in merged_sd.items():
            torch.testing.assert_close(value, peft_merged[key], rtol=0, atol=1e-6)
        # merged_weight (what the engine reads) is the same merge, and plain W elsewhere
        layer = ours.layers[1]
        assert torch.equal(merged_weight(layer.mlp.down), merged_sd["layers.1.mlp.down.weight"])
        assert torch.equal(merged_weight(ours.lm_head), ours.lm_head.weight)


def test_a_scalar_model_keeps_its_head_trainable_and_ppo_adapts_policy_and_critic():
    torch.manual_seed(0)
    policy = GPT(TINY)
    critic = ScalarModel.from_policy(policy, response_start_id=3)   # with the likelihood term's coefficient
    both = apply_lora(ppo.PolicyAndCritic(policy, critic), rank=2, alpha=4)
    trainable = {n for n, p in both.named_parameters() if p.requires_grad}
    assert {"critic.head.weight", "critic.head.bias", "critic.likelihood_coef"} <= trainable
    assert {n for n in trainable if not n.startswith("critic.head") and n != "critic.likelihood_coef"} == {
        f"{who}layers.{i}.{block}.{name}.lora_{ab}" for who in ("policy.", "critic.trunk.") for i in range(2)
        for block, name in (("attn", "qkv"), ("attn", "proj"), ("mlp", "gate_up"), ("mlp", "down")) for ab in "AB"}
    assert not critic.trunk.tok_emb.weight.requires_grad and not policy.lm_head.weight.requires_grad
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(policy, rank=2, alpha=4)
    with pytest.raises(ValueError, match=r"unknown module 'foo' \(expected qkv, proj, gate_up, down\)"):
        apply_lora(GPT(TINY), rank=2, alpha=4, targets="qkv,foo")


# --- the Session: adapters only, the merge saved --------------------------------------------------


def test_session_trains_only_the_adapters_learns_and_saves_the_merge(tmp_path):
    torch.manual_seed(0)
    # a base whose frozen LM head can express confident predictions (at std 0.02 its logits stay within
    # about +-0.6, whatever the adapters do)
    model = GPT(dataclasses.replace(TINY, init_std=0.2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tc = SFTConfig(max_steps=40, lr=3e-2, warmup_steps=0, schedule="constant", lora_rank=4, lora_alpha=8,
                   checkpoint_every=0, log_every=100, threads=1)
    session = Session.start(tc, "sft", model, tmp_path / "sft", DistInfo(), Config().to_dict())
    trainable, total = param_counts(model)
    # rank x (in + out) per adapted linear: qkv 32 -> (4 + 2 x 2) x 8 = 64, proj 32 -> 32, gate_up 32 -> 2 x 96, down 96 -> 32
    assert session.trainable_params == trainable == 2 * 4 * ((32 + 64) + (32 + 32) + (32 + 192) + (96 + 32)) < total
    groups = session.optimizer.param_groups
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable   # frozen weights are not in it
    assert groups[0]["weight_decay"] == tc.weight_decay and len(groups[0]["params"]) == 16   # A and B decayed
    # a learnable task: the next token is this one + 1
    x = torch.randint(0, TINY.vocab_size, (8, 24), generator=torch.Generator().manual_seed(0))
    y = (x + 1) % TINY.vocab_size
    losses = [session.step(s, lambda micro: session.step_model(x, y))[1] for s in session.steps()]
    assert losses[-1] < 0.5 * losses[0], losses
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())   # every base weight bit-identical
    assert all(after[k].any() for k in after if k.endswith("lora_B"))
    session.finish({})
    saved = load_file(str(tmp_path / "sft/model.safetensors"))
    merged = merge_lora_state_dict(model.state_dict(), 2.0)
    assert saved.keys() == before.keys() == merged.keys()
    assert all(torch.equal(saved[k], merged[k]) for k in saved)
    assert json.loads((tmp_path / "sft/summary.json").read_text())["train/trainable_params"] == trainable
    plain = GPT(model.config)
    plain.load_state_dict(saved)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, y), model(x, y), rtol=0, atol=1e-5)


# --- config -----------------------------------------------------------------------------------------


def test_settings_are_checked_and_pretraining_refuses_lora():
    assert build_config("micro").sft.lora_rank == 0   # off by default: full fine-tuning
    cfg = build_config("micro", sets=["sft.lora_rank=8", "sft.lora_alpha=16", "dpo.lora_targets=qkv, down"])
    assert cfg.sft.lora_rank == 8 and cfg.dpo.check_lora("dpo") == ["qkv", "down"]
    with pytest.raises(UserError, match=r"sft.lora_targets: unknown module 'foo' \(expected qkv, proj, gate_up, down\)"):
        build_config("micro", sets=["sft.lora_targets=qkv,foo"])
    with pytest.raises(UserError, match="pretrain.lora_rank: LoRA adapts a trained model"):
        build_config("micro", sets=["pretrain.lora_rank=4"])
    with pytest.raises(UserError, match=r"grpo.lora_dropout: expected a value in \[0, 1\)"):
        build_config("micro", sets=["grpo.lora_dropout=1.5"])


# --- the stages ------------------------------------------------------------------------------------

MICRO = ["eval.limit=4", "eval.k=1", "eval.max_new_tokens=8"]
WORLD_ROWS = [
    {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
     "responses": [f"{a} + {b} = {a + b}. The answer is {a + b}.", f"The answer is {a + b + 1}.", "hello"],
     "ranking": [0, 1, 2], "ended": [True, True, False]}
    for a, b in [(2, 3), (4, 4), (7, 1), (3, 5), (6, 2), (1, 1), (8, 0), (5, 4)]]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train("Question: what is 2 + 3? The answer is 5. Count the letters, yes indeed. " * 100, 300,
                           progress=False)


def make_run(root, tok):
    """RUN/tokenizer, a random micro policy as RUN/pretrain and RUN/sft, a reward model at RUN/rm, prefs."""
    cfg = build_config("micro", sets=[f"model.vocab_size={tok.vocab_size}"])
    tok.save(root / "tokenizer")
    torch.manual_seed(0)
    policy = GPT(cfg.model)
    for stage in ("pretrain", "sft"):
        save_model(root / stage, policy.state_dict(), cfg.to_dict())
    rm = ScalarModel.from_policy(policy)
    torch.nn.init.normal_(rm.head.weight, std=0.3)
    save_scalar_model(root / "rm", rm, cfg.to_dict())
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in WORLD_ROWS))
    return root


def check_saved(stage_dir, source_dir):
    """The stage's model.safetensors: the source's keys, no adapter; frozen tensors bit-identical and
    the adapted linears moved."""
    saved, source = load_file(str(stage_dir / "model.safetensors")), load_file(str(source_dir / "model.safetensors"))
    assert saved.keys() == source.keys() and not any("lora" in k for k in saved)
    for key in saved:
        if key.endswith(("tok_emb.weight", "norm.weight", "lm_head.weight")):
            assert torch.equal(saved[key], source[key]), key
    assert not torch.equal(saved[next(k for k in saved if k.endswith("attn.qkv.weight"))],
                           source[next(k for k in source if k.endswith("attn.qkv.weight"))])
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert 0 < summary["train/trainable_params"] < sum(v.numel() for v in saved.values())
    return summary


def test_sft_with_lora_from_the_command_line(tmp_path, tok, capsys):
    from gptstack.cli import main

    run = make_run(tmp_path, tok)
    sets = [*MICRO, "sft.max_steps=2", "sft.lora_rank=16", "sft.lora_alpha=32"]
    assert main(["sft", "--recipe", "micro", "--from", str(run / "pretrain"), "--out", str(run),
                 *[a for s in sets for a in ("--set", s)]]) == 0
    assert "trainable params: " in capsys.readouterr().out
    check_saved(run / "sft", run / "pretrain")
    config = json.loads((run / "sft/config.json").read_text())
    assert config["sft"]["lora_rank"] == 16 and config["sft"]["lora_alpha"] == 32


def test_rm_dpo_ppo_grpo_prm_run_with_lora(tmp_path, tok):
    run = make_run(tmp_path, tok)
    rm_cfg = build_config("micro", sets=[*MICRO, "rm.max_steps=2", "rm.lr=1e-2", "rm.lora_rank=4",
                                         "rm.likelihood_score=true", "rm.eval_fraction=0.3"])
    rm_stage.run(rm_cfg, run / "sft", run / "prefs.jsonl", tmp_path / "r")
    saved = load_file(str(tmp_path / "r/rm/model.safetensors"))
    source = load_file(str(run / "sft/model.safetensors"))
    assert not any("lora" in k for k in saved) and saved["likelihood_coef"] != 0   # the head's terms learned
    assert torch.equal(saved["trunk.tok_emb.weight"], source["tok_emb.weight"])
    assert not torch.equal(saved["trunk.layers.0.mlp.down.weight"], source["layers.0.mlp.down.weight"])

    dpo.run(build_config("micro", sets=[*MICRO, "dpo.max_steps=2", "dpo.lr=1e-2", "dpo.lora_rank=4",
                                        "dpo.heldout_fraction=0.25"]), run / "sft", run / "prefs.jsonl", run)
    check_saved(run / "dpo", run / "sft")

    rl = ["updates=2", "prompts_per_update=4", "max_new_tokens=8", "epochs=1", "minibatches=2", "lr=1e-2",
          "lora_rank=4", "threads=1"]
    ppo.run(build_config("micro", sets=[*MICRO, *(f"ppo.{s}" for s in rl)]), run / "sft", run, rm_dir=run / "rm")
    summary = check_saved(run / "ppo", run / "sft")
    # the policy's adapters and the critic's (adapters + its head: 2 x 32 + 1 more)
    assert summary["train/trainable_params"] == 2 * (2 * 4 * (32 + 96 + 32 + 32 + 32 + 2 * 96 + 96 + 32)) + 33
    ppo.run(build_config("micro", sets=[*MICRO, *(f"grpo.{s}" for s in rl), "grpo.samples_per_prompt=2"]),
            run / "sft", run, reward="gold", stage="grpo")
    check_saved(run / "grpo", run / "sft")

    prm_stage.run(build_config("micro", sets=[*MICRO, "prm.prompts=8", "prm.samples=2", "prm.max_steps=2", "prm.lr=1e-2",
                                              "prm.batch_size=4", "prm.max_new_tokens=16", "prm.lora_rank=4"]),
                  run / "sft", run)
    for stage_dir in (run / "prm", run / "prm/orm"):   # two scalar models, each its own session
        saved = load_file(str(stage_dir / "model.safetensors"))
        assert not any("lora" in k for k in saved) and saved["head.weight"].any()
        assert torch.equal(saved["trunk.tok_emb.weight"], source["tok_emb.weight"])
        assert not torch.equal(saved["trunk.layers.1.attn.proj.weight"], source["layers.1.attn.proj.weight"])


def test_a_stopped_lora_run_resumes_exactly_and_other_settings_are_refused(tmp_path, tok):
    sets = [*MICRO, "sft.max_steps=4", "sft.lora_rank=4", "sft.lora_dropout=0.1", "sft.lr=1e-2", "sft.warmup_steps=0"]
    finals = []
    for name, stops in (("straight", [0]), ("resumed", [2, 0])):
        run = make_run(tmp_path / name, tok)
        for stop in stops:
            out = sft.run(build_config("micro", sets=[*sets, f"sft.stop_at={stop}"]), run / "pretrain", run)
            if stop:
                assert out == {"stopped_at": 2}
                state = torch.load(run / "sft/checkpoint/state.pt", weights_only=False)
                lora_keys = [k for k in state["model"] if ".lora_" in k]
                assert sorted(state["model"]) == sorted(lora_keys)   # the adapters only: no frozen weight
                assert len(lora_keys) == 16   # 2 layers x 4 linears x (A, B), and their Adam moments
                assert len(state["optimizer"]["state"]) == 16
                with pytest.raises(UserError, match="was trained with lora_rank=4.*asks for lora_rank=8"):
                    sft.run(build_config("micro", sets=[*sets, "sft.lora_rank=8"]), run / "pretrain", run)
        finals.append(load_file(str(run / "sft/model.safetensors")))
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


# --- sampling ----------------------------------------------------------------------------------------


def test_the_engine_samples_a_lora_model_as_its_merge():
    torch.manual_seed(0)
    base = GPT(TINY).eval()
    lora = randomize_adapters(apply_lora(copy.deepcopy(base), rank=4, alpha=8)).eval()
    merged = GPT(TINY).eval()
    merged.load_state_dict(merge_lora_state_dict(lora.state_dict(), 2.0))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]

    def sample(model):
        return [c.tokens for row in generate(model, prompts, 12, n=3, temperature=1.0, seed=5) for c in row]

    assert sample(lora) == sample(merged) != sample(base)


@pytest.mark.slow
def test_ddp_and_fsdp_train_the_adapters_as_one_process(tmp_path):
    """Two processes, DDP or FSDP2 (each block sharded, frozen and trainable tensors side by side),
    train the adapters as one process on the whole batch does, and save the same merged model from
    the gathered full state dict (tests/lora_dist_run.py)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    curves, finals = [], []
    for n, mode in ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
        out = tmp_path / f"{mode}{n}"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                               f"--master_port={port}", str(Path(__file__).parent / "lora_dist_run.py"), str(out), mode],
                              capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = [json.loads(line) for line in (out / "sft/metrics.jsonl").read_text().splitlines()]
        curves.append([m["train/loss"] for m in lines if "train/loss" in m])
        finals.append(load_file(str(out / "sft/model.safetensors")))
    assert len(curves[0]) == 4 and curves[0][-1] < 0.7 * curves[0][0]
    for curve, final in zip(curves[1:], finals[1:]):
        assert curve == pytest.approx(curves[0], rel=1e-5, abs=1e-6)
        assert final.keys() == finals[0].keys() and not any("lora" in k for k in final)
        for key, value in finals[0].items():
            torch.testing.assert_close(final[key], value, rtol=0, atol=1e-5)


def test_without_adapters_is_the_base_model_sharing_its_frozen_tensors():
    """PPO's and DPO's reference under LoRA: the SFT model, no second copy of its weights."""
    from gptstack.model.heads import ScalarModel
    from gptstack.model.lora import without_adapters

    torch.manual_seed(0)
    base = GPT(TINY).eval()
    x = torch.randint(0, TINY.vocab_size, (2, 12))
    with torch.no_grad():
        before = base(x)
    lora = randomize_adapters(apply_lora(copy.deepcopy(base), rank=4, alpha=8)).eval()
    ref = without_adapters(lora)
    assert not any(isinstance(m, LoRALinear) for m in ref.modules()) and not any(p.requires_grad for p in ref.parameters())
    assert ref.layers[0].attn.qkv.weight is lora.layers[0].attn.qkv.weight       # shared, not copied
    assert ref.tok_emb.weight.data_ptr() == lora.tok_emb.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(ref(x), before, rtol=0, atol=0)
        assert not torch.allclose(lora(x), before)
    # a scalar model's trainable head is copied: training the head leaves the reference's alone
    critic = apply_lora(ScalarModel(TINY, kind="value"), rank=4, alpha=8)
    frozen_head = without_adapters(critic)
    with torch.no_grad():
        critic.head.weight.add_(1.0)
    assert not torch.equal(frozen_head.head.weight, critic.head.weight)
    assert frozen_head.trunk.tok_emb.weight is critic.trunk.tok_emb.weight
