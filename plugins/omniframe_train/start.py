"""Start and finish: build the model a recipe names, export the official checkpoint format.

Starting points (``model.init``):

- ``random://<preset>``: random weights of a Mini-Omni preset (``tiny``, ``small``, ...).
- a Hugging Face Qwen2 model: ``hf://Qwen/Qwen2-0.5B-Instruct`` or a local folder holding its
  ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``). Weights are mapped into the
  litgpt layout (fused per-group QKV) and the vocabulary is extended from 151,936 to 181,120 rows:
  new rows are the mean of the Qwen rows (or normal / zeros) plus N(0, audio_rows_std) noise on
  the audio rows so that they are not all identical. The Whisper adapter starts random.
- a Mini-Omni checkpoint folder (``lit_model.pth`` + ``model_config.yaml``): fine-tuning.

Export writes ``lit_model.pth`` + ``model_config.yaml`` + the tokenizer files, which
``omniframe_mini_omni.checkpoint.load_mini_omni`` (and so ``omniframe run``) loads like the
released model.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import structlog
import torch
from omniframe_mini_omni import tokens as T
from omniframe_mini_omni.config import Config
from omniframe_mini_omni.model import GPT

from .recipe import ModelSpec

log = structlog.get_logger("omniframe_train.start")


class StartError(ValueError):
    """The recipe's starting point cannot be used; the message says why and what to do."""


def _resolve(uri: str) -> tuple[str, Path | None, str | None]:
    from omniframe.model_uris import resolve_model

    ref = resolve_model(uri)
    return ref.scheme, ref.path, ref.preset


def build_model(spec: ModelSpec, seed: int) -> tuple[GPT, Config, Path | None]:
    """The GPT (fp32, CPU), its config and the tokenizer.json to use (None if unknown)."""
    scheme, path, preset = _resolve(spec.init)
    gen = torch.Generator().manual_seed(seed)
    tok = Path(spec.tokenizer) if spec.tokenizer else None
    if scheme == "random":
        config = Config.from_name(preset or spec.preset, **spec.overrides)
        model = GPT(config)
        model.init_weights(gen)
        return model, config, tok
    assert path is not None
    if (path / "model_config.yaml").is_file() and (path / "lit_model.pth").is_file():
        from omniframe_mini_omni.checkpoint import load_mini_omni

        loaded = load_mini_omni(path, load_tokenizer=False)
        if spec.overrides:
            raise StartError("model.overrides cannot change a Mini-Omni checkpoint's shape; "
                             "remove them (the checkpoint's model_config.yaml decides)")
        model = loaded.model.float().train()
        tok = tok or (path / "tokenizer.json")
        return model, loaded.config, tok if tok.is_file() else None
    if (path / "config.json").is_file():
        model, config = from_hf_qwen2(path, spec, gen)
        tok = tok or (path / "tokenizer.json")
        return model, config, tok if tok.is_file() else None
    raise StartError(f"{spec.init}: {path} is neither a Mini-Omni checkpoint folder "
                     "(lit_model.pth + model_config.yaml) nor a Hugging Face Qwen2 folder "
                     "(config.json + model.safetensors)")


def read_hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        sd = {}
        for f in bins:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
        return sd
    raise StartError(f"{path}: no model.safetensors or pytorch_model.bin")


def from_hf_qwen2(path: Path, spec: ModelSpec, gen: torch.Generator) -> tuple[GPT, Config]:
    """Qwen2 weights mapped into the Mini-Omni layout, vocabulary extended to 181,120 rows."""
    from omniframe_mini_omni.convert import config_from_hf_qwen2, convert_hf_qwen2_state_dict

    hf = json.loads((path / "config.json").read_text())
    if hf.get("model_type") not in (None, "qwen2"):
        raise StartError(f"{path}: model_type {hf.get('model_type')!r}; only Qwen2 backbones "
                         "map onto the Mini-Omni layout")
    hf.setdefault("_name_or_path", path.name)
    config = config_from_hf_qwen2(SimpleNamespace(**hf), **spec.overrides)
    sd = convert_hf_qwen2_state_dict(read_hf_state_dict(path), config, new_rows=spec.new_rows,
                                     generator=gen)
    model = GPT(config)
    model.init_weights(gen)  # the adapter (absent from Qwen2) keeps this init
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(("whisper_adapter.", "lm_head."))]
    if missing or unexpected:
        raise StartError(f"{path}: converted Qwen2 weights do not fit: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    if spec.audio_rows_std > 0:
        with torch.no_grad():
            w = model.transformer.wte.weight
            noise = torch.randn(w.shape[0] - T.TEXT_VOCAB_SIZE, w.shape[1], generator=gen)
            w[T.TEXT_VOCAB_SIZE:] += spec.audio_rows_std * noise
    log.info("initialised_from_qwen2", path=str(path), layers=config.n_layer,
             vocab=config.padded_vocab_size)
    return model, config


def export(gpt: GPT, config: Config, folder: str | Path, tokenizer: Path | None) -> Path:
    """Write the official folder format (fp32 lit_model.pth with both tied keys,
    model_config.yaml, tokenizer.json + tokenizer_config.json when available)."""
    from omniframe_mini_omni.checkpoint import save_checkpoint

    files: list[Path] = []
    if tokenizer is not None and tokenizer.is_file():
        files.append(tokenizer)
        side = tokenizer.parent / "tokenizer_config.json"
        if side.is_file():
            files.append(side)
    out = save_checkpoint(gpt, config, folder, files)
    if not (out / "tokenizer_config.json").is_file():
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))
    return out


def param_summary(gpt: GPT) -> dict[str, Any]:
    total = sum(p.numel() for p in gpt.parameters())
    train = sum(p.numel() for p in gpt.parameters() if p.requires_grad)
    return {"params": total, "trainable": train}
