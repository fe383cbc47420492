"""Pipeline configs: YAML, validated in two phases.

Phase 1 checks the outer shape (:class:`PipelineConfig`). Phase 2, once plugins are loaded,
checks each stage's ``options`` against its plugin's ``Options`` model and that the stages fit
together. Every error names the YAML path (``pipeline[2].options.temprature``) and what was
expected.

Example::

    name: demo
    pipeline:
      - {kind: source, plugin: file, options: {path: question.wav}}
      - {kind: vad, plugin: energy}
      - {kind: lm, plugin: echo}
      - {kind: codec, plugin: echo}
      - {kind: sink, plugin: wav, options: {path: answer.wav}}
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omniframe.stage import StageKind, StageOptions

__all__ = [
    "ConfigError",
    "PipelineConfig",
    "ResolvedStage",
    "StageSpec",
    "apply_overrides",
    "build_pipeline",
    "config_schema",
    "load_config",
    "parse_config",
    "resolve_stages",
]


class ConfigError(ValueError):
    """A config is wrong; ``problems`` lists ``(yaml_path, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None) -> None:
        self.problems = problems
        where = f" in {source}" if source else ""
        lines = [f"invalid config{where}:"] + [f"  {p}: {m}" for p, m in problems]
        super().__init__("\n".join(lines))


class StageSpec(BaseModel):
    """One stage of a pipeline in a config."""

    model_config = ConfigDict(extra="forbid")

    kind: StageKind = Field(description="source, vad, encoder, lm, codec or sink")
    plugin: str = Field(description="the registered stage name within its kind")
    name: str | None = Field(
        default=None, description="name in this pipeline (for --set and logs); default: kind")
    options: dict[str, Any] = Field(default_factory=dict)


class PipelineConfig(BaseModel):
    """The outer shape of a pipeline config."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    name: str = "pipeline"
    description: str = ""
    device: str = Field(default="cpu", description="torch device for model stages")
    buffer: int = Field(default=8, ge=1, le=100_000, description="frames per bounded edge")
    pipeline: list[StageSpec] = Field(min_length=1)

    def stage_names(self) -> list[str]:
        """Each stage's name: its ``name``, else its kind, else its plugin if kinds repeat."""
        kinds = [s.kind for s in self.pipeline]
        out = []
        for s in self.pipeline:
            if s.name:
                out.append(s.name)
            elif kinds.count(s.kind) == 1:
                out.append(s.kind)
            else:
                out.append(s.plugin)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_defaults=True), sort_keys=False)


def _loc(loc: tuple[Any, ...], prefix: str = "") -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "<top>"


def _pydantic_problems(err: ValidationError, prefix: str,
                       allowed: list[str] | None = None) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors():
        loc = e["loc"]
        msg = e["msg"]
        if e["type"] == "extra_forbidden" and loc:
            key = str(loc[-1])
            msg = f"unknown key {key!r}"
            if allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                msg += f"; did you mean {close[0]!r}?" if close else ""
                msg += f" Expected one of: {', '.join(allowed)}"
        elif e["type"] == "missing":
            msg = "required but missing"
        elif loc and loc[-1] == "plugin" and e.get("input", "") is None:
            msg = ("is empty; YAML reads a bare null as nothing: for the null sink write "
                   "plugin: 'null' (quoted)")
        elif "input" in e and e["type"] not in ("model_type",):
            msg = f"{msg} (got {e['input']!r})"
        problems.append((_loc(loc, prefix), msg))
    return problems


def parse_config(data: Any, source: str | None = None) -> PipelineConfig:
    """Phase 1: check the outer shape of already-parsed YAML/JSON data."""
    if not isinstance(data, dict):
        raise ConfigError([("<top>", f"expected a mapping with a 'pipeline' list, got "
                                     f"{type(data).__name__}")], source)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        allowed = list(PipelineConfig.model_fields)
        problems = []
        for p, m in _pydantic_problems(err, "", allowed):
            if p.startswith("pipeline[") and "unknown key" in m:
                keys = ", ".join(StageSpec.model_fields)
                m = m.split(" Expected")[0] + " Expected one of: " + keys
            problems.append((p, m))
        raise ConfigError(problems, source) from None


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set path=value`` overrides to raw config data (before validation).

    ``path`` starts with a stage name (``lm.options.temperature=0.5``), a top-level key
    (``device=cuda``) or ``pipeline[2]...``. Values are parsed as YAML (``1``, ``true``,
    ``[1, 2]``, ``null``).
    """
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError([(item, "an override must look like path=value, e.g. "
                                      "lm.options.temperature=0.5")])
        path, raw = item.split("=", 1)
        parts = [p for p in path.strip().split(".") if p]
        if not parts:
            raise ConfigError([(item, "empty path before '='")])
        value = _parse_value(raw)
        target: Any = data
        head = parts[0]
        stages = data.get("pipeline")
        if head not in PipelineConfig.model_fields and isinstance(stages, list):
            try:
                names = parse_config(data).stage_names()
            except ConfigError:
                names = [s.get("name") or s.get("kind") for s in stages if isinstance(s, dict)]
            idx = None
            if head.startswith("pipeline[") and head.endswith("]"):
                idx = int(head[len("pipeline["):-1])
            elif head in names:
                idx = names.index(head)
            if idx is None or not 0 <= idx < len(stages):
                close = difflib.get_close_matches(head, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError([(path, f"no stage named {head!r}{hint} Stages: "
                                          f"{', '.join(map(str, names))}")])
            target = stages[idx]
            parts = parts[1:]
            if not parts:
                raise ConfigError([(path, "say what to set, e.g. lm.options.temperature=0.5")])
        for p in parts[:-1]:
            if not isinstance(target, dict):
                raise ConfigError([(path, f"{p!r} is not inside a mapping")])
            target = target.setdefault(p, {})
            if target is None:
                target = {}
        if not isinstance(target, dict):
            raise ConfigError([(path, "cannot set a key inside a non-mapping value")])
        target[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML file with errors that give the file, line and column."""
    p = Path(path)
    if not p.exists():
        raise ConfigError([("<file>", f"config file {str(p)!r} does not exist")])
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ConfigError([(where, f"not valid YAML: {getattr(exc, 'problem', exc)}")],
                          str(p)) from None
    if data is None:
        raise ConfigError([("<top>", "the file is empty")], str(p))
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate (phase 1) a YAML config file."""
    data = read_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return parse_config(data, str(path))


@dataclass
class ResolvedStage:
    """A config stage after phase 2: its class and validated options."""

    name: str
    spec: StageSpec
    cls: type
    options: StageOptions


def resolve_stages(cfg: PipelineConfig, source: str | None = None) -> list[ResolvedStage]:
    """Phase 2: find each stage's class and validate its options; all problems at once."""
    from omniframe.plugins import PluginError, get_registry

    reg = get_registry()
    problems: list[tuple[str, str]] = []
    out: list[ResolvedStage] = []
    for i, (spec, name) in enumerate(zip(cfg.pipeline, cfg.stage_names(), strict=True)):
        prefix = f"pipeline[{i}]"
        try:
            cls = reg.stage(spec.kind, spec.plugin)
        except PluginError as exc:
            problems.append((f"{prefix}.plugin", str(exc)))
            continue
        try:
            options = cls.Options.model_validate(spec.options)
        except ValidationError as err:
            problems.extend(_pydantic_problems(err, f"{prefix}.options",
                                               list(cls.Options.model_fields)))
            continue
        out.append(ResolvedStage(name=name, spec=spec, cls=cls, options=options))
    if problems:
        raise ConfigError(problems, source)
    return out


def build_pipeline(cfg: PipelineConfig, *, source: str | None = None, session: Any = None,
                   observers: list[Any] | None = None, collect: bool = True,
                   resources: Any = None) -> Any:
    """Phase 2 and construction: a ready :class:`~omniframe.pipeline.Pipeline`."""
    from omniframe.compat import IncompatibleStages
    from omniframe.pipeline import Pipeline, PipelineError
    from omniframe.resources import default_resources
    from omniframe.session import Session
    from omniframe.stage import StageContext

    resolved = resolve_stages(cfg, source)
    session = session or Session()
    resources = resources if resources is not None else default_resources()
    stages = []
    for r in resolved:
        ctx = StageContext(name=r.name, session=session, resources=resources, device=cfg.device)
        stages.append(r.cls(r.options, ctx))
    try:
        return Pipeline(stages, buffer=cfg.buffer, observers=observers or [], collect=collect)
    except (IncompatibleStages, PipelineError) as exc:
        raise ConfigError([("pipeline", str(exc))], source) from None


def config_schema() -> dict[str, Any]:
    """A JSON schema for pipeline configs, with each registered stage's options, for editors."""
    from pydantic import create_model

    from omniframe.plugins import get_registry

    reg = get_registry()
    variants = []
    for (kind, name), cls in sorted(reg.stages.items()):
        model = create_model(  # type: ignore[call-overload]
            f"{kind}_{name}".replace("-", "_"),
            __config__=ConfigDict(extra="forbid"),
            kind=(Literal[kind], ...),  # type: ignore[valid-type]
            plugin=(Literal[name], ...),  # type: ignore[valid-type]
            name=(str | None, None),
            options=(cls.Options, Field(default_factory=dict)),
        )
        variants.append(model)
    if not variants:
        return PipelineConfig.model_json_schema()
    from typing import Union

    stage_union = Union[tuple(variants)]  # type: ignore[valid-type]  # noqa: UP007
    top = create_model(  # type: ignore[call-overload]
        "OmniframePipeline",
        __config__=ConfigDict(extra="forbid"),
        version=(Literal[1], 1),
        name=(str, "pipeline"),
        description=(str, ""),
        device=(str, "cpu"),
        buffer=(int, 8),
        pipeline=(list[stage_union], ...),
    )
    schema = top.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.loads(json.dumps(schema))
