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
score there); `finished` says which did. The training forwards (`token_logprobs`, `token_values`)
do not run over that layout: each row's prompt + response is packed with the others into rows of
up to block_size tokens (`pack`, GPT `segments`), only the response-predicting positions reach
the heads, and the results come back in the (B, R) layout: the same numbers without computing
the padding (about a third of a world batch's positions; timings in bench/RESULTS.md).

Temperature: the engine samples from softmax(logits / T) and `token_logprobs` recomputes exactly
that distribution, so the importance ratios of the first PPO epoch are 1 (up to float rounding).
The sampler's own logprobs of the drawn tokens come back as `Batch.logprobs` (top-k/top-p off:
of the unfiltered distribution): PPO takes them as the old logprobs instead of a second forward.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..data.packing import attention_pair_cost, cheapest_packing
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
    _packings: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return self.ids.size(0)

    def packing(self, config) -> "Packing":
        """The rows packed for a training forward of a model with this GPTConfig (`pack`), built
        once per batch and shape (policy, reference and critic read the same one)."""
        key = (config.block_size, config.n_embd)
        if key not in self._packings:
            self._packings[key] = pack(self, config.block_size, attention_pair_cost(config.n_embd))
        return self._packings[key]

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


@dataclass
class Packing:
    """A batch's rows packed for a training forward: each row's prompt + response (its last token
    dropped: its output predicts nothing trained on) is one sequence, and the sequences are packed
    first-fit-decreasing into rows, with GPT `segments`, so every sequence gets the outputs it
    would get alone and the left/right padding of the (B, P + R) layout (a third of its positions
    on world prompts) is not computed. The row length is the cheapest by `cheapest_packing`'s
    cost model (`attention_pair_cost`): one prompt's equal-length samples stay one to a row."""
    ids: torch.Tensor       # (N, L) packed sequences
    segments: torch.Tensor  # (N, L) sequence number within the row (the tail padding a run of its own)
    keep: torch.Tensor      # (N, K) positions whose outputs predict a response token (0-padded)
    targets: torch.Tensor   # (N, K) the response token each of them predicts (0-padded)
    index: torch.Tensor     # (B, R) where response token k of batch row b sits in keep.flatten()

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K) per kept position -> (B, R) in the batch's response layout (pads: garbage, mask them)."""
        return x.flatten(0, 1)[self.index]


def pack(batch: Batch, max_capacity: int, pair_cost: float) -> Packing:
    """`Packing` of `batch` into rows of at most `max_capacity` tokens (a longer sequence gets a
    row of its own), at the row length `cheapest_packing` picks for this pair cost."""
    P, R = batch.prompt_len, batch.response_len
    prompt_lens = batch.pad_mask[:, :P].sum(1).tolist()
    response_lens = batch.mask.sum(1).long().tolist()
    ids = batch.ids.cpu()
    seqs = [ids[b, P - p : P + r - 1] for b, (p, r) in enumerate(zip(prompt_lens, response_lens))]
    bins = cheapest_packing([len(s) for s in seqs], max_capacity, pair_cost)
    L = max(sum(len(seqs[b]) for b in rows) for rows in bins)
    K = max(sum(response_lens[b] for b in rows) for rows in bins)
    packed = torch.zeros(len(bins), L, dtype=torch.long)
    segments = torch.zeros(len(bins), L, dtype=torch.long)
    keep = torch.zeros(len(bins), K, dtype=torch.long)
    targets = torch.zeros(len(bins), K, dtype=torch.long)
    index = torch.zeros(len(batch), R, dtype=torch.long)
    for n, rows in enumerate(bins):
        at = kept = 0
        for j, b in enumerate(rows):
            p, r, s = prompt_lens[b], response_lens[b], seqs[b]
            packed[n, at : at + len(s)] = s
            segments[n, at : at + len(s)] = j
            # response token k is predicted by the output at the sequence's position p - 1 + k
            keep[n, kept : kept + r] = torch.arange(at + p - 1, at + p - 1 + r)
            targets[n, kept : kept + r] = ids[b, P : P + r]
            index[b, :r] = torch.arange(n * K + kept, n * K + kept + r)
            at, kept = at + len(s), kept + r
        segments[n, at:] = len(rows)
    device = batch.ids.device
    return Packing(packed.to(device), segments.to(device), keep.to(device), targets.to(device), index.to(device))


def model_config(model):
    """The GPTConfig of a model, also through wrappers that hide it (DDP keeps the model as .module)."""
    while not hasattr(model, "config"):
        model = model.module
    return model.config


def token_logprobs(model, batch: Batch, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, R) log π(response token k | prefix) at `temperature` (float32), and optionally the
    entropy of each of those distributions (a figure to log: no gradient). Pads come out 0. The
    logprobs are differentiable (call under no_grad for reference logprobs). Computed over the
    batch's packing: only the response-predicting positions reach the LM head."""
    packing = batch.packing(model_config(model))
    logits = model(packing.ids, segments=packing.segments, logits_to_keep=packing.keep).float()  # (N, K, V)
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = packing.unpack(logp_all.gather(-1, packing.targets.unsqueeze(-1)).squeeze(-1)) * batch.mask
    entropy = None
    if with_entropy:
        with torch.no_grad():   # a logged figure: no loss term reads it, so no graph for it
            entropy = packing.unpack(-(logp_all.exp() * logp_all).sum(-1)) * batch.mask
    return logp, entropy


def token_values(critic, batch: Batch) -> torch.Tensor:
    """(B, R) the critic's value of the state before each response token (pads 0)."""
    packing = batch.packing(model_config(critic))
    return packing.unpack(critic(packing.ids, segments=packing.segments, logits_to_keep=packing.keep)) * batch.mask


def summed_logprobs(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                    temperature: float = 1.0) -> torch.Tensor:
    """(B,) sum over each response's tokens of log p(token | prompt, earlier tokens) at temperature
    T: `token_logprobs` over the pairs' packing, so DPO's loss, the eval protocol's KL and the
    RM's likelihood baseline read the numbers RL trains on. Differentiable; an empty response sums to 0."""
    device = next(model.parameters()).device
    rows = [i for i, r in enumerate(responses) if len(r)]
    out = torch.zeros(len(responses), device=device)
    if rows:
        batch = make_batch([prompts[i] for i in rows], [responses[i] for i in rows], rows, [True] * len(rows))
        out = out.index_put((torch.tensor(rows, device=device),),
                            token_logprobs(model, batch.to(device), temperature)[0].sum(1))
    return out


@torch.inference_mode()
def sequence_logprobs(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      temperature: float = 1.0, batch_size: int = 32, desc: str | None = None) -> list[float]:
    """`summed_logprobs` without gradients, `batch_size` sequences at a time (`desc`: a progress bar)."""
    out: list[float] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, unit="batch",
                  dynamic_ncols=True, mininterval=1.0):
        out += summed_logprobs(model, prompts[i : i + batch_size], responses[i : i + batch_size], temperature).tolist()
    return out
