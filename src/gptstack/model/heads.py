"""Scalar heads on the GPT trunk: reward models, PPO critics and process reward models.

    rm = ScalarModel.from_policy(sft_model, kind="reward")     # trunk copied from the policy
    values = rm(ids, pad_mask=mask)            # (B, T): one scalar per position
    rewards = rm.score(ids, pad_mask=mask)     # (B,): read at each row's last real token
    (saved and loaded by rundir.py: save_scalar_model, load_scalar_model)

The head is a linear map of the trunk's final (normed) hidden state, as in InstructGPT's RM and
TRL's value heads. The trunk's language-model head is dropped unless asked for (`lm_head=True`):
by default nothing reads it, and an unused parameter would trip DDP. A reward model is read at the
last real token of prompt + response (its <|assistant_end|> when the response ended), which
`score` finds from the pad mask, so left padding, right padding or holes give the same score as
the sequence alone.

Two options for reward models (stages/rm.py; both off for PPO's critic and the PRM):
  lm_head=True           keep the trunk's LM head: the RM trains with a joint language-modelling
                         loss (Cobbe et al. 2021); `forward(..., return_logits=True)` returns it.
  response_start_id=i    a likelihood term in every scalar (implies lm_head): value at position t
                         = head(h_t) + c * the mean over the response tokens so far of
                         log p(token | prefix) under the LM head, c a learned scalar starting at 0.
                         The response is what follows the latest token i (<|assistant_start|>), so
                         the model finds it from the ids alone and every caller of `score` gets
                         the same reward whatever the padding (Generative Verifiers, DPO's
                         implicit reward). Sequences without token i get no likelihood term.

Normalisation (the RM's scores on the SFT policy's responses having mean 0 and std 1) is folded
into the head's weight and bias (`normalize`), so a saved RM's raw output is already normalised.
"""
from __future__ import annotations


import torch
import torch.nn as nn

from .gpt import GPT, GPTConfig, keep_positions

KINDS = ("reward", "value", "prm", "orm")


class ScalarModel(nn.Module):
    def __init__(self, config: GPTConfig, kind: str = "reward", lm_head: bool = False,
                 response_start_id: int | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"scalar head kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = kind
        self.config = config
        self.trunk = GPT(config)
        if not lm_head and response_start_id is None:
            self.trunk.lm_head = None  # only hidden states are read (see the module docstring)
        self.head = nn.Linear(config.n_embd, 1)
        # zero head: every score starts at 0, so a Bradley-Terry loss starts at exactly log 2 and the
        # first steps train the head before they move the trunk
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if response_start_id is not None:
            # the likelihood term's weight, 0 at start (scores still start at 0); a 0-dim parameter,
            # so the optimizer never decays it; the start token's id is saved with the weights
            self.likelihood_coef = nn.Parameter(torch.zeros(()))
            self.register_buffer("response_start_id", torch.tensor(int(response_start_id)))

    @property
    def has_lm_head(self) -> bool:
        return self.trunk.lm_head is not None

    @property
    def likelihood_score(self) -> bool:
        return hasattr(self, "likelihood_coef")

    @classmethod
    def from_policy(cls, policy: GPT, kind: str = "reward", lm_head: bool = False,
                    response_start_id: int | None = None) -> "ScalarModel":
        model = cls(policy.config, kind, lm_head, response_start_id)
        keep_lm = model.has_lm_head
        trunk_state = {k: v for k, v in policy.state_dict().items() if keep_lm or not k.startswith("lm_head.")}
        model.trunk.load_state_dict(trunk_state, strict=True)
        return model.to(next(policy.parameters()).device)

    def forward(self, idx: torch.Tensor, pad_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                return_logits: bool = False, segments: torch.Tensor | None = None):
        """(B, T) ids -> (B, T) scalars (float32), one per position (only those `logits_to_keep`
        selects: GPT.forward's argument). pad_mask / positions / segments: GPT.hidden_states'.
        return_logits: -> (scalars, LM logits (float32) at the same positions), both in one call
        so DDP sees every parameter that gets a gradient."""
        h = self.trunk.hidden_states(idx, pad_mask=pad_mask, positions=positions, segments=segments)
        if return_logits and not self.has_lm_head:
            raise ValueError("return_logits: this scalar model has no LM head (build it with lm_head=True)")
        logits = self.trunk.lm_head(h).float() if return_logits else None
        values = self.head(keep_positions(h, logits_to_keep)).squeeze(-1).float()
        if self.likelihood_score:
            # the term is a running mean from the response's start, so it needs the LM head at every
            # response token, kept or not, and nowhere else (not at prompts or pads: PPO's critic
            # runs this forward and backward on every minibatch)
            def logits_at(rows, cols):
                return logits[rows, cols] if logits is not None else self.trunk.lm_head(h[rows, cols]).float()
            start = latest_start(idx, int(self.response_start_id))
            logp, in_response = response_token_logprobs(idx, logits_at, start, pad_mask)
            term = running_response_mean(logp, in_response, start)
            values = values + self.likelihood_coef * keep_positions(term, logits_to_keep)
        if return_logits:
            return values, keep_positions(logits, logits_to_keep)
        return values

    def score(self, idx: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) the scalar at each row's last real token."""
        return gather_last(self(idx, pad_mask=pad_mask), pad_mask)

    @torch.no_grad()
    def normalize(self, mean: float, std: float) -> None:
        """Fold (s - mean) / std into the head, so scores come out normalised."""
        if not std > 0:
            raise ValueError(f"cannot normalise scores with std {std}")
        self.head.weight.div_(std)
        self.head.bias.sub_(mean).div_(std)
        if self.likelihood_score:
            self.likelihood_coef.div_(std)


def latest_start(idx: torch.Tensor, start_id: int) -> torch.Tensor:
    """(B, T) index of the latest `start_id` token at or before each position (-1: none yet)."""
    t = torch.arange(idx.size(1), device=idx.device).expand_as(idx)
    return torch.where(idx == start_id, t, -1).cummax(dim=1).values


def response_token_logprobs(idx: torch.Tensor, logits_at, start: torch.Tensor,
                            pad_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (logp, in_response), both (B, T): logp[b, s] = log p(idx[b, s] | the real tokens before
    it), read from the logits at the previous *real* position (so a hole in the padding changes
    nothing); in_response[b, s] marks the real tokens after start[b, s] (`latest_start`: the
    response's start token at or before s, itself excluded). logp is 0 where in_response is False.
    logits_at(rows, cols) -> (N, vocab) logits at positions (rows[i], cols[i]); it is asked only for
    the positions the response tokens are predicted from."""
    B, T = idx.shape
    t = torch.arange(T, device=idx.device).expand(B, T)
    real = torch.ones_like(idx, dtype=torch.bool) if pad_mask is None else pad_mask.to(idx.device).bool()
    last_real = torch.where(real, t, -1).cummax(dim=1).values
    prev = torch.cat([torch.full_like(last_real[:, :1], -1), last_real[:, :-1]], dim=1)   # the real token before s
    in_response = real & (start >= 0) & (t > start) & (prev >= 0)
    rows, cols = in_response.nonzero(as_tuple=True)
    logits = logits_at(rows, prev[rows, cols])
    # log_softmax at the token only: its logit minus the logsumexp at its source
    picked = logits.gather(1, idx[rows, cols, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    logp = torch.zeros(B, T, device=idx.device, dtype=picked.dtype).index_put((rows, cols), picked)
    return logp, in_response


def running_response_mean(logp: torch.Tensor, in_response: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """(B, T) at each position t, the mean of logp over the response tokens in (start[b, t], t]
    (`response_token_logprobs`' outputs, `latest_start`'s positions); 0 where there is none
    (before the first response token)."""
    sums, counts = logp.cumsum(1), in_response.long().cumsum(1)
    # cumulative sums since the start token: subtract their value at the start token itself
    base, has_start = start.clamp(min=0), start >= 0
    sums = sums - torch.where(has_start, sums.gather(1, base), torch.zeros_like(sums))
    counts = counts - torch.where(has_start, counts.gather(1, base), torch.zeros_like(counts))
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))


def last_real_index(pad_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask of real tokens -> (B,) index of each row's last real token (any padding side)."""
    mask = pad_mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("a row has no real token")
    T = mask.size(1)
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).max(dim=1).values


def gather_last(values: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    if pad_mask is None:
        return values[:, -1]
    idx = last_real_index(pad_mask.to(values.device))
    return values.gather(1, idx[:, None]).squeeze(1)


def pad_sequences(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids, pad_mask), right-padded with 0. Causal attention never lets a real token see the
    pads after it, so the trunk runs without a mask and the score is gathered at the last real token."""
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids.to(device), mask.to(device)


def sequence_scores(model, seqs: list[list[int]]) -> torch.Tensor:
    """(B,) reward of each token sequence (differentiable; `model` may be DDP-wrapped)."""
    device = next(model.parameters()).device
    ids, mask = pad_sequences(seqs, device)
    return gather_last(model(ids), mask)


@torch.inference_mode()
def score_ids(rm: ScalarModel, seqs: list[list[int]], batch_size: int = 64) -> list[float]:
    """Rewards of rendered sequences, batched by similar length (order kept)."""
    rm.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    for c in range(0, len(order), batch_size):
        idx = order[c : c + batch_size]
        for i, s in zip(idx, sequence_scores(rm, [seqs[i] for i in idx]).tolist()):
            out[i] = s
    return out


def scalar_metadata(model: ScalarModel) -> dict:
    """The weights' header entries that say how to rebuild `model`: its kind, and whether it has
    an LM head (not inferable from the tensors when the head is tied to the embedding)."""
    return {"gptstack_head": model.kind, **({"gptstack_lm_head": "true"} if model.has_lm_head else {})}


def scalar_weights(state_dict: dict) -> dict:
    """A scalar model's state dict as saved: a tied LM head shares the embedding's storage, which
    safetensors refuses, so it is stored once (the GPT constructor ties it again on load)."""
    lm, emb = state_dict.get("trunk.lm_head.weight"), state_dict.get("trunk.tok_emb.weight")
    if lm is not None and emb is not None and lm.data_ptr() == emb.data_ptr():
        return {k: v for k, v in state_dict.items() if k != "trunk.lm_head.weight"}
    return state_dict
