"""Scalar heads: the score is read at the last real token whatever the padding; save/load keeps
the kind and refuses the wrong kind; normalisation folds into the head exactly."""
import pytest
import torch

from gptstack.common import UserError
from gptstack.config import Config
from gptstack.model.gpt import GPT, GPTConfig
from gptstack.model.heads import ScalarModel, last_real_index
from gptstack.rundir import load_model, load_scalar_model, save_model, save_scalar_model


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=32, **kw)
    rm = ScalarModel.from_policy(GPT(cfg))
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    torch.nn.init.normal_(rm.head.bias, std=0.5)
    return rm


def test_last_real_index_any_padding_side():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]])
    assert last_real_index(mask).tolist() == [2, 4, 4, 3]
    with pytest.raises(ValueError):
        last_real_index(torch.tensor([[0, 0]]))


@pytest.mark.parametrize("tied", [False, True])
def test_score_at_last_real_token_whatever_the_padding(tied):
    rm = _model(tie_embeddings=tied).eval()
    seqs = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    alone = torch.stack([rm.score(torch.tensor([s]))[0] for s in seqs])
    # the score is the head at the last token of the sequence alone
    manual = torch.stack([rm(torch.tensor([s]))[0, -1] for s in seqs])
    torch.testing.assert_close(alone, manual)
    T = 7
    for side in ("left", "right"):
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.bool)
        for i, s in enumerate(seqs):
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            ids[i, sl] = torch.tensor(s)
            mask[i, sl] = True
        ids[~mask] = 1  # pad id that would change the score if it were read
        torch.testing.assert_close(rm.score(ids, pad_mask=mask), alone, atol=1e-5, rtol=1e-5)


def test_from_policy_copies_the_trunk_and_starts_at_zero():
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=32))
    rm = ScalarModel.from_policy(policy)
    x = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(rm.trunk.hidden_states(x), policy.hidden_states(x))
    assert torch.equal(rm.score(x), torch.zeros(2))
    assert not any(n.startswith("trunk.lm_head") for n, _ in rm.named_parameters())


def test_normalize_folds_mean_and_std_into_the_head():
    rm = _model().eval()
    x = torch.randint(0, 50, (8, 6))
    raw = rm.score(x)
    mean, std = raw.mean().item(), raw.std().item()
    rm.normalize(mean, std)
    torch.testing.assert_close(rm.score(x), (raw - mean) / std, atol=1e-5, rtol=1e-5)


def test_save_load_keeps_kind_and_refuses_the_wrong_model(tmp_path):
    rm = _model()
    cfg = Config()
    cfg.model = rm.config
    save_scalar_model(tmp_path / "rm", rm, cfg.to_dict())
    loaded, _ = load_scalar_model(tmp_path / "rm", "reward")
    x = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(loaded.score(x), rm.score(x))
    with pytest.raises(UserError, match="expected a prm model, found a reward model"):
        load_scalar_model(tmp_path / "rm", "prm")
    with pytest.raises(UserError, match="reward model .* not a language model"):
        load_model(tmp_path / "rm")
    policy = GPT(rm.config)
    save_model(tmp_path / "sft", policy.state_dict(), cfg.to_dict())
    with pytest.raises(UserError, match="found a language model"):
        load_scalar_model(tmp_path / "sft", "reward")
