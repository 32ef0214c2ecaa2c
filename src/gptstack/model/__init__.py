"""The model: a Llama-style GPT (gpt.py), its inference forward (inference.py), value/reward heads, HF import/export (hf.py)."""
from .gpt import GPT, PRESETS, GPTConfig, KVCache, sample_next

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS", "sample_next"]
