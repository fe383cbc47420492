"""Function calling: tools an LM may call, their JSON-schema arguments, and running a call.

A :class:`Tool` is a name, a description, a JSON schema of its arguments (an ``object``
schema) and, for a *server-side* tool, a Python function (sync or async) that answers a call.
A *client-side* tool has no function: the LM emits the call as a
:class:`~omniframe.frames.ToolCallFrame`, ends its turn with ``reason="tool_call"``, and the
answer comes back into the pipeline as a :class:`~omniframe.frames.ToolResultFrame` (an
OpenAI Realtime client's ``function_call_output``).

Plugins register server-side tools with the ``register_tools`` hook; a pipeline config lists
the tools its LM may use (``tools:``, the names of registered tools or inline client-side
declarations), and :func:`build_toolbox` turns that list into the pipeline's :class:`Toolbox`,
which stages read as ``self.context.tools``.

Running a call never raises for the tool's sake: bad JSON, arguments that do not fit the
schema, an unknown tool, an exception in the tool and a timeout all become a
:class:`ToolResult` with ``is_error=True`` whose output says what went wrong, which the model
reads like any other result.

Argument schemas are checked by a small validator of the JSON-schema subset tools use
(:func:`validate`): ``type`` (one or a list), ``properties``, ``required``,
``additionalProperties`` (a boolean), ``enum``, ``const``, ``items``, ``minimum``/``maximum``,
``minLength``/``maxLength``, ``minItems``/``maxItems``. Annotations (``description``,
``title``, ``default``, ``examples``, ``format``) are accepted and not enforced; so is any
other keyword.

This module imports nothing heavy (json, re, and anyio for the timeouts).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ParsedOutput",
    "StreamGate",
    "Tool",
    "ToolCall",
    "ToolResult",
    "ToolSpec",
    "Toolbox",
    "build_toolbox",
    "check_schema",
    "format_tool_call",
    "new_call_id",
    "parse_tool_calls",
    "template_supports_tools",
    "tool_system_prompt",
    "validate",
]

log = structlog.get_logger("omniframe.tools")

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""Tool names: what OpenAI's function calling accepts."""

DEFAULT_TIMEOUT_S = 10.0
MAX_OUTPUT_CHARS = 4000
"""A result longer than this is cut (it goes into the model's prompt)."""

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


# --------------------------------------------------------------------------------- schemas


def check_schema(schema: Any, path: str = "parameters") -> list[str]:
    """Problems that make ``schema`` unusable as a tool's ``parameters`` (empty: fine).

    The top level must be an ``object`` schema; the keywords the validator enforces must
    have the right shapes all the way down."""
    problems = _check(schema, path)
    if not problems and schema.get("type", "object") != "object":
        problems.append(f"{path}: a tool's parameters are an object schema "
                        f"(type: object), not type {schema.get('type')!r}")
    return problems


def _check(schema: Any, path: str) -> list[str]:
    if not isinstance(schema, dict):
        return [f"{path}: a schema is a mapping, not {type(schema).__name__}"]
    out: list[str] = []
    t = schema.get("type")
    types = t if isinstance(t, list) else [t] if t is not None else []
    for name in types:
        if name not in _TYPES:
            out.append(f"{path}.type: unknown type {name!r}; one of {', '.join(_TYPES)}")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            out.append(f"{path}.properties: a mapping of property name to schema")
        else:
            for key, sub in props.items():
                out.extend(_check(sub, f"{path}.properties.{key}"))
    req = schema.get("required")
    if req is not None and not (isinstance(req, list) and all(isinstance(r, str) for r in req)):
        out.append(f"{path}.required: a list of property names")
    if "enum" in schema and not isinstance(schema["enum"], list):
        out.append(f"{path}.enum: a list of allowed values")
    if "items" in schema:
        out.extend(_check(schema["items"], f"{path}.items"))
    extra = schema.get("additionalProperties")
    if extra is not None and not isinstance(extra, bool):
        out.extend(_check(extra, f"{path}.additionalProperties"))
    return out


def validate(value: Any, schema: Mapping[str, Any], path: str = "arguments") -> list[str]:
    """What is wrong with ``value`` for ``schema`` (the subset in the module docstring);
    empty when it fits. Each problem names where (``arguments.unit``) and what was
    expected."""
    out: list[str] = []
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        if not any(_TYPES.get(name, lambda v: True)(value) for name in types):
            return [f"{path}: expected {' or '.join(map(str, types))}, got "
                    f"{_short(value)} ({type(value).__name__})"]
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {_short(value)} is not one of {schema['enum']!r}")
    if "const" in schema and value != schema["const"]:
        out.append(f"{path}: must be {schema['const']!r}, got {_short(value)}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{path}: {value} is less than the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{path}: {value} is more than the maximum {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            out.append(f"{path}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            out.append(f"{path}: longer than {schema['maxLength']} characters")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            out.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            out.append(f"{path}: more than {schema['maxItems']} items")
        items = schema.get("items")
        if isinstance(items, dict):
            for i, v in enumerate(value):
                out.extend(validate(v, items, f"{path}[{i}]"))
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key in schema.get("required") or ():
            if key not in value:
                out.append(f"{path}.{key}: required but missing")
        for key, v in value.items():
            if key in props:
                out.extend(validate(v, props[key], f"{path}.{key}"))
            elif schema.get("additionalProperties") is False:
                known = ", ".join(props) or "none"
                out.append(f"{path}.{key}: unknown argument (known: {known})")
            elif isinstance(schema.get("additionalProperties"), dict):
                out.extend(validate(v, schema["additionalProperties"], f"{path}.{key}"))
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else text[:limit] + "…"


# ------------------------------------------------------------------------------ the tools


@dataclass(frozen=True, eq=False)
class Tool:
    """A function the model may call.

    Parameters:
        name: letters, digits, ``_`` and ``-``, at most 64 (what OpenAI accepts).
        description: what it does and when to use it; the model reads it.
        parameters: JSON schema of the arguments, an ``object`` schema.
        fn: the Python function answering a call, called with the arguments as keywords;
            sync (run in a worker thread) or async. It returns anything JSON can encode.
            None makes the tool client-side: someone outside the pipeline answers it.
        timeout_s: how long a call may take before it is an error result (server-side).

    Tools compare (and hash) by identity: the registry holds each registered object.
    """

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}})
    fn: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise ValueError(f"tool name {self.name!r}: use 1 to 64 letters, digits, '_' or "
                             f"'-'")
        problems = check_schema(self.parameters)
        if problems:
            raise ValueError(f"tool {self.name!r}: {'; '.join(problems)}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"tool {self.name!r}: timeout_s must be a positive number")
        if self.fn is not None and not callable(self.fn):
            raise ValueError(f"tool {self.name!r}: fn is not callable")

    @property
    def client_side(self) -> bool:
        """True when no function answers it here: the result comes from outside."""
        return self.fn is None

    def schema(self) -> dict[str, Any]:
        """The declaration chat templates and OpenAI take:
        ``{"type": "function", "function": {"name", "description", "parameters"}}``."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": json.loads(json.dumps(self.parameters))}}


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: ``arguments`` is JSON text (an object)."""

    call_id: str
    name: str
    arguments: str = "{}"

    def args(self) -> Any:
        """The arguments decoded (None when they are not JSON)."""
        try:
            return json.loads(self.arguments)
        except ValueError:
            return None


@dataclass(frozen=True)
class ToolResult:
    """The answer to a call: ``output`` is JSON text (or a client's text); ``is_error``
    when the call failed and ``output`` says why."""

    call_id: str
    name: str
    output: str
    is_error: bool = False


def new_call_id() -> str:
    """A fresh call id, ``call_`` + 24 hex digits (OpenAI's ids look alike)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def _error(call: ToolCall, message: str) -> ToolResult:
    return ToolResult(call.call_id, call.name, json.dumps({"error": message},
                                                          ensure_ascii=False), True)


class Toolbox:
    """The tools of one pipeline, by name (read-only once built)."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            if t.name in self._tools:
                raise ValueError(f"tool {t.name!r} is listed twice")
            self._tools[t.name] = t

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Any:
        return iter(self._tools.values())

    def __repr__(self) -> str:
        return f"Toolbox({', '.join(self._tools)})"

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def schemas(self) -> list[dict[str, Any]]:
        """Every tool's declaration (:meth:`Tool.schema`), for ``apply_chat_template``."""
        return [t.schema() for t in self._tools.values()]

    def check_call(self, call: ToolCall) -> tuple[dict[str, Any] | None, str | None]:
        """The decoded arguments of ``call``, or why it cannot be run."""
        tool = self._tools.get(call.name)
        if tool is None:
            return None, (f"there is no tool named {call.name!r}; the tools are: "
                          f"{', '.join(self._tools) or 'none'}")
        try:
            args = json.loads(call.arguments or "{}")
        except ValueError as exc:
            return None, f"the arguments are not JSON ({exc})"
        if not isinstance(args, dict):
            return None, f"the arguments must be a JSON object, got {_short(args)}"
        problems = validate(args, tool.parameters)
        if problems:
            return None, "invalid arguments: " + "; ".join(problems[:5])
        return args, None

    async def run(self, call: ToolCall) -> ToolResult:
        """Run a server-side call. Never raises for the tool's sake (cancellation passes):
        every failure is a result with ``is_error=True`` that says what went wrong."""
        args, problem = self.check_call(call)
        if problem is not None:
            log.info("tool call refused", tool=call.name, call_id=call.call_id, why=problem)
            return _error(call, problem)
        tool = self._tools[call.name]
        if tool.fn is None:
            return _error(call, f"{call.name!r} is a client-side tool: its result comes "
                                f"from the client, not from this server")
        assert args is not None
        try:
            with anyio.fail_after(tool.timeout_s):
                if inspect.iscoroutinefunction(tool.fn):
                    value = await tool.fn(**args)
                else:  # a stuck sync tool is abandoned in its thread at the timeout
                    value = await anyio.to_thread.run_sync(partial(tool.fn, **args),
                                                           abandon_on_cancel=True)
        except TimeoutError:
            log.warning("tool timed out", tool=call.name, timeout_s=tool.timeout_s)
            return _error(call, f"{call.name} did not answer within {tool.timeout_s:g} s")
        except Exception as exc:
            log.warning("tool failed", tool=call.name, error=f"{type(exc).__name__}: {exc}")
            return _error(call, f"{call.name} failed: {type(exc).__name__}: {exc}")
        try:
            output = json.dumps(value, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return _error(call, f"{call.name} returned a value JSON cannot encode ({exc})")
        if len(output) > MAX_OUTPUT_CHARS:
            output = json.dumps({"truncated": True, "output": output[:MAX_OUTPUT_CHARS]},
                                ensure_ascii=False)
        return ToolResult(call.call_id, call.name, output, False)


# -------------------------------------------------------------------------------- config


class ToolSpec(BaseModel):
    """An inline tool declaration in a config: a client-side tool (the client answers it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="letters, digits, '_' and '-', at most 64")
    description: str = ""
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON schema of the arguments (an object schema)")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"tool name {v[:80]!r}: use 1 to 64 letters, digits, '_' or '-'")
        return v

    @field_validator("parameters")
    @classmethod
    def _schema_ok(cls, v: dict[str, Any]) -> dict[str, Any]:
        problems = check_schema(v)
        if problems:
            raise ValueError("; ".join(problems[:5]))
        return v


def build_toolbox(entries: Iterable[str | ToolSpec], registered: Mapping[str, Tool]
                  ) -> Toolbox:
    """The toolbox for a config's ``tools:`` list: a name picks a registered (server-side)
    tool; a :class:`ToolSpec` declares a client-side one. Raises ValueError listing
    ``(index, problem)`` pairs in ``args[0]`` (the config turns them into ConfigErrors)."""
    import difflib

    tools: list[Tool] = []
    problems: list[tuple[int, str]] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        name = entry if isinstance(entry, str) else entry.name
        if name in seen:
            problems.append((i, f"tool {name!r} is listed twice"))
            continue
        seen.add(name)
        if isinstance(entry, str):
            tool = registered.get(entry)
            if tool is None:
                close = difflib.get_close_matches(entry, list(registered), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                problems.append((i, f"no registered tool named {entry!r}.{hint} Registered: "
                                    f"{', '.join(sorted(registered)) or 'none'}; a tool the "
                                    f"client answers is declared inline with name, "
                                    f"description and parameters"))
                continue
            tools.append(tool)
        else:
            if entry.name in registered:
                problems.append((i, f"{entry.name!r} is a registered tool: list it by name, "
                                    f"or give the client-side tool another name"))
                continue
            tools.append(Tool(entry.name, entry.description, entry.parameters, None))
    if problems:
        raise ValueError(problems)
    return Toolbox(tools)


# ---------------------------------------------------------------------- prompts and parsing


def template_supports_tools(template: str | None) -> bool:
    """Whether a Jinja chat template renders the ``tools`` it is given (transformers passes
    ``tools=`` to every template; one that never reads it drops them silently)."""
    return bool(template) and re.search(r"\btools\b", template or "") is not None


def tool_system_prompt(schemas: list[dict[str, Any]]) -> str:
    """Instructions that declare ``schemas`` in the Hermes / Qwen2.5 style, for a chat
    template that does not render tools itself (appended to the system prompt)."""
    lines = "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)
    return ("# Tools\n\nYou may call one or more functions to answer the user. The function "
            "signatures are within <tools></tools> XML tags:\n<tools>\n" + lines +
            "\n</tools>\n\nTo call a function, reply with only a JSON object with the "
            "function name and arguments within <tool_call></tool_call> XML tags:\n"
            "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
            "</tool_call>\nThe result comes back within <tool_response></tool_response> "
            "tags; then answer the user with it.")


def format_tool_call(name: str, arguments: Any) -> str:
    """A call as Hermes / Qwen2.5 write it: ``<tool_call>\\n{...}\\n</tool_call>``."""
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments)
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ParsedOutput:
    """What a model generated, split: ``text`` for the user (before any call), ``calls`` as
    ``(name, arguments JSON text)`` pairs, and ``problems`` with calls that did not parse."""

    text: str
    calls: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _as_call(obj: Any) -> tuple[str, str] | None:
    """``{"name", "arguments"|"parameters"}`` (or OpenAI's ``{"function": {...}}``) as a
    call; None for anything else."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict) and "name" not in obj:
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    if set(obj) - {"name", "arguments", "parameters", "type", "id"}:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # OpenAI's form: the arguments as JSON text
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return name, json.dumps(args, ensure_ascii=False)


def _calls_in(payload: Any) -> list[tuple[str, str]] | None:
    items = payload if isinstance(payload, list) else [payload]
    calls = [_as_call(item) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def parse_tool_calls(text: str, names: Iterable[str] | None = None) -> ParsedOutput:
    """Find the tool calls in a model's output.

    Formats: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes,
    Qwen2.5; one or several, the last one possibly unclosed where generation stopped; a
    block may hold a list of calls), and a whole answer that is one bare JSON call or a list
    of them (optionally in a code fence), as Llama 3 style models write. ``arguments`` may
    be an object or JSON text; ``parameters`` is read as ``arguments``. A bare JSON answer
    counts as a call only when its name is in ``names`` (when given), so that an answer that
    happens to be JSON is not taken for a call. Never raises."""
    known = set(names) if names is not None else None
    start = text.find(OPEN)
    if start >= 0:
        out = ParsedOutput(text=text[:start].rstrip())
        rest = text[start:]
        while True:
            i = rest.find(OPEN)
            if i < 0:
                break
            rest = rest[i + len(OPEN):]
            j = rest.find(CLOSE)
            body, rest = (rest, "") if j < 0 else (rest[:j], rest[j + len(CLOSE):])
            body = body.strip()
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            calls = _calls_in(payload) if payload is not None else None
            if calls is None:
                out.problems.append(f"not a tool call: {body[:200]!r}")
            else:
                out.calls.extend(calls)
        return out
    stripped = text.strip()
    m = _FENCE.match(stripped)
    if m:
        stripped = m.group(1)
    if stripped[:1] in ("{", "["):
        try:
            payload = json.loads(stripped)
        except ValueError:
            return ParsedOutput(text=text)
        calls = _calls_in(payload)
        if calls and (known is None or all(n in known for n, _ in calls)):
            return ParsedOutput(text="", calls=calls)
    return ParsedOutput(text=text)


class StreamGate:
    """Decides, as text streams in, what may go to the user at once: everything except a
    possible tool call. Text that starts with ``{``, ``[`` or a code fence (a bare JSON call,
    perhaps) is held until the end; so is everything from ``<tool_call>`` on, and a tail that
    could be the start of one. ``emitted + held`` is always the text fed so far.

    At the end, :func:`parse_tool_calls` on the whole text decides: no call, and
    :meth:`flush` releases what was held."""

    def __init__(self) -> None:
        self.text = ""
        self.emitted = 0
        self._bare: bool | None = None  # decided at the first non-space character
        self._call = False

    @property
    def held(self) -> str:
        return self.text[self.emitted:]

    def feed(self, new: str) -> str:
        """Add ``new``; returns the text that may be spoken now."""
        self.text += new
        if self._call:
            return ""
        if self._bare is None:
            head = self.text.lstrip()
            if not head:
                return ""
            if head[0] in "{[`":
                self._bare = True
            elif OPEN.startswith(head[:len(OPEN)]) and len(head) < len(OPEN):
                return ""  # "<tool" so far: wait
            else:
                self._bare = False
        if self._bare:
            return ""
        i = self.text.find(OPEN, self.emitted)
        if i >= 0:
            self._call = True
            end = i
        else:
            end = len(self.text)
            for k in range(min(len(OPEN) - 1, len(self.text) - self.emitted), 0, -1):
                if OPEN.startswith(self.text[-k:]):
                    end = len(self.text) - k
                    break
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

    def flush(self) -> str:
        """Release everything held (when the whole text turned out to hold no call)."""
        out = self.held
        self.emitted = len(self.text)
        return out
