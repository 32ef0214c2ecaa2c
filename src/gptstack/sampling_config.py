"""The `sampling` section of a config: the interactive commands' sampling defaults (kept apart from
config.py so the command-line parser shows them in --help without importing torch)."""
from dataclasses import dataclass, field


@dataclass
class SamplingConfig:
    """The interactive commands' sampling defaults: `gptstack chat`, `gptstack sample` and the chat and
    compare views of `gptstack serve` (their flags and request fields override them). The stages
    keep their own temperatures: theirs is sampling for training and measurement."""

    temperature: float = field(default=0.7, metadata={"range": "[0, 10]", "help": "sampling temperature (0 = greedy)"})
    top_k: int = field(default=0, metadata={"range": "[0, inf)", "help": "sample from the k most likely tokens (0 = off)"})
    top_p: float = field(default=1.0, metadata={"range": "(0, 1]", "help": "nucleus sampling: the smallest set of tokens with this much probability (1 = off)"})
    max_new_tokens: int = field(default=128, metadata={"range": "[1, 4096]", "help": "reply length limit, in tokens"})
    seed: int = field(default=0, metadata={"range": "[0, inf)", "help": "sampling seed (chat adds the turn number)"})
