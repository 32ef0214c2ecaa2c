"""Rollouts for RL: prompts → sampled responses → padded tensors that training reads back.

    batch = rollout(policy, prompts, n=4, max_new_tokens=64, temperature=1.0, stop_ids=[end], seed=s)
    logp, entropy = token_logprobs(policy, batch, temperature=1.0)   # (B, R): recomputed, with grad
    values = token_values(critic, batch)                             # (B, R)
    scores = critic_or_rm.score(batch.ids, pad_mask=batch.pad_mask)  # read at each row's last token

The layout (TRL's): prompts *left*-padded to a common length P, responses *right*-padded to R, so
response token k of every row sits at column P + k of `ids` and is predicted by the logits at
P + k - 1: one slice, no per-row gathering. `pad_mask` marks real tokens (the model gives each row
its own positions, so padding changes nothing); `mask` (B, R) marks real response tokens. A
response that stopped on <|assistant_end|> keeps it as its last token (the reward model reads its
score there); `finished` says which did.

Temperature: the engine samples from softmax(logits / T) and `token_logprobs` recomputes exactly
that distribution, so the importance ratios of the first PPO epoch are 1 (up to float rounding).
The sampler's own logprobs of the drawn tokens come back as `Batch.logprobs` (top-k/top-p off:
of the unfiltered distribution): PPO takes them as the old logprobs instead of a second forward.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sampling import check_prompts, generate


@dataclass
class Batch:
    ids: torch.Tensor          # (B, P + R) prompt (left-padded) + response (right-padded)
    pad_mask: torch.Tensor     # (B, P + R) bool, True on real tokens
    mask: torch.Tensor         # (B, R) float 0/1, real response tokens
    prompt_len: int            # P
    prompt_index: list[int]    # row -> index into the prompt list it was sampled for
    responses: list[list[int]]  # row -> its response tokens (end token included when finished)
    finished: torch.Tensor     # (B,) bool: stopped on a stop id (not on the length limit)
    logprobs: torch.Tensor | None = None  # (B, R) the sampler's log π(token) at T (pads 0), when known

    def __len__(self) -> int:
        return self.ids.size(0)

    @property
    def response_len(self) -> int:
        return self.mask.size(1)

    def select(self, rows: torch.Tensor | Sequence[int]) -> "Batch":
        """A sub-batch of rows (a PPO minibatch), same layout."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        lst = rows.tolist()
        return Batch(self.ids[rows], self.pad_mask[rows], self.mask[rows], self.prompt_len,
                     [self.prompt_index[i] for i in lst], [self.responses[i] for i in lst], self.finished[rows],
                     None if self.logprobs is None else self.logprobs[rows])

    def to(self, device) -> "Batch":
        return Batch(self.ids.to(device), self.pad_mask.to(device), self.mask.to(device), self.prompt_len,
                     self.prompt_index, self.responses, self.finished.to(device),
                     None if self.logprobs is None else self.logprobs.to(device))


def make_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], prompt_index: Sequence[int],
               finished: Sequence[bool], pad_id: int = 0, logprobs: Sequence[Sequence[float]] | None = None) -> Batch:
    """Rows of (prompt, response) token lists -> the padded layout above. Every response needs >= 1 token.
    `logprobs`: per row, the sampler's logprob of each response token (kept as Batch.logprobs)."""
    if any(len(r) == 0 for r in responses):
        raise ValueError("every response needs at least one token")
    B = len(responses)
    P = max(len(p) for p in prompts)
    R = max(len(r) for r in responses)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    pad_mask = torch.zeros(B, P + R, dtype=torch.bool)
    mask = torch.zeros(B, R)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, P - len(p) : P] = torch.as_tensor(list(p), dtype=torch.long)
        ids[b, P : P + len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        pad_mask[b, P - len(p) : P + len(r)] = True
        mask[b, : len(r)] = 1.0
    lp = None
    if logprobs is not None:
        lp = torch.zeros(B, R)
        for b, row in enumerate(logprobs):
            lp[b, : len(row)] = torch.as_tensor(list(row), dtype=torch.float32)
    return Batch(ids, pad_mask, mask, P, list(prompt_index), [list(r) for r in responses],
                 torch.as_tensor(list(finished), dtype=torch.bool), lp)


def rollout(policy, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int, *, temperature: float = 1.0,
            stop_ids: Sequence[int] = (), seed: int = 0, top_k: int | None = None, top_p: float | None = None,
            batch_size: int | None = None, truncate: bool = False) -> Batch:
    """n samples of each prompt with the engine (rows grouped by prompt: row i*n + j is sample j of
    prompt i, as GRPO's group advantages expect). Sampling is deterministic given `seed`."""
    # the prompts as the engine will see them (left-truncated when `truncate`), for the layout
    prompts = check_prompts(policy, prompts, max_new_tokens, n, temperature, top_k, top_p, truncate)
    completions = generate(policy, prompts, max_new_tokens, n=n, temperature=temperature, top_k=top_k,
                           top_p=top_p, stop_ids=stop_ids, seed=seed, batch_size=batch_size, truncate=truncate)
    rows = [(i, c) for i, group in enumerate(completions) for c in group]
    return make_batch([prompts[i] for i, _ in rows], [c.tokens for _, c in rows], [i for i, _ in rows],
                      [c.finished for _, c in rows], logprobs=[c.logprobs for _, c in rows])


def _response_hidden(model_fn, batch: Batch) -> torch.Tensor:
    # the last token's output predicts nothing we train on: drop it from the forward; of the
    # P + R - 1 positions left, the last R (from the last prompt token on) predict the response
    return model_fn(batch.ids[:, :-1], pad_mask=batch.pad_mask[:, :-1], logits_to_keep=batch.response_len)


def token_logprobs(model, batch: Batch, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, R) log π(response token k | prefix) at `temperature` (float32), and optionally the
    entropy of each of those distributions (a figure to log: no gradient). Pads come out 0. The
    logprobs are differentiable (call under no_grad for reference logprobs)."""
    logits = _response_hidden(model, batch).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    targets = batch.ids[:, batch.prompt_len : batch.prompt_len + batch.response_len]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * batch.mask
    entropy = None
    if with_entropy:
        with torch.no_grad():   # a logged figure: no loss term reads it, so no graph for it
            entropy = -(logp_all.exp() * logp_all).sum(-1) * batch.mask
    return logp, entropy


def token_values(critic, batch: Batch) -> torch.Tensor:
    """(B, R) the critic's value of the state before each response token (pads 0)."""
    return _response_hidden(critic, batch) * batch.mask
