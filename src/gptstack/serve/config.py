"""The `serve` section of a config: what the Label view samples and how (kept apart from the app
so configs load without FastAPI)."""
from dataclasses import dataclass, field


@dataclass
class ServeConfig:
    stage: str = field(default="sft", metadata={"help": "the stage whose model samples the responses people rank"})
    prompts: str = field(default="world", metadata={
        "help": "prompts to label: world (training prompts of the task world, never eval items) or a data file "
                "(any format with prompts: TRL prompt-only, chat, preference, ...)"})
    num_prompts: int = field(default=1000, metadata={"help": "world prompts in the label set"})
    k: int = field(default=4, metadata={"help": "responses sampled per prompt (identical or empty ones are dropped)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the label responses"})
    top_k: int = field(default=0, metadata={"help": "top-k of the label responses (0 = off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of the label responses (1 = off)"})
    max_new_tokens: int = field(default=96, metadata={"help": "response length limit of the label responses"})
    batch: int = field(default=8, metadata={"help": "prompts sampled together when an annotator needs more"})
    seed: int = field(default=0, metadata={"help": "seed of the world prompt set and of the sampled responses"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = all cores)"})
    max_body_bytes: int = field(default=256 * 1024, metadata={
        "help": "largest request body served, in bytes: a bigger one gets 413 before it is read (a chat "
                "longer than any model's context only costs time)"})
