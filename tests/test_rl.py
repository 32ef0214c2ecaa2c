"""The RL core's arithmetic against hand-computed answers (train/rl.py) and the rollout layout
against the model and the engine (engine/rollout.py)."""
import math

import pytest
import torch

from gptstack.engine import generate
from gptstack.engine.rollout import make_batch, rollout, sequence_logprobs, token_logprobs, token_values
from gptstack.model.gpt import GPT, GPTConfig
from gptstack.model.heads import ScalarModel
from gptstack.train.rl import (AdaptiveKLController, clipped_policy_loss, clipped_value_loss, explained_variance,
                               gae, group_advantages, masked_whiten, per_token_rewards, rloo_advantages)


def _gae_reference(rewards, values, length, gamma, lam):
    """The textbook per-episode loop on a plain list (episode = the first `length` tokens)."""
    adv, last = [0.0] * length, 0.0
    for t in reversed(range(length)):
        next_v = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [0.1, 0.3, 9.0]])   # 9.0 sits on a pad: must be ignored
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: δ2 = 1 - .4 = .6; δ1 = .4 - .2 = .2 -> .2 + .95·.6 = .77; δ0 = .2 - .5 -> -.3 + .95·.77 = .4315
    # row 1: δ1 = 2 - .3 = 1.7; δ0 = .3 - .1 = .2 -> .2 + .95·1.7 = 1.815; the pad gets 0
    torch.testing.assert_close(adv, torch.tensor([[0.4315, 0.77, 0.6], [1.815, 1.7, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.9315, 0.97, 1.0], [1.915, 2.0, 0.0]]))


def test_gae_matches_the_textbook_loop_on_random_ragged_batches():
    g = torch.Generator().manual_seed(0)
    B, R = 6, 9
    rewards, values = torch.randn(B, R, generator=g), torch.randn(B, R, generator=g)
    lengths = [9, 1, 4, 7, 2, 5]
    mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths])
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)]:
        adv, _ = gae(rewards * mask, values, mask, gamma, lam)
        for b, n in enumerate(lengths):
            ref = _gae_reference(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
            torch.testing.assert_close(adv[b, :n], torch.tensor(ref), rtol=1e-5, atol=1e-6)
            assert torch.all(adv[b, n:] == 0)


def test_per_token_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.4, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r = per_token_rewards(torch.tensor([2.0, -1.0]), kl, 0.1, mask)
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.02, -0.01 + 2.0], [-0.03, -0.04 - 1.0, 0.0]]))


def test_clipped_policy_gradient_is_zero_outside_the_clip_range():
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    # log-ratios: inside, above 1+ε, below 1-ε, inside
    new = torch.tensor([[0.05, math.log(1.5), math.log(0.5), -0.05]], requires_grad=True)
    for sign in (1.0, -1.0):
        adv = torch.full((1, 4), sign)
        loss, clipfrac, _ = clipped_policy_loss(new, old, adv, mask, clip=0.2)
        (grad,) = torch.autograd.grad(loss, new)
        # adv > 0: the clip binds above 1+ε; adv < 0: below 1-ε. There the gradient vanishes.
        binding = 1 if sign > 0 else 2
        assert grad[0, binding] == 0
        others = [i for i in range(4) if i != binding]
        assert torch.all(grad[0, others] != 0)
        assert clipfrac.item() == pytest.approx(0.25)
        # d/dlogp of -A·exp(logp - old) / n is -A·ratio / n where not clipped
        torch.testing.assert_close(grad[0, 0], torch.tensor(-sign * math.exp(0.05) / 4))


def test_clipped_value_loss_hand_computed():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[0.5, 0.1]])
    ret = torch.tensor([[1.0, 1.0]])
    loss, clipfrac = clipped_value_loss(new, old, ret, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (0.5-1)² = .25, clipped (0.2-1)² = .64 -> .64; token 1: .81 both
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_adaptive_kl_controller_moves_beta_the_right_way():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert c.update(12.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))   # KL too high: β up (clipped e)
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert c.update(5.4, 256) == pytest.approx(0.1 * (1 - 0.1 * 256 / 10000))    # too low: β down
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert c.update(1.5, 256) == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000))    # e clipped at -0.2
    fixed = AdaptiveKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05
    with pytest.raises(ValueError):
        AdaptiveKLController(-0.1)


def test_explained_variance_by_hand():
    values = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 2.0, 9.0], [5.0, 9.0, 9.0]])   # the 9s are padding
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # real returns 1, 2, 5: variance 78/27; residuals 0, 0, 2: variance 24/27
    assert explained_variance(values, returns, mask) == pytest.approx(1 - 24 / 78)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)          # a perfect critic
    assert explained_variance(values, torch.full_like(returns, 3.0), mask) is None   # returns that do not vary


def test_group_and_rloo_advantages_hand_computed():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(scores, 4)
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / torch.tensor([s + 1e-4] * 4 + [1e-4] * 4))
    torch.testing.assert_close(group_advantages(scores, 4, scale=False), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    # RLOO: the baseline is the mean of the *other* samples: 1 - 2.5, 2 - 2, 3 - 1.5
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), 3), torch.tensor([-1.5, 0.0, 1.5]))
    with pytest.raises(ValueError):
        rloo_advantages(torch.tensor([1.0]), 1)


def test_masked_whiten_ignores_pads():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    real = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(w[:, :2].reshape(-1), (real - real.mean()) / real.std(), rtol=1e-4, atol=1e-4)
    assert torch.all(w[:, 2] == 0)


# --- rollout layout ---------------------------------------------------------------------------------


def _tiny(seed=0, vocab=40):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


def test_token_logprobs_equal_the_engine_and_a_forward_pass_per_row():
    policy = _tiny()
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    batch = rollout(policy, prompts, n=2, max_new_tokens=7, temperature=0.7, stop_ids=[3], seed=5)
    assert batch.prompt_index == [0, 0, 1, 1, 2, 2]
    completions = generate(policy, prompts, 7, n=2, temperature=0.7, stop_ids=[3], seed=5)
    with torch.no_grad():
        logp, entropy = token_logprobs(policy, batch, temperature=0.7, with_entropy=True)
    for row, (i, j) in enumerate([(i, j) for i in range(3) for j in range(2)]):
        c = completions[i][j]
        n = len(c.tokens)
        assert batch.responses[row] == c.tokens and bool(batch.finished[row]) == c.finished
        assert batch.mask[row].sum() == n
        torch.testing.assert_close(logp[row, :n], torch.tensor(c.logprobs), atol=1e-4, rtol=1e-4)
        # the row alone, unpadded, through the plain model
        ids = torch.tensor([prompts[i] + c.tokens])
        with torch.no_grad():
            alone = torch.log_softmax(policy(ids)[0, len(prompts[i]) - 1 : -1] / 0.7, -1)
        torch.testing.assert_close(logp[row, :n], alone.gather(-1, torch.tensor(c.tokens)[:, None])[:, 0],
                                   atol=1e-5, rtol=1e-5)
        ent = -(alone.exp() * alone).sum(-1)
        torch.testing.assert_close(entropy[row, :n], ent, atol=1e-5, rtol=1e-5)
        assert torch.all(logp[row, n:] == 0)
    # the sampler's logprobs travel with the batch (PPO's old logprobs): the same values, same layout
    torch.testing.assert_close(batch.logprobs, logp, atol=1e-4, rtol=1e-4)
    assert torch.all(batch.logprobs[batch.mask == 0] == 0)
    torch.testing.assert_close(batch.select([4, 1]).logprobs, logp[[4, 1]], atol=1e-4, rtol=1e-4)


def test_per_token_kl_sums_to_the_sequence_log_ratio():
    policy, ref = _tiny(0), _tiny(1)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    batch = rollout(policy, prompts, n=3, max_new_tokens=6, seed=1)
    with torch.no_grad():
        kl = token_logprobs(policy, batch)[0] - token_logprobs(ref, batch)[0]
    flat_prompts = [prompts[i] for i in batch.prompt_index]
    seq = torch.tensor(sequence_logprobs(policy, flat_prompts, batch.responses)) - \
        torch.tensor(sequence_logprobs(ref, flat_prompts, batch.responses))
    torch.testing.assert_close(kl.sum(1), seq, atol=1e-4, rtol=1e-4)


def test_token_values_read_the_state_before_each_response_token():
    critic = ScalarModel.from_policy(_tiny(), kind="value").eval()
    torch.nn.init.normal_(critic.head.weight)
    batch = make_batch([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], [0, 1], [True, False])
    with torch.no_grad():
        v = token_values(critic, batch)
        alone = critic(torch.tensor([[4, 7, 8, 9]]))[0]
    # row 1: the value before response token k is the head at position (prompt_len - 1 + k)
    torch.testing.assert_close(v[1], alone[0:3], atol=1e-5, rtol=1e-5)
    assert v[0, 2] == 0


def test_packed_training_forward_equals_each_row_alone_with_gradients():
    # block_size 16: six rows of 4-13 tokens pack into several rows, some holding 2-3 sequences
    torch.manual_seed(3)
    policy = GPT(GPTConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=16))
    critic = ScalarModel.from_policy(policy, kind="value")
    torch.nn.init.normal_(critic.head.weight)
    prompts = [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10], [11, 12], [13, 14, 15, 16, 17, 18, 19, 20], [21, 22, 23]]
    responses = [[30, 31], [32, 33, 34, 35], [36], [37, 38, 39, 30, 31, 32], [33, 34, 35, 36, 37, 38], [39, 30]]
    batch = make_batch(prompts, responses, list(range(6)), [True] * 6)
    packing = batch.packing(policy.config)                          # what token_logprobs/values read
    assert packing.ids.numel() < batch.ids[:, :-1].numel()           # padding is not computed
    assert packing.ids.size(0) < len(batch)                          # a row holds several sequences
    w = torch.randn(batch.mask.shape)

    def loss_of(logp, values):
        return (logp * w).sum() + (values * w.flip(0)).sum()

    logp, _ = token_logprobs(policy, batch, temperature=0.8)
    values = token_values(critic, batch)
    loss_of(logp, values).backward()
    packed_grads = [p.grad.clone() for p in [*policy.parameters(), *critic.parameters()] if p.grad is not None]
    policy.zero_grad()
    critic.zero_grad()

    ref_logp, ref_values = torch.zeros_like(logp), torch.zeros_like(values)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([p + r])
        lp = torch.log_softmax(policy(ids)[0, len(p) - 1 : -1] / 0.8, -1).gather(-1, torch.tensor(r)[:, None])[:, 0]
        ref_logp = ref_logp.index_put((torch.tensor([b]), torch.arange(len(r))), lp)
        ref_values = ref_values.index_put((torch.tensor([b]), torch.arange(len(r))), critic(ids)[0, len(p) - 1 : -1])
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)
    loss_of(ref_logp, ref_values).backward()
    ref_grads = [p.grad for p in [*policy.parameters(), *critic.parameters()] if p.grad is not None]
    assert len(ref_grads) == len(packed_grads)
    for g_packed, g_ref in zip(packed_grads, ref_grads):
        torch.testing.assert_close(g_packed, g_ref, atol=1e-5, rtol=1e-4)
