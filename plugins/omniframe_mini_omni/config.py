"""Mini-Omni model configuration: the fields of the official ``model_config.yaml`` plus presets.

``Config`` keeps only what shapes or numerics depend on. ``Config.from_file`` reads the full
official litgpt-style YAML: fields that are fixed for this architecture are checked (a value we do
not implement is an error that says so), fields that are unused at inference are ignored, and
``to_dict``/``to_yaml`` write the official field set back so that the reference loader and ours
both read what we save.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import tokens

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A model_config.yaml or preset that this implementation cannot run."""


# Fields of the official model_config.yaml that must have exactly this value, because the model
# below hard-codes the corresponding behaviour (litgpt class choices, residual layout, ...).
MAX_BLOCK_SIZE = 1 << 16
"""Largest ``block_size`` accepted (the release has 2048): RoPE tables are built for every
position, so a broken config with 10**12 would exhaust memory instead of failing."""

_FIXED: dict[str, Any] = {
    "mlp_class_name": "LLaMAMLP",  # SwiGLU: fc_1 gate, fc_2 up, proj down
    "norm_class_name": "RMSNorm",
    "parallel_residual": False,  # pre-norm sequential blocks
    "shared_attention_norm": False,
    "bias": False,  # no bias anywhere but the fused QKV
    "lm_head_bias": False,
    "rotary_percentage": 1.0,  # RoPE on the full head
    "rope_condense_ratio": 1,
    "scale_embeddings": False,
    "pos_type": "rope",
    "asr_adapter": "llamamlp",  # the SwiGLU Whisper adapter
    "n_expert": 0,
    "n_expert_per_token": 0,
}

# Fields present in the official file that have no effect at inference; written back with the
# official values, ignored (with a log line where the value differs) when read.
_IGNORED: dict[str, Any] = {
    "vocab_size": 50254,  # litgpt leftover; padded_vocab_size is what counts
    "padding_multiple": 512,
    "cat_audio_vocab_size": 29120,  # only for the unreleased post-adapter head
    "post_adapter": False,  # TTS adapter: not in the released weights (forced False upstream)
    "post_adapter_layers": 6,
    "attn_dropout": 0.0,
    "prompt_vocab_size": None,
    "force_align": False,
    "use_pretrain_phoneme_emb": False,
    "gelu_approximate": "none",
}

# Official field order (model_config.yaml of gpt-omni/mini-omni), used by to_dict().
_OFFICIAL_ORDER = (
    "name", "hf_config", "block_size", "n_layer", "n_embd", "n_head", "n_query_groups",
    "head_size", "intermediate_size", "mlp_class_name", "norm_class_name", "norm_eps",
    "parallel_residual", "shared_attention_norm", "bias", "add_qkv_bias", "lm_head_bias",
    "rotary_percentage", "rope_base", "rope_condense_ratio", "padded_vocab_size", "vocab_size",
    "padding_multiple", "tie_word_embeddings", "scale_embeddings", "pos_type",
    "text_vocab_size", "audio_vocab_size", "cat_audio_vocab_size", "whisper_adapter_dim",
    "vision_adapter_dim", "asr_adapter", "post_adapter", "post_adapter_layers", "attn_dropout",
    "n_expert", "n_expert_per_token", "prompt_vocab_size", "force_align",
    "use_pretrain_phoneme_emb", "gelu_approximate",
)  # fmt: skip


@dataclass
class Config:
    """Hyperparameters of the Mini-Omni LM (Qwen2 in litgpt layout + audio vocabulary + adapters).

    Defaults are the released ``gpt-omni/mini-omni`` values (spec mini_omni.md §1.1).
    """

    name: str = "mini-omni"
    hf_config: dict[str, str] = field(
        default_factory=lambda: {"name": "Qwen2-0.5B", "org": "Qwen"}
    )  # base model; a "Gemma" name would imply a +1 RMSNorm offset (unsupported)
    # transformer
    block_size: int = 2048  # max positions (prompt + generation); sizes RoPE and the KV cache
    n_layer: int = 24
    n_embd: int = 896
    n_head: int = 14
    n_query_groups: int = 2  # GQA: n_head // n_query_groups query heads share one K/V head
    head_size: int = 64
    intermediate_size: int = 4864  # SwiGLU width of the blocks and of the adapters
    norm_eps: float = 1e-6
    rope_base: int = 1_000_000
    add_qkv_bias: bool = True  # bias on the fused QKV projection only (Qwen2)
    tie_word_embeddings: bool = True  # lm_head.weight is transformer.wte.weight
    # vocabulary (fixed by the token layout, see tokens.py)
    padded_vocab_size: int = tokens.PADDED_VOCAB_SIZE
    text_vocab_size: int = tokens.TEXT_VOCAB_SIZE
    audio_vocab_size: int = tokens.AUDIO_VOCAB_SIZE
    # adapters
    whisper_adapter_dim: int = 768  # Whisper-small d_model
    vision_adapter_dim: int | None = None  # Mini-Omni2 only (CLIP ViT-B/32: 512)

    def __post_init__(self) -> None:
        sizes = ("block_size", "n_layer", "n_embd", "n_head", "n_query_groups", "head_size",
                 "intermediate_size", "whisper_adapter_dim", "padded_vocab_size",
                 "text_vocab_size", "audio_vocab_size")
        wrong = [f"{name}={getattr(self, name)!r} must be an integer" for name in sizes
                 if type(getattr(self, name)) is not int]
        wrong += [f"{name}={getattr(self, name)!r} must be a number"
                  for name in ("norm_eps", "rope_base")
                  if type(getattr(self, name)) not in (int, float)]
        if wrong:  # the checks below would fail with a TypeError from deep inside
            raise ConfigError("invalid Mini-Omni config: " + "; ".join(wrong))
        problems = []
        if self.block_size > MAX_BLOCK_SIZE:
            problems.append(
                f"block_size={self.block_size} is more than {MAX_BLOCK_SIZE} positions: the "
                f"RoPE tables and KV cache are sized by it (the release has 2048)"
            )
        if self.n_query_groups > 0 and self.n_head % self.n_query_groups:
            problems.append(
                f"n_head={self.n_head} is not a multiple of n_query_groups={self.n_query_groups}"
            )
        if self.head_size % 2:
            problems.append(f"head_size={self.head_size} must be even for RoPE")
        if self.text_vocab_size != tokens.TEXT_VOCAB_SIZE:
            problems.append(
                f"text_vocab_size={self.text_vocab_size}; the token layout fixes it to "
                f"{tokens.TEXT_VOCAB_SIZE}"
            )
        if self.audio_vocab_size != tokens.AUDIO_VOCAB_SIZE:
            problems.append(
                f"audio_vocab_size={self.audio_vocab_size}; the token layout fixes it to "
                f"{tokens.AUDIO_VOCAB_SIZE}"
            )
        if self.padded_vocab_size < tokens.PADDED_VOCAB_SIZE:
            problems.append(
                f"padded_vocab_size={self.padded_vocab_size} is smaller than the "
                f"{tokens.PADDED_VOCAB_SIZE} rows the text + 7 audio layers need"
            )
        if "gemma" in self.name.lower() or "gemma" in str(self.hf_config.get("name", "")).lower():
            problems.append(
                "Gemma-style configs (RMSNorm with +1 offset, scaled embeddings) are not supported"
            )
        for name in sizes[:8]:
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise ConfigError("invalid Mini-Omni config: " + "; ".join(problems))

    # ----------------------------------------------------------------- derived
    @property
    def q_per_kv(self) -> int:
        """Query heads per K/V group (7 for Mini-Omni)."""
        return self.n_head // self.n_query_groups

    @property
    def qkv_size(self) -> int:
        """Output width of the fused QKV projection: (n_head + 2 * n_query_groups) * head_size."""
        return (self.n_head + 2 * self.n_query_groups) * self.head_size

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        """A named preset (see :data:`PRESETS`), optionally with field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown Mini-Omni preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> Config:
        """Build from the official field set: check fixed fields, drop unused ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        problems = []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _FIXED:
                if not _same(value, _FIXED[key]):
                    problems.append(
                        f"{key}={value!r} is not supported (this implementation needs "
                        f"{_FIXED[key]!r})"
                    )
            elif key in _IGNORED:
                if key == "post_adapter" and value:
                    log.warning(
                        "%s: post_adapter=true ignored: the TTS adapter is not part of the "
                        "released model (the reference forces it off)",
                        source,
                    )
                elif not _same(value, _IGNORED[key]):
                    log.info("%s: %s=%r has no effect at inference; ignored", source, key, value)
            elif value in (None, False, 0, 0.0, "none"):
                log.debug("%s: unknown field %s=%r is inactive; ignored", source, key, value)
            else:
                problems.append(
                    f"unknown field {key}={value!r} (not part of the Mini-Omni architecture)"
                )
        if problems:
            raise ConfigError(
                f"{source}: cannot build a Mini-Omni model: "
                + "; ".join(problems)
                + ". Use the official model_config.yaml or a preset "
                f"({', '.join(PRESETS)})."
            )
        if "hf_config" in kwargs and not isinstance(kwargs["hf_config"], dict):
            kwargs["hf_config"] = {"name": str(kwargs["hf_config"])}
        for f in dataclasses.fields(cls):  # YAML may say 1000000.0 for an int, 1 for a float
            value = kwargs.get(f.name)
            if value is None or isinstance(value, bool):
                continue
            if f.type in ("int", "int | None") and isinstance(value, float):
                if not value.is_integer():
                    problems.append(f"{f.name}={value!r} must be an integer")
                kwargs[f.name] = int(value)
            elif f.type == "float" and isinstance(value, int):
                kwargs[f.name] = float(value)
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        """Read an official ``model_config.yaml`` (or one written by :meth:`to_yaml`)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"model config not found: {path}")
        try:
            with path.open(encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1})" if where is not None else ""
            raise ConfigError(
                f"{path} is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}. "
                f"Restore it from the checkpoint's release (hf://gpt-omni/mini-omni)") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a YAML mapping of config fields")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The official ``model_config.yaml`` field set, in the official order."""
        values: dict[str, Any] = {**_FIXED, **_IGNORED, **dataclasses.asdict(self)}
        values["cat_audio_vocab_size"] = tokens.N_AUDIO_LAYERS * self.audio_vocab_size
        values["vocab_size"] = min(_IGNORED["vocab_size"], self.padded_vocab_size)
        if self.vision_adapter_dim is None:
            del values["vision_adapter_dim"]  # Mini-Omni v1 has no such line
        return {k: values[k] for k in _OFFICIAL_ORDER if k in values}

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Serialise :meth:`to_dict` as YAML; also write it to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, bool) or b is None or isinstance(b, str):
        return a == b
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


# Named presets. Every preset keeps the vocabulary layout (token ids stay valid everywhere);
# only the transformer size changes.
PRESETS: dict[str, dict[str, Any]] = {
    # https://huggingface.co/gpt-omni/mini-omni (Qwen2-0.5B backbone), 532M parameters
    "mini-omni": {},
    # https://huggingface.co/gpt-omni/mini-omni2: the same plus a CLIP vision adapter
    "mini-omni2": {"name": "mini-omni2", "vision_adapter_dim": 512},
    # tests: 2 layers, 2 query heads per group, ~12M parameters (mostly the embedding)
    "tiny": {
        "name": "tiny",
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 4,
        "n_query_groups": 2,
        "head_size": 16,
        "intermediate_size": 128,
    },
    # benchmarks of the decode loop: 4 layers of Mini-Omni's head layout (7 q per K/V group)
    "small": {
        "name": "small",
        "n_layer": 4,
        "n_embd": 448,
        "n_head": 7,
        "n_query_groups": 1,
        "head_size": 64,
        "intermediate_size": 1216,
    },
}
