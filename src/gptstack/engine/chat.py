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

import bisect
from collections.abc import Callable, Sequence

from ..common import UserError
from .sampling import generate


def fit_history(tok, messages: Sequence[dict], max_new_tokens: int, block_size: int, stage: str = "") -> list[dict]:
    """The conversation to prompt with: the system message (if any) and the latest turns that
    fit the context with room for the reply (the oldest user/assistant pairs are dropped).
    UserError, naming the sizes, when the system message and the last user turn alone do not fit."""
    messages = list(messages)
    if len(tok.render_prompt(messages)) + max_new_tokens <= block_size:  # also checks the roles
        return messages
    head = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(head):]  # user, assistant, ..., user

    def fits(pairs_dropped: int) -> bool:
        return len(tok.render_prompt(head + turns[2 * pairs_dropped:])) + max_new_tokens <= block_size

    # the fewest pairs to drop, searched (dropping a pair never lengthens the prompt): a long chat
    # is rendered a few times, not once per pair
    pairs = len(turns) // 2
    dropped = bisect.bisect_left(range(pairs + 1), True, key=fits)
    history = head + turns[2 * min(dropped, pairs):]
    n = len(tok.render_prompt(history))
    if n >= block_size:
        what = "the system message and the last user message take" if head else "the last user message takes"
        raise UserError(f"message too long{f' for stage {stage!r}' if stage else ''}: {what} {n} tokens, and the "
                        f"model's context is {block_size} tokens for prompt and reply together (earlier turns are "
                        f"dropped to fit, {'these two' if head else 'the last message'} never): shorten "
                        f"{'them' if head else 'it'}")
    return history


class _Stopped(Exception):
    pass


def stream_reply(model, tok, history: Sequence[dict], *, max_new_tokens: int, temperature: float,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 on_text: Callable[[str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> tuple[str, bool]:
    """Sample the assistant's reply to `history` (ending with a user turn).

    Returns (reply text, finished): finished is True when the model ended its turn with
    <|assistant_end|> or another of `tok.turn_end_ids` (False: cut at max_new_tokens or the context, or stopped). on_text gets
    the reply in pieces as it is sampled; the pieces concatenate to the returned text."""
    ends = tok.turn_end_ids
    prompt = tok.render_prompt(history)
    tokens: list[int] = []
    shown = ""

    def on_token(_prompt_index: int, _sample_index: int, token: int) -> None:
        nonlocal shown
        if should_stop is not None and should_stop():
            raise _Stopped
        if token in ends:
            return
        tokens.append(token)
        text = tok.decode(tokens)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            if on_text is not None and len(text) > len(shown):
                on_text(text[len(shown):])
            shown = text

    try:
        (completion,), = generate(model, [prompt], max_new_tokens, temperature=temperature, top_k=top_k or None,
                                  top_p=top_p if top_p and top_p < 1 else None, stop_ids=ends, seed=seed,
                                  on_token=on_token)
        finished = completion.finished
    except _Stopped:
        finished = False
    reply = tok.decode(tokens)
    if on_text is not None and len(reply) > len(shown):
        on_text(reply[len(shown):])  # a trailing partial character, as U+FFFD
    return reply, finished
