"""Byte-level BPE: training (bpe.py), encoding and the chat template (tokenizer.py), file formats (formats.py)."""
from .bpe import DIGITS_PATTERN, GPT2_PATTERN, GPT4_PATTERN, PATTERNS
from .tokenizer import (
    ASSISTANT_END,
    ASSISTANT_START,
    BOS,
    DEFAULT_SPECIALS,
    STEP,
    USER_END,
    USER_START,
    Tokenizer,
)

__all__ = [
    "Tokenizer", "DEFAULT_SPECIALS", "BOS", "USER_START", "USER_END", "ASSISTANT_START", "ASSISTANT_END",
    "STEP", "PATTERNS", "GPT2_PATTERN", "GPT4_PATTERN", "DIGITS_PATTERN",
]
