"""Recipes, flags and --set: typed, layered, and every unknown key named with close matches."""
import pytest

from gptstack.common import UserError
from gptstack.config import build_config, config_from_dict, recipe_names


def test_builtin_recipes_load():
    assert {"tiny", "shakespeare-char", "gpt2-124m"} <= set(recipe_names())
    for name in recipe_names():
        cfg = build_config(name)
        assert cfg.name == name


def test_layers_override_in_order(tmp_path):
    cfg = build_config("shakespeare-char", {"data": {"paths": ["a.txt"]}},
                       ["pretrain.lr=3e-3", "model.n_layer=6", "pretrain.compile=true", "data.paths=x.txt,y.txt"])
    assert cfg.pretrain.lr == 3e-3 and cfg.model.n_layer == 6 and cfg.pretrain.compile is True
    assert cfg.data.paths == ["x.txt", "y.txt"]
    assert cfg.model.block_size == 64  # from the recipe
    assert config_from_dict(cfg.to_dict()) == cfg


def test_derived_sizes_follow_width():
    cfg = build_config("tiny", sets=["model.n_embd=384", "model.n_head=6"])
    assert cfg.model.ffn_dim == 1024 and cfg.model.kv_heads == 6


@pytest.mark.parametrize(
    "sets, message",
    [
        (["pretrain.lrr=1"], r"--set pretrain.lrr=1: pretrain.lrr: no such key; did you mean pretrain.lr\?"),
        (["modle.n_layer=2"], r"modle: no such key; did you mean model\?"),
        (["pretrain.max_steps=ten"], r"pretrain.max_steps: expected int, got 'ten'"),
        (["pretrain.compile=maybe"], "expected true or false"),
        (["model=3"], r"model: expected a \[model\] section"),
        (["model.n_embd=100", "model.n_head=3"], "must be divisible"),
        (["lr"], "expected key=value"),
    ],
)
def test_bad_keys_and_values(sets, message):
    with pytest.raises(UserError, match=message):
        build_config("tiny", sets=sets)


def test_bad_recipe_file(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text("[pretrain]\nlearning_rate = 1\n")
    with pytest.raises(UserError, match=r"r.toml: pretrain.learning_rate: no such key"):
        build_config(str(bad))
    bad.write_text("[pretrain\n")
    with pytest.raises(UserError, match="invalid TOML"):
        build_config(str(bad))
    with pytest.raises(UserError, match="no such recipe.*did you mean tiny"):
        build_config("tiyn")


def test_model_presets():
    cfg = build_config("tiny", sets=["model.preset=mini", "model.n_layer=3"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (3, 6, 384)
    with pytest.raises(UserError, match="model.preset: expected one of"):
        build_config("tiny", sets=["model.preset=huge"])


def test_run_seed_moves_every_training_seed_and_keeps_the_eval_set():
    from gptstack.config import apply_run_seed

    base = build_config("tiny")
    assert apply_run_seed(build_config("tiny"), 0).to_dict() == base.to_dict()   # seed 0: the recipe as written
    one, two = apply_run_seed(build_config("tiny"), 1), apply_run_seed(build_config("tiny"), 2)
    seeds = lambda c: {(s, k): v for s, sec in c.to_dict().items() if isinstance(sec, dict)  # noqa: E731
                       for k, v in sec.items() if k in ("seed", "prompt_seed")}
    moved = {key for key in seeds(base) if key[0] not in ("eval", "world", "serve", "sampling", "report")}
    assert {("pretrain", "seed"), ("sft", "seed"), ("prefs", "seed"), ("rm", "seed"), ("ppo", "prompt_seed"),
            ("overopt", "seed"), ("grpo", "prompt_seed"), ("dpo", "seed"), ("prm", "seed")} <= moved
    for key in moved:
        assert len({seeds(base)[key], seeds(one)[key], seeds(two)[key]}) == 3, key
    for c in (one, two):   # the measurement stays fixed
        assert c.eval.seed == base.eval.seed and c.world.eval_seed == base.world.eval_seed
        assert c.to_dict()["world"] == base.to_dict()["world"]
        assert c.sampling == base.sampling   # chat/sample/serve defaults are not a run's randomness


def test_run_eta_is_a_table_of_stages_from_the_recipe(tmp_path):
    assert build_config("tiny").run.eta["sft"] == 490 and build_config("gpt2-124m").run.eta == {}
    cfg = build_config("micro", sets=["run.eta.sft=9"])   # one key changed, the recipe's others kept
    assert cfg.run.eta["sft"] == 9 and cfg.run.eta["pretrain"] == 5
    assert config_from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    old["run"] = {"pretrain": 220, "sft": 420}   # a config.json written when the ETAs were fields
    assert config_from_dict(old).run.eta == {"pretrain": 220, "sft": 420}
    for sets, message in [(["run.eta.sfft=3"], r"run.eta.sfft: no such key; did you mean run.eta.sft\?"),
                          (["run.sft=3"], r"run.sft: no such key; did you mean run.eta.sft\?"),
                          (["run.eta.sft=-1"], r"run.eta.sft: expected a value in \[0, inf\)"),
                          (["run.eta=3"], "run.eta: expected a table")]:
        with pytest.raises(UserError, match=message):
            build_config("tiny", sets=sets)
    bad = tmp_path / "r.toml"
    bad.write_text("[run.eta]\npretrain = 1\nrlhf = 2\n")
    with pytest.raises(UserError, match=r"r.toml: run.eta.rlhf: no such key; valid keys: run.eta.pretrain"):
        build_config(str(bad))


def test_fsdp_is_refused_for_post_training_stages():
    from gptstack.common import UserError
    from gptstack.config import build_config

    assert build_config("micro", sets=["pretrain.fsdp=true"]).pretrain.fsdp
    for stage in ("sft", "rm", "dpo", "ppo", "grpo", "prm"):
        with pytest.raises(UserError, match=rf"^{stage}\.fsdp: only pretraining shards with FSDP"):
            build_config("micro", sets=[f"{stage}.fsdp=true"])
