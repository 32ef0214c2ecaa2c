"""The RL sanity check DESIGN.md asks of every RL mode: from a tiny SFT policy that answers in two
styles half the time each, a reward for one style choice must go up within a few updates. PPO's GAE
runs with a cold critic (value head from the policy, starting at 0) and its warm-up, which is what
lets it learn a choice made at the first tokens as RLOO and GRPO do."""
import json
import random

import pytest
import torch

from gptstack import world
from gptstack.config import Config, build_config
from gptstack.model.gpt import GPT, GPTConfig
from gptstack.stages import ppo
from gptstack.tokenizer import Tokenizer
from gptstack.rundir import save_model

FAMILY_CFG = world.WorldConfig(families=["compare"], difficulty_mix=[1, 0, 0, 0])


@pytest.fixture(scope="module")
def two_style_sft(tmp_path_factory):
    """RUN/tokenizer + RUN/sft: a 2-layer GPT fine-tuned on level-1 comparisons answered terse or
    chatty (50/50), so its own sampling chooses the style at the first token."""
    root = tmp_path_factory.mktemp("styles")
    tasks = world.train_tasks(600, seed=1, config=FAMILY_CFG)
    rng = random.Random(0)
    demos = [t.messages(t.styled(rng.choice(["terse", "chatty"]), rng, padding_max=0)) for t in tasks]
    tok = Tokenizer.train(" ".join(m["content"] for d in demos for m in d), 400, progress=False)
    tok.save(root / "tokenizer")
    cfg = Config()
    cfg.model = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=48, block_size=96)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    rows = []
    for d in demos:
        ids, mask = tok.render_conversation(d)
        rows.append((ids[:-1], [t if m else -1 for t, m in zip(ids[1:], mask[1:])]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        batch = [rows[i] for i in torch.randint(len(rows), (32,), generator=g).tolist()]
        width = max(len(x) for x, _ in batch)
        x = torch.tensor([a + [0] * (width - len(a)) for a, _ in batch])
        y = torch.tensor([b + [-1] * (width - len(b)) for _, b in batch])
        loss = model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(root / "sft", model.state_dict(), cfg.to_dict())
    return root


def chatty(prompts, responses):
    return [float(world.style_of(r) == "chatty") for r in responses]


@pytest.mark.parametrize("advantage", ["gae", "rloo", "grpo"])
def test_rl_raises_a_style_choice_within_a_few_updates(two_style_sft, tmp_path, advantage):
    sets = ["ppo.updates=10", "ppo.prompts_per_update=16", "ppo.max_new_tokens=64", "ppo.epochs=2",
            "ppo.minibatches=2", "ppo.lr=5e-4", "ppo.penalize_no_end=false", "ppo.kl_coef=0", "ppo.eval_every=0", "ppo.checkpoint_every=0",
            "ppo.threads=1", f"ppo.advantage={advantage}", "eval.limit=5", "eval.k=1", "eval.max_new_tokens=64",
            "world.families=[\"compare\"]", "world.difficulty_mix=[1, 0, 0, 0]"]
    if advantage == "gae":
        sets += ["ppo.critic_warmup=2", "ppo.vf_coef=1.0"]
    else:
        sets += ["ppo.samples_per_prompt=4", "ppo.prompts_per_update=4"]
    cfg = build_config("tiny", sets=sets)
    ppo.run(cfg, two_style_sft / "sft", tmp_path, reward=chatty)
    rows = [json.loads(line) for line in (tmp_path / "ppo/metrics.jsonl").read_text().splitlines()]
    scores = [r["objective/scores"] for r in rows if "objective/scores" in r]
    assert len(scores) == 10
    assert 0.2 < scores[0] < 0.8, scores          # the SFT policy really chooses between the styles
    assert sum(scores[-3:]) / 3 > scores[0] + 0.2, (advantage, scores)
