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
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from omniframe.stage import KINDS, StageOptions, is_kind
from omniframe.tools import ToolSpec
from omniframe.watchdog import WatchdogLimits

__all__ = [
    "ConfigError",
    "ObserverSpec",
    "PipelineConfig",
    "ResolvedStage",
    "StageSpec",
    "apply_overrides",
    "build_observers",
    "build_pipeline",
    "config_schema",
    "load_config",
    "parse_config",
    "parse_yaml",
    "read_yaml",
    "resolve_stages",
    "parse_value",
    "short_repr",
    "split_path",
]

# Limits on what a config may make the loader build. A real config is a few KB and a few
# hundred nodes; these stop a small hostile file (nested aliases, "billion laughs") from
# expanding into gigabytes in the validators, copies and error messages that follow.
MAX_YAML_BYTES = 8 * 1024 * 1024
MAX_YAML_NODES = 100_000  # scalars and collections, an alias counted once per use
MAX_YAML_DEPTH = 64
MAX_VALUE_CHARS = 200  # a value quoted in an error message
MAX_PATH_CHARS = 300  # one problem's path
MAX_MESSAGE_CHARS = 2_000  # one problem's message


def clip(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was: ``'abc… (5000 chars)'``."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} chars)"


def short_repr(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters for error messages."""
    return clip(repr(value), limit)


class ConfigError(ValueError):
    """A config is wrong; ``problems`` lists ``(yaml_path, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None) -> None:
        self.problems = [(clip(str(p), MAX_PATH_CHARS), clip(str(m), MAX_MESSAGE_CHARS))
                         for p, m in problems]
        where = f" in {clip(source, MAX_MESSAGE_CHARS)}" if source else ""
        lines = [f"invalid config{where}:"] + [f"  {p}: {m}" for p, m in self.problems]
        super().__init__("\n".join(lines))


# The device types torch.device() accepts (torch 2.x, c10/core/DeviceType.cpp), each with an
# optional index: checked here by name so that the core never imports torch.
TORCH_DEVICE_TYPES = (
    "cpu", "cuda", "mps", "xpu", "meta", "hip", "ipu", "mkldnn", "opengl", "opencl", "ideep",
    "ve", "fpga", "maia", "xla", "lazy", "vulkan", "hpu", "mtia", "privateuseone",
)
_DEVICE_RE = re.compile(rf"(?:{'|'.join(TORCH_DEVICE_TYPES)})(?::(?:0|[1-9][0-9]*))?")


def check_device(device: str) -> str:
    """``device`` if torch would accept it (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...)."""
    if not _DEVICE_RE.fullmatch(device):
        raise ValueError(
            f"{short_repr(device)} is not a torch device; use cpu, cuda, cuda:N (N = 0, 1, ...), "
            f"mps or xpu (any of {', '.join(TORCH_DEVICE_TYPES)}, optionally with :N)")
    return device


def _stage_names(stages: list[tuple[Any, Any, Any]]) -> list[str]:
    """``(name, kind, plugin)`` of each stage → its name: ``name``; else its kind for the first
    stage of that kind without a name; else its plugin (also for raw, not yet validated config
    data). Adding a second stage of a kind thus never renames the first (``--set lm.…``
    keeps working when a ``processor`` or a second ``lm`` is added)."""
    named: set[str] = set()  # kinds already given as a name
    out = []
    for n, k, p in stages:
        if n:
            out.append(str(n))
        elif str(k) not in named:
            named.add(str(k))
            out.append(str(k))
        else:
            out.append(str(p))
    return out


def _non_finite(value: Any, path: str = "") -> list[str]:
    """Where NaN or an infinity hides in nested config data (``.nan``/``.inf`` in YAML)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{path or 'the value'} is {value}"]
    if isinstance(value, dict):
        return [w for k, v in value.items() for w in _non_finite(v, f"{path}.{k}".lstrip("."))]
    if isinstance(value, list | tuple):
        return [w for i, v in enumerate(value) for w in _non_finite(v, f"{path}[{i}]")]
    return []


class StageSpec(BaseModel):
    """One stage of a pipeline in a config."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description=f"{', '.join(KINDS)}, or another kind a plugin defines")
    plugin: str = Field(description="the registered stage name within its kind")
    name: str | None = Field(
        default=None, description="name in this pipeline (for --set and logs); default: the "
                                  "kind for the first stage of a kind, else the plugin")
    options: dict[str, Any] = Field(default_factory=dict)
    watchdog: dict[str, float | None] | None = Field(
        default=None, description="this stage's watchdog limits in seconds, by phase "
                                  "(setup, process, ...); null turns one off")

    @field_validator("kind")
    @classmethod
    def _kind_ok(cls, v: str) -> str:
        if not is_kind(v):
            raise ValueError(f"kind {short_repr(v)} is not an identifier; use one of "
                             f"{', '.join(KINDS)}, or a plugin's own kind (letters, digits, '_')")
        return v

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str | None) -> str | None:
        if v is None:
            return v
        bad = sorted(set(v) & set(".[]=:\n"))
        if not v.strip() or bad or v != v.strip():
            why = f"has {' '.join(repr(c) for c in bad)}" if bad else "is blank or padded"
            raise ValueError(f"stage name {short_repr(v)} {why}, so --set could not reach it; "
                             f"use letters, digits, '-' and '_'")
        if v in PipelineConfig.model_fields:
            raise ValueError(f"stage name {v!r} is a top-level config key, so --set {v}.… "
                             f"would set that key; choose another name")
        return v

    @field_validator("options")
    @classmethod
    def _finite(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = _non_finite(v)
        if bad:  # a stage would sleep forever on .inf, or compare NaN as never reached
            raise ValueError(f"{', '.join(bad[:5])}: options take finite numbers (null "
                             f"where a stage allows no limit)")
        return v

    @field_validator("watchdog")
    @classmethod
    def _watchdog_ok(cls, v: dict[str, float | None] | None) -> dict[str, float | None] | None:
        if v is not None:
            WatchdogLimits.model_validate(v)  # unknown phases and values <= 0 are errors
        return v


class ObserverSpec(BaseModel):
    """An observer a config attaches (registered by a plugin's ``register_observers`` hook);
    a bare name in YAML stands for ``{plugin: name}``."""

    model_config = ConfigDict(extra="forbid")

    plugin: str = Field(description="the registered observer's name (omniframe plugins)")
    options: dict[str, Any] = Field(default_factory=dict)


class PipelineConfig(BaseModel):
    """The outer shape of a pipeline config."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    name: str = "pipeline"
    description: str = ""
    device: str = Field(default="cpu", description="torch device for model stages")
    buffer: int = Field(default=8, ge=1, le=100_000, description="frames per bounded edge")
    watchdog: WatchdogLimits = Field(
        default_factory=WatchdogLimits,
        description="seconds a stage may make no progress, by phase, before the run stops "
                    "naming it; stages may change their own")
    pipeline: list[StageSpec] = Field(min_length=1)
    observers: list[ObserverSpec] = Field(
        default_factory=list,
        description="observers that see every frame and each turn's MetricsFrame without "
                    "being stages, e.g. {plugin: latency-csv, options: {path: latency.csv}}")

    @field_validator("observers", mode="before")
    @classmethod
    def _bare_observer_names(cls, v: Any) -> Any:
        return [{"plugin": o} if isinstance(o, str) else o for o in v] if isinstance(
            v, list) else v
    tools: list[str | ToolSpec] = Field(
        default_factory=list,
        description="tools the LM may call: names of registered tools (server-side), or "
                    "inline client-side declarations {name, description, parameters}")

    @field_validator("tools")
    @classmethod
    def _tools_unique(cls, v: list[str | ToolSpec]) -> list[str | ToolSpec]:
        names = [t if isinstance(t, str) else t.name for t in v]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"tools listed twice: {', '.join(twice)}")
        return v

    @field_validator("device")
    @classmethod
    def _device_ok(cls, v: str) -> str:
        return check_device(v)

    @field_validator("pipeline")
    @classmethod
    def _names_unique(cls, v: list[StageSpec]) -> list[StageSpec]:
        names = _stage_names([(s.name, s.kind, s.plugin) for s in v])
        repeated = [
            f"{name!r} ({', '.join(f'pipeline[{i}]' for i, n in enumerate(names) if n == name)})"
            for name in dict.fromkeys(n for n in names if names.count(n) > 1)
        ]
        if repeated:
            raise ValueError(f"stage names must be unique; repeated: {'; '.join(repeated)}. "
                             f"Give each of them its own name: (--set and logs use it)")
        return v

    def stage_names(self) -> list[str]:
        """Each stage's name: its ``name``, else its kind, else its plugin if kinds repeat."""
        return _stage_names([(s.name, s.kind, s.plugin) for s in self.pipeline])

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
        elif e["type"] == "value_error":  # our validators' messages quote the value
            msg = msg.removeprefix("Value error, ")
        elif "input" in e and e["type"] not in ("model_type",):
            msg = f"{msg} (got {short_repr(e['input'])})"
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


# ------------------------------------------------------------------------------- YAML


class YamlLimitError(yaml.MarkedYAMLError):
    """Valid YAML that would expand into too much (aliases, nesting): refused, not built."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses documents that expand past :data:`MAX_YAML_NODES`
    nodes (each use of an alias counted in full) or nest deeper than :data:`MAX_YAML_DEPTH`,
    recursive aliases, and duplicate keys (YAML would silently keep only the last)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YamlLimitError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                     self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node, {}, [])
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                key = self.construct_object(key_node)
                first = seen.setdefault(key, key_node)
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None,
                        f"duplicate key {short_repr(key)} (first on line "
                        f"{first.start_mark.line + 1}); YAML would keep only the last one, so "
                        f"remove or rename one of them", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _check_expansion(node: Any, seen: dict[int, tuple[int, int]], path: list[int]
                     ) -> tuple[int, int]:
    """How many nodes ``node`` expands to, and how deep; raises :class:`YamlLimitError` past
    the limits. ``seen`` memoizes shared (aliased) nodes, so an alias bomb costs little."""
    key = id(node)
    if key in path:
        raise YamlLimitError(None, None, "an alias refers to the collection that contains it "
                             "(a recursive structure)", node.start_mark)
    n, height = seen.get(key, (1, 1))
    if key not in seen and isinstance(node, yaml.CollectionNode):
        path.append(key)
        children = (node.value if isinstance(node, yaml.SequenceNode)
                    else [c for kv in node.value for c in kv])
        for child in children:
            size, h = _check_expansion(child, seen, path)
            n += size
            height = max(height, h + 1)
            if n > MAX_YAML_NODES:
                raise YamlLimitError(
                    None, None, f"expands to more than {MAX_YAML_NODES:,} values (aliases "
                    f"count each time they are used); a config is far smaller, so this looks "
                    f"like an alias bomb", node.start_mark)
        path.pop()
        seen[key] = (n, height)
    if len(path) + height > MAX_YAML_DEPTH:
        raise YamlLimitError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels once "
                             f"aliases are expanded", node.start_mark)
    return n, height


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[str, str]:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<top>"
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    if isinstance(exc, yaml.reader.ReaderError):  # a control character: binary junk?
        before = text[:exc.position]
        where = f"line {before.count(chr(10)) + 1}, column {len(before.rsplit(chr(10))[-1]) + 1}"
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        problem = (f"control character #x{char:04x}, which YAML does not allow: is this a "
                   f"text file?")
    if "'\\t'" in problem:
        problem += " (YAML indents with spaces; replace the tabs)"
    elif "another document" in problem:
        problem += " (a config is one YAML document; remove the '---' line)"
    what = "refused" if isinstance(exc, YamlLimitError) else "not valid YAML"
    return where, f"{what}: {problem}"


def parse_yaml(text: str, source: str | None = None) -> Any:
    """YAML text to data, like ``yaml.safe_load`` but bounded (see :class:`_BoundedLoader`);
    every problem is a :class:`ConfigError` with the line and column."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader already checks the characters
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(exc, text)], source) from None
    except RecursionError:  # the limits above should make this unreachable
        raise ConfigError([("<top>", f"nested too deeply (over {MAX_YAML_DEPTH} levels)")],
                          source) from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file with errors that give the file, line and column and say what to do."""
    p = Path(path)
    name = str(p)
    try:
        if not p.exists():
            raise ConfigError([("<file>", f"config file {short_repr(name)} does not exist")])
        if p.is_dir():
            raise ConfigError([("<file>", f"{short_repr(name)} is a folder; give a YAML file "
                                          f"in it")])
        with p.open("rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as exc:  # permissions, a name too long, a symlink loop, ...
        raise ConfigError([("<file>", f"cannot read {short_repr(name)}: "
                                      f"{exc.strerror or exc}")]) from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError([("<file>", f"the file is over {MAX_YAML_BYTES // 2**20} MiB; a "
                                      f"config is a few KB: is this the right file?")], name)
    if b"\0" in raw:
        raise ConfigError([("<file>", "this is a binary file, not YAML text: is this the "
                                      "right file?")], name)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError([(f"line {line}", f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                                            f"offset {exc.start}); save the file as UTF-8")],
                          name) from None
    data = parse_yaml(text, name)
    if data is None:
        raise ConfigError([("<top>", "the file is empty")], name)
    return data


# ---------------------------------------------------------------------------- --set

_SEGMENT = re.compile(r"([^\[\]]*)((?:\[[^\[\]]*\])*)")


def split_path(path: str) -> list[str | int]:
    """``pipeline[2].options.x`` → ``['pipeline', 2, 'options', 'x']``; ConfigError if bad."""
    out: list[str | int] = []
    for seg in path.split("."):
        m = _SEGMENT.fullmatch(seg)
        if m is None:
            raise ConfigError([(path, "unbalanced [ ] in the path; write an index as "
                                      "pipeline[2] or a key as lm.options.name")])
        key, brackets = m.group(1).strip(), m.group(2)
        if not key:
            raise ConfigError([(path, "empty key in the path (two dots, or a dot or [ at an "
                                      "end); write e.g. lm.options.temperature")])
        out.append(key)
        for idx in re.findall(r"\[([^\[\]]*)\]", brackets):
            if not re.fullmatch(r"\s*[0-9]+\s*", idx):
                raise ConfigError([(path, f"index [{idx}] is not a number; write e.g. "
                                          f"pipeline[2] (counting from 0)")])
            out.append(int(idx))
    return out


def _where(parts: list[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def parse_value(raw: str) -> Any:
    """A ``--set`` value: YAML (``1``, ``true``, ``[1, 2]``), else the text itself."""
    try:
        return parse_yaml(raw)
    except ConfigError as exc:
        if any(m.startswith("refused") for _, m in exc.problems):
            raise ConfigError([("--set", f"value {clip(raw)}: {exc.problems[0][1]}")]) from None
        return raw  # not YAML: the text itself


def apply_overrides(data: dict[str, Any], overrides: list[str],
                    source: str | None = None) -> dict[str, Any]:
    """Apply ``--set path=value`` overrides to raw config data (before validation).

    ``path`` starts with a stage name (``lm.options.temperature=0.5``), a top-level key
    (``device=cuda``) or ``pipeline[2]...``; ``[N]`` also picks an item of a list option.
    Values are parsed as YAML (``1``, ``true``, ``[1, 2]``, ``null``). ``source`` names the
    config in errors.
    """
    try:
        return _apply_overrides(data, overrides)
    except ConfigError as exc:
        raise ConfigError(exc.problems, source) from None


def _apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    import copy

    if not isinstance(data, dict):
        raise ConfigError([("<top>", f"the config is a {type(data).__name__}, not a mapping "
                                     f"with a 'pipeline' list, so --set has nothing to set")])
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError([(item, "an override must look like path=value, e.g. "
                                      "lm.options.temperature=0.5")])
        path, raw = item.split("=", 1)
        path = path.strip()
        if not path:
            raise ConfigError([(item, "empty path before '='")])
        parts = split_path(path)
        value = parse_value(raw)
        _set_path(data, parts, value, path)
    return data


def _set_path(data: dict[str, Any], parts: list[str | int], value: Any, path: str) -> None:
    target: Any = data
    head = parts[0]
    stages = data.get("pipeline")
    if head == "pipeline" and len(parts) > 1 and isinstance(parts[1], int):
        if not isinstance(stages, list):
            raise ConfigError([(path, "the config has no 'pipeline' list to index")])
        idx = parts[1]
        if idx >= len(stages):
            raise ConfigError([(path, f"the pipeline has {len(stages)} stages: pipeline[0] to "
                                      f"pipeline[{len(stages) - 1}]")])
        target, parts = stages[idx], parts[2:]
    elif head not in PipelineConfig.model_fields:
        if not isinstance(stages, list):
            raise ConfigError([(path, f"no stage named {short_repr(head)}: the config has no "
                                      f"'pipeline' list")])
        names = _stage_names([(s.get("name"), s.get("kind"), s.get("plugin"))
                              if isinstance(s, dict) else (None, "?", "?") for s in stages])
        if names.count(head) > 1:
            where = ", ".join(f"pipeline[{i}]" for i, n in enumerate(names) if n == head)
            raise ConfigError([(path, f"{short_repr(head)} names several stages ({where}); "
                                      f"pick one as pipeline[N], or give each its own name:")])
        plugins = [s.get("plugin") if isinstance(s, dict) else None for s in stages]
        if head not in names and plugins.count(head) == 1:
            names[plugins.index(head)] = head  # a plugin's name picks its only stage too
        if head not in names:
            close = difflib.get_close_matches(str(head), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError([(path, f"no stage named {short_repr(head)}{hint} Stages: "
                                      f"{', '.join(names)}; top-level keys: "
                                      f"{', '.join(PipelineConfig.model_fields)}")])
        target, parts = stages[names.index(head)], parts[1:]
    if not parts:
        raise ConfigError([(path, "say what to set, e.g. lm.options.temperature=0.5")])
    done: list[str | int] = []
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        where = _where([head, *done]) if isinstance(head, str) and done else str(head)
        if isinstance(p, int):
            if not isinstance(target, list):
                raise ConfigError([(path, f"[{p}]: {where} is not a list")])
            if p >= len(target):
                raise ConfigError([(path, f"[{p}]: {where} has {len(target)} items")])
            if last:
                target[p] = value
            else:
                target = target[p]
        else:
            if not isinstance(target, dict):
                raise ConfigError([(path, f"cannot set {short_repr(p)}: {where} is a "
                                          f"{type(target).__name__}, not a mapping")])
            if last:
                target[p] = value
            else:
                if target.get(p) is None:  # absent, or an empty YAML value (options:)
                    target[p] = {}
                target = target[p]
        done.append(p)


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate (phase 1) a YAML config file."""
    data = read_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides, str(path))
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


def build_observers(cfg: PipelineConfig, source: str | None = None) -> list[Any]:
    """The config's ``observers:``, made from the registered classes with validated options;
    all problems at once, each at its YAML path (``observers[0].options.path``)."""
    if not cfg.observers:
        return []
    from omniframe.plugins import PluginError, get_registry

    reg = get_registry()
    problems: list[tuple[str, str]] = []
    out = []
    for i, spec in enumerate(cfg.observers):
        prefix = f"observers[{i}]"
        try:
            factory = reg.observer(spec.plugin)
        except PluginError as exc:
            problems.append((f"{prefix}.plugin", str(exc)))
            continue
        model = getattr(factory, "Options", None)
        try:
            if isinstance(model, type) and issubclass(model, BaseModel):
                out.append(factory(model.model_validate(spec.options)))
            else:
                out.append(factory(**spec.options))
        except ValidationError as err:
            problems.extend(_pydantic_problems(err, f"{prefix}.options",
                                               list(getattr(model, "model_fields", {}))))
        except (TypeError, ValueError) as exc:
            problems.append((f"{prefix}.options", f"{type(exc).__name__}: {clip(str(exc))}"))
    if problems:
        raise ConfigError(problems, source)
    return out


def build_pipeline(cfg: PipelineConfig, **kwargs: Any) -> Any:
    """A ready pipeline from a validated config: see :func:`omniframe.pipeline.build_pipeline`
    (it lives with the pipeline; this name is kept for existing callers)."""
    from omniframe.pipeline import build_pipeline as build

    return build(cfg, **kwargs)


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
        observers=(list[ObserverSpec], []),
        tools=(list[str | ToolSpec], []),
    )
    schema = top.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.loads(json.dumps(schema))
