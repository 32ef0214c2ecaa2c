"""The hf-small recipe end to end on a user's model and files, as the README shows it:
`gptstack run --recipe hf-small --set model.from_hf=DIR --set sft.data=FILE ...` imports a Qwen2
model (q/k/v biases) that keeps its own ChatML template, then sft -> rm -> ppo -> grpo -> dpo with
LoRA, each on the user's file; the export loads in transformers with the same logits and template.
A run without the data keys stops before any work, naming them."""
import json

import pytest
import torch

from gptstack.cli import main
from gptstack.rundir import load_stage

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from hf_builders import CHATML, bpe_tokenizer  # noqa: E402

CORPUS = "".join(f"What is {i} plus {i + 2}? It is {2 * i + 2}. The fox says hello {i} times.\n" for i in range(80))

TINY = ["--set", "eval.limit=4", "--set", "eval.max_new_tokens=8",
        "--set", "sft.max_steps=2", "--set", "sft.batch_size=2", "--set", "sft.grad_accum=1", "--set", "sft.warmup_steps=0",
        "--set", "rm.max_steps=2", "--set", "rm.batch_size=2", "--set", "rm.norm_prompts=4", "--set", "rm.max_new_tokens=8",
        "--set", "rm.warmup_steps=0",
        "--set", "ppo.updates=1", "--set", "ppo.prompts_per_update=2", "--set", "ppo.max_new_tokens=8",
        "--set", "ppo.eval_prompts=2", "--set", "ppo.minibatches=1",
        "--set", "grpo.updates=1", "--set", "grpo.prompts_per_update=2", "--set", "grpo.samples_per_prompt=2",
        "--set", "grpo.max_new_tokens=8", "--set", "grpo.eval_prompts=2",
        "--set", "dpo.max_steps=2", "--set", "dpo.batch_size=2", "--set", "dpo.grad_accum=1", "--set", "dpo.warmup_steps=0",
        "--set", "sft.threads=1", "--set", "rm.threads=1", "--set", "ppo.threads=1", "--set", "grpo.threads=1",
        "--set", "dpo.threads=1"]


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    # Qwen2's tokenizer.json layout: transformers loads a qwen2 export with its own Qwen2Tokenizer
    tok = bpe_tokenizer(CORPUS, 300, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], layout="qwen2")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHATML, eos_token="<|im_end|>",
                                                  pad_token="<|endoftext|>")
    model_dir = d / "qwen"
    hf_tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)

    def write(name, rows):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(d / name)

    q = [f"What is {i} plus {i + 2}?" for i in range(40)]
    files = {
        "sft.data": write("chats.jsonl", [{"messages": [{"role": "user", "content": x},
                                                        {"role": "assistant", "content": f"It is {2 * i + 2}."}]}
                                          for i, x in enumerate(q)]),
        "rm.prefs": write("prefs.jsonl", [{"prompt": [{"role": "user", "content": x}],
                                           "chosen": [{"role": "assistant", "content": f"It is {2 * i + 2}."}],
                                           "rejected": [{"role": "assistant", "content": "The fox says hello."}]}
                                          for i, x in enumerate(q)]),
        "grpo.reward": write("gsm8k.jsonl", [{"question": x, "answer": f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}"}
                                             for i, x in enumerate(q)]),
    }
    files["dpo.prefs"] = files["ppo.prompts"] = files["rm.prefs"]
    return model_dir, files


def test_hf_small_runs_every_stage_on_the_users_model_and_files(user_files, tmp_path):
    model_dir, files = user_files
    run = tmp_path / "run"
    sets = [a for key, path in files.items() for a in ("--set", f"{key}={path}")]
    assert main(["run", "--recipe", "hf-small", "--out", str(run), "--no-report",
                 "--set", f"model.from_hf={model_dir}", *sets, *TINY]) == 0
    for stage in ("pretrain", "sft", "rm", "ppo", "grpo", "dpo"):
        assert (run / stage / "summary.json").exists(), stage
    assert not (run / "prefs").exists() and not (run / "overopt").exists()  # the recipe's stages only
    assert json.loads((run / "pretrain/summary.json").read_text())["chat"] == "model"
    sft = json.loads((run / "sft/summary.json").read_text())
    assert sft["data/train_conversations"] > 0 and "heldout/loss" in sft and sft["train/trainable_params"] > 0
    # no gold in a user's file: PPO reports the RM's score on held-out prompts beside SFT's, and the KL
    ppo = json.loads((run / "ppo/summary.json").read_text())
    assert {"eval/proxy_score", "eval/sft_proxy_score", "eval/kl_to_sft"} <= set(ppo) and "eval/accuracy" not in ppo
    assert "eval/accuracy" in json.loads((run / "grpo/summary.json").read_text())  # the answers of grpo.reward's file
    model, cfg, tok = load_stage(run / "dpo")
    assert cfg.model.hf_family == "qwen2" and cfg.model.qkv_bias and tok.chat_template is not None
    # the post-trained model goes back out as a Qwen2 with the ChatML template, same logits
    assert main(["export", "--to", "hf", str(run / "dpo"), str(tmp_path / "out")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    ids = tok.render_prompt([{"role": "user", "content": "What is 3 plus 5?"}])
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert list(hf_tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 5?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)) == ids
    with torch.no_grad():
        diff = (hf(torch.tensor([ids])).logits[0] - model.eval()(torch.tensor([ids]))[0]).abs().max().item()
    assert diff <= 1e-4


def test_hf_small_without_the_data_keys_stops_before_any_work(user_files, tmp_path, capsys):
    model_dir, _ = user_files
    assert main(["run", "--recipe", "hf-small", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == "error: recipe hf-small: set model.from_hf (--set KEY=VALUE; run.needs)"
    assert main(["run", "--recipe", "hf-small", "--out", str(tmp_path / "run"),
                 "--set", f"model.from_hf={model_dir}"]) == 2
    err = capsys.readouterr().err
    assert "error: model.from_hf: set sft.data, rm.prefs, ppo.prompts, grpo.reward, dpo.prefs" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_hf_small_under_torchrun(user_files, tmp_path):
    """The README's GPU line on CPU: every rank runs the pipeline, rank 0 imports and writes, DDP
    (gloo) trains each stage, one process group for all of them."""
    import os
    import socket
    import subprocess
    import sys

    model_dir, files = user_files
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = [a for key, path in files.items() for a in ("--set", f"{key}={path}")]
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
            "-m", "gptstack.cli", "run", "--recipe", "hf-small", "--out", str(tmp_path / "run"),
            "--set", f"model.from_hf={model_dir}", *sets, *TINY]
    done = subprocess.run(args, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("pretrain", "sft", "rm", "ppo", "grpo", "dpo"):
        assert (tmp_path / "run" / stage / "summary.json").exists(), stage
    assert (tmp_path / "run/report.md").exists()
    assert done.stdout.count("[2/6] sft: starting") == 1   # rank 0 speaks


def test_stage_commands_read_the_data_keys_when_no_flag_is_given(monkeypatch, tmp_path, capsys):
    """`gptstack rm|dpo --set <stage>.prefs=FILE`, `ppo|grpo --set <stage>.prompts=FILE` and
    `grpo --set grpo.reward=FILE` run as their flags would; a flag wins; neither: one error line."""
    from gptstack.stages import dpo, ppo, rm

    calls = {}
    monkeypatch.setattr(rm, "run", lambda cfg, src, prefs, out, **kw: calls.setdefault("rm", prefs))
    monkeypatch.setattr(dpo, "run", lambda cfg, pol, prefs, out, **kw: calls.setdefault("dpo", prefs))
    monkeypatch.setattr(ppo, "run", lambda cfg, pol, out, **kw: calls.setdefault(kw["stage"], (kw["reward"], kw["prompts"])))
    out = str(tmp_path)
    assert main(["rm", "--from", "R/sft", "--out", out, "--set", "rm.prefs=p.jsonl"]) == 0
    assert main(["dpo", "--policy", "R/sft", "--out", out, "--prefs", "flag.jsonl", "--set", "dpo.prefs=p.jsonl"]) == 0
    assert main(["grpo", "--policy", "R/sft", "--out", out, "--set", "grpo.reward=g.jsonl"]) == 0
    assert main(["ppo", "--policy", "R/sft", "--rm", "R/rm", "--out", out, "--set", "ppo.prompts=q.jsonl"]) == 0
    assert calls == {"rm": "p.jsonl", "dpo": "flag.jsonl", "grpo": ("answer", "g.jsonl"), "ppo": ("rm", "q.jsonl")}
    capsys.readouterr()
    assert main(["dpo", "--policy", "R/sft", "--out", out]) == 2
    assert capsys.readouterr().err.strip() == "error: --prefs (or dpo.prefs): required"


def test_a_qwen2_import_keeps_the_layout_transformers_rebuilds(user_files, tmp_path, capsys):
    """The Qwen2 layout is recognised (no warning at export); a qwen2 model exported with another
    pre-tokenizer gets a warning that transformers >= 5 would tokenize it differently."""
    from gptstack.tokenizer import Tokenizer
    from gptstack.tokenizer.hf_import import is_qwen2_layout

    model_dir, _ = user_files
    assert is_qwen2_layout(Tokenizer.from_huggingface(model_dir))
    assert main(["import", "--from", "hf", str(model_dir), str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["export", "--to", "hf", str(tmp_path / "run/pretrain"), str(tmp_path / "out")]) == 0
    assert "warning" not in capsys.readouterr().err
    plain = Tokenizer.train(CORPUS, 300, progress=False)
    assert not is_qwen2_layout(plain)


def test_the_worlds_stages_serve_and_chat_run_on_a_template_run(user_files, tmp_path):
    """An imported model with its own chat template through the stages the pipeline test leaves out:
    prefs (the world's labeler ranks its samples), prm (steps and rollouts in the template's turns),
    and the web app's chat, which stops at the template's end of turn."""
    from fastapi.testclient import TestClient

    from gptstack.config import build_config
    from gptstack.serve.app import create_app

    model_dir, files = user_files
    run = tmp_path / "run"
    micro = ["--recipe", "micro", "--set", "eval.limit=2", "--set", "eval.max_new_tokens=4"]
    assert main(["import", "--from", "hf", str(model_dir), str(run)]) == 0
    assert main(["sft", "--from", str(run / "pretrain"), "--data", files["sft.data"], "--out", str(run), *micro,
                 "--set", "sft.max_steps=2", "--set", "sft.batch_size=2"]) == 0
    assert main(["prefs", "--from", str(run / "sft"), "--out", str(run), *micro, "--set", "prefs.prompts=4",
                 "--set", "prefs.max_new_tokens=8"]) == 0
    assert json.loads((run / "prefs/summary.json").read_text())["prefs/pairs"] > 0
    assert main(["prm", "--from", str(run / "sft"), "--out", str(run), *micro, "--set", "prm.prompts=4",
                 "--set", "prm.max_steps=2", "--set", "prm.max_new_tokens=8"]) == 0
    assert (run / "prm/summary.json").exists()
    client = TestClient(create_app(run, build_config("micro"), allowed_hosts=("127.0.0.1",)), base_url="http://127.0.0.1")
    r = client.post("/api/chat", json={"stage": "sft", "messages": [{"role": "user", "content": "What is 2 plus 4?"}]})
    assert r.status_code == 200 and "event: done" in r.text
