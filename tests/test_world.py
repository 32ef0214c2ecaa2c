"""The task world: generators, gold reward, step checker, labeler, documents, decontamination."""
import collections
import dataclasses
import hashlib
import math
import os
import random
import re
import subprocess
import sys

import pytest

from gptstack import world
from gptstack.common import UserError
from gptstack.world import FAMILIES, Labeler, WorldConfig, check_steps, gold, score, task_from_prompt
from gptstack.world.tasks import generate


@pytest.fixture(scope="module")
def train_sample():
    return world.train_tasks(3000, seed=7)


# --- tasks ------------------------------------------------------------------------------------


def test_eval_set_is_fixed_large_enough_and_uniform_over_levels():
    ev = world.eval_set()
    by_family = collections.Counter(t.family for t in ev)
    assert set(by_family) == set(FAMILIES) and min(by_family.values()) >= 100 and len(ev) >= 500
    assert len({t.prompt for t in ev}) == len(ev)
    levels = collections.Counter((t.family, t.difficulty) for t in ev)
    assert set(levels.values()) == {25}
    assert [t.prompt for t in world.eval_set(WorldConfig())] == [t.prompt for t in ev]
    # changing the training mix or labeler never moves the eval set
    other = WorldConfig(difficulty_mix=[1, 0, 0, 0], labeler_tau=1.0)
    assert [t.prompt for t in world.eval_set(other)] == [t.prompt for t in ev]
    assert [t.prompt for t in world.eval_set(WorldConfig(eval_seed=99))] != [t.prompt for t in ev]


def _digest(tasks) -> str:
    return hashlib.sha256("\n".join(t.prompt + "|" + t.reference for t in tasks).encode()).hexdigest()


def test_seeded_generation_is_deterministic_across_processes():
    here = _digest(world.eval_set()) + _digest(world.train_tasks(500, seed=3))
    code = ("import hashlib; from gptstack import world\n"
            "d = lambda ts: hashlib.sha256('\\n'.join(t.prompt + '|' + t.reference for t in ts).encode()).hexdigest()\n"
            "print(d(world.eval_set()) + d(world.train_tasks(500, seed=3)))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert here == there
    assert _digest(world.train_tasks(500, seed=3)) != _digest(world.train_tasks(500, seed=4))


def test_difficulty_mix_and_families_are_respected():
    cfg = WorldConfig(difficulty_mix=[0, 0, 0, 1])
    tasks = world.train_tasks(400, seed=0, config=cfg, families=["arithmetic", "lists"])
    assert {t.difficulty for t in tasks} == {4} and {t.family for t in tasks} == {"arithmetic", "lists"}
    # arithmetic difficulty d means d operations
    assert all(len(t.spec) == 2 * 4 + 1 for t in tasks if t.family == "arithmetic")
    mix = collections.Counter(t.difficulty for t in world.train_tasks(4000, seed=1))
    for level, weight in zip(world.LEVELS, WorldConfig().difficulty_mix):
        assert abs(mix[level] / 4000 - weight) < 0.03


def test_prompts_parse_back_to_the_same_task(train_sample):
    for t in train_sample + world.eval_set():
        u = task_from_prompt(t.prompt)
        assert (u.family, u.prompt, u.answer, u.steps, u.spec) == (t.family, t.prompt, t.answer, t.steps, t.spec)
    for text in ("What is love?", "Tell me a joke.", "Which is larger, 5 or 5?", "Reverse the list: 3, 3."):
        with pytest.raises(UserError, match="expected a task-world prompt"):
            task_from_prompt(text)


def test_references_are_short_steps_ending_in_the_answer_line(train_sample):
    for t in train_sample + world.train_tasks(20_000, seed=8):
        assert gold(t, t.reference) == 1.0, t.reference  # exactly: no repeated step, no unknown word
    for t in train_sample:
        assert t.steps[-1] == f"The answer is {t.answer}."
        assert t.reference == "\n".join(t.steps)
        assert len(t.prompt) < 200 and len(t.reference) < 200
        assert t.messages()[1] == {"role": "assistant", "content": t.reference}
    # reference numbers stay small: nothing above four digits
    assert max(int(x) for t in train_sample for x in re.findall(r"\d+", t.reference)) < 10_000


def test_world_text_tokenizes_compactly_with_digit_splitting():
    from gptstack.tokenizer import Tokenizer

    tok = Tokenizer.train(world.world_documents(300_000, seed=0), vocab_size=1024, pattern="digits", num_workers=1)
    ev = world.eval_set()
    lengths = [len(tok.encode(t.reference)) for t in ev]
    assert sum(lengths) / len(lengths) < 40 and max(lengths) <= 64
    assert max(len(tok.encode(t.prompt)) for t in ev) <= 48
    assert tok.encode("1234") == [tok.encode(d)[0] for d in "1234"]  # one token per digit


def test_config_validation_and_help():
    for f in dataclasses.fields(WorldConfig):
        assert f.metadata.get("help"), f.name
    with pytest.raises(UserError, match="world.families"):
        WorldConfig(families=["algebra"]).validate()
    with pytest.raises(UserError, match="world.difficulty_mix"):
        WorldConfig(difficulty_mix=[1, 1]).validate()
    with pytest.raises(UserError, match="world.labeler_tau"):
        WorldConfig(labeler_tau=-1).validate()


# --- gold reward --------------------------------------------------------------------------------


def _wrong(t) -> str:
    """The reference with its final answer replaced by a wrong one (steps left as they were)."""
    if t.answer_kind == "int":
        bad = str(int(t.answer) + random.Random(t.prompt).choice([-2, -1, 1, 2, 10]))
        bad = bad if bad != t.answer else str(int(t.answer) + 1)
    else:
        items = t.answer.split(", ")
        bad = ", ".join(items[1:] + items[:1])
    return "\n".join(t.steps[:-1] + (f"The answer is {bad}.",))


def _gibberish(t) -> str:
    rng = random.Random(t.prompt)
    return " ".join("".join(rng.choice("qxzjkvwy") for _ in range(rng.randint(2, 7))) for _ in range(12))


@pytest.mark.parametrize("family", FAMILIES)
def test_gold_ranks_reference_over_wrong_answer_over_gibberish(family):
    tasks = [t for t in world.eval_set() if t.family == family]
    for t in tasks:
        ref, wrong, gib = gold(t, t.reference), gold(t, _wrong(t)), gold(t, _gibberish(t))
        assert ref == 1.0 and ref > wrong > gib, (t.prompt, ref, wrong, gib)
        # degenerate forms of the right answer: repetition, no end, run-on after the answer
        looped = "\n".join(t.steps[:-1] * 6 + (t.steps[-1],))
        assert gold(t, looped) < wrong or len(t.steps) == 1
        assert gold(t, t.reference, ended=False) <= 0.2
        if t.answer != "3":  # hedging with a second, wrong answer line: the last one counts, format is lost
            assert gold(t, t.reference + "\nThe answer is 3 or 4 or 5.") <= 0.1


def test_gold_formula_on_hand_written_cases():
    t = task_from_prompt("What is 17 + 25 - 8?")
    assert t.reference == "17 + 25 = 42.\n42 - 8 = 34.\nThe answer is 34."
    assert gold(t, t.reference) == 1.0
    assert gold("What is 17 + 25 - 8?", t.reference) == 1.0 == gold({"prompt": t.prompt}, t.reference)
    assert gold(t, "The answer is 34.") == 1.0                     # steps are optional
    assert gold(t, "The answer is 35.") == pytest.approx(0.2)      # well-formed but wrong: format + brevity
    assert gold(t, "the answer is 34") == pytest.approx(0.9)       # right, not the fixed answer line
    assert gold(t, "34") == 0.0                                   # no answer line, no answer
    assert gold(t, "") == 0.0
    s = score(t, t.reference, ended=False)
    assert s.correct and not s.format_ok and s.unfinished == 0.8 and s.score == pytest.approx((0.8 + 0.1) * 0.2)
    # brevity: up to 1.5x the reference's length is free, then it decays as 1.5 L_ref / L
    padded = "17 + 25 = 42. I compute the sums carefully and precisely right now.\n42 - 8 = 34.\nThe answer is 34."
    s = score(t, padded)
    assert s.correct and s.format_ok and 0.5 < s.brevity < 1 and s.gibberish > 0
    # a list answer: items must match in order; spacing is forgiven by correctness, not by format
    lt = task_from_prompt("Sort from smallest to largest: 3, 8, 1.")
    assert gold(lt, "The answer is 1, 3, 8.") == 1.0
    assert gold(lt, "The answer is 1,3,8.") == pytest.approx(0.9)
    assert gold(lt, "The answer is 8, 3, 1.") == pytest.approx(0.2)
    assert world.is_correct(lt, "so... The answer is 1, 3, 8") and not world.is_correct(lt, "The answer is 1, 3.")
    # gibberish is judged against the world's words and the prompt's own words
    ct = task_from_prompt("How many times does the letter q appear in qzqkqz?")
    assert score(ct, ct.reference).gibberish == 0 and ct.answer == "3"


def test_gold_is_deterministic_and_bounded(train_sample):
    rng = random.Random(0)
    for t in train_sample[:300]:
        r = rng.choice([t.reference, _wrong(t), _gibberish(t), t.reference[: rng.randint(0, len(t.reference))]])
        g = gold(t, r)
        assert 0.0 <= g <= 1.0 and g == gold(t, r)


# --- step checker ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, steps, first_error", [
    ("What is 17 + 25 - 8?", ["17 + 25 = 42.", "42 - 8 = 34.", "The answer is 34."], None),
    ("What is 17 + 25 - 8?", ["17 + 25 = 42.", "42 - 8 = 35.", "The answer is 35."], 1),
    ("What is 17 + 25 - 8?", ["25 - 8 = 17.", "17 + 17 = 34.", "The answer is 34."], None),   # another valid order
    ("What is 20 - 5 + 3?", ["5 + 3 = 8.", "20 - 8 = 12.", "The answer is 12."], 0),          # illegal regrouping
    ("What is 5 + 3 * 4?", ["5 + 3 = 8.", "8 * 4 = 32.", "The answer is 32."], 0),            # precedence ignored
    ("What is 5 + 3 * 4?", ["4 * 3 = 12.", "5 + 12 = 17.", "The answer is 17."], None),       # commuted product
    ("What is 5 + 3 * 4?", ["3 * 4 = 12.", "5 + 12 = 17.", "The answer is 18."], 2),          # only the answer wrong
    ("What is 9 - 4?", ["9 - 4 = 5.", "The answer is 5.", "I am sure."], 2),
    ("Tom has a rope that is 3 meters long. How many centimeters long is the rope?",
     ["3 * 10 = 30.", "The answer is 30."], 0),                                               # wrong unit constant
    ("Tom has 5 apples. He gets 4 more. How many apples does Tom have now?", ["Tom is happy.", "The answer is 9."], 0),
    ("Which is the largest of 47, 74 and 39?", ["47 < 74.", "74 > 39.", "The answer is 74."], None),
    ("Which is the largest of 47, 74 and 39?", ["47 > 74.", "47 > 39.", "The answer is 47."], 0),  # false relation
    ("Which is the largest of 47, 74 and 39?", ["47 < 74.", "47 > 39.", "The answer is 74."], 1),  # 47 already out
    ("How many times does the letter a appear in banana?",
     ["Spelled out: b, a, n, a, n, a.", "Counting a: 1, 2, 3.", "The answer is 3."], None),
    ("How many times does the letter a appear in banana?",
     ["Spelled out: b, a, n, n, a.", "Counting a: 1, 2.", "The answer is 2."], 0),            # misspelled
    ("How many times does the letter a appear in banana?",
     ["Spelled out: b, a, n, a, n, a.", "Counting a: 1, 2.", "The answer is 2."], 1),         # miscounted
    ("How many times does the letter z appear in banana?",
     ["Spelled out: b, a, n, a, n, a.", "Counting z: none.", "The answer is 0."], None),
    ("Sort from smallest to largest: 3, 8, 1.", ["The smallest is 1.", "Next is 8.", "Next is 3.", "The answer is 1, 8, 3."], 1),
    ("Reverse the list: 3, 8, 1.", ["The last is 1.", "Next is 8.", "Next is 3.", "The answer is 1, 8, 3."], None),
    ("Sort in alphabetical order: cat, apple, dog.",
     ["The first is apple.", "Next is cat.", "Next is dog.", "The answer is apple, cat, dog."], None),
])
def test_step_checker_finds_the_first_wrong_step(prompt, steps, first_error):
    for sep in ("\n", "<|step|>", " "):
        check = check_steps(prompt, sep.join(steps))
        assert check.steps == steps
        assert check.first_error == first_error, (sep, check)
        expected = [True] * len(steps) if first_error is None else [True] * first_error + [False] * (len(steps) - first_error)
        assert check.correct == expected
        assert world.step_labels(prompt, sep.join(steps)) == [int(x) for x in expected]


def test_step_checker_accepts_every_reference_and_rejects_corrupted_steps(train_sample):
    rng = random.Random(0)
    for t in train_sample + world.eval_set():
        assert check_steps(t, t.reference).all_correct, t.prompt
        if len(t.steps) < 2:
            continue
        # corrupt one step's last number: the checker must point exactly there
        k = rng.randrange(len(t.steps) - 1)
        step = t.steps[k]
        nums = list(re.finditer(r"\d+", step))
        if not nums:
            continue
        m = nums[-1]
        bad = step[: m.start()] + str(int(m.group()) + 1000) + step[m.end():]  # never a valid move
        steps = list(t.steps)
        steps[k] = bad
        assert check_steps(t, "\n".join(steps)).first_error == k, (t.prompt, steps)


# --- labeler --------------------------------------------------------------------------------------


def _candidates(t, rng):
    """Four responses of varied quality: reference, wrong answer, bare answer, degenerate."""
    return [t.reference, _wrong(t), f"The answer is {t.answer}." if rng.random() < 0.5 else t.reference[:-1],
            _gibberish(t) if rng.random() < 0.5 else t.steps[0]]


def _pair_stats(labeler, tau, tasks, repeats=4, seed=0):
    """Observed count of gold-better-ranked-higher over all pairs, and its BT expectation/variance."""
    rng = random.Random(seed)
    obs = exp = var = 0.0
    by_bin = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for t in tasks:
        responses = _candidates(t, rng)
        golds = [gold(t, r) for r in responses]
        for _ in range(repeats):
            ranking = labeler.rank(t, responses, rng)
            pos = {i: p for p, i in enumerate(ranking)}
            for i in range(4):
                for j in range(i + 1, 4):
                    d = golds[i] - golds[j]
                    if abs(d) < 1e-9:
                        continue
                    hi, lo = (i, j) if d > 0 else (j, i)
                    p = 1 / (1 + math.exp(-abs(d) / tau))
                    agree = pos[hi] < pos[lo]
                    obs += agree; exp += p; var += p * (1 - p)
                    b = by_bin[min(int(abs(d) / 0.25), 3)]
                    b[0] += agree; b[1] += p; b[2] += p * (1 - p)
    return obs, exp, var, by_bin


def test_labeler_agreement_with_gold_matches_bradley_terry():
    tasks = world.train_tasks(400, seed=11)
    tau = 0.35
    obs, exp, var, by_bin = _pair_stats(Labeler(tau=tau, length_bias=0, position_bias=0), tau, tasks)
    assert var > 300  # thousands of pairs
    assert abs(obs - exp) / math.sqrt(var) < 3.5, (obs, exp, var)
    for lo_edge, (o, e, v) in by_bin.items():  # also per |Δgold| bin
        assert v > 0 and abs(o - e) / math.sqrt(v) < 3.5, (lo_edge, o, e, v)
    # the test has power: the same rankings are far from what a different tau predicts
    _, exp_wrong, var_wrong, _ = _pair_stats(Labeler(tau=tau, length_bias=0), 0.2, tasks)
    assert abs(obs - exp_wrong) / math.sqrt(var_wrong) > 5


def test_labeler_length_bias_prefers_longer_among_equal_gold():
    tasks = [t for t in world.train_tasks(600, seed=5) if len(t.reference.split()) >= 8]
    tau, beta = 0.35, 0.1
    rng = random.Random(1)
    for bias, check_pref in ((beta, True), (0.0, False)):
        lab = Labeler(tau=tau, length_bias=bias)
        obs = exp = var = 0.0
        for t in tasks:
            short, long = f"The answer is {t.answer}.", t.reference
            assert gold(t, short) == gold(t, long) == 1.0
            for order in ((short, long), (long, short)):
                ranking = lab.rank(t, list(order), rng)
                long_first = order[ranking[0]] is long
                p = 1 / (1 + math.exp(-bias * math.log2(len(long.split()) / len(short.split())) / tau))
                obs += long_first; exp += p; var += p * (1 - p)
        assert abs(obs - exp) / math.sqrt(var) < 3.5
        n = 2 * len(tasks)
        if check_pref:
            assert obs / n > 0.55
        else:
            assert abs(obs / n - 0.5) < 0.05


def test_labeler_is_seeded_and_noiseless_at_tau_zero():
    t = world.eval_set()[0]
    responses = _candidates(t, random.Random(0))
    lab = Labeler.from_config(WorldConfig())
    assert lab.tau == WorldConfig().labeler_tau and lab.length_bias > 0  # the defaults are noisy and biased
    assert [lab.rank(t, responses, random.Random(3)) for _ in range(3)] == [lab.rank(t, responses, 3)] * 3
    exact = Labeler(tau=0, length_bias=0).judge(t, responses, 0)
    assert [exact.gold[i] for i in exact.ranking] == sorted(exact.gold, reverse=True)
    assert world.ranking_to_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    assert Labeler(tau=0.35, length_bias=0).prob_prefers(t, t.reference, _wrong(t)) == pytest.approx(
        1 / (1 + math.exp(-0.8 / 0.35)))


# --- documents and decontamination ----------------------------------------------------------------


def test_documents_mix_world_text_with_english():
    docs = world.documents(400_000, seed=0)
    total = sum(map(len, docs))
    assert 400_000 <= total < 410_000
    english = world.english_documents(5000, 0)  # passages are verbatim from the shipped text
    from gptstack.world.documents import english_text
    text = english_text()
    n_english = sum(len(d) for d in docs if d in text)
    assert abs(n_english / total - WorldConfig().doc_english_fraction) < 0.02
    assert english and english[0] in text
    world_text = "\n".join(d for d in docs if d not in text)
    for marker in ("The answer is", "Times table of", "Spelled out:", "Next is", "Question:"):
        assert marker in world_text
    assert world.documents(50_000, seed=0) == world.documents(50_000, seed=0)
    assert world.documents(50_000, seed=0) != world.documents(50_000, seed=1)
    val = "\n".join(world.documents(50_000, seed=0, split="val"))
    assert val != "\n".join(world.documents(50_000, seed=0))


def test_eval_items_never_occur_in_training_data_or_documents():
    config = WorldConfig()
    eval_prompts = [t.prompt for t in world.eval_set(config)]
    # The filter has something to do: unfiltered generation does produce eval prompts.
    rng = random.Random(0)
    unfiltered = {generate(rng.choice(FAMILIES), rng, rng.choice(world.LEVELS)).prompt for _ in range(30_000)}
    assert len(set(eval_prompts) & unfiltered) > 20
    tasks = world.train_tasks(30_000, seed=0, config=config)
    demos = "\n".join(m["content"] for t in tasks for m in t.messages())   # SFT demonstrations
    prompts = "\n".join(t.prompt for t in world.train_tasks(10_000, seed=1, config=config))  # preference / RL
    docs = "\n".join(world.documents(2_000_000, seed=0, config=config) + world.documents(200_000, seed=0, split="val"))
    for p in eval_prompts:
        assert p not in demos and p not in prompts and p not in docs, p


def test_eval_index_finds_prompts_inside_text():
    idx = world.eval_index()
    p = world.eval_set()[123].prompt
    assert idx.contains(p) and idx.contains(f"Problem 3. {p}\nSolution.") and p in idx
    assert not idx.contains(p[:-1]) and not idx.contains("Tell me a story.") and not idx.contains("")
