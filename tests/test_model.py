"""The model: KV-cache generation == recomputation, causality, accounting, HF exactness."""
import pytest
import torch

from gptstack.model import GPT, GPTConfig, KVCache


def make(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, n_layer=2, n_head=4, n_embd=64, block_size=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}, {"n_kv_head": 1, "tie_embeddings": True}])
def test_kv_cache_generation_equals_recomputation(kw):
    model = make(**kw)
    prompt = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(1))
    # greedy: identical tokens
    a = model.generate(prompt, 40, temperature=0, use_cache=True)
    b = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    # sampling with the same generator state: identical tokens too (same logits -> same draws)
    a = model.generate(prompt, 40, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = model.generate(prompt, 40, temperature=1.0, generator=torch.Generator().manual_seed(5), use_cache=False)
    assert torch.equal(a, b)
    # and the cached logits match the full forward's at every position
    full = model(a)
    cache = KVCache(model.config, 3, a.size(1))
    step_logits = [model(a[:, :7], cache=cache)]
    for t in range(7, a.size(1)):
        step_logits.append(model(a[:, t : t + 1], cache=cache))
    assert torch.allclose(torch.cat(step_logits, dim=1), full, atol=1e-5)


def test_generation_past_trained_context_extends_rope():
    model = make(block_size=8)
    out = model.generate(torch.zeros(1, 4, dtype=torch.long), 20, temperature=0)
    ref = model.generate(torch.zeros(1, 4, dtype=torch.long), 20, temperature=0, use_cache=False)
    assert out.shape == (1, 24) and torch.equal(out, ref)


def test_causal_no_peeking():
    model = make()
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 97
    assert torch.allclose(model(x)[:, :10], model(y)[:, :10], atol=1e-6)
    assert not torch.allclose(model(x)[:, 10:], model(y)[:, 10:])


def test_loss_ignores_index_and_matches_cross_entropy():
    model = make()
    x = torch.randint(0, 97, (2, 12))
    t = torch.randint(0, 97, (2, 12))
    t[:, :5] = -1
    logits = model(x)
    ref = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 97), t[:, 5:].reshape(-1))
    assert torch.allclose(model(x, t), ref, atol=1e-6)


def test_param_and_flop_counts():
    model = make(n_kv_head=2)
    c = model.config
    d, f, hd = c.n_embd, c.ffn_dim, c.head_dim
    per_layer = d * (c.n_head + 2 * c.kv_heads) * hd + c.n_head * hd * d + 3 * d * f + 2 * d
    expected = c.vocab_size * d * 2 + c.n_layer * per_layer + d
    assert model.num_params() == expected
    matmul = expected - c.vocab_size * d - (2 * c.n_layer + 1) * d
    assert model.flops_per_token() == 6 * matmul + 12 * c.n_layer * d * c.block_size
    assert make(n_kv_head=2, tie_embeddings=True).num_params() == expected - c.vocab_size * d


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    assert GPTConfig(n_embd=384).ffn_dim == 1024 and GPTConfig(n_embd=128).ffn_dim == 352


def test_logits_to_keep_gives_the_last_positions_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    idx = torch.randint(0, 50, (3, 12))
    pad = torch.ones(3, 12, dtype=torch.bool)
    pad[0, :4] = False   # a left-padded row
    with torch.no_grad():
        full = model(idx, pad_mask=pad)
        torch.testing.assert_close(model(idx, pad_mask=pad, logits_to_keep=5), full[:, -5:])
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(idx, targets=idx, logits_to_keep=2)


def test_packed_segments_give_each_sequence_its_outputs_alone():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    seqs = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    row = torch.tensor([sum(seqs, []) + [0, 0]])
    segments = torch.tensor([[0] * 5 + [1] * 2 + [2] * 3 + [3] * 2])
    with torch.no_grad():
        packed = model(row, segments=segments)[0]
        k = 0
        for s in seqs:
            torch.testing.assert_close(packed[k : k + len(s)], model(torch.tensor([s]))[0], atol=1e-5, rtol=1e-5)
            k += len(s)
    with pytest.raises(ValueError, match="segments"):
        model(row, segments=segments, pad_mask=torch.ones_like(row, dtype=torch.bool))


def test_a_loaded_model_is_built_without_an_init_and_keeps_its_ties(tmp_path):
    """rundir.load_model builds on the meta device and takes the file's tensors (no random init, no
    second copy): tied heads are tied again (one Parameter, so training updates it once), RoPE
    tables are computed, the logits equal the saved model's."""
    from gptstack.config import Config
    from gptstack.rundir import load_model, save_model

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16, tie_embeddings=True)).eval()
    save_model(tmp_path / "stage", model.state_dict(), Config(model=model.config).to_dict())
    loaded, _ = load_model(tmp_path / "stage")
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    assert len(list(loaded.parameters())) == len(list(model.parameters()))
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
