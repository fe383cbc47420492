"""Which parameters train, their optimizer groups, row gradient masks and the LR schedule.

Stage 1 trains the adapter and (optionally) the *audio rows* of the tied embedding/head: the
text rows' gradient is zeroed after every backward, and the table sits in a weight-decay-free
group, because AdamW's decoupled decay would otherwise still move the masked rows (spec
training.md §3.2, verified there). Frozen parameters never enter the optimizer (§6.9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omniframe_mini_omni import tokens as T
from torch import nn

from .recipe import OptimSpec, TrainableSpec

WTE = "transformer.wte.weight"


@dataclass
class RowMask:
    """Keep the gradient of rows [lo, hi) of ``param``; zero all others."""

    name: str
    param: nn.Parameter
    lo: int
    hi: int

    def apply(self) -> None:
        g = self.param.grad
        if g is None:
            return
        apply_row_mask(g, self.lo, self.hi)


def bind_row_masks(model: nn.Module, masks: list[RowMask]) -> list[RowMask]:
    """Re-point the masks at the parameters of the *wrapped* model: FSDP2's ``fully_shard``
    replaces parameters by DTensor ones, so masks made before wrapping would hold stale
    tensors. The tied table is found by name suffix (``wte`` or ``lm_head``)."""
    if not masks:
        return []
    table = None
    for name, p in model.named_parameters():
        if name.endswith(WTE) or name.endswith("lm_head.weight"):
            table = p
            break
    if table is None:
        raise RuntimeError("the embedding table is not among the model's parameters")
    return [RowMask(m.name, table, m.lo, m.hi) for m in masks]


def apply_row_mask(grad: torch.Tensor, lo: int, hi: int) -> None:
    """Zero rows outside [lo, hi) of a gradient; handles FSDP2 DTensors sharded on dim 0."""
    local = grad
    offset = 0
    if hasattr(grad, "to_local") and hasattr(grad, "device_mesh"):  # DTensor (FSDP2 Shard(0))
        local = grad.to_local()
        mesh = grad.device_mesh
        rank = mesh.get_local_rank() if mesh.ndim == 1 else mesh.get_local_rank(0)
        world = mesh.size()
        rows = grad.shape[0]
        offset = min(rank * math.ceil(rows / world), rows)
    n = local.shape[0]
    a, b = max(lo - offset, 0), min(hi - offset, n)
    with torch.no_grad():
        if a >= b:
            local.zero_()
        else:
            local[:a].zero_()
            local[b:].zero_()


def select_trainable(gpt: nn.Module, spec: TrainableSpec) -> tuple[list[str], list[RowMask]]:
    """Set ``requires_grad`` per the recipe; return the trainable names and the row masks."""
    for p in gpt.parameters():
        p.requires_grad_(False)
    names: list[str] = []
    masks: list[RowMask] = []
    wte = gpt.transformer.wte.weight  # type: ignore[union-attr]
    for name, p in gpt.named_parameters():  # a tied table appears once, maybe as lm_head
        if p is wte:
            name = WTE
        train = False
        if name.startswith("whisper_adapter."):
            train = spec.adapter
        elif name == WTE:
            train = spec.embedding != "none"
            if spec.embedding == "audio":
                masks.append(RowMask(name, p, T.TEXT_VOCAB_SIZE, p.shape[0]))
            elif spec.embedding == "audio+specials":
                masks.append(RowMask(name, p, T.TEXT_TOKENIZER_SIZE, p.shape[0]))
            elif spec.embedding == "text":
                masks.append(RowMask(name, p, 0, T.TEXT_VOCAB_SIZE))
        elif name.startswith("transformer.h.") or name.startswith("transformer.ln_f."):
            train = spec.blocks
        elif name.startswith("vision_adapter."):
            train = False
        if train:
            p.requires_grad_(True)
            names.append(name)
    return names, masks


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on 2-D weights except the embedding; none on embeddings, norms,
    biases. Names are matched by suffix so that DDP/FSDP wrapper prefixes do not matter."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or name.endswith(WTE) or name.endswith("lm_head.weight"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(model: nn.Module, spec: OptimSpec, impl: str = "for",
                   device: torch.device | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable groups. ``impl``: ``fused``, ``foreach``, ``for`` or ``auto``
    (fused on CUDA, foreach elsewhere); all compute the same update."""
    groups = param_groups(model, spec.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters: check the recipe's trainable section")
    if impl == "auto":
        impl = "fused" if device is not None and device.type == "cuda" else "foreach"
    kw: dict = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, **kw)


def lr_at(step: int, spec: OptimSpec, total_steps: int) -> float:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine down to ``min_lr`` at
    ``total_steps`` (litgpt ``get_lr``; the paper's min/max pairs map to min_lr/lr)."""
    if spec.warmup_steps > 0 and step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    span = max(1, total_steps - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    return spec.min_lr + 0.5 * (spec.lr - spec.min_lr) * (1 + math.cos(math.pi * progress))
