"""Logging setup for applications (the CLI). Libraries only call structlog.get_logger()."""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure_logging", "is_verbose"]

_level = logging.WARNING


def is_verbose() -> bool:
    """True when the application asked for info or debug logs."""
    return _level <= logging.INFO


class _Stderr:
    """Writes to whatever ``sys.stderr`` is at the time (it may be swapped, e.g. in tests)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Readable lines on a terminal, JSON lines otherwise (or as ``json`` says). To stderr,
    so that stdout carries only results."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    global _level
    lvl = getattr(logging, level.upper(), logging.INFO)
    _level = lvl
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr)
