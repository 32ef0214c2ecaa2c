"""Response styles (world/styles.py) and the labeler's tastes (world/labeler.py), as documented."""
import math
import random

import pytest

from gptstack import world
from gptstack.world import styles
from gptstack.world.labeler import Labeler, sigmoid


@pytest.fixture(scope="module")
def tasks():
    return world.train_tasks(300, seed=5)


@pytest.mark.parametrize("style", world.STYLES)
def test_every_style_renders_parses_and_scores_as_documented(tasks, style):
    rng = random.Random(0)
    for task in tasks:
        text = task.styled(style, rng)
        assert world.style_of(text) == style, text
        s = world.score(task, text)
        assert s.correct and s.format_ok, text
        assert s.repetition == 0 and s.gibberish == 0, text
        assert world.check_steps(task, text).all_correct, text
        if style in ("terse", "standard"):
            assert s.score == 1.0       # the concise styles are gold's best
        else:
            assert 0.9 <= s.score <= 1.0   # only brevity separates them from it
        if style == "terse":
            assert text == task.steps[-1]
        if style == "standard":
            assert text == task.reference


def test_a_wrong_step_in_a_long_style_is_found_where_it_is():
    task = world.task_from_prompt("What is 17 + 25 - 8?")
    text = task.styled("explained", random.Random(1), padding_max=0)
    assert text.splitlines()[1] == "First, 17 + 25 = 42."
    bad = text.replace("17 + 25 = 42.", "17 + 25 = 43.").replace("42 - 8 = 34.", "43 - 8 = 35.").replace("is 34", "is 35")
    check = world.check_steps(task, bad)
    assert check.first_error == 1 and not world.is_correct(task, bad)
    chatty = task.styled("chatty", random.Random(2)).replace("42 - 8 = 34.", "42 - 8 = 33.")
    assert world.check_steps(task, chatty).first_error == chatty.splitlines().index("42 - 8 = 33.")


def test_style_of_edge_cases():
    assert world.style_of("") == "other"
    assert world.style_of("17 + 25 = 42.") == "other"            # no answer line
    assert world.style_of("The answer is 3.") == "terse"
    assert world.style_of("Great question!\nThe answer is 3.") == "chatty"
    assert world.style_of("We are asked: What is 1 + 2?\nFirst, 1 + 2 = 3.\nThe answer is 3.") == "explained"
    assert world.style_of("1 + 2 = 3.\nCheck: 3 - 2 = 1.\nThe answer is 3.") == "checked"


def test_padding_has_a_thin_tail_and_repeated_padding_costs_gold():
    rng = random.Random(0)
    task = world.task_from_prompt("What is 3 + 4?")
    counts = [sum(line in styles.PADDING for line in task.styled("chatty", rng, padding_max=3).splitlines())
              for _ in range(4000)]
    shares = [counts.count(k) / len(counts) for k in range(4)]
    # P(k) halves with each extra sentence: 1/2, 1/4, 1/8, 1/8 (the cap takes the rest)
    for got, want in zip(shares, [0.5, 0.25, 0.125, 0.125]):
        assert abs(got - want) < 0.03
    assert all(line not in styles.PADDING for line in task.styled("chatty", rng, padding_max=0).splitlines())
    # RL that pads past the demonstrations repeats the small pool: gold prices it
    padded = "Great question!\n" + "\n".join(styles.PADDING[:3] * 3) + "\n3 + 4 = 7.\nThe answer is 7."
    assert world.score(task, padded).repetition > 0.5 and world.gold(task, padded) < 0.5


def test_demonstrations_follow_the_style_mix():
    cfg = world.WorldConfig(style_mix=[0.5, 0.0, 0.0, 0.25, 0.25])
    demos = world.demonstrations(2000, seed=3, config=cfg)
    share = {s: sum(d[1] == s for d in demos) / len(demos) for s in world.STYLES}
    assert share["standard"] == share["explained"] == 0
    assert abs(share["terse"] - 0.5) < 0.04 and abs(share["checked"] - 0.25) < 0.04
    assert [t.prompt for t, _, _ in demos] == [t.prompt for t in world.train_tasks(2000, seed=3, config=cfg)]
    assert all(world.style_of(text) == s for _, s, text in demos)


def test_world_config_rejects_bad_style_settings():
    with pytest.raises(world.tasks.UserError, match="style_mix"):
        world.WorldConfig(style_mix=[1, 0]).validate()
    with pytest.raises(world.tasks.UserError, match="labeler_style_bias"):
        world.WorldConfig(labeler_style_bias=[0.1]).validate()


def _preference_rate(labeler: Labeler, task, a: str, b: str, n: int = 6000) -> float:
    rng = random.Random(7)
    return sum(labeler.rank(task, [a, b], rng)[0] == 0 for _ in range(n)) / n


def test_length_bias_measured_on_synthetic_pairs_matches_its_setting():
    task = world.task_from_prompt("What is 3 + 4?")
    short = "3 + 4 = 7.\nThe answer is 7."
    long = "Let me think.\nLet me see.\nOne step at a time.\n3 + 4 = 7.\nThe answer is 7."   # same style, 3x words
    for bias in (0.0, 0.3, 0.5):
        lab = Labeler(tau=0.35, length_bias=bias)
        du = world.gold(task, long) - world.gold(task, short) + bias * math.log2(len(long.split()) / len(short.split()))
        want = sigmoid(du / 0.35)
        got = _preference_rate(lab, task, long, short)
        assert abs(got - want) < 3 * math.sqrt(want * (1 - want) / 6000) + 0.005, (bias, got, want)
    # at the recipe's strength the taste outweighs gold's own preference for the concise answer
    assert _preference_rate(Labeler(tau=0.35, length_bias=0.3), task, long, short) > 0.6


def test_style_taste_measured_on_synthetic_pairs_matches_its_setting():
    task = world.task_from_prompt("What is 3 + 4?")
    checked, standard = "3 + 4 = 7.\nCheck: 7 - 4 = 3.\nThe answer is 7.", "3 + 4 = 7.\nThe answer is 7."
    lab = Labeler(tau=0.35, length_bias=0.0, style_bias={"checked": 0.2})
    want = sigmoid((world.gold(task, checked) - world.gold(task, standard) + 0.2) / 0.35)
    got = _preference_rate(lab, task, checked, standard)
    assert abs(got - want) < 0.03
    assert Labeler.from_config(world.WorldConfig()).style_bias == dict(zip(world.STYLES, [0.0, 0.0, 0.0, 0.1, 0.1]))
