"""torch.distributed plumbing: process group, wrapping (DDP / FSDP2), reductions, teardown.

Works in three situations: one plain process (no process group; collectives are no-ops), N
processes started by ``torchrun`` (env RANK/WORLD_SIZE/LOCAL_RANK), gloo on CPU and NCCL on GPU.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None


def init(backend: str = "auto") -> DistEnv:
    """Join the process group when started by torchrun; pick the device (cuda:LOCAL_RANK)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        return DistEnv(0, 1, 0, device, None)
    chosen = ("nccl" if cuda else "gloo") if backend == "auto" else backend
    if not dist.is_initialized():
        dist.init_process_group(chosen, device_id=device if chosen == "nccl" else None)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, device, chosen)


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks (in place and returned); a no-op for one process."""
    if env.active and env.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(value: float, env: DistEnv) -> float:
    """Maximum of a float over ranks."""
    if not (env.active and env.world > 1):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    """Barrier, then destroy the group (spec training.md §4.5 trap 3: clean teardown)."""
    if env.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, env: DistEnv, strategy: str, *, find_unused: bool = False,
         mixed_bf16: bool = False) -> nn.Module:
    """DDP (default) or FSDP2 ``fully_shard`` (blocks first, then the root)."""
    if not env.active:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=find_unused)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_bf16 else MixedPrecisionPolicy())
        for block in model.gpt.transformer.h:  # type: ignore[union-attr]
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    raise ValueError(f"unknown strategy {strategy!r}: use ddp or fsdp2")


def no_sync(model: nn.Module, strategy: str, enabled: bool) -> AbstractContextManager:
    """Skip gradient synchronisation on non-final micro-steps."""
    if not enabled:
        return nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _FsdpNoSync(model)
    return nullcontext()


class _FsdpNoSync(AbstractContextManager):
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.model.set_requires_gradient_sync(False)  # type: ignore[operator]

    def __exit__(self, *exc: object) -> None:
        self.model.set_requires_gradient_sync(True)  # type: ignore[operator]


def unwrap(model: nn.Module) -> nn.Module:
    """The TrainModel inside a DDP wrapper (FSDP2 modules are not wrapped)."""
    return model.module if hasattr(model, "module") else model
