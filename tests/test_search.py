"""Search stage: best-of-N and majority vote on fixed scores; a search round never plans past its
budget and the search never generates more tokens than it is given (counted at the engine); the
stage's summary follows the contract, with every method equal at N = 1."""
import json

import numpy as np
import pytest
import torch

from gptstack import world
from gptstack.common import UserError
from gptstack.config import build_config
from gptstack.engine import step_search
from gptstack.model.gpt import GPT, GPTConfig
from gptstack.model.heads import ScalarModel
from gptstack.rundir import save_model, save_scalar_model
from gptstack.stages import prm, search
from gptstack.tokenizer import Tokenizer

SMALL_MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=160"]


@pytest.fixture(scope="module")
def tok():
    texts = [t.prompt + "\n" + t.reference for t in world.train_tasks(300, seed=0, families=["arithmetic"])]
    return Tokenizer.train(texts, 400, pattern="digits", progress=False)


# --- best-of-N on fixed scores ----------------------------------------------------------------------


def test_best_of_n_picks_the_top_score_of_each_disjoint_group():
    scores = np.array([[0.1, 0.9, 0.5, 0.5], [0.3, 0.3, 0.2, 0.8]])
    correct = np.array([[True, False, True, False], [False, True, False, True]])
    assert search.best_of_n(scores, correct, 1).tolist() == correct.tolist()
    # groups {0,1} and {2,3}; prompt 1's first group is a tie: the first sample wins
    assert search.best_of_n(scores, correct, 2).tolist() == [[False, True], [False, True]]
    assert search.best_of_n(scores, correct, 4).tolist() == [[False], [True]]
    tokens = np.array([[10, 20, 30, 40], [1, 1, 1, 1]])
    assert search.group_tokens(tokens, 2).tolist() == [50.0, 2.0]
    assert search.group_tokens(tokens, 1).tolist() == [25.0, 1.0]


def test_majority_vote_ties_and_missing_answers():
    keys = [[7, 9, 9, 7], [None, None, 3, None], [None, None, None, None], [5, 6, 6, 5]]
    correct = np.array([[True, False, False, True], [False, False, True, False], [False] * 4,
                        [False, True, True, False]])
    # 7 and 9 tie 2-2 over all four: 7 came first; one answer among Nones wins; no answer is wrong
    assert search.majority_vote(keys, correct, 4).tolist() == [[True], [True], [False], [False]]
    assert search.majority_vote(keys, correct, 2).tolist() == [[True, False], [False, True], [False, False],
                                                              [False, True]]
    assert search.vote([None, 4, 2, 2]) == 2 and search.vote([None]) is None


# --- the search's budget ------------------------------------------------------------------------------


def test_plan_round_never_plans_past_the_budget():
    for beams in (1, 2, 5, 16):
        for expand in (1, 2, 4):
            for remaining in (0, 1, 3, 15, 16, 17, 40, 63, 64, 65, 200, 5000):
                for step in (1, 8, 16):
                    counts, cap = step_search.plan_round(beams, expand, remaining, step)
                    assert sum(counts) * cap <= remaining
                    assert len(counts) <= beams and all(1 <= c <= expand for c in counts)
                    assert (remaining > 0) == bool(counts)  # any budget left is used
                    if remaining >= beams * expand * step:  # enough for a full round: every beam expands
                        assert counts == [expand] * beams and cap == step
    assert step_search.plan_round(4, 4, 100, 16) == ([4, 2], 16)  # fewer children, the best beams first
    assert step_search.plan_round(4, 4, 10, 16) == ([1], 10)


def test_prm_search_never_exceeds_its_budget(tok, monkeypatch):
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=128)).eval()
    verifier = ScalarModel.from_policy(policy, kind="prm").eval()
    torch.nn.init.normal_(verifier.head.weight, std=1.0)  # scores that differ, so selection does something
    tasks = world.train_tasks(6, seed=1, families=["arithmetic"])
    prompts = [tok.render_prompt([{"role": "user", "content": t.prompt}]) for t in tasks]
    generated = []
    real_generate = step_search.generate

    def counting_generate(model, prefixes, max_new_tokens, **kw):
        out = real_generate(model, prefixes, max_new_tokens, **kw)
        for i, samples in enumerate(out):
            owner = next(p for p, pr in enumerate(prompts) if prefixes[i][: len(pr)] == pr)
            generated.extend((owner, len(c.tokens)) for c in samples)
            assert all(len(c.tokens) <= max_new_tokens for c in samples)
        return out

    monkeypatch.setattr(step_search, "generate", counting_generate)
    sc = build_config("tiny", sets=["search.step_tokens=8", "search.max_new_tokens=40"]).search
    # distinct prompts, so the engine's rows can be traced back to the prompt they belong to
    assert len({tuple(p) for p in prompts}) == len(prompts)
    for n, budgets in ((1, [0, 1, 7, 8, 30, 200]), (4, [5, 16, 33, 64, 100, 500]), (8, [0, 9, 50, 120, 300, 1000])):
        generated.clear()
        chosen, used = step_search.prm_search(policy, verifier, tok, prompts, budgets, n, sc, seed=3, progress=False)
        for p, budget in enumerate(budgets):
            counted = sum(k for owner, k in generated if owner == p)
            assert counted == used[p] <= budget
            assert len(chosen[p].tokens) <= sc.max_new_tokens
        assert used[-1] > 0 and chosen[-1].tokens  # a large budget is used, and something is chosen


# --- the stage ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tok):
    run = tmp_path_factory.mktemp("run")
    cfg = build_config("tiny", sets=SMALL_MODEL + [f"model.vocab_size={tok.vocab_size}"])
    torch.manual_seed(0)
    policy = GPT(cfg.model)
    save_model(run / "sft", policy.state_dict(), cfg.to_dict())
    tok.save(run / "tokenizer")
    # a preference RM as `gptstack rm` would save it (kind "reward"), built here
    rm = ScalarModel.from_policy(policy, kind="reward")
    torch.nn.init.normal_(rm.head.weight, std=1.0)
    save_scalar_model(run / "rm", rm, cfg.to_dict())
    prm.run(build_config("tiny", sets=SMALL_MODEL + ["prm.prompts=16", "prm.samples=2", "prm.max_steps=2",
                                                     "prm.batch_size=4", "prm.max_new_tokens=24"]), run / "sft", run)
    return run


SEARCH_SETS = SMALL_MODEL + ["search.n=1,2,4", "search.prompts=6", "search.max_new_tokens=24", "search.step_tokens=8"]


def test_search_summary_contract(trained_run):
    run = trained_run
    summary = search.run(build_config("tiny", sets=SEARCH_SETS), run / "sft", run / "prm", run,
                         orm_dir=run / "prm", rm_dir=run / "rm")
    saved = json.loads((run / "search/summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for key in ("accuracy", "tokens"):
        assert set(saved[key]) == {"prm", "orm", "rm", "majority", "prm_search"}
        for method, by_n in saved[key].items():
            assert set(by_n) == {"1", "2", "4"}, method
            assert all(isinstance(v, float) for v in by_n.values())
    acc, tokens = saved["accuracy"], saved["tokens"]
    # N = 1: every selection method picks the only sample, so all equal the policy's accuracy
    assert acc["prm"]["1"] == acc["orm"]["1"] == acc["rm"]["1"] == acc["majority"]["1"]
    for n in ("1", "2", "4"):
        assert tokens["prm"][n] == tokens["orm"][n] == tokens["rm"][n] == tokens["majority"][n]
        assert tokens["prm_search"][n] <= saved["prm_search/budget"][n] <= tokens["prm"][n]
        assert acc["prm"][n] <= saved["oracle"][n]
    assert tokens["prm"]["4"] == pytest.approx(2 * tokens["prm"]["2"]) == pytest.approx(4 * tokens["prm"]["1"])
    picks = [json.loads(x) for x in (run / "search/picks.jsonl").read_text().splitlines()]
    assert len(picks) == saved["n_prompts"] == 6


def test_search_without_rm_and_bad_settings(trained_run):
    run = trained_run
    summary = search.run(build_config("tiny", sets=SEARCH_SETS + ["search.n=1,2"]), run / "sft", run / "prm", run,
                         rm_dir="none")
    assert summary["accuracy"]["rm"] == {"1": None, "2": None}
    with pytest.raises(UserError, match="search.n: expected positive sizes that each divide the largest"):
        search.run(build_config("tiny", sets=SEARCH_SETS + ["search.n=1,3,4"]), run / "sft", run / "prm", run)
    with pytest.raises(UserError, match="expected a prm model, found a reward model"):
        search.run(build_config("tiny", sets=SEARCH_SETS), run / "sft", run / "rm", run, rm_dir="none")
    with pytest.raises(UserError, match="expected a reward model, found a prm model"):
        search.run(build_config("tiny", sets=SEARCH_SETS), run / "sft", run / "prm", run, rm_dir=run / "prm")
