"""Generation: the batched KV-cache sampling engine every stage uses (eval, chat, best-of-N, RL)."""
from .sampling import Completion, generate, sample_tokens, stream_seed, stream_uniforms

__all__ = ["Completion", "generate", "sample_tokens", "stream_seed", "stream_uniforms"]
