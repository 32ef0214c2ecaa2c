"""PRM stage: steps split and rendered so the score of a step is read at its last token; checker and
Monte-Carlo labels on hand-made examples; aggregation and AUROC on fixed scores; TRL stepwise rows
read and written with file:line errors; the PRM learns step labels; the stage's outputs."""
import json

import pytest
import torch

from gptstack import world
from gptstack.common import UserError
from gptstack.config import build_config
from gptstack.data.formats import read_dataset
from gptstack.engine.sampling import Completion
from gptstack.engine import scoring
from gptstack.eval import stats
from gptstack.model.gpt import GPT, GPTConfig
from gptstack.model.heads import ScalarModel
from gptstack.rundir import load_scalar_model, save_model
from gptstack.stages import prm
from gptstack.tokenizer import ASSISTANT_END, Tokenizer
from gptstack.train.dist import DistInfo

SMALL_MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=160"]


@pytest.fixture(scope="module")
def tok():
    texts = [t.prompt + "\n" + t.reference for t in world.train_tasks(300, seed=0, families=["arithmetic"])]
    return Tokenizer.train(texts, 400, pattern="digits", progress=False)


def make_sft_run(run, tok, seed=0):
    """A run directory with the tokenizer and an (untrained) policy saved as RUN/sft."""
    cfg = build_config("tiny", sets=SMALL_MODEL + [f"model.vocab_size={tok.vocab_size}"])
    torch.manual_seed(seed)
    save_model(run / "sft", GPT(cfg.model).state_dict(), cfg.to_dict())
    tok.save(run / "tokenizer")
    return cfg


# --- steps --------------------------------------------------------------------------------------


def test_response_steps_are_lines_and_know_a_cut_last_step():
    assert scoring.response_steps("3 * 4 = 12.\n5 + 12 = 17.\nThe answer is 17.") == (
        ["3 * 4 = 12.", "5 + 12 = 17.", "The answer is 17."], False)
    assert scoring.response_steps("  3 * 4 = 12. \n\n5 + 1") == (["3 * 4 = 12.", "5 + 1"], False)
    assert scoring.response_steps("3 * 4 = 12.\n") == (["3 * 4 = 12."], True)
    assert scoring.response_steps("\n \n") == ([], False)


def test_render_reads_each_step_at_its_last_token(tok):
    prompt = tok.render_prompt([{"role": "user", "content": "What is 5 + 3 * 4?"}])
    steps = ["3 * 4 = 12.", "5 + 12 = 17.", "The answer is 17."]
    end = tok.special(ASSISTANT_END)
    r = scoring.render_steps(tok, prompt, steps, ended=True)
    assert r.ids == prompt + tok.encode("3 * 4 = 12.\n5 + 12 = 17.\nThe answer is 17.") + [end]
    # step k ends with its newline; the final step of an ended response at <|assistant_end|>
    assert tok.decode(r.ids[len(prompt) : r.ends[0] + 1]) == "3 * 4 = 12.\n"
    assert tok.decode(r.ids[r.ends[0] + 1 : r.ends[1] + 1]) == "5 + 12 = 17.\n"
    assert r.ends[2] == len(r.ids) - 1 and r.ids[-1] == end and r.complete == 3
    # a response cut inside its last step: that step is not complete (search does not score it)
    cut = scoring.render_response(tok, prompt, "3 * 4 = 12.\n5 + 1", ended=False)
    assert cut.complete == 1 and len(cut.ends) == 2 and cut.ends[1] == len(cut.ids) - 1
    assert tok.decode(cut.ids[len(prompt):]) == "3 * 4 = 12.\n5 + 1"
    # cut right after a newline: every step is complete, the last one read at its newline
    whole = scoring.render_response(tok, prompt, "3 * 4 = 12.\n", ended=False)
    assert whole.complete == 1 and tok.decode([whole.ids[whole.ends[0]]]).endswith("\n")
    # no step at all: one empty step at the last token
    assert scoring.render_steps(tok, prompt, [], ended=True).ends == [len(prompt)]


def test_checker_labels_first_error_and_lines_with_two_steps():
    task = world.task_from_prompt("What is 5 + 3 * 4 - 2?")
    assert prm.checker_labels(task, ["3 * 4 = 12.", "5 + 12 = 17.", "17 - 2 = 15.", "The answer is 15."]) == [1, 1, 1, 1]
    assert prm.checker_labels(task, ["3 * 4 = 12.", "5 + 12 = 18.", "18 - 2 = 16.", "The answer is 16."]) == [1, 0, 0, 0]
    # an illegal first move (5 + 3 before the product) is wrong though its sum is right
    assert prm.checker_labels(task, ["5 + 3 = 8.", "8 * 4 = 32."]) == [0, 0]
    # one line holding two of the checker's steps: right only if both are
    assert prm.checker_labels(task, ["3 * 4 = 12. 5 + 12 = 17.", "17 - 2 = 15.", "The answer is 15."]) == [1, 1, 1]
    assert prm.checker_labels(task, ["3 * 4 = 12. 5 + 12 = 19.", "19 - 2 = 17."]) == [0, 0]
    # right steps, wrong final answer: only the answer line is wrong
    assert prm.checker_labels(task, ["3 * 4 = 12.", "5 + 12 = 17.", "17 - 2 = 15.", "The answer is 14."]) == [1, 1, 1, 0]


def test_monte_carlo_labels_on_a_hand_made_example(tok):
    """Step j's label is the fraction of rollouts from the prefix ending at step j that reach the
    answer; the last step's label is the response's own correctness."""
    task = world.task_from_prompt("What is 5 + 3 * 4 - 2?")
    prompt = tok.render_prompt([{"role": "user", "content": task.prompt}])
    steps = ["3 * 4 = 12.", "5 + 12 = 18.", "18 - 2 = 16.", "The answer is 16."]
    end = tok.special(ASSISTANT_END)
    # rollouts per prefix: after step 1, 3 of 4 reach 15; after step 2 (already wrong), 0 of 4;
    # after step 3, 1 of 4 (a "recovery" the checker would not credit)
    continuations = {1: ["5 + 12 = 17.\n17 - 2 = 15.\nThe answer is 15."] * 3 + ["The answer is 9."],
                     2: ["18 - 2 = 16.\nThe answer is 16."] * 4,
                     3: ["The answer is 15."] + ["The answer is 16."] * 3}
    seen = []

    def fake_generate(model, prefixes, max_new_tokens, n, temperature, stop_ids, seed, truncate):
        seen.extend(prefixes)
        assert n == 4 and stop_ids == [end]
        return [[Completion(i, tok.encode(text) + [end], [0.0] * (len(tok.encode(text)) + 1), True)
                 for text in continuations[i + 1]] for i in range(len(prefixes))]

    def is_right(text):
        return world.is_correct(task, text)

    # a one-step response beside it needs no rollout: its label is its correctness
    responses = [prm.Response(prompt, steps, False, is_right), prm.Response(prompt, ["The answer is 15."], True, is_right)]
    labels = prm.monte_carlo_labels(None, tok, responses, rollouts=4, max_new_tokens=64, generate_fn=fake_generate)
    assert labels == [[0.75, 0.0, 0.25, 0.0], [1.0]]
    assert seen == [prompt + tok.encode("3 * 4 = 12.\n"), prompt + tok.encode("3 * 4 = 12.\n5 + 12 = 18.\n"),
                    prompt + tok.encode("3 * 4 = 12.\n5 + 12 = 18.\n18 - 2 = 16.\n")]
    assert prm.monte_carlo_labels(None, tok, responses[1:], 4, 64,
                                  generate_fn=lambda *a, **k: pytest.fail("no rollout expected")) == [[1.0]]


def test_monte_carlo_labels_with_the_engine(tok):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=128)).eval()
    prompt = tok.render_prompt([{"role": "user", "content": "What is 2 + 3?"}])
    steps = ["2 + 3 = 5.", "5 + 0 = 5.", "The answer is 5."]
    responses = [prm.Response(prompt, steps, True, lambda text: "5" in text),
                 prm.Response(prompt, ["2 + 3 = 6.", "The answer is 6."], False, lambda text: "9" in text)]
    labels = prm.monte_carlo_labels(model, tok, responses, 3, 8, seed=1)
    assert len(labels[0]) == 3 and labels[0][-1] == 1.0 and len(labels[1]) == 2 and labels[1][-1] == 0.0
    # each rollout keeps the prefix's text, which already holds a "5": every rollout counts as right
    assert labels[0][:2] == [1.0, 1.0]
    assert 0.0 <= labels[1][0] <= 1.0 and labels[1][0] * 3 == round(labels[1][0] * 3)
    assert prm.monte_carlo_labels(model, tok, responses, 3, 8, seed=1) == labels


# --- aggregation, AUROC -----------------------------------------------------------------------------


def test_aggregation_on_fixed_scores():
    assert scoring.aggregate([0.9, 0.5, 0.8], "min") == 0.5
    assert scoring.aggregate([0.9, 0.5, 0.8], "product") == pytest.approx(0.36)
    assert scoring.aggregate([], "min") == 0.0
    # min and product can rank two responses differently: a long sure chain vs a short doubtful one
    long_sure, short = [0.7] * 4, [0.5]
    assert scoring.aggregate(long_sure, "min") > scoring.aggregate(short, "min")
    assert scoring.aggregate(long_sure, "product") < scoring.aggregate(short, "product")
    with pytest.raises(ValueError):
        scoring.aggregate([0.5], "mean")


def test_auroc_known_values():
    assert stats.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert stats.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert stats.auroc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    # by hand: pairs (pos, neg) = (0.4, 0.1) win, (0.4, 0.6) lose, (0.7, 0.1) win, (0.7, 0.6) win -> 3/4
    assert stats.auroc([0.1, 0.4, 0.6, 0.7], [0, 1, 0, 1]) == 0.75
    assert stats.auroc([0.3, 0.3, 0.1], [1, 0, 0]) == 0.75  # the tie counts one half
    assert stats.auroc([0.1, 0.2], [1, 1]) is None
    # within prompts only: prompt "a" ranks its pair right, prompt "b" wrong -> 1/2; the overall AUROC
    # also counts the pairs across prompts (0.9 > 0.6, 0.5 > 0.2) -> 3/4
    scores, labels = [0.9, 0.2, 0.5, 0.6], [1, 0, 1, 0]
    assert stats.within_group_auroc(scores, labels, ["a", "a", "b", "b"]) == 0.5
    assert stats.auroc(scores, labels) == 0.75
    assert stats.within_group_auroc([0.9, 0.8, 0.3], [1, 0, 1], ["a", "a", "b"]) == 1.0
    assert stats.within_group_auroc([0.9, 0.3], [1, 0], ["a", "b"]) is None


# --- TRL stepwise rows ----------------------------------------------------------------------------


def test_stepwise_rows_read_with_optional_extras(tmp_path):
    path = tmp_path / "steps.jsonl"
    rows = [{"prompt": "What is 2 + 3?", "completions": ["2 + 3 = 5.", "The answer is 5."], "labels": [True, True]},
            {"prompt": [{"role": "user", "content": "What is 9 - 4?"}], "completions": ["9 - 4 = 6.", "The answer is 6."],
             "labels": [0.25, 0], "outcome": False, "ended": False}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = read_dataset(path)
    assert ds.kind == "stepwise" and ds.source == "trl"
    assert ds.rows[0] == {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
                          "completions": ["2 + 3 = 5.", "The answer is 5."], "labels": [1.0, 1.0], "outcome": 1.0,
                          "ended": True}
    assert ds.rows[1]["labels"] == [0.25, 0.0] and ds.rows[1]["outcome"] == 0.0 and ds.rows[1]["ended"] is False


def test_stepwise_bad_labels_are_file_line_errors(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    rows = [{"prompt": "What is 2 + 3?", "completions": ["2 + 3 = 5.", "The answer is 5."], "labels": [True, True]},
            {"prompt": "What is 2 + 3?", "completions": ["2 + 3 = 5.", "The answer is 5."], "labels": [True]},
            {"prompt": "What is 2 + 3?", "completions": ["2 + 3 = 5.", "The answer is 5."], "labels": [1, 1.5]},
            {"prompt": "What is 2 + 3?", "completions": ["2 + 3 = 5."], "labels": ["yes"]},
            {"prompt": "What is 2 + 3?", "completions": ["2 + 3 = 5."], "labels": [-0.1]},
            {"prompt": "What is 2 + 3?", "completions": [], "labels": []},
            {"prompt": "What is 2 + 3?", "completions": ["a"], "labels": [1], "outcome": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError) as e:
        read_dataset(path)
    msg = str(e.value)
    assert "bad.jsonl:2: labels: expected 2 labels (one per step of completions), got 1" in msg
    assert "bad.jsonl:3: labels[1]: expected a boolean, 0/1 or a number in [0, 1], got 1.5" in msg
    assert 'bad.jsonl:4: labels[0]: expected a boolean, 0/1 or a number in [0, 1], got "yes"' in msg
    assert "bad.jsonl:5: labels[0]: expected a boolean, 0/1 or a number in [0, 1], got -0.1" in msg
    assert "bad.jsonl:6: completions: expected a non-empty list of step strings" in msg
    assert "bad.jsonl:7: outcome: expected a boolean, 0/1 or a number in [0, 1], got 2" in msg
    # the stage stops on them before any work
    make_sft_run(tmp_path / "run", tok)
    with pytest.raises(UserError, match="bad.jsonl:2: labels"):
        prm.run(build_config("tiny", sets=SMALL_MODEL), tmp_path / "run/sft", tmp_path / "run", data=str(path))
    assert not (tmp_path / "run/prm").exists()


# --- training -------------------------------------------------------------------------------------


def _examples(tok, n=64):
    """Responses whose step k is right unless it says "bad": labels follow the step text."""
    import random

    rng = random.Random(0)
    rows = []
    for i in range(n):
        steps = [rng.choice(["7 + 1 = 8.", "bad 7 + 1 = 9."]) for _ in range(rng.randint(1, 3))]
        labels = []
        for s in steps:
            labels.append(0.0 if (s.startswith("bad") or (labels and labels[-1] == 0.0)) else 1.0)
        rows.append({"prompt": f"What is 7 + {i}?", "completions": steps, "labels": labels, "outcome": labels[-1]})
    return prm.make_examples(tok, rows, block_size=128, eval_fraction=0.0)[0]


def test_batches_label_exactly_the_step_ends(tok):
    examples = _examples(tok)
    x, target, mask = prm.get_batch(examples, outcome=False, batch_size=8, seed=0, step=0)
    for row in range(8):
        ex = next(e for e in examples if torch.equal(x[row, : len(e.ids)], torch.from_numpy(e.ids))
                  and not x[row, len(e.ids):].any())
        assert mask[row].nonzero().squeeze(1).tolist() == ex.ends
        assert target[row, ex.ends].tolist() == ex.labels
    x, target, mask = prm.get_batch(examples, outcome=True, batch_size=8, seed=0, step=0)
    for row in range(8):
        (pos,) = mask[row].nonzero().squeeze(1).tolist()
        assert pos == int((x[row] != 0).nonzero().max())  # the last real token (ids are never 0 here)


def test_prm_learns_step_labels(tok, tmp_path):
    examples = _examples(tok, 96)
    cfg = build_config("tiny", sets=SMALL_MODEL + [f"model.vocab_size={tok.vocab_size}", "prm.max_steps=60",
                                                    "prm.lr=3e-3", "prm.batch_size=16", "prm.warmup_steps=5",
                                                    "prm.log_every=100", "prm.checkpoint_every=0"])
    torch.manual_seed(0)
    model = ScalarModel.from_policy(GPT(cfg.model), kind="prm")
    prm._train(cfg, model, tmp_path / "prm", None, examples, outcome=False, info=DistInfo(), name="prm")
    model.eval()
    probs = scoring.head_logits(model, [e.ids.tolist() for e in examples], [e.ends for e in examples])
    flat = [(torch.sigmoid(torch.tensor(v)).item(), y) for vals, e in zip(probs, examples) for v, y in zip(vals, e.labels)]
    assert stats.auroc([p for p, _ in flat], [y for _, y in flat]) > 0.95
    assert sum((p > 0.5) == (y > 0.5) for p, y in flat) / len(flat) > 0.9


# --- the stage --------------------------------------------------------------------------------


def test_prm_stage_outputs(tmp_path, tok):
    run = tmp_path / "run"
    make_sft_run(run, tok)
    sets = SMALL_MODEL + ["prm.prompts=24", "prm.samples=2", "prm.max_steps=3", "prm.batch_size=4",
                          "prm.max_new_tokens=24", "prm.eval_fraction=0.25", "prm.log_every=1"]
    summary = prm.run(build_config("tiny", sets=sets), run / "sft", run)
    model, _ = load_scalar_model(run / "prm", "prm")
    orm, _ = load_scalar_model(run / "prm/orm", "orm")
    assert model.kind == "prm" and orm.kind == "orm"
    rows = read_dataset(run / "prm/steps.jsonl").rows  # written in TRL's stepwise format, read back
    assert len(rows) == summary["data/responses"] > 0
    for r in rows:
        task = world.task_from_prompt(r["prompt"][-1]["content"])
        assert r["labels"] == [float(v) for v in prm.checker_labels(task, r["completions"])]
        assert r["outcome"] == float(world.is_correct(task, "\n".join(r["completions"])))
    saved = json.loads((run / "prm/summary.json").read_text())
    assert saved["data/labels"] == "checker" and saved["steps"] == 3
    assert (run / "prm/metrics.jsonl").exists() and (run / "prm/orm/metrics.jsonl").exists()
    # same data, same budget: both models took the same number of steps on the same examples
    prm_lines = [json.loads(x) for x in (run / "prm/metrics.jsonl").read_text().splitlines()]
    orm_lines = [json.loads(x) for x in (run / "prm/orm/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in prm_lines if "train/loss" in x] == [x["step"] for x in orm_lines if "train/loss" in x]
    # rerunning a finished stage resumes, reads the step data back and gives the same summary
    again = prm.run(build_config("tiny", sets=sets), run / "sft", run)
    assert {k: v for k, v in again.items() if k != "wall_seconds"} == \
        {k: v for k, v in summary.items() if k != "wall_seconds"}


def test_prm_stage_on_files_mc_labels_and_stepwise(tmp_path, tok):
    """Prompts with answers (GSM8K-style) get Monte-Carlo labels; a stepwise file trains as it is."""
    run = tmp_path / "run"
    make_sft_run(run, tok)
    tasks = world.train_tasks(8, seed=5, families=["arithmetic"])
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"prompt": t.prompt, "answer": t.answer}) + "\n" for t in tasks))
    sets = SMALL_MODEL + ["prm.prompts=8", "prm.samples=2", "prm.max_steps=2", "prm.batch_size=4",
                          "prm.max_new_tokens=16", "prm.mc_rollouts=2", "prm.eval_fraction=0"]
    summary = prm.run(build_config("tiny", sets=sets), run / "sft", run, data=str(answers))
    assert summary["data/labels"] == "mc"
    rows = read_dataset(run / "prm/steps.jsonl").rows
    assert rows and all(0 <= v <= 1 and v * 2 == round(v * 2) for r in rows for v in r["labels"])  # k/2 fractions
    assert all(r["labels"][-1] == r["outcome"] for r in rows)
    with pytest.raises(UserError, match="prm.labels=checker needs the world's step checker"):
        prm.run(build_config("tiny", sets=sets + ["prm.labels=checker"]), run / "sft", tmp_path / "other",
                data=str(answers))
    stepwise = tmp_path / "stepwise.jsonl"
    stepwise.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "completions": [f"{i} + 1 = {i + 1}.",
                                                                                         f"The answer is {i + 1}."],
                                            "labels": [True, i % 2 == 0]}) + "\n" for i in range(12)))
    summary = prm.run(build_config("tiny", sets=sets), run / "sft", tmp_path / "file_run", data=str(stepwise))
    assert summary["data/labels"] == "file" and summary["data/responses"] == 12
    assert not (tmp_path / "file_run/prm/steps.jsonl").exists()  # the file is the step data
