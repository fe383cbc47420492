"""Sharded training checkpoints with torch.distributed.checkpoint (DCP) and exact resume.

``<out_dir>/checkpoints/step-00000100/`` holds the DCP shards of the model and optimizer state
(``get_state_dict``: reshardable between world sizes and between DDP/FSDP2) and
``state.json`` (step, epoch, batch index within the epoch, world size), written last by rank 0:
a folder without ``state.json`` is incomplete and ignored. The data plan is a pure function of
(seed, epoch) and the LR a pure function of the step, so this is everything resume needs.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from .dist import DistEnv, barrier


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (one with state.json)."""
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def save(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         state: dict[str, Any], env: DistEnv, keep: int = 2) -> Path:
    """Save shards of model + optimizer, then state.json; prune to the newest ``keep``."""
    path = step_dir(root, step)
    msd, osd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # one process without a process group: expected
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    barrier(env)
    if env.is_main:
        (path / "state.json").write_text(json.dumps({**state, "step": step,
                                                     "world": env.world}, indent=1))
        if keep > 0:
            done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return path


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model + optimizer from a DCP folder (any world size); return its state.json."""
    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return json.loads((path / "state.json").read_text())


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU, for export; keys without wrapper prefixes."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                              cpu_offload=True))
    return {k.removeprefix("gpt."): v for k, v in sd.items()}
