"""Reward model: the Bradley–Terry loss by hand, K-wise rankings as all C(K,2) pairs in one batch
element, the score at the last real token, reading comparisons (bad rows, ties), the held-out
figures on hand-made examples, a learnable toy preference, normalisation, hh-rlhf transcripts."""
import gzip
import json
import math

import numpy as np
import pytest
import torch

from gptstack.common import UserError
from gptstack.config import build_config
from gptstack.data.batches import batch_indices
from gptstack.data.comparisons import distinct_pairs, load_preferences
from gptstack.data.split import is_heldout
from gptstack.engine.scoring import likelihood_scores, render_for_rm
from gptstack.eval.stats import preference_metrics, rankdata, spearman
from gptstack.model.gpt import GPT
from gptstack.model.heads import ScalarModel
from gptstack.rundir import check_same_tokenizer, load_scalar_model, save_model
from gptstack.stages import rm as rm_stage
from gptstack.tokenizer import ASSISTANT_END, ASSISTANT_START, USER_START, Tokenizer

SMALL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=64", "rm.batch_size=8",
         "rm.log_every=5", "rm.norm_prompts=16", "rm.max_new_tokens=8", "rm.warmup_steps=2", "rm.threads=1",
         # the plain Bradley-Terry RM (the tiny recipe adds the likelihood term and LM loss: test_rm_lm.py)
         "rm.likelihood_score=false", "rm.lm_coef=0.0"]


@pytest.fixture(scope="module")
def tok():
    text = "Question: what is 2 + 3? The answer is 5. yes indeed, no way. Human Assistant hello there " * 100
    return Tokenizer.train(text, 400, progress=False)


def make_run(path, tok, seed=0, sets=()):
    """A run directory with a (random) policy at RUN/sft and its tokenizer."""
    cfg = build_config("tiny", sets=[*SMALL, *sets])
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(seed)
    save_model(path / "sft", GPT(cfg.model).state_dict(), cfg.to_dict())
    tok.save(path / "tokenizer")
    return cfg


def write_jsonl(path, rows, gz=False):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# --- the loss and the pairs ----------------------------------------------------------------------


def test_bradley_terry_loss_equals_the_hand_computed_value():
    # prompt A: K=3 ranked 0 > 1 > 2 with scores 2, 1, -1; prompt B: one pair, 4 over 3, equal scores
    scores = torch.tensor([2.0, 1.0, -1.0, 0.5, 0.5], requires_grad=True)
    groups = [[(0, 1), (0, 2), (1, 2)], [(4, 3)]]
    loss = rm_stage.bradley_terry_loss(scores, groups)
    # -log sigmoid(x) = log(1 + e^-x): A's pairs differ by 1, 3, 2; B's by 0 (log 2)
    a = (math.log1p(math.exp(-1)) + math.log1p(math.exp(-3)) + math.log1p(math.exp(-2))) / 3
    b = math.log(2)
    assert loss.item() == pytest.approx((a + b) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.4280, abs=1e-4)  # (0.3133 + 0.0486 + 0.1269) / 3 = 0.1629; (0.1629 + 0.6931) / 2
    loss.backward()
    # d/d r_4 of B's term (weight 1/2 for the prompt, 1 for its only pair): -(1 - sigmoid(0)) / 2
    assert scores.grad[4].item() == pytest.approx(-0.25, abs=1e-6)
    assert scores.grad[3].item() == pytest.approx(0.25, abs=1e-6)


def test_kwise_ranking_gives_all_pairs_and_one_pass_per_response():
    row = {"prompt": [{"role": "user", "content": "p"}], "responses": ["a", "b", "c", "d"], "ranking": [2, 0, 3, 1]}
    pairs, identical = distinct_pairs(row)
    assert identical == 0 and len(pairs) == math.comb(4, 2)
    assert set(pairs) == {(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)}
    items = [{"seqs": [[1], [2], [3], [4]], "pairs": pairs}, {"seqs": [[5], [6]], "pairs": [(1, 0)]}]
    seqs, groups = rm_stage.collate(items)
    assert seqs == [[1], [2], [3], [4], [5], [6]]          # each response once
    assert groups == [pairs, [(5, 4)]]                      # pairs point into the flat list, per prompt


def test_identical_responses_are_not_a_pair():
    row = {"prompt": [], "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}
    assert distinct_pairs(row) == ([(0, 1), (1, 2)], 1)
    # the same text, one ended and one cut off, is a real difference
    row["ended"] = [True, True, False]
    assert distinct_pairs(row) == ([(0, 1), (0, 2), (1, 2)], 0)


def test_batches_are_epochs_of_shuffles_and_resume_exactly():
    first = [batch_indices(10, 4, seed=0, step=s).tolist() for s in range(5)]
    flat = [i for b in first for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert batch_indices(10, 4, seed=0, step=3).tolist() == first[3]  # a function of the step alone


# --- rendering and the score ---------------------------------------------------------------------


def test_render_for_rm_appends_the_end_token_only_when_the_response_ended(tok):
    prompt = [{"role": "user", "content": "what is 2 + 3?"}]
    ids = tok.render_prompt(prompt)
    end = tok.special(ASSISTANT_END)
    assert render_for_rm(tok, prompt, "The answer is 5.", True, 100) == ids + tok.encode("The answer is 5.") + [end]
    assert render_for_rm(tok, ids, tok.encode("5"), False, 100) == ids + tok.encode("5")
    long = render_for_rm(tok, prompt, "yes indeed " * 20, True, 16)
    assert len(long) == 16 and long[-1] == end  # the prompt's oldest tokens go, never the end


def test_score_is_read_at_the_last_real_token_whatever_the_padding():
    torch.manual_seed(0)
    rm = ScalarModel.from_policy(GPT(build_config("tiny", sets=SMALL).model)).eval()
    torch.nn.init.normal_(rm.head.weight, std=1.0)
    seqs = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    alone = [rm(torch.tensor([s]))[0, -1].item() for s in seqs]
    assert rm_stage.score_ids(rm, seqs, batch_size=3) == pytest.approx(alone, abs=1e-5)   # right padding
    assert rm_stage.score_ids(rm, seqs, batch_size=1) == pytest.approx(alone, abs=1e-5)
    ids = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for i, s in enumerate(seqs):  # left padding through ScalarModel.score
        ids[i, 5 - len(s):], mask[i, 5 - len(s):] = torch.tensor(s), True
    assert rm.score(ids, pad_mask=mask).tolist() == pytest.approx(alone, abs=1e-5)


# --- reading comparisons -------------------------------------------------------------------------


def test_load_preferences_pairs_rankings_directories_and_bad_rows(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."},
        {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."},       # identical: skipped, counted
        {"prompt": "Hi", "chosen": " ", "rejected": "Go away."},       # empty response: skipped, counted
    ])
    rows, counts = load_preferences(pairs)
    assert rows == [{"prompt": [{"role": "user", "content": "Hi"}], "responses": ["Hello.", "Go away."], "ranking": [0, 1]}]
    assert counts["data/skipped/chosen_equals_rejected"] == 1 and counts["data/skipped/empty_final_assistant_turn"] == 1

    ranked = {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "responses": ["The answer is 5.", "The answer is 6."],
              "ranking": [0, 1], "ended": [True, False], "gold": [1.0, 0.04], "family": "arithmetic"}
    (tmp_path / "run" / "prefs").mkdir(parents=True)
    write_jsonl(tmp_path / "run" / "prefs" / "prefs.jsonl", [ranked])
    rows, _ = load_preferences(tmp_path / "run" / "prefs")
    assert rows == [{k: ranked[k] for k in ("prompt", "responses", "ranking", "ended", "gold")}]  # extras kept

    ties = write_jsonl(tmp_path / "ties.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [[0, 1], 2]}])
    with pytest.raises(UserError, match=r"ties.jsonl:1: ranking: .*ties cannot be expressed"):
        load_preferences(ties)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "gold": [1]}])
    with pytest.raises(UserError, match=r"bad.jsonl:1: gold: expected a list of 2 numbers"):
        load_preferences(bad)
    with pytest.raises(UserError, match="no prefs.jsonl here"):
        load_preferences(tmp_path)


def test_load_preferences_reads_a_feedback_store(tmp_path, monkeypatch):
    expected = ([{"prompt": [{"role": "user", "content": "x"}], "responses": ["a", "b"], "ranking": [1, 0]}], {"data/rows": 1})
    from gptstack.data import comparisons

    monkeypatch.setattr(comparisons, "read_feedback", lambda path: expected)
    assert load_preferences(tmp_path / "feedback.sqlite") == expected


def test_check_same_tokenizer_refuses_different_tokenizers(tmp_path, tok):
    tok.save(tmp_path / "a" / "tokenizer")
    tok.save(tmp_path / "b" / "tokenizer")
    check_same_tokenizer(tmp_path / "a" / "sft", tmp_path / "b" / "rm")  # same content, other directory: fine
    Tokenizer.train("completely different text " * 50, 300, progress=False).save(tmp_path / "c" / "tokenizer")
    with pytest.raises(UserError, match=r"a/sft and .*c/rm use different tokenizers .*sha256:.*sha256:"):
        check_same_tokenizer(tmp_path / "a" / "sft", tmp_path / "c" / "rm")


# --- the held-out figures ------------------------------------------------------------------------


def test_spearman_with_ties_matches_known_values():
    assert rankdata([3.0, 1.0, 2.0, 2.0]).tolist() == [4.0, 1.0, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)    # 1 - 6*2/(4*15)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_preference_metrics_on_a_hand_made_example():
    rows = [
        # labels: 0 > 1 > 2; gold orders 0 > 2 > 1, so the labels get (0,1), (0,2) right, (1,2) wrong
        {"responses": ["a", "b", "c"], "ranking": [0, 1, 2], "gold": [1.0, 0.1, 0.2]},
        # labels: 1 > 0, gold equal: not a gold pair
        {"responses": ["d", "e"], "ranking": [1, 0], "gold": [0.5, 0.5]},
    ]
    scores = [[3.0, 1.0, 2.0], [0.0, 0.0]]
    correct = [[True, False, False], None]
    m = preference_metrics(rows, scores, correct)
    # label pairs: (0,1) yes, (0,2) yes, (1,2) no (1 < 2), (1,0) of row 2 a tie (1/2) -> 2.5 / 4
    assert m["eval/accuracy"] == pytest.approx(2.5 / 4)
    assert m["eval/pairs"] == 4
    # exactly one right: (0,1), (0,2); the RM puts 0 on top both times
    assert m["eval/correct_vs_wrong_accuracy"] == 1.0 and m["eval/correct_vs_wrong_pairs"] == 2
    assert m["eval/labeler_gold_agreement"] == pytest.approx(2 / 3)
    assert m["eval/gold_pair_accuracy"] == pytest.approx(3 / 3)   # the RM orders all three as gold does
    assert m["eval/gold_spearman"] == pytest.approx(spearman([3, 1, 2, 0, 0], [1.0, 0.1, 0.2, 0.5, 0.5]))


def test_heldout_split_is_by_prompt_and_stable():
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(2000)]
    held = [is_heldout(p, 0.1) for p in prompts]
    assert 0.07 < sum(held) / len(held) < 0.13
    assert held == [is_heldout(p, 0.1) for p in prompts]


# --- the stage -----------------------------------------------------------------------------------


def toy_preferences(path, n=240):
    """'yes ...' is always preferred to 'no ...': learnable from the last tokens alone."""
    rows = [{"prompt": f"Question {i}: what is {i} + 3?", "chosen": "yes indeed", "rejected": "no way"} for i in range(n)]
    for i, r in enumerate(rows):
        if i % 2:
            r["chosen"], r["rejected"] = r["chosen"] + " yes", r["rejected"] + " no"
    return write_jsonl(path, rows)


def test_rm_learns_a_toy_preference_and_normalises_on_the_policy(tmp_path, tok):
    run = tmp_path / "run"
    make_run(run, tok)
    cfg = build_config("tiny", sets=[*SMALL, "rm.epochs=3", "rm.lr=3e-3"])
    summary = rm_stage.run(cfg, run / "sft", toy_preferences(tmp_path / "toy.jsonl"), run)
    assert summary["eval/accuracy"] >= 0.95, summary  # a flipped sign or wrong pairs would give ~0
    assert summary["train/final_loss"] < 0.2
    assert summary["train/prompts"] + summary["eval/prompts"] == 240
    assert "eval/correct_vs_wrong_accuracy" not in summary  # not world prompts
    for key in ("norm/raw_mean", "norm/raw_std", "wall_seconds", "steps"):
        assert key in summary
    rm, _ = load_scalar_model(run / "rm", "reward")
    assert json.loads((run / "rm" / "summary.json").read_text())["eval/accuracy"] == summary["eval/accuracy"]
    # normalised: the same policy samples now score mean 0, std 1
    from gptstack.rundir import load_stage

    policy, _, tok2 = load_stage(run / "sft")
    rows, _ = load_preferences(tmp_path / "toy.jsonl")
    train_prompts = [r["prompt"] for r in rows if not is_heldout(r["prompt"], cfg.rm.eval_fraction)]
    mean, std = rm_stage.normalization(rm, policy, tok2, train_prompts, cfg.rm, cfg.rm.seed)
    assert mean == pytest.approx(0.0, abs=1e-4) and std == pytest.approx(1.0, abs=1e-4)
    # rerunning a finished stage resumes (nothing left to train) and keeps the figures
    again = rm_stage.run(build_config("tiny", sets=[*SMALL, "rm.epochs=3", "rm.lr=3e-3"]), run / "sft",
                         tmp_path / "toy.jsonl", run)
    assert again["eval/accuracy"] == summary["eval/accuracy"]


def test_world_rows_give_the_world_figures(tmp_path, tok):
    run = tmp_path / "run"
    make_run(run, tok)
    rows = []
    for i in range(60):
        a, b = i % 9 + 1, i // 9 + 2
        right, wrong = f"{a} + {b} = {a + b}.\nThe answer is {a + b}.", f"{a} + {b} = {a + b + 1}.\nThe answer is {a + b + 1}."
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "responses": [right, wrong],
                     "ranking": [0, 1], "ended": [True, True]})
    path = write_jsonl(tmp_path / "w.jsonl", rows)
    summary = rm_stage.run(build_config("tiny", sets=[*SMALL, "rm.max_steps=2", "rm.eval_fraction=0.3"]), run / "sft",
                           path, run)
    for key in ("eval/accuracy", "eval/correct_vs_wrong_accuracy", "eval/gold_spearman",
                "eval/labeler_gold_agreement", "policy/accuracy"):
        assert isinstance(summary[key], float), key
    assert summary["eval/labeler_gold_agreement"] == 1.0  # these labels always put the right answer first
    assert summary["policy/n_prompts"] == summary["eval/prompts"]
    assert 0 <= summary["policy/logprob_correct_vs_wrong_accuracy"] <= 1


def hh_rows(n):
    rows = []
    for i in range(n):
        prompt = f"\n\nHuman: Question {i}, hello there?\n\nAssistant: hello\n\nHuman: what is {i} + 3?"
        rows.append({"chosen": prompt + "\n\nAssistant: yes indeed", "rejected": prompt + "\n\nAssistant: no way"})
    rows.append({"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected": "\n\nHuman: hi\n\nAssistant: same"})
    return rows


def test_rm_on_hh_rlhf_transcripts_through_the_chat_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "hh.jsonl.gz", hh_rows(80), gz=True)
    rows, counts = load_preferences(path)
    assert counts["data/skipped/chosen_equals_rejected"] == 1
    assert [m["role"] for m in rows[0]["prompt"]] == ["user", "assistant", "user"]
    seq = render_for_rm(tok, rows[0]["prompt"], rows[0]["responses"][0], True, 500)
    specials = [t for t in seq if t in (tok.special(USER_START), tok.special(ASSISTANT_START), tok.special(ASSISTANT_END))]
    assert specials == [tok.special(USER_START), tok.special(ASSISTANT_START), tok.special(ASSISTANT_END),
                        tok.special(USER_START), tok.special(ASSISTANT_START), tok.special(ASSISTANT_END)]
    run = tmp_path / "run"
    make_run(run, tok)
    summary = rm_stage.run(build_config("tiny", sets=[*SMALL, "rm.max_steps=3", "rm.eval_fraction=0.25"]), run / "sft",
                           path, run)
    assert 0 <= summary["eval/accuracy"] <= 1 and summary["eval/prompts"] > 0
    assert "policy/accuracy" not in summary and summary["data/skipped/chosen_equals_rejected"] == 1


def test_rm_on_a_slice_of_the_real_hh_rlhf_file(tmp_path, tok, shared_data):
    with gzip.open(shared_data / "hh-rlhf/helpful-base/test.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(60), f)]
    path = write_jsonl(tmp_path / "slice.jsonl", rows)
    run = tmp_path / "run"
    make_run(run, tok)
    summary = rm_stage.run(build_config("tiny", sets=[*SMALL, "rm.max_steps=2", "rm.eval_fraction=0.2"]), run / "sft",
                           path, run)
    assert summary["eval/prompts"] > 0 and summary["sequences/truncated"] > 0  # long transcripts keep their ends
    assert np.isfinite(summary["eval/accuracy"])


def test_bad_input_stops_before_training(tmp_path, tok):
    run = tmp_path / "run"
    make_run(run, tok)
    only_same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "p", "responses": ["a", "a"], "ranking": [0, 1]}] * 5)
    with pytest.raises(UserError, match="0 training and 0 held-out prompts with a comparison"):
        rm_stage.run(build_config("tiny", sets=SMALL), run / "sft", only_same, run)
    assert not (run / "rm").exists()


def test_likelihood_scores_are_the_policys_mean_logprob_per_token(tok):
    torch.manual_seed(0)
    cfg = build_config("tiny", sets=SMALL)
    cfg.model.vocab_size = tok.vocab_size
    policy = GPT(cfg.model).eval()
    row = {"prompt": [{"role": "user", "content": "what is 2 + 3?"}], "responses": ["The answer is 5.", "no"],
           "ranking": [0, 1], "ended": [True, False]}
    (got,) = likelihood_scores(policy, tok, [row])
    p = tok.render_prompt(row["prompt"])
    for value, r in zip(got, [tok.encode("The answer is 5.") + [tok.special(ASSISTANT_END)], tok.encode("no")]):
        logp = torch.log_softmax(policy(torch.tensor([p + r]))[0], -1)
        manual = sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(r)) / len(r)
        assert value == pytest.approx(manual, abs=1e-5)
