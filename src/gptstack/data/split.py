"""The one held-out rule: which rows of a file a stage holds out (never trains on).

A row is held out when a hash of its prompt falls below the fraction. The hash, not the row's
position or a seeded shuffle, decides: the split does not depend on the file's order or on any
seed, repeated prompts land on the same side, and every stage that holds rows out of a file (rm,
dpo, prm, the RL stages' verifiable files) splits the same prompts the same way.
"""
from __future__ import annotations

import hashlib
import json


def is_heldout(prompt: str | list[dict], fraction: float) -> bool:
    """Whether a prompt (messages, or the text of one user turn) belongs to the held-out slice:
    sha256 of its messages as sorted-key JSON, its first 8 bytes read as a fraction of 2^64."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    digest = hashlib.sha256(json.dumps(prompt, sort_keys=True).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < fraction
