"""Plugin discovery (pluggy, entry-point group ``omniframe``) and the typed registry.

Built-in plugins are entry points of the ``omniframe`` distribution itself, so they load
exactly like third-party ones. ``OMNIFRAME_LOAD_PLUGINS`` (comma-separated entry-point or
distribution names) restricts which are loaded; ``OMNIFRAME_TRACE_PLUGINS=1`` logs every hook
call. Loading is lazy and happens once.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy
import structlog

from omniframe import hookspecs
from omniframe.stage import KINDS, Stage

__all__ = [
    "PluginError",
    "PluginInfo",
    "Registry",
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
    plugins: dict[str, PluginInfo] = field(default_factory=dict)

    def stage(self, kind: str, name: str) -> type[Stage]:
        """The stage class registered as ``(kind, name)``; a helpful error otherwise."""
        if kind not in KINDS:
            raise PluginError(f"unknown stage kind {kind!r}; expected one of {', '.join(KINDS)}")
        cls = self.stages.get((kind, name))
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
                f"a missing one may need its extra, e.g. pip install 'omniframe[all]'."
            )
        return cls

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
            except Exception as exc:
                from omniframe.config import clip

                raise PluginError(
                    f"plugin {ep.name!r} ({ep.value}, from {dist or 'unknown distribution'}) "
                    f"failed to import: {type(exc).__name__}: {clip(str(exc))}. Reinstall it, "
                    f"or leave it out with OMNIFRAME_LOAD_PLUGINS=<the plugins you want>."
                ) from exc
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


def register_plugin(module: Any, name: str) -> None:
    """Register an in-process plugin (tests, notebooks); call :func:`reset_plugins` after.
    The installed plugins are loaded first, so they always come before it (a clash names
    them in the same order whatever ran before)."""
    global _registry
    load_plugins()
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

    load_plugins()
    out: dict[str, list[str]] = {}
    for impl in pm.hook.register_commands.get_hookimpls():
        group = click.Group()
        try:
            impl.function(cli=group)
        except Exception as exc:  # listing must not fail because of one plugin
            log.warning("plugin commands could not be listed", plugin=impl.plugin_name,
                        error=str(exc))
            continue
        out[impl.plugin_name] = sorted(group.commands)
    return out


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
    _registry = reg
    return reg


def _call_hook(impl: Any, hook: str, register: Callable[..., None]) -> None:
    """Call one plugin's ``register_*`` hook; its own bug becomes a :class:`PluginError`
    that names the plugin (the CLI prints it as one line)."""
    try:
        impl.function(register=register)
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
    if cls.kind not in KINDS:
        raise PluginError(
            f"plugin {owner!r}: stage {cls.__name__} has kind {cls.kind!r}; "
            f"expected one of {', '.join(KINDS)}"
        )
