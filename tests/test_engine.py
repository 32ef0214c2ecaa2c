"""The sampling engine: batched KV-cache sampling == one-at-a-time sampling without a cache,
logprobs == a fresh forward pass, stops, shared prefill, filters, padding, context limits."""
import math
from collections import Counter

import pytest
import torch

from gptstack.common import UserError
from gptstack.engine import generate, sample_tokens, stream_uniforms
from gptstack.engine import sampling
from gptstack.model import GPT, GPTConfig, inference

V = 61


def make(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, n_layer=2, n_head=4, n_embd=64, block_size=48)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg)).eval()
    with torch.no_grad():  # a peakier next-token distribution than the init's near-uniform one
        model.lm_head.weight.mul_(8)
    return model


PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 7], [1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4], [0], [6, 6, 6, 6, 6]]


@torch.no_grad()
def reference(model, prompts, max_new, *, n=1, temperature=1.0, top_k=None, top_p=None, stop_ids=(), seed=0):
    """One stream at a time, no cache, no padding: the whole sequence recomputed every step."""
    out = []
    for i, prompt in enumerate(prompts):
        row = []
        for j in range(n):
            u = stream_uniforms(seed, i, j, max_new)
            seq, toks, lps, finished = list(prompt), [], [], False
            for t in range(max_new):
                if len(seq) > model.config.block_size:
                    break
                logits = model(torch.tensor([seq]))[:, -1]
                tok, lp = sample_tokens(logits, u[t].view(1, 1), temperature, top_k, top_p)
                toks.append(int(tok))
                lps.append(float(lp))
                seq.append(int(tok))
                if int(tok) in stop_ids:
                    finished = True
                    break
            row.append((toks, lps, finished))
        out.append(row)
    return out


def assert_same(got, ref, atol=1e-5):
    assert len(got) == len(ref)
    for i, (g_row, r_row) in enumerate(zip(got, ref)):
        assert len(g_row) == len(r_row)
        for j, (g, (toks, lps, fin)) in enumerate(zip(g_row, r_row)):
            assert g.prompt_index == i
            assert g.tokens == toks, (i, j)
            assert g.finished == fin, (i, j)
            assert len(g.logprobs) == len(lps) and max((abs(a - b) for a, b in zip(g.logprobs, lps)), default=0) < atol


@pytest.mark.parametrize("kw", [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, top_k=10, top_p=0.6),
])
def test_batched_cached_sampling_equals_one_at_a_time_without_cache(kw):
    model = make()
    got = generate(model, PROMPTS, 16, n=2, seed=11, **kw)
    assert_same(got, reference(model, PROMPTS, 16, n=2, seed=11, **kw))
    # and independent of how the prompts are batched (a stream is keyed by its prompt's index)
    again = generate(model, PROMPTS, 16, n=2, seed=11, batch_size=2, **kw)
    for a, b in zip(got, again):
        assert [c.tokens for c in a] == [c.tokens for c in b]


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}, {"n_kv_head": 1, "tie_embeddings": True}])
def test_greedy_batched_mixed_lengths_equals_one_at_a_time(kw):
    model = make(**kw)
    got = generate(model, PROMPTS, 25, temperature=0)
    for prompt, (c,) in zip(PROMPTS, got):
        ref = model.generate(torch.tensor([prompt]), 25, temperature=0, use_cache=False)[0, len(prompt):]
        assert c.tokens == ref.tolist() and not c.finished


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (0.6, 4), (1.0, None), (2.0, None)])
def test_logprobs_equal_a_fresh_forward_pass(temperature, top_k):
    model = make(n_kv_head=2)
    got = generate(model, PROMPTS, 16, n=2, temperature=temperature, top_k=top_k, seed=3)
    with torch.no_grad():
        for prompt, row in zip(PROMPTS, got):
            for c in row:
                logits = model(torch.tensor([prompt + c.tokens]))[0, len(prompt) - 1 : -1]
                logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
                want = logp.gather(1, torch.tensor(c.tokens)[:, None])[:, 0]
                assert torch.allclose(torch.tensor(c.logprobs), want, atol=1e-5)


def rig_stop(model: GPT, stop: int, strength: float) -> GPT:
    """Make `stop` likely after any input: a constant feature in every embedding that only
    `stop`'s output row reads."""
    with torch.no_grad():
        model.tok_emb.weight[:, 0] = 3.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[stop, 0] = strength
    return model


def test_stops_at_stop_id_and_sets_finished(monkeypatch):
    monkeypatch.setattr(sampling, "PREFILL_TOKENS", 20)  # prefill in several groups of prompts, too
    # stop id 0 is also the engine's pad id: a pad must never read as end of sequence
    model = rig_stop(make(), stop=0, strength=0.14)
    got = generate(model, PROMPTS, 30, n=4, stop_ids=[0, 59], seed=5)
    lengths = [len(c.tokens) for row in got for c in row]
    assert any(c.finished for row in got for c in row) and not all(c.finished for row in got for c in row)
    assert len(set(lengths)) > 3  # rows stop at different steps (the batch gets compacted on the way)
    for row in got:
        for c in row:
            stops = [k for k, t in enumerate(c.tokens) if t in (0, 59)]
            if c.finished:
                assert stops == [len(c.tokens) - 1]
            else:
                assert stops == [] and len(c.tokens) == 30
            assert len(c.logprobs) == len(c.tokens)
    assert_same(got, reference(model, PROMPTS, 30, n=4, stop_ids=(0, 59), seed=5))
    # greedy with a stop that always wins: one token each
    always = rig_stop(make(), stop=7, strength=10.0)
    assert all(c.tokens == [7] and c.finished for (c,) in generate(always, PROMPTS, 10, temperature=0, stop_ids=[7]))


def test_n_samples_share_the_prefill_and_are_independent_draws(monkeypatch):
    model = make()
    calls = []
    forward = inference.Decoder.forward

    def spy(self, ids, *a, **k):
        calls.append(tuple(ids.shape))
        return forward(self, ids, *a, **k)

    monkeypatch.setattr(inference.Decoder, "forward", spy)
    prompt = [5, 3, 9, 1]
    got = generate(model, [prompt], 2, n=4000, seed=1)[0]
    assert calls == [(1, 4), (4000, 1)]  # one prefill of the prompt, then one step for all 4000 streams

    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([prompt]))[0, -1], dim=-1)
    counts = Counter(c.tokens[0] for c in got)
    # chi-square of the first tokens against the model's distribution (bins with expected >= 5)
    expected = p * len(got)
    big = expected >= 5
    obs = torch.tensor([counts.get(t, 0) for t in range(V)], dtype=torch.float64)
    rest_obs, rest_exp = obs[~big].sum(), expected[~big].sum().double()
    chi2 = (((obs[big] - expected[big]) ** 2) / expected[big]).sum() + ((rest_obs - rest_exp) ** 2) / max(rest_exp, 1e-9)
    df = int(big.sum())
    assert chi2 < df + 5 * math.sqrt(2 * df), (float(chi2), df)
    # independence: consecutive streams agree on their first token about as often as two draws do
    same = sum(a.tokens[0] == b.tokens[0] for a, b in zip(got, got[1:])) / (len(got) - 1)
    assert abs(same - float((p ** 2).sum())) < 0.03
    # and each stream's second token follows from its own first
    firsts = {c.tokens[0] for c in got}
    assert len({tuple(c.tokens) for c in got}) > len(firsts)


def test_top_k_and_top_p_never_emit_a_filtered_token():
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    logits[:, 7] = -1e30  # probability 0 after softmax: never sampled, whatever u is
    u = torch.cat([torch.zeros(1), torch.rand(61), torch.tensor([1 - 2 ** -24, 0.9999999])])[:, None]
    for top_k, top_p in [(None, None), (3, None), (None, 0.5), (8, 0.3), (1, None)]:
        for temperature in (0.5, 1.0, 3.0):
            tok, lp = sample_tokens(logits, u, temperature, top_k, top_p)
            tok = tok[:, 0]
            assert not (tok == 7).any()
            scaled = logits / temperature
            if top_k:
                kth = scaled.topk(top_k, dim=-1).values[:, -1]
                assert (scaled.gather(1, tok[:, None])[:, 0] >= kth).all()
            if top_p:
                probs = torch.softmax(scaled, dim=-1)
                if top_k:
                    probs = torch.softmax(scaled.masked_fill(scaled < kth[:, None], float("-inf")), dim=-1)
                mass_above = (probs * (probs > probs.gather(1, tok[:, None]))).sum(-1)
                assert (mass_above < top_p).all()  # the token is inside the nucleus
            assert torch.allclose(lp[:, 0], torch.log_softmax(scaled, -1).gather(1, tok[:, None])[:, 0])
    # and through the engine, checked against the model's own logits at every step
    model = make()
    for kw in (dict(top_k=2), dict(top_p=0.3)):
        for prompt, row in zip(PROMPTS, generate(model, PROMPTS, 12, n=3, temperature=1.5, seed=2, **kw)):
            for c in row:
                with torch.no_grad():
                    logits = model(torch.tensor([prompt + c.tokens]))[0, len(prompt) - 1 : -1] / 1.5
                probs = torch.softmax(logits, -1)
                chosen = probs.gather(1, torch.tensor(c.tokens)[:, None])[:, 0]
                rank = (probs > chosen[:, None]).sum(-1)
                mass_above = (probs * (probs > chosen[:, None])).sum(-1)
                if "top_k" in kw:
                    assert (rank < 2).all()
                else:
                    assert (mass_above < 0.3).all()


def test_padding_never_changes_a_result():
    model = make()
    alone = [generate(model, [p], 15, n=2, seed=4)[0] for p in PROMPTS]
    alone = [[c.tokens for c in row] for row in alone]
    # prompt_index is part of the stream's seed, so compare each prompt alone at index 0
    batched = [[c.tokens for c in row] for row in generate(model, [PROMPTS[0]], 15, n=2, seed=4)]
    assert batched == [alone[0]]
    for i, p in enumerate(PROMPTS):
        # the same prompt at index 0 of a batch with longer and shorter prompts (other padding)
        mixed = generate(model, [p, [1] * 20, [2]], 15, n=2, seed=4)[0]
        assert [c.tokens for c in mixed] == alone[i]


def test_model_forward_with_pad_mask_equals_unpadded():
    model = make(n_kv_head=2)
    seqs = [[4, 5, 6, 7, 8, 9], [1, 2], [3, 3, 3, 3]]
    T = 8
    with torch.no_grad():
        singles = [model(torch.tensor([s]))[0] for s in seqs]
        for left in (True, False):
            ids = torch.zeros(len(seqs), T, dtype=torch.long)
            mask = torch.zeros(len(seqs), T, dtype=torch.bool)
            for r, s in enumerate(seqs):
                cols = slice(T - len(s), T) if left else slice(0, len(s))
                ids[r, cols], mask[r, cols] = torch.tensor(s), True
            logits = model(ids, pad_mask=mask)
            assert torch.isfinite(logits).all()
            for r, s in enumerate(seqs):
                assert torch.allclose(logits[r][mask[r]], singles[r], atol=1e-5)


def test_context_limit_and_bad_prompts():
    model = make(block_size=16)
    with pytest.raises(UserError, match="prompt 1 has 17 tokens, more than the model's context of 16"):
        generate(model, [[1, 2], list(range(17))], 4)
    with pytest.raises(UserError, match="prompt 0 is empty"):
        generate(model, [[]], 4)
    with pytest.raises(UserError, match="token id 61 is outside"):
        generate(model, [[1, 61]], 4)
    # truncate=True keeps the last block_size + 1 - max_new_tokens tokens: same as passing them
    long = [t % V for t in range(30)]
    (a,), = generate(model, [long], 5, temperature=0, truncate=True)
    (b,), = generate(model, [long[-12:]], 5, temperature=0)
    assert a.tokens == b.tokens and len(a.tokens) == 5
    # a sequence never runs past the context: a 14-token prompt gets 3 tokens (inputs of 14..16)
    (c,), (d,) = generate(model, [list(range(14)), [1]], 10, temperature=0)
    assert len(c.tokens) == 3 and not c.finished and len(d.tokens) == 10
    assert generate(model, [[1], [2, 3]], 0, n=2)[1][1].tokens == []


def test_deterministic_and_sees_updated_weights():
    model = make()
    a = generate(model, PROMPTS, 10, n=2, seed=9)
    b = generate(model, PROMPTS, 10, n=2, seed=9)
    assert [[c.tokens for c in r] for r in a] == [[c.tokens for c in r] for r in b]
    assert [[c.tokens for c in r] for r in a] != [[c.tokens for c in r] for r in generate(model, PROMPTS, 10, n=2, seed=10)]
    # an in-place update (an optimizer step) must be seen by the next call (prepared weights are cached)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    for prompt, (c,) in zip(PROMPTS, generate(model, PROMPTS, 10, temperature=0)):
        assert c.tokens == model.generate(torch.tensor([prompt]), 10, temperature=0)[0, len(prompt):].tolist()


@pytest.mark.parametrize("fused", [False, True])
def test_sees_weights_written_by_an_optimizer_step(fused):
    # AdamW(fused=True) writes parameters without bumping their version counters: the engine's cache
    # of prepared weights must notice anyway (it once did not, and RL sampled from stale weights)
    model = make()
    generate(model, PROMPTS, 10, temperature=0)   # prepare and cache the weights
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=fused, foreach=None if fused else True)
    model(torch.tensor([PROMPTS[0]])).square().mean().backward()
    opt.step()
    for prompt, (c,) in zip(PROMPTS, generate(model, PROMPTS, 10, temperature=0)):
        assert c.tokens == model.generate(torch.tensor([prompt]), 10, temperature=0)[0, len(prompt):].tolist()


def test_half_precision_rope_path_and_autocast(monkeypatch):
    # bf16/fp16 have no complex multiply: the real-arithmetic RoPE must give the same results
    model = make(n_kv_head=2)
    want = generate(model, PROMPTS, 12, n=2, seed=6)
    init = inference.Decoder.__init__

    def real_rope(self, *a, **k):
        init(self, *a, **k)
        if self.complex_rope:
            self.complex_rope, self.rot = False, torch.view_as_real(self.rot)

    monkeypatch.setattr(inference.Decoder, "__init__", real_rope)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast does not leak in
        got = generate(model, PROMPTS, 12, n=2, seed=6)
    assert [[c.tokens for c in r] for r in got] == [[c.tokens for c in r] for r in want]
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < 1e-5
    # and a bf16 model runs end to end (its own precision: only sanity checks)
    half = make().to(torch.bfloat16)
    out = generate(half, PROMPTS, 8, n=2, seed=1, stop_ids=[3])
    assert all(1 <= len(c.tokens) <= 8 and all(math.isfinite(v) for v in c.logprobs) for r in out for c in r)
