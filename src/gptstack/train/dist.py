"""Distributed setup: the same command runs alone or under `torchrun --nproc_per_node=N`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; then a process group is created (NCCL on CUDA,
gloo on CPU) and the model is wrapped in DDP, or sharded with FSDP2 (`fully_shard`) when asked.
Only rank 0 prints, logs and writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str | None = None) -> DistInfo:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return DistInfo(device=device)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank, local_rank, world, device)


def wrap_model(model: torch.nn.Module, info: DistInfo, fsdp: bool = False) -> torch.nn.Module:
    """DDP, or FSDP2 with each transformer block sharded on its own (then the root)."""
    if not info.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # shard each transformer block of every GPT inside (a policy, a scalar head's trunk, a critic)
        from ..model.gpt import Block
        for block in [m for m in model.modules() if isinstance(m, Block)]:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[info.local_rank] if info.device.startswith("cuda") else None)


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return (t / info.world).item()


def print0(*args, info: DistInfo | None = None, **kwargs) -> None:
    if info is None or info.is_main:
        print(*args, **kwargs)


# `gptstack run` runs stage after stage in one process: it keeps one process group for all of them
# (gloo cannot always set up a new one right after destroying the last), so a stage's cleanup
# leaves it alone and the pipeline destroys it at the end
_keep_group = False


def keep_process_group(keep: bool) -> None:
    global _keep_group
    _keep_group = keep


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized() and not _keep_group:
        dist.destroy_process_group()
