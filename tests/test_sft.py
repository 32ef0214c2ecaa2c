"""SFT: the loss mask covers exactly the assistant spans; the stage's summary follows the contract;
bad conversation files stop before training."""
import json

import pytest
import torch

from gptstack.common import UserError
from gptstack.config import build_config
from gptstack.engine.rollout import sequence_logprobs
from gptstack.eval.stats import wilson_interval
from gptstack.stages import pretrain, sft
from gptstack.tokenizer import ASSISTANT_END, Tokenizer

SMALL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=128", "pretrain.batch_size=4",
         "pretrain.max_steps=4", "pretrain.log_every=1", "tokenizer.vocab_size=400", "data.world_chars=60000",
         "sft.max_steps=3", "sft.batch_size=4", "sft.demos=200", "eval.limit=20", "eval.k=2",
         "eval.max_new_tokens=24"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train("Question: what is 2 + 3? The answer is 5. hello there " * 200, 400, progress=False)


def test_loss_mask_covers_exactly_the_assistant_spans(tok):
    conv = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5.\nThe answer is 5."},
            {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "The answer is 8."}]
    (pair,), dropped = sft.render_all(tok, [conv], block_size=200)
    x, y = pair
    assert dropped == 0
    trained = [int(t) for t in y if t >= 0]
    end = tok.special(ASSISTANT_END)
    assert trained == tok.encode("2 + 3 = 5.\nThe answer is 5.") + [end] + tok.encode("The answer is 8.") + [end]
    # and each trained target is the next input token at that position (shifted by one)
    ids, mask = tok.render_conversation(conv)
    assert x.tolist() == ids[:-1]
    assert [t >= 0 for t in y.tolist()] == [bool(m) for m in mask[1:]]
    assert sft.render_all(tok, [conv], block_size=10) == ([], 1)  # longer than the context: dropped, counted


def test_batches_pad_right_with_ignored_targets(tok):
    convs = [[{"role": "user", "content": "hi" * n}, {"role": "assistant", "content": "yo"}] for n in (1, 5, 9)]
    rendered, _ = sft.render_all(tok, convs, 100)
    x, y, seg = sft.get_batch(rendered, 8, seed=0, step=0)
    assert seg is None
    lengths = [r.shape[1] for r in rendered]
    assert x.shape[1] == max(lengths)
    for row_x, row_y in zip(x, y):
        n = next(r.shape[1] for r in rendered if torch.equal(torch.from_numpy(r[0]), row_x[: r.shape[1]]))
        assert (row_y[n:] == -1).all() and (row_x[n:] == 0).all()


@pytest.mark.parametrize("pair_cost", [0.0, 1 / 320])   # 1 / 320: the test model's attention_pair_cost
def test_packed_batches_hold_the_same_conversations_and_give_the_padded_loss(tok, pair_cost):
    from gptstack.model import GPT, GPTConfig

    convs = [[{"role": "user", "content": "hi " * n}, {"role": "assistant", "content": "yo " * (1 + n % 4)}]
             for n in range(1, 30)]
    rendered, _ = sft.render_all(tok, convs, 64)
    for step in range(3):
        x, y, _ = sft.get_batch(rendered, 12, seed=1, step=step)
        px, py, seg = sft.get_batch(rendered, 12, seed=1, step=step, pack_to=64, pair_cost=pair_cost)
        assert px.shape[0] < x.shape[0] and px.shape[1] <= 64 and px.numel() < x.numel()
        # the same conversations: each packed run (a segment with targets) is one drawn conversation
        runs = sorted(tuple(px[i][seg[i] == j].tolist()) for i in range(px.shape[0]) for j in seg[i].unique().tolist()
                      if (py[i][seg[i] == j] >= 0).any())
        assert runs == sorted(tuple(row[: (row != 0).nonzero().max() + 1].tolist()) for row in x)
        assert int((py >= 0).sum()) == int((y >= 0).sum())
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64))
        padded = model(x, y)
        packed = model(px, py, segments=seg)
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
        g_pad = torch.autograd.grad(padded, list(model.parameters()))
        g_pack = torch.autograd.grad(model(px, py, segments=seg), list(model.parameters()))
        for a, b in zip(g_pad, g_pack):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson_interval(100, 100)[1] == 1.0


def test_sequence_logprobs_equal_a_forward_pass():
    from gptstack.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    prompts, responses = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10, 11]]
    got = sequence_logprobs(model, prompts, responses, temperature=0.7)
    for p, r, value in zip(prompts, responses, got):
        logp = torch.log_softmax(model(torch.tensor([p + r]))[0] / 0.7, -1)
        assert value == pytest.approx(sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(r)), abs=1e-5)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    pretrain.run(build_config("tiny", sets=SMALL), run)
    return run


@pytest.fixture(scope="module")
def fine_tuned(pretrained):
    summary = sft.run(build_config("tiny", sets=SMALL), pretrained / "pretrain", pretrained)
    return pretrained, summary


def test_sft_summary_contract(fine_tuned):
    pretrained, summary = fine_tuned
    saved = json.loads((pretrained / "sft/summary.json").read_text())
    for key in ("eval/accuracy", "eval/accuracy_ci95", "eval/gold_reward", "eval/format_ok", "eval/kl_to_sft",
                "wall_seconds", "base/eval/accuracy", "base/eval/gold_reward", "base/eval/accuracy_ci95"):
        assert key in saved, key
    families = {k.split("/")[-1] for k in saved if k.startswith("eval/accuracy/")}
    assert families <= set(__import__("gptstack.world", fromlist=["FAMILIES"]).FAMILIES) and families
    lo, hi = saved["eval/accuracy_ci95"]
    assert lo <= saved["eval/accuracy"] <= hi and saved["eval/kl_to_sft"] == 0
    assert (pretrained / "sft/model.safetensors").exists() and (pretrained / "sft/eval_samples.jsonl").exists()
    assert summary["eval/accuracy"] == saved["eval/accuracy"]
    # the same command on the finished run resumes at its last step and re-evaluates, same figures
    again = sft.run(build_config("tiny", sets=SMALL), pretrained / "pretrain", pretrained)
    assert again["eval/accuracy"] == summary["eval/accuracy"]


def test_sft_bad_file_stops_before_training(pretrained, tmp_path):
    bad = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                          {"role": "user", "content": "and?"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError) as e:
        sft.run(build_config("tiny", sets=SMALL), pretrained / "pretrain", tmp_path / "out", data=str(bad))
    message = str(e.value)
    assert "chats.jsonl:2: messages[2]: does not end with an assistant turn" in message
    assert "chats.jsonl:3: messages[1].role: expected one of system, user, assistant, got 'robot'" in message
    assert "chats.jsonl:4: messages[1]: empty final assistant turn" in message
    assert not (tmp_path / "out/sft").exists()


def test_chat_and_sample_commands(fine_tuned):
    import subprocess
    import sys

    run, _ = fine_tuned
    proc = subprocess.run([sys.executable, "-m", "gptstack.cli", "chat", str(run), "--max-new-tokens", "8"],
                          input="What is 2 + 3?\nAnd 4 + 4?\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2  # two turns, one reply each, history kept between them
    proc = subprocess.run([sys.executable, "-m", "gptstack.cli", "sample", str(run / "sft"), "--chat", "--prompt",
                           "What is 2 + 3?", "--max-new-tokens", "8", "--num-samples", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--- sample") == 2


def test_eval_command_prints_the_protocol(fine_tuned):
    import subprocess
    import sys

    run, _ = fine_tuned
    proc = subprocess.run([sys.executable, "-m", "gptstack.cli", "eval", str(run / "sft"), "--set", "eval.limit=10",
                           "--set", "eval.k=1", "--set", "eval.max_new_tokens=16"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert figures["eval/n_prompts"] == 10 and "eval/pass@1" in figures and figures["eval/kl_to_sft"] == 0.0


def sum_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} + {i + 1}?"},
                          {"role": "assistant", "content": f"{i} + {i + 1} = {2 * i + 1}.\nThe answer is {2 * i + 1}."}]}
            for i in range(n)]


def test_sft_on_a_file_holds_out_a_slice_and_reports_its_loss(pretrained, tmp_path):
    from gptstack.data.split import is_heldout
    from gptstack.report import ReportConfig, write_report
    from gptstack.rundir import load_stage

    rows = sum_rows(60)
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build_config("tiny", sets=SMALL + ["sft.heldout_fraction=0.2"])
    held = [r["messages"] for r in rows if is_heldout(r["messages"][:-1], 0.2)]   # the one rule, on the prompt
    assert 0 < len(held) < len(rows)
    # the held-out conversations are never trained on: training draws only from the rest
    train, counts, heldout = sft.load_conversations(str(path), cfg, skip_bad_rows=False)
    assert [c for c, _ in heldout] == held and heldout[0][1] is None
    assert not any(c in held for c in train) and len(train) + len(held) == counts["data/usable"] == len(rows)
    none_held = sft.load_conversations(str(path), build_config("tiny", sets=SMALL + ["sft.heldout_fraction=0"]), False)
    assert len(none_held[0]) == len(rows) and none_held[2] == []

    summary = sft.run(cfg, pretrained / "pretrain", tmp_path / "out", data=str(path))
    saved = json.loads((tmp_path / "out/sft/summary.json").read_text())
    assert saved["heldout/conversations"] == len(held)
    assert saved["data/train_conversations"] + saved["heldout/conversations"] == saved["data/usable"] == len(rows)
    assert "heldout/accuracy" not in saved and summary["heldout/loss"] == saved["heldout/loss"]
    # the training loss (the model's own cross-entropy on the loss mask), token-weighted over the slice
    model, _, tok = load_stage(tmp_path / "out/sft", "cpu")
    nats = tokens = 0
    with torch.no_grad():
        for (x, y) in sft.render_all(tok, held, 128)[0]:
            n = int((y >= 0).sum())
            nats, tokens = nats + model(torch.from_numpy(x)[None], torch.from_numpy(y)[None]).item() * n, tokens + n
    assert saved["heldout/loss"] == pytest.approx(nats / tokens, rel=1e-4)
    md = write_report(tmp_path / "out", ReportConfig(samples=1, dpi=20))[0].read_text()
    assert f"| held-out loss (nats/token) | {saved['heldout/loss']:.3f} | `heldout/loss` |" in md


def test_sft_on_gsm8k_rows_reports_the_heldout_greedy_accuracy(pretrained, tmp_path):
    rows = [{"question": f"What is {i} + {i + 1}?", "answer": f"{i} + {i + 1} = <<{i}+{i + 1}={2 * i + 1}>>{2 * i + 1}\n"
                                                             f"#### {2 * i + 1}"} for i in range(40)]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build_config("tiny", sets=SMALL + ["sft.heldout_fraction=0.25"])
    saved = sft.run(cfg, pretrained / "pretrain", tmp_path / "out", data=str(path))
    n = saved["heldout/conversations"]
    assert 0 < n < 40 and saved["heldout/n_prompts"] == n and saved["data/train_conversations"] == 40 - n
    lo, hi = saved["heldout/accuracy_ci95"]
    assert lo <= saved["heldout/accuracy"] <= hi
    assert [lo, hi] == pytest.approx(wilson_interval(round(saved["heldout/accuracy"] * n), n))
