"""The eval protocol's settings (a config section; kept apart so configs load without the engine)."""
from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    k: int = field(default=4, metadata={"range": "[1, inf)", "help": "samples per prompt at temperature 1 (gold reward, pass@k, KL)"})
    max_new_tokens: int = field(default=96, metadata={"range": "[1, inf)", "help": "response length limit"})
    few_shot: int = field(default=3, metadata={"range": "[0, inf)", "help": "worked examples in the base model's prompt"})
    seed: int = field(default=0, metadata={"range": "[0, inf)", "help": "seed of the sampled responses (fixed across stages)"})
    batch_size: int = field(default=128, metadata={"range": "[1, inf)", "help": "prompts per generation batch"})
    limit: int = field(default=0, metadata={"range": "[0, inf)", "help": "evaluate only the first N eval prompts (0 = all; for smoke tests only)"})
