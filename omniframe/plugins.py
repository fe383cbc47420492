"""Plugin discovery (pluggy, entry-point group ``omniframe``) and the typed registry.

Built-in plugins are entry points of the ``omniframe`` distribution itself, so they load
exactly like third-party ones. ``OMNIFRAME_LOAD_PLUGINS`` (comma-separated entry-point or
distribution names) restricts which are loaded; ``OMNIFRAME_TRACE_PLUGINS=1`` logs every hook
call. Loading is lazy and happens once.

Every hook is called through pluggy, one plugin at a time (:func:`call_hook`: a subset hook
caller without the other plugins), so that tracing shows every call, an implementation may take
fewer arguments than its spec, and what a plugin registers is known to be its own. A plugin
that fails to import is skipped and remembered (:func:`failed_plugins`): the CLI warns,
``omniframe plugins`` lists it, and a config that needs one of its stages says why it is
missing; everything else works.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pluggy
import structlog

from omniframe import hookspecs
from omniframe.stage import KINDS, Stage, is_kind

__all__ = [
    "PluginError",
    "PluginInfo",
    "Registry",
    "call_hook",
    "failed_plugins",
    "get_registry",
    "load_plugins",
    "pm",
    "reset_plugins",
]

log = structlog.get_logger("omniframe.plugins")

pm = pluggy.PluginManager("omniframe")
pm.add_hookspecs(hookspecs)

_lock = threading.Lock()
_loaded = False
_registry: Registry | None = None


class PluginError(Exception):
    """A plugin could not be loaded or registered something inconsistent."""


@dataclass
class PluginInfo:
    """One loaded plugin: its entry-point name, distribution and version."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None


@dataclass
class Registry:
    """What the loaded plugins registered. Built once from the hooks, read everywhere."""

    stages: dict[tuple[str, str], type[Stage]] = field(default_factory=dict)
    stage_plugin: dict[tuple[str, str], str] = field(default_factory=dict)
    datasets: dict[str, Callable[..., Any]] = field(default_factory=dict)
    dataset_plugin: dict[str, str] = field(default_factory=dict)
    resolvers: dict[str, Callable[[str], Any]] = field(default_factory=dict)
    observers: dict[str, Callable[..., Any]] = field(default_factory=dict)
    """Observer classes (or factories) by name, for the ``observers:`` config key."""
    observer_plugin: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    """Entry-point plugins that failed to import and were skipped: name → why."""
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    tools: dict[str, Any] = field(default_factory=dict)
    """Registered tools (:class:`omniframe.tools.Tool`) by name."""
    tool_plugin: dict[str, str] = field(default_factory=dict)

    def stage(self, kind: str, name: str) -> type[Stage]:
        """The stage class registered as ``(kind, name)``; a helpful error otherwise."""
        cls = self.stages.get((kind, name))
        broken = "".join(f" {why}" for _, why in sorted(self.failed.items()))
        if cls is None and kind not in {k for k, _ in self.stages}:
            kinds = self.kinds()
            close = difflib.get_close_matches(kind, kinds, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise PluginError(f"unknown stage kind {kind!r}: no installed stage has it.{hint} "
                              f"Kinds: {', '.join(kinds)}.{broken}")
        if cls is None:
            names = sorted(n for k, n in self.stages if k == kind)
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            elsewhere = sorted(k for k, n in self.stages if n == name)
            if elsewhere:
                hint += f" ({name!r} exists as kind {', '.join(elsewhere)}.)"
            raise PluginError(
                f"no {kind} stage named {name!r}.{hint} Installed {kind} stages: "
                f"{', '.join(names) or 'none'}. `omniframe plugins` lists every plugin; "
                f"a missing one may need its extra, e.g. pip install 'omniframe[all]'.{broken}"
            )
        return cls

    def kinds(self) -> list[str]:
        """The well-known kinds (:data:`~omniframe.stage.KINDS`), then any other kind the
        installed stages have."""
        return [*KINDS, *sorted({k for k, _ in self.stages} - set(KINDS))]

    def observer(self, name: str) -> Callable[..., Any]:
        """The observer class (or factory) registered as ``name``; a helpful error otherwise."""
        factory = self.observers.get(name)
        if factory is None:
            names = sorted(self.observers)
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise PluginError(f"no observer named {name!r}.{hint} Registered observers: "
                              f"{', '.join(names) or 'none'} (`omniframe plugins` lists them).")
        return factory

    def plugin_of(self, kind: str, name: str) -> str:
        return self.stage_plugin.get((kind, name), "?")


def _allowlist() -> set[str] | None:
    raw = os.environ.get("OMNIFRAME_LOAD_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def load_plugins() -> None:
    """Load every entry-point plugin (or those allowed by OMNIFRAME_LOAD_PLUGINS), once."""
    global _loaded
    with _lock:
        if _loaded:
            return
        allow = _allowlist()
        for ep in importlib.metadata.entry_points(group="omniframe"):
            dist = ep.dist.name if ep.dist is not None else None
            if allow is not None and ep.name not in allow and (dist or "") not in allow:
                continue
            if pm.get_plugin(ep.name) is not None:
                continue
            try:
                module = ep.load()
            except Exception as exc:  # skipped: whatever does not need it still works
                from omniframe.config import clip

                _failed[ep.name] = (
                    f"plugin {ep.name!r} ({ep.value}, from {dist or 'unknown distribution'}) "
                    f"failed to import and was skipped: {type(exc).__name__}: "
                    f"{clip(str(exc))}. Reinstall it, or leave it out with "
                    f"OMNIFRAME_LOAD_PLUGINS=<the plugins you want>.")
                continue
            pm.register(module, name=ep.name)
            _infos[ep.name] = PluginInfo(
                name=ep.name, module=ep.value, distribution=dist,
                version=ep.dist.version if ep.dist is not None else None,
            )
        if os.environ.get("OMNIFRAME_TRACE_PLUGINS"):
            pm.trace.root.setwriter(lambda msg: log.debug("hook", call=msg.rstrip()))
            pm.enable_tracing()
        _loaded = True


_infos: dict[str, PluginInfo] = {}
_failed: dict[str, str] = {}


def failed_plugins() -> dict[str, str]:
    """The entry-point plugins that failed to import and were skipped: name → a message."""
    load_plugins()
    return dict(_failed)


def register_plugin(module: Any, name: str) -> None:
    """Register an in-process plugin (tests, notebooks); call :func:`reset_plugins` after.
    The installed plugins are loaded first, so they always come before it (a clash names
    them in the same order whatever ran before)."""
    global _registry
    load_plugins()
    try:
        hash(module)
    except TypeError:  # e.g. a SimpleNamespace: pluggy's subset callers need hashable plugins
        wrapped = types.ModuleType(name)
        wrapped.__dict__.update(vars(module))
        module = wrapped
    pm.register(module, name=name)
    _infos[name] = PluginInfo(name=name, module=getattr(module, "__name__", repr(module)))
    _registry = None


def unregister_plugin(name: str) -> None:
    global _registry
    plugin = pm.get_plugin(name)
    if plugin is not None:
        pm.unregister(plugin, name=name)
    _infos.pop(name, None)
    _registry = None


def plugin_commands() -> dict[str, list[str]]:
    """The CLI commands each plugin adds (by letting it register on a scratch group)."""
    import click

    out: dict[str, list[str]] = {}
    for name, kwargs, exc in call_hook("register_commands", lambda: {"cli": click.Group()}):
        if exc is not None:  # listing must not fail because of one plugin
            log.warning("plugin commands could not be listed", plugin=name, error=str(exc))
        else:
            out[name] = sorted(kwargs["cli"].commands)
    return out


def call_hook(hook: str, make_kwargs: Callable[[], dict[str, Any]],
              ) -> Iterator[tuple[str, dict[str, Any], Exception | None]]:
    """Call ``hook`` through pluggy once per plugin that implements it, in pluggy's call order
    (the last registered first), each time with the arguments ``make_kwargs()`` returns (the
    spec's; an implementation may take fewer). Yields ``(plugin name, those arguments, None)``
    after each call, or ``(..., exception)`` where the implementation raised; a
    :class:`PluginError` raised by a callback propagates."""
    load_plugins()
    for impl in reversed(getattr(pm.hook, hook).get_hookimpls()):
        kwargs = make_kwargs()
        try:
            _subset_caller(hook, impl.plugin)(**kwargs)
        except PluginError:
            raise
        except Exception as exc:
            yield impl.plugin_name, kwargs, exc
            continue
        yield impl.plugin_name, kwargs, None


def _subset_caller(hook: str, plugin: Any) -> Any:
    """``pm.hook.<hook>`` restricted to ``plugin``'s implementation."""
    others = [p for _, p in pm.list_name_plugin() if p is not None and p is not plugin]
    return pm.subset_hook_caller(hook, others)


def reset_plugins() -> None:
    """Forget the built registry (it is rebuilt from the hooks on next use)."""
    global _registry
    _registry = None


def _plugin_name(obj: Any) -> str:
    for name, plugin in pm.list_name_plugin():
        if plugin is obj:
            return name
    return "?"


def get_registry() -> Registry:
    """Load plugins if needed and build the registry from their hooks."""
    global _registry
    load_plugins()
    if _registry is not None:
        return _registry
    reg = Registry(plugins=dict(_infos))
    from omniframe import models

    for scheme, fn in models.BUILTIN_RESOLVERS.items():
        reg.resolvers[scheme] = fn

    for impl in pm.hook.register_stages.get_hookimpls():
        owner = impl.plugin_name

        def register(cls: type[Stage], _owner: str = owner) -> None:
            _check_stage_class(cls, _owner)
            key = (cls.kind, cls.name)
            if key in reg.stages and reg.stages[key] is not cls:
                raise PluginError(
                    f"{cls.kind} stage {cls.name!r} is registered twice: by plugin "
                    f"{reg.stage_plugin[key]!r} and by {_owner!r}. Rename one of them."
                )
            reg.stages[key] = cls
            reg.stage_plugin[key] = _owner

        _call_hook(impl, "register_stages", register)

    for impl in pm.hook.register_datasets.get_hookimpls():
        def reg_ds(name: str, factory: Callable[..., Any], _owner: str = impl.plugin_name) -> None:
            if name in reg.datasets:
                raise PluginError(f"dataset {name!r} is registered twice (second: {_owner!r})")
            reg.datasets[name] = factory
            reg.dataset_plugin[name] = _owner

        _call_hook(impl, "register_datasets", reg_ds)

    for impl in pm.hook.register_model_resolvers.get_hookimpls():
        def reg_res(scheme: str, fn: Callable[[str], Any]) -> None:
            reg.resolvers[scheme] = fn

        _call_hook(impl, "register_model_resolvers", reg_res)

    for impl in pm.hook.register_observers.get_hookimpls():
        def reg_obs(name: str, factory: Callable[..., Any], _owner: str = impl.plugin_name,
                    ) -> None:
            if not isinstance(name, str) or not name or not callable(factory):
                raise PluginError(f"plugin {_owner!r} registered observer {name!r} as "
                                  f"{factory!r}; expected register(name, class)")
            if name in reg.observers and reg.observers[name] is not factory:
                raise PluginError(f"observer {name!r} is registered twice: by plugin "
                                  f"{reg.observer_plugin[name]!r} and by {_owner!r}. Rename "
                                  f"one of them.")
            reg.observers[name] = factory
            reg.observer_plugin[name] = _owner

        _call_hook(impl, "register_observers", reg_obs)
    reg.failed = dict(_failed)

    _collect_tools(reg)
    _registry = reg
    return reg


def _collect_tools(reg: Registry) -> None:
    """The ``register_tools`` hooks into ``reg.tools``; a name registered twice, or something
    that is not a :class:`~omniframe.tools.Tool`, is a :class:`PluginError`."""
    from omniframe.tools import Tool

    for impl in pm.hook.register_tools.get_hookimpls():
        def reg_tool(tool: Any, _owner: str = impl.plugin_name) -> None:
            if not isinstance(tool, Tool):
                raise PluginError(f"plugin {_owner!r} registered {tool!r} as a tool; "
                                  f"register omniframe.tools.Tool(name, description, "
                                  f"parameters, fn) objects")
            if tool.name in reg.tools and reg.tools[tool.name] is not tool:
                raise PluginError(
                    f"tool {tool.name!r} is registered twice: by plugin "
                    f"{reg.tool_plugin[tool.name]!r} and by {_owner!r}. Rename one of them.")
            reg.tools[tool.name] = tool
            reg.tool_plugin[tool.name] = _owner

        _call_hook(impl, "register_tools", reg_tool)


def _call_hook(impl: Any, hook: str, register: Callable[..., None]) -> None:
    """Call one plugin's ``register_*`` hook; its own bug becomes a :class:`PluginError`
    that names the plugin (the CLI prints it as one line)."""
    try:  # through pluggy (tracing, fewer arguments), this plugin's implementation only
        _subset_caller(hook, impl.plugin)(register=register)
    except PluginError:
        raise
    except Exception as exc:
        from omniframe.config import clip

        raise PluginError(
            f"plugin {impl.plugin_name!r} failed in its {hook} hook: {type(exc).__name__}: "
            f"{clip(str(exc))}. Update or reinstall it, or leave it out with "
            f"OMNIFRAME_LOAD_PLUGINS=<the plugins you want>."
        ) from exc


def _check_stage_class(cls: Any, owner: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise PluginError(f"plugin {owner!r} registered {cls!r}, which is not a Stage subclass")
    for attr in ("kind", "name"):
        if not getattr(cls, attr, None):
            raise PluginError(f"plugin {owner!r}: stage class {cls.__name__} has no {attr!r}")
    if not is_kind(cls.kind):
        raise PluginError(
            f"plugin {owner!r}: stage {cls.__name__} has kind {cls.kind!r}; a kind is an "
            f"identifier (letters, digits, '_'), e.g. one of {', '.join(KINDS)}"
        )
