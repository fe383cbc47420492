"""Registers the built-in tools (``current_time``, ``calculator``) with ``register_tools``."""

from __future__ import annotations

from collections.abc import Callable

from omniframe import hookimpl


@hookimpl
def register_tools(register: Callable[[object], None]) -> None:
    from omniframe_tools.builtin import CALCULATOR, CURRENT_TIME

    register(CURRENT_TIME)
    register(CALCULATOR)
