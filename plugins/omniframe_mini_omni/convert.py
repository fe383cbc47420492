"""Hugging Face Qwen2 -> Mini-Omni (litgpt layout) weight conversion.

Training initialises the LM from Qwen2-0.5B; the parity tests use the same path. The mapping
(spec mini_omni.md §8.2): embed_tokens -> wte rows 0..V-1; q/k/v_proj -> the per-group
interleaved fused ``attn.attn`` (weights and biases); o_proj -> attn.proj; gate/up/down_proj ->
mlp.fc_1/fc_2/proj; input_layernorm -> norm_1; post_attention_layernorm -> norm_2; norm -> ln_f.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from . import tokens
from .config import Config

log = logging.getLogger(__name__)

NewRows = Literal["mean", "zeros", "normal"]

_LAYER_MAP = {
    "self_attn.o_proj.weight": "attn.proj.weight",
    "mlp.gate_proj.weight": "mlp.fc_1.weight",
    "mlp.up_proj.weight": "mlp.fc_2.weight",
    "mlp.down_proj.weight": "mlp.proj.weight",
    "input_layernorm.weight": "norm_1.weight",
    "post_attention_layernorm.weight": "norm_2.weight",
}
_QKV = ("q_proj", "k_proj", "v_proj")


def config_from_hf_qwen2(hf_config: Any, **overrides: Any) -> Config:
    """A Mini-Omni :class:`Config` with the transformer sizes of a ``transformers`` Qwen2Config."""
    head_size = getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )
    fields = {
        "name": overrides.pop("name", "mini-omni"),
        "hf_config": {"name": str(getattr(hf_config, "_name_or_path", "") or "Qwen2"),
                      "org": "Qwen"},
        "n_layer": hf_config.num_hidden_layers,
        "n_embd": hf_config.hidden_size,
        "n_head": hf_config.num_attention_heads,
        "n_query_groups": hf_config.num_key_value_heads,
        "head_size": head_size,
        "intermediate_size": hf_config.intermediate_size,
        "norm_eps": float(hf_config.rms_norm_eps),
        "rope_base": _rope_theta(hf_config),
        "tie_word_embeddings": bool(getattr(hf_config, "tie_word_embeddings", True)),
    }  # fmt: skip
    return Config(**{**fields, **overrides})


def _rope_theta(hf_config: Any) -> int:
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:  # transformers >= 5 keeps it in rope_parameters
        params = getattr(hf_config, "rope_parameters", None) or {}
        theta = params.get("rope_theta", 1_000_000)
    return int(theta)


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, config: Config) -> Tensor:
    """Interleave separate Q (nh*hs, ...), K (G*hs, ...), V (G*hs, ...) rows per K/V group.

    Works for weights (rows, C) and biases (rows,). Output rows: for each group g, its
    q_per_kv query heads, then its key head, then its value head.
    """
    G, q_per_kv, hs = config.n_query_groups, config.q_per_kv, config.head_size
    tail = q.shape[1:]
    q = q.reshape(G, q_per_kv, hs, *tail)
    k = k.reshape(G, 1, hs, *tail)
    v = v.reshape(G, 1, hs, *tail)
    return torch.cat((q, k, v), dim=1).reshape(config.qkv_size, *tail)


def split_qkv(qkv: Tensor, config: Config) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`fuse_qkv`: fused rows -> (Q, K, V) in the HF (contiguous) layout."""
    G, q_per_kv, hs = config.n_query_groups, config.q_per_kv, config.head_size
    tail = qkv.shape[1:]
    grouped = qkv.reshape(G, q_per_kv + 2, hs, *tail)
    q = grouped[:, :q_per_kv].reshape(G * q_per_kv * hs, *tail)
    k = grouped[:, q_per_kv].reshape(G * hs, *tail)
    v = grouped[:, q_per_kv + 1].reshape(G * hs, *tail)
    return q, k, v


def _pad_rows(table: Tensor, rows: int, how: NewRows, generator: torch.Generator | None) -> Tensor:
    """Grow an embedding table (V, C) to ``rows`` rows; new rows per ``how``."""
    extra = rows - table.size(0)
    if extra < 0:
        raise ValueError(f"table has {table.size(0)} rows, more than {rows}")
    if how == "zeros":
        new = table.new_zeros(extra, table.size(1))
    elif how == "mean":
        new = table.float().mean(0, keepdim=True).expand(extra, -1).to(table.dtype)
    elif how == "normal":
        new = torch.randn(extra, table.size(1), generator=generator, dtype=torch.float32)
        new = (new * table.float().std()).to(table.dtype)
    else:
        raise ValueError(f"new_rows must be 'mean', 'zeros' or 'normal', got {how!r}")
    return torch.cat((table, new.to(table.device)), dim=0)


def convert_hf_qwen2_state_dict(
    hf_state_dict: Mapping[str, Tensor],
    config: Config,
    *,
    new_rows: NewRows = "mean",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Map a ``transformers`` Qwen2 (``Qwen2ForCausalLM`` or ``Qwen2Model``) state dict to ours.

    The embedding grows from the Qwen vocabulary (151,936 rows for Qwen2) to
    ``config.padded_vocab_size``: the new rows (text specials and the 7 audio layers) are
    initialised per ``new_rows`` ("mean" of the existing rows, "zeros", or "normal" with the
    table's std, drawn from ``generator``).

    Returns:
        Our state dict for the LM part. ``lm_head.weight`` is the same tensor as
        ``transformer.wte.weight`` when the config ties them. The Whisper (and vision) adapter
        keys are absent: load with ``strict=False`` and initialise those separately.

    Raises:
        ValueError naming unknown keys or shapes that do not match ``config``.
    """
    sd = {k.removeprefix("model."): v for k, v in hf_state_dict.items()}
    out: dict[str, Tensor] = {}
    pending: dict[int, dict[str, Tensor]] = {}
    unknown = []
    hf_head = sd.pop("lm_head.weight", None)
    for key, value in sd.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # non-persistent buffer in older transformers
        if key == "embed_tokens.weight":
            if value.size(0) > tokens.TEXT_VOCAB_SIZE:
                raise ValueError(
                    f"embed_tokens has {value.size(0)} rows: more than the "
                    f"{tokens.TEXT_VOCAB_SIZE} text rows of the Mini-Omni layout"
                )
            out["transformer.wte.weight"] = _pad_rows(
                value, config.padded_vocab_size, new_rows, generator
            )
            continue
        if key == "norm.weight":
            out["transformer.ln_f.weight"] = value
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if m is None:
            unknown.append(key)
            continue
        layer, rest = int(m.group(1)), m.group(2)
        if rest in _LAYER_MAP:
            out[f"transformer.h.{layer}.{_LAYER_MAP[rest]}"] = value
            continue
        m2 = re.fullmatch(r"self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)", rest)
        if m2 is None:
            unknown.append(key)
            continue
        pending.setdefault(layer, {})[f"{m2.group(1)}.{m2.group(2)}"] = value
    if unknown:
        raise ValueError(f"unknown Qwen2 keys (not converted): {', '.join(sorted(unknown)[:10])}")

    for layer, parts in sorted(pending.items()):
        for kind in ("weight", "bias"):
            got = [parts.get(f"{name}.{kind}") for name in _QKV]
            if all(t is None for t in got):
                continue
            if any(t is None for t in got):
                raise ValueError(f"layer {layer}: q/k/v_proj.{kind} incomplete")
            q, k, v = got
            assert q is not None and k is not None and v is not None
            want_q = config.n_head * config.head_size
            want_kv = config.n_query_groups * config.head_size
            if q.size(0) != want_q or k.size(0) != want_kv or v.size(0) != want_kv:
                raise ValueError(
                    f"layer {layer}: q/k/v rows {q.size(0)}/{k.size(0)}/{v.size(0)} do not match "
                    f"n_head*head_size={want_q}, n_query_groups*head_size={want_kv}"
                )
            out[f"transformer.h.{layer}.attn.attn.{kind}"] = fuse_qkv(q, k, v, config)

    if config.tie_word_embeddings:
        wte = out.get("transformer.wte.weight")
        if wte is not None:
            if hf_head is not None and not torch.equal(hf_head, sd["embed_tokens.weight"]):
                log.warning("the Qwen2 lm_head differs from embed_tokens; the tied head uses wte")
            out["lm_head.weight"] = wte
    elif hf_head is not None:
        out["lm_head.weight"] = _pad_rows(hf_head, config.padded_vocab_size, new_rows, generator)
    return out
