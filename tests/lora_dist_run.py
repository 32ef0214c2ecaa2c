"""A LoRA Session under torchrun, for tests/test_lora.py: DDP or FSDP2 (argv[2] = "fsdp"), a few
steps on a fixed global batch split over the ranks, then the merged weights (Session.finish) and a checkpoint in
argv[1]. The stages evaluate on rank 0 alone, which a sharded model cannot (sft/dpo under FSDP fail
there with or without LoRA), so this drives the training core directly.

    torchrun --nproc_per_node=2 tests/lora_dist_run.py OUT fsdp|ddp
"""
import sys
from pathlib import Path

import torch

from gptstack.config import Config, SFTConfig
from gptstack.model.gpt import GPT, GPTConfig
from gptstack.train.dist import cleanup, init_distributed
from gptstack.train.loop import Session

out, mode = Path(sys.argv[1]), sys.argv[2]
info = init_distributed("cpu")
torch.manual_seed(0)   # the same base weights and adapters on every rank
model = GPT(GPTConfig(vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32, init_std=0.2))
tc = SFTConfig(max_steps=4, lr=3e-2, warmup_steps=0, schedule="constant", lora_rank=4, lora_alpha=8,
               checkpoint_every=0, log_every=1, fsdp=mode == "fsdp")
session = Session.start(tc, "sft", model, out / "sft", info, Config().to_dict())
rows = 8 // info.world   # one global batch of 8, each rank its slice: 1, 2 processes train alike
x = torch.randint(0, 61, (8, 24), generator=torch.Generator().manual_seed(0))[info.rank * rows : (info.rank + 1) * rows]
y = (x + 1) % 61
session.run_steps(lambda step, micro: session.step_model(x, y))
session.finish({})
cleanup(info)
