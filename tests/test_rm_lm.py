"""The reward model's two LM-head options (model/heads.py, stages/rm.py): rm.lm_coef's loss is the
cross-entropy of exactly the best responses' assistant tokens; rm.likelihood_score's term is the
mean token log-probability a GPT forward gives the response, whatever the padding; both save, load,
normalise and train under DDP."""
import json

import pytest
import torch
import torch.nn.functional as F

from gptstack.common import UserError
from gptstack.config import Config, build_config
from gptstack.model.gpt import GPT, GPTConfig
from gptstack.model.heads import ScalarModel, pad_sequences, score_ids
from gptstack.rundir import load_scalar_model, save_scalar_model
from gptstack.stages import rm as rm_stage
from gptstack.tokenizer import ASSISTANT_START
from gptstack.train.checkpoint import load_checkpoint

from test_rm import SMALL, make_run, tok, toy_preferences  # noqa: F401 (tok: the module's fixture)

START = 7  # <|assistant_start|> in these hand-made sequences


def _policy(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=32, **kw)).eval()


def _mean_logprob_by_hand(policy, seq):
    """The mean over the tokens after the last START of log softmax(GPT logits) at the previous position."""
    logp = torch.log_softmax(policy(torch.tensor([seq]))[0].float(), -1)
    start = max(i for i, t in enumerate(seq) if t == START)
    return sum(logp[i - 1, seq[i]].item() for i in range(start + 1, len(seq))) / (len(seq) - start - 1)


SEQS = [[1, 2, 3, START, 9, 10, 11],              # prompt, start, 3 response tokens
        [4, START, 12],                           # one response token
        [1, START, 5, 6, 2, START, 13, 14, 15, 16]]  # two turns: only the last response counts


@pytest.mark.parametrize("tied", [False, True])
def test_likelihood_term_is_the_mean_token_logprob_of_a_gpt_forward(tied):
    policy = _policy(tie_embeddings=tied)
    rm = ScalarModel.from_policy(policy, response_start_id=START).eval()
    assert rm.has_lm_head and rm.likelihood_score and rm.likelihood_coef.item() == 0
    x = torch.tensor([SEQS[0]])
    assert rm.score(x).item() == 0.0  # starts at 0 like the plain RM (zero head, zero coefficient)
    with torch.no_grad():
        torch.nn.init.normal_(rm.head.weight, std=0.5)
        rm.likelihood_coef.fill_(0.7)
    plain = ScalarModel.from_policy(policy).eval()
    plain.head.load_state_dict(rm.head.state_dict())
    with torch.no_grad():
        for s in SEQS:
            got = rm.score(torch.tensor([s])).item()
            head_only = plain.score(torch.tensor([s])).item()
            assert got == pytest.approx(head_only + 0.7 * _mean_logprob_by_hand(policy, s), abs=1e-5)
        # before the start token there is no response yet: the head alone
        torch.testing.assert_close(rm(x)[0, :4], plain(x)[0, :4])
        # nor in a batch with no start token at all (the LM head is then run on no position)
        no_start = torch.tensor([[1, 2, 3, 9, 10], [4, 12, 13, 14, 15]])
        torch.testing.assert_close(rm(no_start), plain(no_start))
    rm(no_start).sum().backward()  # still differentiable: the term's coefficient gets a zero gradient
    assert rm.likelihood_coef.grad is not None and rm.likelihood_coef.grad.item() == 0.0


def test_likelihood_score_is_the_same_whatever_the_padding():
    rm = ScalarModel.from_policy(_policy(), response_start_id=START).eval()
    with torch.no_grad():
        rm.likelihood_coef.fill_(1.0)
        alone = torch.stack([rm.score(torch.tensor([s]))[0] for s in SEQS])
        T = 13
        for layout in ("left", "right", "hole"):
            ids = torch.full((len(SEQS), T), 3, dtype=torch.long)  # a pad id that would change the score if read
            mask = torch.zeros(len(SEQS), T, dtype=torch.bool)
            for i, s in enumerate(SEQS):
                if layout == "left":
                    cols = list(range(T - len(s), T))
                elif layout == "right":
                    cols = list(range(len(s)))
                else:  # a pad inside the response, one inside the prompt
                    cols = [c for c in range(len(s) + 2) if c not in (1, len(s) - 1)]
                ids[i, cols] = torch.tensor(s)
                mask[i, cols] = True
            torch.testing.assert_close(rm.score(ids, pad_mask=mask), alone, atol=1e-5, rtol=1e-5)
        # the batched scorer (right padding, no mask) agrees too
        assert score_ids(rm, SEQS) == pytest.approx(alone.tolist(), abs=1e-5)


def test_likelihood_values_per_position_under_logits_to_keep_and_packed_segments():
    """PPO's critic starts from the RM and reads selected positions of packed rows: each
    sequence's values there must be those of the sequence alone."""
    rm = ScalarModel.from_policy(_policy(), response_start_id=START).eval()
    with torch.no_grad():
        torch.nn.init.normal_(rm.head.weight, std=0.5)
        rm.likelihood_coef.fill_(0.7)
        a, b = SEQS[0], SEQS[2]
        alone_a, alone_b = rm(torch.tensor([a]))[0], rm(torch.tensor([b]))[0]
        torch.testing.assert_close(rm(torch.tensor([b]), logits_to_keep=4)[0], alone_b[-4:])
        row = torch.tensor([a + b])
        segments = torch.tensor([[0] * len(a) + [1] * len(b)])
        keep = torch.tensor([[1, 5, len(a) + 2, len(a) + 8]])
        got = rm(row, segments=segments, logits_to_keep=keep)[0]
        want = torch.stack([alone_a[1], alone_a[5], alone_b[2], alone_b[8]])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        _, logits = rm(row, segments=segments, logits_to_keep=keep, return_logits=True)
        assert logits.shape == (1, 4, 50)


def test_lm_loss_is_the_cross_entropy_of_exactly_the_best_responses_assistant_tokens():
    policy = _policy()
    rm = ScalarModel.from_policy(policy, lm_head=True).eval()
    seqs = [[1, 2, START, 9, 10, 11, 4], [1, START, 12, 13], [3, 3, 3, START, 20], [5, START, 6, 6, 6, 6, 6]]
    ids, mask = pad_sequences(seqs, "cpu")
    with torch.no_grad():
        values, logits = rm(ids, return_logits=True)
        rows = [0, 2, 3]  # row 1 is not a best response: its tokens must not count
        got = rm_stage.response_lm_loss(logits, ids, rows, START, mask)
        # by hand: the GPT's logits at positions start .. L-2 predict the tokens start+1 .. L-1
        pred, target = [], []
        for r in rows:
            s = seqs[r]
            out = policy(torch.tensor([s]))[0]
            k = s.index(START)
            pred.append(out[k : len(s) - 1])
            target.append(torch.tensor(s[k + 1 :]))
        want = F.cross_entropy(torch.cat(pred).float(), torch.cat(target))
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    torch.testing.assert_close(values, ScalarModel.from_policy(policy)(ids))  # the scalars are unchanged
    with pytest.raises(ValueError, match="no LM head"):
        ScalarModel.from_policy(policy)(ids, return_logits=True)


def test_best_rows_point_at_each_rankings_first():
    items = [{"row": {"ranking": [2, 0, 1]}, "seqs": [[1], [2], [3]]}, {"row": {"ranking": [1, 0]}, "seqs": [[1], [2]]}]
    assert rm_stage.best_rows(items) == [2, 4]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("options", [{"lm_head": True}, {"response_start_id": START}])
def test_save_load_and_normalise_keep_the_lm_head_and_likelihood_term(tmp_path, tied, options):
    policy = _policy(tie_embeddings=tied)
    rm = ScalarModel.from_policy(policy, **options)
    with torch.no_grad():
        torch.nn.init.normal_(rm.head.weight, std=0.5)
        rm.trunk.lm_head.weight.add_(0.1)  # the LM head moved in training: the saved one must come back
        if rm.likelihood_score:
            rm.likelihood_coef.fill_(0.4)
    cfg = Config()
    cfg.model = rm.config
    save_scalar_model(tmp_path / "rm", rm, cfg.to_dict())
    loaded, _ = load_scalar_model(tmp_path / "rm", "reward")
    assert loaded.has_lm_head and loaded.likelihood_score == rm.likelihood_score
    x = torch.tensor(SEQS[2])[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, return_logits=True), rm(x, return_logits=True))
        raw = torch.stack([rm.score(torch.tensor([s]))[0] for s in SEQS])
        rm.normalize(raw.mean().item(), raw.std().item())
        norm = torch.stack([rm.score(torch.tensor([s]))[0] for s in SEQS])
    torch.testing.assert_close(norm, (raw - raw.mean()) / raw.std(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sets,saved_lm_head", [(["rm.lm_coef=1.0"], False),
                                                (["rm.likelihood_score=true"], True),
                                                (["rm.likelihood_score=true", "rm.lm_coef=0.5"], True)])
def test_rm_stage_trains_and_saves_with_each_option(tmp_path, tok, sets, saved_lm_head):  # noqa: F811
    run = tmp_path / "run"
    make_run(run, tok)
    cfg = build_config("tiny", sets=[*SMALL, "rm.epochs=3", "rm.lr=3e-3", *sets])
    summary = rm_stage.run(cfg, run / "sft", toy_preferences(tmp_path / "toy.jsonl"), run)
    assert summary["eval/accuracy"] >= 0.95, summary
    # the checkpoint (resume) holds the LM head whenever training used it ...
    ckpt = load_checkpoint(run / "rm")
    assert any(k.startswith("trunk.lm_head.") for k in ckpt["model"])
    # ... RUN/rm only when its scores read it, so with lm_coef alone downstream stages see a plain RM
    rm, _ = load_scalar_model(run / "rm", "reward")
    assert rm.has_lm_head == saved_lm_head and rm.likelihood_score == saved_lm_head
    if saved_lm_head:
        assert int(rm.response_start_id) == tok.special(ASSISTANT_START)
        assert rm.likelihood_coef.item() != 0  # Bradley–Terry trained it
    with torch.no_grad():
        logged = [json.loads(line) for line in (run / "rm/metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in logged)


def test_likelihood_init_sets_the_starting_coefficient(tmp_path, tok):  # noqa: F811
    run = tmp_path / "run"
    make_run(run, tok)
    cfg = build_config("tiny", sets=[*SMALL, "rm.max_steps=1", "rm.lr=1e-4", "rm.likelihood_score=true",
                                     "rm.likelihood_init=1.0"])
    summary = rm_stage.run(cfg, run / "sft", toy_preferences(tmp_path / "toy.jsonl"), run)
    rm, _ = load_scalar_model(run / "rm", "reward")
    # one Adam step moves c by at most ~lr; the saved c is divided by the normalisation's std
    assert rm.likelihood_coef.item() * summary["norm/raw_std"] == pytest.approx(1.0, abs=1e-3)


def test_lm_coef_reaches_the_loss(tmp_path, tok, monkeypatch):  # noqa: F811
    """The LM term is in the optimised loss: with a huge weight the step's loss is far above log 2."""
    run = tmp_path / "run"
    make_run(run, tok)
    cfg = build_config("tiny", sets=[*SMALL, "rm.max_steps=1", "rm.lm_coef=100", "rm.warmup_steps=1"])
    summary = rm_stage.run(cfg, run / "sft", toy_preferences(tmp_path / "toy.jsonl"), run)
    # a random 2-layer policy: cross-entropy ~ log(vocab) ~ 6 per token, x 100
    assert summary["train/final_loss"] > 100


def test_negative_lm_coef_is_refused_before_anything_loads(tmp_path):
    # neither the policy nor the preferences exist: the setting is checked first, as the config is built
    with pytest.raises(UserError, match=r"rm.lm_coef: expected a value in \[0, inf\)"):
        cfg = build_config("tiny", sets=[*SMALL, "rm.lm_coef=-1"])
        rm_stage.run(cfg, tmp_path / "no-run" / "sft", tmp_path / "no-prefs.jsonl", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lm_head_gets_a_gradient_every_step_under_ddp(tmp_path):
    """DDP (find_unused_parameters off) stops at the second step when a parameter got no gradient
    in the first: the joint loss reads the LM head in the same forward as the scores."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        policy = _policy()
        seqs = [[1, 2, START, 9, 10], [1, START, 12, 13]]
        ids, mask = pad_sequences(seqs, "cpu")

        def two_steps(model, joint):
            ddp = DDP(model)
            for _ in range(2):
                if joint:
                    values, logits = ddp(ids, return_logits=True)
                    loss = values.sum() + rm_stage.response_lm_loss(logits, ids, [0], START, mask)
                else:
                    loss = ddp(ids).sum()
                loss.backward()

        two_steps(ScalarModel.from_policy(policy, lm_head=True), joint=True)
        two_steps(ScalarModel.from_policy(policy, response_start_id=START), joint=False)
        with pytest.raises(RuntimeError):  # the failure this guards against: an LM head nothing reads
            two_steps(ScalarModel.from_policy(policy, lm_head=True), joint=False)
    finally:
        dist.destroy_process_group()
