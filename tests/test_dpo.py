"""DPO: the loss against its closed form, log 2 at initialisation, the reference computed once,
padding-free sequence logprobs, gradients that raise chosen and lower rejected; the stage's data
handling (ranking rows -> pairs, truncation, held-out split) and its summary contract."""
import gzip
import json
import math

import numpy as np
import pytest
import torch

from gptstack.common import UserError
from gptstack.config import build_config
from gptstack.data.batches import batch_indices
from gptstack.data.comparisons import ranking_pairs
from gptstack.data.formats import read_dataset
from gptstack.data.split import is_heldout
from gptstack.engine.rollout import sequence_logprobs, summed_logprobs
from gptstack.model import GPT, GPTConfig
from gptstack.stages import dpo
from gptstack.tokenizer import ASSISTANT_END, Tokenizer
from gptstack.rundir import load_model, save_model

SMALL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=96", "dpo.batch_size=4",
         "dpo.max_steps=3", "dpo.log_every=1", "dpo.warmup_steps=0", "dpo.heldout_fraction=0.25",
         "eval.limit=10", "eval.k=2", "eval.max_new_tokens=12", "dpo.checkpoint_every=0", "dpo.pairs=all",
         "dpo.rpo_alpha=0"]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- the loss -----------------------------------------------------------------------------------


def test_loss_equals_the_closed_form_on_a_fixed_batch():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-2.0, -1.0])
    # by hand: h = (pc - rc) - (pr - rr) = (0.5 + 1.0, 0.0 + 0.5) = (1.5, 0.5); beta = 0.5
    loss, chosen_rewards, rejected_rewards = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx((-math.log(sigmoid(0.75)) - math.log(sigmoid(0.25))) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.48141, abs=1e-5)  # (log(1 + e^-0.75) + log(1 + e^-0.25)) / 2 = (0.38687 + 0.57594) / 2
    assert chosen_rewards.tolist() == pytest.approx([0.25, 0.0])
    assert rejected_rewards.tolist() == pytest.approx([-0.5, -0.25])
    m = dpo.pair_metrics(loss, chosen_rewards, rejected_rewards, pc, pr)
    assert m["rewards/accuracies"] == 1.0 and m["rewards/margins"] == pytest.approx(0.5)
    assert m["rewards/chosen"] == pytest.approx(0.125) and m["logps/rejected"] == pytest.approx(-2.25)
    # conservative DPO: eps of the labels assumed flipped
    smoothed, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    expected = [-0.8 * math.log(sigmoid(z)) - 0.2 * math.log(sigmoid(-z)) for z in (0.75, 0.25)]
    assert smoothed.item() == pytest.approx(sum(expected) / 2, abs=1e-6)
    # IPO: (h - 1/(2 beta))^2 = (1.5 - 1)^2, (0.5 - 1)^2
    ipo, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    assert ipo.item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="loss_type"):
        dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge")


def test_loss_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    loss, _, _ = dpo.dpo_loss(pc, pr, torch.tensor([-1.5]), torch.tensor([-2.0]), beta=0.5)
    loss.backward()
    # d/d(pc) of -log sigmoid(beta h) = -beta sigmoid(-beta h), with beta h = 0.75
    assert pc.grad.item() == pytest.approx(-0.5 * sigmoid(-0.75)) and pr.grad.item() == pytest.approx(0.5 * sigmoid(-0.75))


# --- logprobs -----------------------------------------------------------------------------------


def tiny_gpt(seed: int = 0, vocab: int = 60) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, block_size=32))


def test_sequence_logprobs_equal_a_forward_of_each_sequence_alone():
    model = tiny_gpt().eval()
    prompts, responses = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [7]], [[10, 11], [12, 13, 14, 15, 16], []]
    batched = summed_logprobs(model, prompts, responses)
    cooled = summed_logprobs(model, prompts, responses, temperature=0.5)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        logits = model(torch.tensor([p + r]))[0].float()
        for t, got in ((1.0, batched), (0.5, cooled)):
            logp = torch.log_softmax(logits / t, -1)
            by_hand = sum(logp[len(p) - 1 + j, tok].item() for j, tok in enumerate(r))  # 0 for the empty one
            assert got[i].item() == pytest.approx(by_hand, abs=1e-5)
    assert sequence_logprobs(model, prompts, responses, batch_size=1) == pytest.approx(batched.tolist(), abs=1e-5)


def test_loss_is_log2_when_the_policy_is_the_reference():
    model = tiny_gpt()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 1]]
    chosen, rejected = [[10, 11, 12], [13], [14, 15]], [[16], [17, 18, 19, 20], [21, 22, 23]]
    ref_c = torch.tensor(sequence_logprobs(model, prompts, chosen))   # precomputed one way (no grad, batch 32)...
    ref_r = torch.tensor(sequence_logprobs(model, prompts, rejected))
    logps = summed_logprobs(model, prompts + prompts, chosen + rejected)  # ...and the training way (one batch)
    for loss_args in ({}, {"label_smoothing": 0.1}):
        loss, rc, rr = dpo.dpo_loss(logps[:3], logps[3:], ref_c, ref_r, beta=0.1, **loss_args)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        assert rc.abs().max().item() < 1e-6 and rr.abs().max().item() < 1e-6


def test_a_gradient_step_on_a_tiny_model_raises_chosen_and_lowers_rejected():
    model = tiny_gpt(seed=3)
    prompts, chosen, rejected = [[1, 2, 3, 4]] * 2, [[10, 11, 12, 13], [20, 21]], [[30, 31, 32], [40, 41, 42, 43]]
    ref_c, ref_r = (torch.tensor(sequence_logprobs(model, prompts, r)) for r in (chosen, rejected))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        logps = summed_logprobs(model, prompts + prompts, chosen + rejected)
        loss, rc, rr = dpo.dpo_loss(logps[:2], logps[2:], ref_c, ref_r, beta=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after_c = torch.tensor(sequence_logprobs(model, prompts, chosen))
    after_r = torch.tensor(sequence_logprobs(model, prompts, rejected))
    assert (after_c > ref_c).all() and (after_r < ref_r).all()
    assert loss.item() < math.log(2)


# --- data ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    text = ("What is 2 + 3? 2 + 3 = 5. The answer is 5. Is 7 larger than 4? Yes. hello there friend "
            "Human: Assistant: how are you today? I am fine, thanks. ") * 100
    return Tokenizer.train(text, 400, progress=False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_ranking_rows_give_all_pairs_with_each_response_encoded_once(tok, tmp_path):
    row = {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "responses": ["The answer is 5.", "5", "The answer is 6"],
           "ranking": [2, 0, 1], "ended": [True, True, False]}
    ds = read_dataset(write_jsonl(tmp_path / "r.jsonl", [row]), expect=("preference", "ranking"))
    data, counts = dpo.encode_pairs(tok, ds, block_size=96)
    end = tok.special(ASSISTANT_END)
    assert len(data.responses) == 3 and counts["data/pairs"] == 3
    assert sorted(map(tuple, data.pairs.tolist())) == sorted([(2, 0), (2, 1), (0, 1)])  # best first
    assert data.responses[0] == tok.encode("The answer is 5.") + [end]
    assert data.responses[2] == tok.encode("The answer is 6")  # did not end: no end token to learn
    assert data.prompts[0] == tok.render_prompt(row["prompt"])


def test_pair_modes_of_a_ranking(tok, tmp_path):
    assert ranking_pairs([2, 0, 3, 1], "all") == [(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)]
    assert ranking_pairs([2, 0, 3, 1], "best_vs_rest") == [(2, 0), (2, 3), (2, 1)]
    assert ranking_pairs([2, 0, 3, 1], "best_worst") == [(2, 1)]
    row = {"prompt": "What is 2 + 3?", "responses": ["a", "The answer is 5.", "b", "The answer is 6."],
           "ranking": [1, 0, 2, 3], "ended": [True, True, True, False]}
    ds = read_dataset(write_jsonl(tmp_path / "r.jsonl", [row]))
    data, counts = dpo.encode_pairs(tok, ds, block_size=96, mode="best_worst")
    end = tok.special(ASSISTANT_END)
    assert counts["data/pairs"] == 1 and len(data.responses) == 2  # the unused middle responses are not scored
    (c, r), = data.pairs.tolist()
    assert data.responses[c] == tok.encode("The answer is 5.") + [end] and data.responses[r] == tok.encode("The answer is 6.")


def test_long_prompts_lose_their_oldest_turns_and_pairs_that_cannot_fit_are_counted(tok, tmp_path):
    history = [{"role": "user", "content": "hello there friend " * 8}, {"role": "assistant", "content": "I am fine. " * 8}]
    rows = [{"prompt": history + [{"role": "user", "content": "What is 2 + 3?"}], "chosen": "The answer is 5.",
             "rejected": "The answer is 6."},
            {"prompt": "how are you today? " * 40, "chosen": "fine", "rejected": "bad"}]
    ds = read_dataset(write_jsonl(tmp_path / "p.jsonl", rows), expect="preference")
    data, counts = dpo.encode_pairs(tok, ds, block_size=40)
    assert counts["data/pairs"] == 1 and counts["data/skipped/longer_than_context"] == 1
    assert data.prompts[0] == tok.render_prompt([{"role": "user", "content": "What is 2 + 3?"}])
    assert all(len(p) + len(r) <= 40 for p, r in zip(data.prompts, data.responses))


def test_heldout_split_is_by_prompt_and_batches_cover_each_pair_once_per_epoch():
    rows = [{"prompt": [{"role": "user", "content": f"q{i % 25}"}]} for i in range(50)]   # each prompt in two rows
    data = dpo.Pairs([], [], np.arange(200).reshape(100, 2), np.repeat(np.arange(50), 2))
    train, heldout = dpo.split_heldout(data, rows, 0.2)
    text = lambda pairs: {rows[g]["prompt"][0]["content"] for g in data.group[pairs]}  # noqa: E731
    assert text(heldout) == {r["prompt"][0]["content"] for r in rows if is_heldout(r["prompt"], 0.2)}
    assert text(heldout) and text(heldout).isdisjoint(text(train))   # a repeated prompt stays on its side
    epoch = len(train) // 2
    seen = np.concatenate([train[batch_indices(len(train), 2, 0, step)] for step in range(epoch)])
    assert sorted(seen.tolist()) == sorted(train.tolist())  # one epoch = every train pair once
    again = train[batch_indices(len(train), 2, 0, 2)]
    assert again.tolist() == seen[4:6].tolist()  # a function of the step: resumable


# --- the stage ----------------------------------------------------------------------------------


WORLD_ROWS = [
    {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
     "responses": [f"{a} + {b} = {a + b}. The answer is {a + b}.", f"The answer is {a + b + 1}.", "hello"],
     "ranking": [0, 1, 2], "ended": [True, True, False]}
    for a, b in [(2, 3), (4, 4), (7, 1), (3, 5), (6, 2), (1, 1), (8, 0), (5, 4)]]


def make_run(run, tok, cfg_sets=SMALL, seed=0):
    """RUN/tokenizer + RUN/sft: a random tiny policy (the stage does not care how it was trained)."""
    cfg = build_config("tiny", sets=[*cfg_sets, f"model.vocab_size={tok.vocab_size}"])
    tok.save(run / "tokenizer")
    torch.manual_seed(seed)
    save_model(run / "sft", GPT(cfg.model).state_dict(), cfg.to_dict())
    return run / "sft"


@pytest.fixture(scope="module")
def trained(tok, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    policy = make_run(run, tok)
    write_jsonl(run / "prefs.jsonl", WORLD_ROWS)
    calls = []
    original = dpo.sequence_logprobs

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return original(*args, **kwargs)

    dpo.sequence_logprobs = counting
    try:
        summary = dpo.run(build_config("tiny", sets=SMALL), policy, run / "prefs.jsonl", run)
    finally:
        dpo.sequence_logprobs = original
    return run, summary, calls


def test_the_reference_logprobs_are_computed_once(trained):
    _, _, calls = trained
    # one call for the reference before 3 training steps, one for the held-out figures at the end
    assert calls == ["reference logprobs", None]


def test_summary_follows_the_contract_and_the_first_step_starts_at_log2(trained):
    run, summary, _ = trained
    on_disk = json.loads((run / "dpo" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("eval/accuracy", "eval/accuracy_ci95", "eval/gold_reward", "eval/format_ok", "eval/kl_to_sft",
                "wall_seconds", *dpo.METRICS, *(f"eval_{k}" for k in dpo.METRICS)):
        assert key in summary, key
    assert any(k.startswith("eval/accuracy/") for k in summary)
    assert summary["data/pairs"] == 24 and summary["data/heldout_pairs"] == 6 and summary["data/train_pairs"] == 18
    lines = [json.loads(line) for line in (run / "dpo" / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in lines if "loss" in m)
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert (run / "dpo" / "model.safetensors").exists() and (run / "dpo" / "eval_samples.jsonl").exists()
    assert summary["eval/kl_to_sft"] != 0.0  # measured against the SFT model, which the policy has left


def test_a_stopped_run_resumes_to_the_same_weights(tok, tmp_path):
    from safetensors.torch import load_file

    sets = [*SMALL, "dpo.max_steps=4", "dpo.lr=3e-3", "eval.limit=2"]
    finals = []
    for name, stops in (("straight", [0]), ("resumed", [2, 0])):
        run = tmp_path / name
        policy = make_run(run, tok, sets)
        write_jsonl(run / "prefs.jsonl", WORLD_ROWS)
        for stop in stops:  # the reference must come from the SFT weights, not the restored checkpoint
            out = dpo.run(build_config("tiny", sets=[*sets, f"dpo.stop_at={stop}"]), policy, run / "prefs.jsonl", run)
        assert "stopped_at" not in out
        finals.append(load_file(str(run / "dpo" / "model.safetensors")))
    for key, value in finals[0].items():
        torch.testing.assert_close(finals[1][key], value, rtol=0, atol=1e-6)
    assert not torch.equal(finals[0]["tok_emb.weight"], load_file(str(tmp_path / "straight" / "sft" / "model.safetensors"))["tok_emb.weight"])


def test_rpo_adds_the_chosen_responses_nll_per_token(tok, tmp_path):
    assert dpo.chosen_nll(torch.tensor([-3.0, -6.0]), torch.tensor([2, 4])).item() == pytest.approx(1.5)  # 9 / 6
    sets = [*SMALL, "dpo.max_steps=1", "dpo.rpo_alpha=0.5", "eval.limit=2"]
    policy = make_run(tmp_path, tok, sets)
    write_jsonl(tmp_path / "prefs.jsonl", WORLD_ROWS)
    cfg = build_config("tiny", sets=sets)
    dpo.run(cfg, policy, tmp_path / "prefs.jsonl", tmp_path)
    (first,) = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()
                if '"nll_loss"' in line]
    # by hand: the step-0 batch's chosen responses, scored by the SFT model token by token
    ds = read_dataset(tmp_path / "prefs.jsonl")
    data, _ = dpo.encode_pairs(tok, ds, cfg.model.block_size)
    train, _ = dpo.split_heldout(data, ds.rows, cfg.dpo.heldout_fraction)
    chosen = data.pairs[train[batch_indices(len(train), cfg.dpo.batch_size, cfg.dpo.seed, 0, 0, 1)], 0]
    sft, _ = load_model(policy)
    token_logps = []
    for s in chosen:
        p, r = data.prompts[s], data.responses[s]
        logp = torch.log_softmax(sft(torch.tensor([p + r]))[0].float(), -1)
        token_logps += [logp[len(p) - 1 + j, t].item() for j, t in enumerate(r)]
    assert first["nll_loss"] == pytest.approx(-sum(token_logps) / len(token_logps), abs=1e-4)
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["nll_loss"], abs=1e-5)


def test_runs_on_hh_rlhf_transcripts(tok, tmp_path, shared_data):
    rows = []
    with gzip.open(shared_data / "hh-rlhf/helpful-base/test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == 24:
                break
    with gzip.open(tmp_path / "hh.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    sets = [*SMALL, "model.block_size=256", "dpo.max_steps=2", "eval.limit=5"]
    policy = make_run(tmp_path, tok, sets)
    summary = dpo.run(build_config("tiny", sets=sets), policy, tmp_path / "hh.jsonl.gz", tmp_path)
    assert summary["data/rows"] == 24 and summary["data/pairs"] >= 5
    assert summary["data/pairs"] + summary.get("data/skipped/longer_than_context", 0) + summary["data/skipped"] == 24
    assert math.isfinite(summary["loss"])


def test_bad_input_stops_before_training(tok, tmp_path):
    policy = make_run(tmp_path / "a", tok)
    write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "yo"}]}])
    cfg = build_config("tiny", sets=SMALL)
    with pytest.raises(UserError, match="expected preference or ranking data"):
        dpo.run(cfg, policy, tmp_path / "sft.jsonl", tmp_path / "a")
    with pytest.raises(UserError, match="no such file"):
        dpo.run(cfg, policy, tmp_path / "missing.jsonl", tmp_path / "a")
    with pytest.raises(UserError, match="no prefs.jsonl"):
        dpo.run(cfg, policy, tmp_path, tmp_path / "a")
    with pytest.raises(UserError, match="dpo.loss_type"):
        dpo.run(build_config("tiny", sets=[*SMALL, "dpo.loss_type=hinge"]), policy, tmp_path / "sft.jsonl", tmp_path)
    # preferences collected in another run, whose tokenizer differs from the policy's
    other = Tokenizer.train("completely different text for another tokenizer " * 50, 300, progress=False)
    other.save(tmp_path / "b" / "tokenizer")
    (tmp_path / "b" / "prefs").mkdir()
    write_jsonl(tmp_path / "b" / "prefs" / "prefs.jsonl", WORLD_ROWS)
    with pytest.raises(UserError, match="different tokenizers"):
        dpo.run(cfg, policy, tmp_path / "b" / "prefs", tmp_path / "a")
    assert not (tmp_path / "a" / "dpo").exists()  # nothing was started


def test_cli_help(capsys):
    from gptstack.cli import main

    with pytest.raises(SystemExit) as e:
        main(["dpo", "--help"])
    assert e.value.code == 0 and "--prefs" in capsys.readouterr().out


@pytest.mark.slow
def test_ddp_two_processes_match_one(tok, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    curves = []
    for n, batch in ((1, 8), (2, 4)):
        run = tmp_path / f"ddp{n}"
        sets = [*SMALL, f"dpo.batch_size={batch}", "dpo.lr=3e-3", "dpo.max_steps=4"]
        make_run(run, tok, sets)
        write_jsonl(run / "prefs.jsonl", WORLD_ROWS)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={port}",
                "-m", "gptstack.cli", "dpo", "--policy", str(run / "sft"), "--prefs", str(run / "prefs.jsonl"),
                "--out", str(run)] + [a for s in sets for a in ("--set", s)]
        done = subprocess.run(args, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = [json.loads(line) for line in (run / "dpo" / "metrics.jsonl").read_text().splitlines()]
        curves.append([(m["loss"], m["rewards/accuracies"], m["rewards/margins"]) for m in lines if "loss" in m])
    assert len(curves[0]) == 4
    assert np.asarray(curves[1]) == pytest.approx(np.asarray(curves[0]), rel=1e-4, abs=1e-5)  # same global batch
