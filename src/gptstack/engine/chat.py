"""One chat turn, streamed as text: the path `gptstack chat` and `gptstack serve` share.

    history = fit_history(tok, messages, max_new_tokens, model.config.block_size)
    reply, finished = stream_reply(model, tok, history, max_new_tokens=128, temperature=0.7,
                                   on_text=lambda piece: print(piece, end=""))

`stream_reply` samples with the engine (`generate(..., on_token=...)`) and turns the tokens into
text pieces as they come: a piece is emitted once the decoded text no longer ends in a partial
UTF-8 character, so the pieces always add up to exactly the final reply. `should_stop()` (checked
at every token) ends the turn early, e.g. when a browser closes its stream.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from ..common import UserError
from ..tokenizer import ASSISTANT_END
from .sampling import generate


def fit_history(tok, messages: Sequence[dict], max_new_tokens: int, block_size: int) -> list[dict]:
    """The conversation to prompt with: the oldest user/assistant turn pairs are dropped
    (left-truncation) until the prompt and the reply fit the context. UserError when even the
    last message alone is too long."""
    history = list(messages)
    while len(tok.render_prompt(history)) + max_new_tokens > block_size and len(history) > 1:
        history = history[2:]
    n = len(tok.render_prompt(history))
    if n >= block_size:
        raise UserError(f"message too long: {n} tokens, the model's context is {block_size}")
    return history


class _Stopped(Exception):
    pass


def stream_reply(model, tok, history: Sequence[dict], *, max_new_tokens: int, temperature: float,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 on_text: Callable[[str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> tuple[str, bool]:
    """Sample the assistant's reply to `history` (ending with a user turn).

    Returns (reply text, finished): finished is True when the model ended its turn with
    <|assistant_end|> (False: cut at max_new_tokens or the context, or stopped). on_text gets
    the reply in pieces as it is sampled; the pieces concatenate to the returned text."""
    end = tok.special(ASSISTANT_END)
    prompt = tok.render_prompt(history)
    tokens: list[int] = []
    shown = ""

    def on_token(_prompt_index: int, _sample_index: int, token: int) -> None:
        nonlocal shown
        if should_stop is not None and should_stop():
            raise _Stopped
        if token == end:
            return
        tokens.append(token)
        text = tok.decode(tokens)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            if on_text is not None and len(text) > len(shown):
                on_text(text[len(shown):])
            shown = text

    try:
        (completion,), = generate(model, [prompt], max_new_tokens, temperature=temperature, top_k=top_k or None,
                                  top_p=top_p if top_p and top_p < 1 else None, stop_ids=[end], seed=seed,
                                  on_token=on_token)
        finished = completion.finished
    except _Stopped:
        finished = False
    reply = tok.decode(tokens)
    if on_text is not None and len(reply) > len(shown):
        on_text(reply[len(shown):])  # a trailing partial character, as U+FFFD
    return reply, finished
