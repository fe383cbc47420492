"""Mini-Omni for omniframe: model, token layout, decode loops and checkpoint I/O (torch level).

Imports are lazy: ``import omniframe_mini_omni`` does not import torch; the names below load
their submodule on first use (``tokens`` and ``config`` are torch-free).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    # config
    "Config": "config",
    "ConfigError": "config",
    "PRESETS": "config",
    # tokens
    "Task": "tokens",
    # model
    "GPT": "model",
    "KVCache": "model",
    # generation
    "SamplingOptions": "generate",
    "DecodeStep": "generate",
    "GenerationResult": "generate",
    "GenerationStream": "generate",
    "stream_generate": "generate",
    "generate": "generate",
    "sample": "generate",
    # checkpoints
    "MiniOmni": "checkpoint",
    "CheckpointError": "checkpoint",
    "load_mini_omni": "checkpoint",
    "save_checkpoint": "checkpoint",
    "download_mini_omni": "checkpoint",
    # tokenizer
    "TextTokenizer": "tokenizer",
    "IncrementalDecoder": "tokenizer",
    # conversion
    "convert_hf_qwen2_state_dict": "convert",
    "config_from_hf_qwen2": "convert",
}

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "DecodeStep",
    "GPT",
    "GenerationResult",
    "GenerationStream",
    "IncrementalDecoder",
    "KVCache",
    "MiniOmni",
    "PRESETS",
    "SamplingOptions",
    "Task",
    "TextTokenizer",
    "config_from_hf_qwen2",
    "convert_hf_qwen2_state_dict",
    "download_mini_omni",
    "generate",
    "load_mini_omni",
    "sample",
    "save_checkpoint",
    "stream_generate",
]

if TYPE_CHECKING:
    from .checkpoint import (
        CheckpointError,
        MiniOmni,
        download_mini_omni,
        load_mini_omni,
        save_checkpoint,
    )
    from .config import PRESETS, Config, ConfigError
    from .convert import config_from_hf_qwen2, convert_hf_qwen2_state_dict
    from .generate import (
        DecodeStep,
        GenerationResult,
        GenerationStream,
        SamplingOptions,
        generate,
        sample,
        stream_generate,
    )
    from .model import GPT, KVCache
    from .tokenizer import IncrementalDecoder, TextTokenizer
    from .tokens import Task


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
