"""Load and save Mini-Omni checkpoints in the official folder format.

An official folder (HF ``gpt-omni/mini-omni``) holds:

- ``lit_model.pth``: a plain torch state dict, fp32, 198 keys (both ``lm_head.weight`` and
  ``transformer.wte.weight``; spec mini_omni.md §8.2);
- ``model_config.yaml``: litgpt-style config (see :class:`~omniframe_mini_omni.config.Config`);
- ``tokenizer.json`` (+ ``tokenizer_config.json``): the Qwen2 tokenizer.

Loading is strict: every key and shape must match the model the config describes, otherwise a
:class:`CheckpointError` lists what is missing, unexpected or mis-shaped.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import Config, ConfigError
from .model import GPT
from .tokenizer import TextTokenizer

log = logging.getLogger(__name__)

WEIGHTS_FILE = "lit_model.pth"
CONFIG_FILE = "model_config.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEFAULT_REPO = "gpt-omni/mini-omni"
_WTE = "transformer.wte.weight"
_HEAD = "lm_head.weight"


class CheckpointError(RuntimeError):
    """A checkpoint folder or file that cannot be loaded as asked; the message says why."""


@dataclass
class MiniOmni:
    """A loaded model with what belongs to it."""

    model: GPT
    config: Config
    tokenizer: TextTokenizer | None
    path: Path | None  # the folder it came from; None for random weights


# --------------------------------------------------------------------------- checks
_REDOWNLOAD = (f"Download {WEIGHTS_FILE} again (hf://{DEFAULT_REPO}) or point the model "
               f"option at a complete checkpoint folder")


def weights_file_problem(path: str | Path) -> str | None:
    """What is wrong with a weights file before torch reads it, or None if it looks like a
    torch checkpoint: empty, a text file (a Git LFS pointer, an HTML error page), not a
    torch zip or pickle, or a zip archive cut short. Reads the first and last bytes only."""
    import zipfile

    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes): the download or copy did not finish"
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"version https://git-lfs"):
        return ("is a Git LFS pointer, not the weights: run `git lfs pull` in the "
                "checkpoint's clone, or download the file itself")
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format
        if not zipfile.is_zipfile(path):
            return (f"is a truncated torch checkpoint ({size} bytes, the zip archive's "
                    f"directory at its end is missing): the download or copy was cut short")
        return None
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:  # a pickle (torch's legacy format)
        return None
    stripped = head.lstrip()
    if stripped[:1] in (b"<", b"{", b"#") or all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        shown = head[:40].decode("ascii", "replace").strip()
        return f"is a text file ({shown!r}...), not torch weights"
    return "is not a torch checkpoint (neither torch.save's zip format nor a pickle)"


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """``torch.load`` a state dict memory-mapped (no second copy in RAM), weights only.

    A file that cannot be a checkpoint (empty, text, truncated; see
    :func:`weights_file_problem`) is a :class:`CheckpointError` saying so and what to do,
    not torch's message about memory mapping."""
    path = Path(path)
    problem = weights_file_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path} {problem}. {_REDOWNLOAD}.")
    with open(path, "rb") as fh:
        legacy = not fh.read(4).startswith(b"PK\x03\x04")
    try:  # a legacy (pickle) checkpoint cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", mmap=not legacy, weights_only=True)
    except Exception as e:  # corrupt file, pickle with code, ...
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}. "
                              f"{_REDOWNLOAD}.") from e
    if isinstance(sd, Mapping) and "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]  # litgpt training checkpoints wrap the weights
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    not_tensors = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{path} is not a plain state dict: {len(not_tensors)} entries are not tensors "
            f"(e.g. {not_tensors[0]!r}: {type(sd[not_tensors[0]]).__name__})")
    return dict(sd)


def check_finite(tensors: Iterable[tuple[str, Tensor]], source: str) -> None:
    """Refuse NaN/Inf weights, naming the first tensor that has some: one ``isfinite``
    reduction per floating-point tensor (about a second for the 0.5B release on a CPU)."""
    for name, t in tensors:
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{source}: weight tensor {name!r} {tuple(t.shape)} holds {bad} NaN or infinite "
                f"value(s) of {t.numel()}; the file is corrupt or comes from a diverged "
                f"training run. {_REDOWNLOAD}, or use an earlier training checkpoint.")


def state_dict_report(
    state_dict: Mapping[str, Tensor],
    expected: Mapping[str, torch.Size | tuple[int, ...]],
) -> str | None:
    """Compare keys and shapes; return a readable report of the differences, or None."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or mis_shaped):
        return None
    lines = []
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mis_shaped),
    ):
        if items:
            lines.append(f"  {title} ({len(items)}):")
            lines.extend(f"    {item}" for item in items[:50])
            if len(items) > 50:
                lines.append(f"    ... and {len(items) - 50} more")
    return "\n".join(lines)


def _describe(config: Config) -> str:
    return (
        f"{config.name}: n_layer={config.n_layer}, n_embd={config.n_embd}, "
        f"n_head={config.n_head}, n_query_groups={config.n_query_groups}, "
        f"vision_adapter_dim={config.vision_adapter_dim}"
    )


def apply_tied_weight_rule(state_dict: dict[str, Tensor], config: Config, source: str) -> None:
    """With tied embeddings the effective matrix is ``transformer.wte.weight`` (reference
    behaviour): warn if the stored ``lm_head.weight`` differs, then drop it (in place)."""
    if not config.tie_word_embeddings or _HEAD not in state_dict:
        return
    head = state_dict.pop(_HEAD)
    wte = state_dict.get(_WTE)
    if wte is None or head.shape != wte.shape:
        state_dict[_HEAD] = head  # let the shape/key report speak
        return
    if head.data_ptr() != wte.data_ptr() and not torch.equal(head, wte):
        log.warning(
            "%s: lm_head.weight differs from transformer.wte.weight although the embeddings are "
            "tied; using transformer.wte.weight for both, as the reference does",
            source,
        )


# --------------------------------------------------------------------------- load
def load_mini_omni(
    path: str | Path | None = None,
    *,
    preset: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    load_tokenizer: bool = True,
) -> MiniOmni:
    """Load a resolved local checkpoint folder, or build random weights from a preset.

    Args:
        path: a local folder in the official format (URI resolution is the caller's job;
            see :func:`download_mini_omni` for ``hf://``). Mutually exclusive with ``preset``.
        preset: a :data:`~omniframe_mini_omni.config.PRESETS` name for random weights
            (``random://tiny``): N(0, 0.02) init from ``seed``, no tokenizer.
        dtype: parameter dtype (float32 is the reference; bfloat16 halves memory and time).
        device: where the model lives.
        load_tokenizer: load ``tokenizer.json`` from the folder.
    """
    device = torch.device(device)
    if (path is None) == (preset is None):
        raise ValueError("give either a checkpoint folder path or a preset name, not both/none")
    if preset is not None:
        config = Config.from_name(preset)
        with torch.device(device):
            model = GPT(config)
        gen = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(gen)
        model.to(dtype=dtype)
        model.eval()
        return MiniOmni(model=model, config=config, tokenizer=None, path=None)

    assert path is not None
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(
            f"Mini-Omni checkpoint folder not found: {folder}. Expected a folder with "
            f"{WEIGHTS_FILE}, {CONFIG_FILE} and tokenizer.json (e.g. a download of "
            f"hf://{DEFAULT_REPO})."
        )
    missing_files = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if not (folder / f).is_file()]
    if load_tokenizer and not (folder / "tokenizer.json").is_file():
        missing_files.append("tokenizer.json")
    if missing_files:
        present = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(
            f"{folder} is not a Mini-Omni checkpoint folder: missing {', '.join(missing_files)} "
            f"(found: {', '.join(present) or 'nothing'})"
        )
    try:
        config = Config.from_file(folder / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e

    weights = folder / WEIGHTS_FILE
    state_dict = load_state_dict_file(weights)
    apply_tied_weight_rule(state_dict, config, str(weights))
    with torch.device("meta"):
        model = GPT(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings and _HEAD not in state_dict:
        expected.pop(_HEAD)  # the tied head is wte; a stored copy was checked and dropped
    report = state_dict_report(state_dict, expected)
    if report is not None:
        raise CheckpointError(
            f"{weights} does not match the model described by {CONFIG_FILE} "
            f"({_describe(config)}):\n{report}\n"
            "Check that lit_model.pth and model_config.yaml come from the same checkpoint."
        )
    check_finite(state_dict.items(), str(weights))
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    model.to(device=device, dtype=dtype)
    model.eval()
    if config.vision_adapter_dim is not None:
        log.warning(
            "%s is a Mini-Omni2 checkpoint: the vision adapter is loaded but unused "
            "(only audio and text tasks are implemented)",
            folder,
        )
    tokenizer = None
    if load_tokenizer:
        try:
            tokenizer = TextTokenizer(folder / "tokenizer.json")
        except Exception as e:  # the tokenizers library's parse errors
            raise CheckpointError(
                f"{folder / 'tokenizer.json'} cannot be read as a tokenizer "
                f"({type(e).__name__}: {str(e).strip()}). Restore it from the release "
                f"(hf://{DEFAULT_REPO}), or pass the lm option tokenizer=/path/tokenizer.json"
            ) from e
    return MiniOmni(model=model, config=config, tokenizer=tokenizer, path=folder)


# --------------------------------------------------------------------------- save
def save_checkpoint(
    model: GPT,
    config: Config,
    folder: str | Path,
    tokenizer_files: Iterable[str | Path] = (),
) -> Path:
    """Write ``folder`` in the official format: fp32 ``lit_model.pth`` (with both the
    ``lm_head.weight`` and ``transformer.wte.weight`` keys), ``model_config.yaml``, and copies
    of the given tokenizer files (``tokenizer.json``, ``tokenizer_config.json``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = {
        k: v.detach().to(device="cpu", dtype=torch.float32).contiguous()
        for k, v in model.state_dict().items()
    }
    if config.tie_word_embeddings:
        state_dict[_HEAD] = state_dict[_WTE].clone()  # stored twice, like the release
    # each file is written beside its final name and renamed, so an interrupted save never
    # leaves a short lit_model.pth or model_config.yaml that looks complete
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    try:
        torch.save(state_dict, tmp)
        os.replace(tmp, folder / WEIGHTS_FILE)
        tmp = folder / (CONFIG_FILE + ".tmp")
        config.to_yaml(tmp)
        os.replace(tmp, folder / CONFIG_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for f in tokenizer_files:
        f = Path(f)
        if not f.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {f}")
        if f.resolve() != (folder / f.name).resolve():
            shutil.copy2(f, folder / f.name)
    return folder


# --------------------------------------------------------------------------- download
def download_mini_omni(
    repo: str = DEFAULT_REPO,
    revision: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    **kwargs: Any,
) -> Path:
    """Fetch the checkpoint folder from the Hugging Face Hub (its usual cache) and return it.

    Raises CheckpointError naming the repository, with how to pass a local folder instead, when
    the download fails (offline machine, unknown repo, missing files, ...).
    """
    where = f"{repo}@{revision}" if revision else repo
    advice = (
        f"Download the folder elsewhere ({WEIGHTS_FILE}, {CONFIG_FILE}, tokenizer.json, "
        "tokenizer_config.json) and pass its local path instead, e.g. "
        "--set lm.options.model=/path/to/mini-omni"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(
            f"cannot download hf://{where}: huggingface_hub is not installed. {advice}"
        ) from e
    try:
        local = snapshot_download(
            repo_id=repo,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=[WEIGHTS_FILE, CONFIG_FILE, *TOKENIZER_FILES],
            **kwargs,
        )
    except Exception as e:  # network, auth, offline mode, unknown repo/revision
        raise CheckpointError(
            f"could not download hf://{where} from the Hugging Face Hub "
            f"({type(e).__name__}: {e}). {advice}"
        ) from e
    folder = Path(local)
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"hf://{where} has no {WEIGHTS_FILE} (got {folder}). {advice}")
    return folder
