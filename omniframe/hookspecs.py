"""Every hook a plugin may implement. Hooks run once, at start-up, to register things;
frames never travel through hooks.

A plugin is a module (registered under the ``omniframe`` entry-point group) with functions
marked ``@omniframe.hookimpl``, named after the specs below. An implementation may take only
some of a spec's arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from omniframe.model_uris import ModelRef
    from omniframe.stage import Stage
    from omniframe.tools import Tool

hookspec = pluggy.HookspecMarker("omniframe")
hookimpl = pluggy.HookimplMarker("omniframe")

__all__ = ["hookimpl", "hookspec"]


@hookspec
def register_stages(register: Callable[[type[Stage]], None]) -> None:
    """Register stage classes: call ``register(StageClass)`` once per class.

    The class's ``kind`` and ``name`` pick it in configs (``kind: lm``, ``plugin: echo``);
    ``(kind, name)`` must be unique across installed plugins.
    """


@hookspec
def register_datasets(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register evaluation datasets: ``register(name, factory)``, where ``factory(**options)``
    returns an iterable of dataset items (see ``omniframe_eval`` for the item type)."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``omniframe`` command line, e.g. ``@cli.command() def eval(): ...``.

    Import heavy libraries inside the command function, not at module level.
    """


@hookspec
def register_model_resolvers(register: Callable[[str, Callable[[str], ModelRef]], None]) -> None:
    """Register model URI schemes: ``register(scheme, resolve)``, where ``resolve(uri)``
    returns a :class:`omniframe.model_uris.ModelRef` (a local path, or a random preset) or raises
    :class:`omniframe.model_uris.ModelNotAvailable` saying what was tried and what to do."""


@hookspec
def register_observers(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register observers that configs may attach (``observers: [{plugin: name, options:
    {...}}]``): ``register(name, ObserverClass)``. The class is called with its validated
    options: ``ObserverClass(options)`` where it has a pydantic ``Options`` model (a
    :class:`omniframe.stage.StageOptions` subclass), else ``ObserverClass(**options)``.

    An observer has ``on_frame(stage, kind, frame, now)``, called inline for every frame a
    stage emits (keep it O(1), no blocking I/O), and sees one
    :class:`omniframe.frames.MetricsFrame` per turn; an optional ``on_run_end(result)`` is
    called once after the run (close files there). Names must be unique across plugins.
    """


@hookspec
def register_tools(register: Callable[[Tool], None]) -> None:
    """Register tools (function calling) that configs may give an LM: ``register(Tool(name,
    description, parameters, fn))`` once per tool (see :class:`omniframe.tools.Tool`).

    Tool names must be unique across installed plugins. A pipeline uses only the tools its
    config lists under ``tools:``. Import heavy libraries inside ``fn``, not at module level.
    """
