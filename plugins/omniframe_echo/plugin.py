"""Registers the echo stages."""

from __future__ import annotations

from collections.abc import Callable

from omniframe import hookimpl


@hookimpl
def register_stages(register: Callable[[type], None]) -> None:
    from omniframe_echo.stages import EchoCodec, EchoLM

    register(EchoLM)
    register(EchoCodec)
