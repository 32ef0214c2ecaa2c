"""Best-of-N: the pick is the RM's argmax in each block, KL_bon and the fit have their known values,
the stage's summary follows the contract, and an RM of another tokenizer is refused."""
import json
import math

import numpy as np
import pytest
import torch

from gptstack.common import UserError
from gptstack.config import build_config
from gptstack.eval.fits import fit_gain, kl_bon
from gptstack.eval.stats import pick_best
from gptstack.model.gpt import GPT
from gptstack.model.heads import ScalarModel
from gptstack.rundir import save_model, save_scalar_model
from gptstack.stages import bon
from gptstack.tokenizer import Tokenizer

SMALL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=256", "bon.prompts=6",
         "bon.n=1,2,4,8", "bon.max_new_tokens=8", "bon.batch_size=4", "bon.threads=1"]


def test_pick_best_is_the_argmax_of_each_disjoint_block():
    proxy = np.array([[0.1, 0.9, 0.5, 0.2, 0.3, 0.3, 0.0, 0.7]])
    assert pick_best(proxy, 1).tolist() == [list(range(8))]
    assert pick_best(proxy, 2).tolist() == [[1, 2, 4, 7]]          # a tie (0.3, 0.3) -> the first
    assert pick_best(proxy, 4).tolist() == [[1, 7]]
    assert pick_best(proxy, 8).tolist() == [[1]]
    assert pick_best(proxy, 3).tolist() == [[1, 4]]                # 8 // 3 = 2 blocks (tie 0.3, 0.3 -> the first), the rest unused
    rng = np.random.default_rng(0)
    big = rng.normal(size=(5, 64))
    for n in (2, 4, 16, 64):
        picks = pick_best(big, n)
        for p in range(5):
            for j in range(64 // n):
                assert picks[p, j] == j * n + int(np.argmax(big[p, j * n : (j + 1) * n]))


def test_best_of_n_table_averages_the_picks():
    proxy = np.array([[0.1, 0.9, 0.5, 0.2], [1.0, 0.0, 0.0, 2.0]])
    gold = np.array([[0.2, 0.0, 1.0, 0.8], [0.3, 0.9, 0.1, 0.6]])
    correct = gold > 0.5
    rows = bon.best_of_n_table([1, 2, 4], proxy, gold, correct)
    assert [r["n"] for r in rows] == [1, 2, 4] and [r["subsets"] for r in rows] == [4, 2, 1]
    assert rows[0]["gold"] == pytest.approx(gold.mean()) and rows[0]["kl"] == 0.0 and rows[0]["d"] == 0.0
    # n = 2: prompt 0 picks 0.9 (gold 0.0) and 0.5 (gold 1.0); prompt 1 picks 1.0 (0.3) and 2.0 (0.6)
    assert rows[1]["gold"] == pytest.approx((0.0 + 1.0 + 0.3 + 0.6) / 4)
    assert rows[1]["proxy"] == pytest.approx((0.9 + 0.5 + 1.0 + 2.0) / 4)
    assert rows[1]["accuracy"] == pytest.approx(2 / 4)
    assert rows[2]["gold"] == pytest.approx((0.0 + 0.6) / 2)
    assert rows[2]["kl"] == pytest.approx(math.log(4) - 3 / 4)
    # blocks nest (powers of two), so the mean pick's proxy can only rise with n
    proxies = [r["proxy"] for r in bon.best_of_n_table([1, 2, 4, 8, 16], *(np.random.default_rng(1).normal(size=(2, 3, 16))),
                                                        np.zeros((3, 16), bool))]
    assert proxies == sorted(proxies)


def test_kl_bon_known_values():
    assert kl_bon(1) == 0.0
    assert kl_bon(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_bon(64) == pytest.approx(math.log(64) - 63 / 64)


def test_fit_recovers_known_coefficients():
    d = np.sqrt([kl_bon(n) for n in (2, 4, 8, 16, 32, 64)])
    alpha, beta, r2 = fit_gain(list(d), list(d * (0.5 - 0.1 * d)))
    assert (alpha, beta, r2) == pytest.approx((0.5, 0.1, 1.0), abs=1e-9)
    noisy = d * (0.5 - 0.1 * d) + np.array([0.01, -0.02, 0.015, -0.01, 0.02, -0.015])
    alpha, beta, r2 = fit_gain(list(d), list(noisy))
    assert 0.4 < alpha < 0.6 and 0.0 < beta < 0.2 and 0.5 < r2 < 1.0


def make_run(path, tok, seed=0):
    cfg = build_config("tiny", sets=SMALL)
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(seed)
    policy = GPT(cfg.model)
    save_model(path / "sft", policy.state_dict(), cfg.to_dict())
    rm = ScalarModel.from_policy(policy)
    torch.nn.init.normal_(rm.head.weight, std=1.0)
    save_scalar_model(path / "rm", rm, cfg.to_dict())
    tok.save(path / "tokenizer")
    return path


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train("What is 2 + 3? The answer is 5. Which is larger, 4 or 7? " * 100, 400, progress=False)


def test_bon_stage_summary_and_picks(tmp_path, tok):
    run = make_run(tmp_path / "run", tok)
    summary = bon.run(build_config("tiny", sets=SMALL), run / "sft", run / "rm", run)
    assert [r["n"] for r in summary["by_n"]] == [1, 2, 4, 8]
    for r in summary["by_n"]:
        assert set(r) >= {"n", "kl", "d", "proxy", "gold", "accuracy"}
        assert r["d"] == pytest.approx(math.sqrt(kl_bon(r["n"])))
    for key in ("fit/alpha", "fit/beta"):
        assert isinstance(summary[key], float)
    assert summary["fit/r2"] is None or summary["fit/r2"] <= 1.0
    proxies = [r["proxy"] for r in summary["by_n"]]
    assert proxies == sorted(proxies)  # nested blocks: the RM's pick can only get better by its own measure
    samples = [json.loads(line) for line in (run / "bon" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(s["best_proxy"] >= s["first_proxy"] for s in samples)
    assert json.loads((run / "bon" / "summary.json").read_text())["by_n"] == summary["by_n"]
    lines = [json.loads(line) for line in (run / "bon" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 4, 8] and lines[1]["bon/gold"] == summary["by_n"][1]["gold"]
    # the same config again: the finished stage is not redone
    assert bon.run(build_config("tiny", sets=SMALL), run / "sft", run / "rm", run)["wall_seconds"] == summary["wall_seconds"]


def test_bon_refuses_an_rm_of_another_tokenizer_and_bad_n(tmp_path, tok):
    run = make_run(tmp_path / "a", tok)
    other_tok = Tokenizer.train("completely different words here " * 100, 400, progress=False)
    other = make_run(tmp_path / "b", other_tok)
    with pytest.raises(UserError, match="use different tokenizers"):
        bon.run(build_config("tiny", sets=SMALL), run / "sft", other / "rm", run)
    with pytest.raises(UserError, match="bon.n: expected positive integers with at least two above 1"):
        bon.run(build_config("tiny", sets=[*SMALL, "bon.n=1,4"]), run / "sft", run / "rm", run)
    with pytest.raises(UserError, match="expected a reward model, found a language model"):
        bon.run(build_config("tiny", sets=SMALL), run / "sft", run / "sft", run)
    assert not (run / "bon").exists()


def test_a_finished_run_is_redone_when_the_rm_changes(tmp_path, tok):
    run = make_run(tmp_path / "run", tok)
    first = bon.run(build_config("tiny", sets=SMALL), run / "sft", run / "rm", run)
    make_run(tmp_path / "run", tok, seed=1)  # another policy and RM in the same places
    again = bon.run(build_config("tiny", sets=SMALL), run / "sft", run / "rm", run)
    assert again["inputs/rm_sha256"] != first["inputs/rm_sha256"] and again["wall_seconds"] != first["wall_seconds"]
