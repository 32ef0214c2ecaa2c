"""Streaming: on_token sees exactly the tokens each completion ends up with, in order."""
from collections import defaultdict

import torch

from gptstack.engine import generate
from gptstack.model import GPT, GPTConfig


def test_on_token_streams_every_completion_token():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=60, n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    streamed = defaultdict(list)
    prompts = [[1, 2, 3], [4, 5], [6]]
    out = generate(model, prompts, 20, n=2, temperature=1.0, stop_ids=[7, 8, 9], seed=3,
                   on_token=lambda i, j, tok: streamed[i, j].append(tok))
    for i, completions in enumerate(out):
        for j, c in enumerate(completions):
            assert streamed[i, j] == c.tokens
