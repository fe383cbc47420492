"""A process-wide cache of loaded models, so that many pipelines (server sessions, evaluation
runs) share one copy of the weights.

Stages ask for a model by a key that says everything that makes it different (URI, dtype,
device) and give a loader; the first caller loads it (in a worker thread, when called from
``Stage.setup``), the others wait and reuse it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

__all__ = ["Resources", "default_resources"]

T = TypeVar("T")


class Resources:
    """A thread-safe get-or-load cache."""

    def __init__(self) -> None:
        self._items: dict[Hashable, Any] = {}
        self._locks: dict[Hashable, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, key: Hashable, loader: Callable[[], T]) -> T:
        """Return the item for ``key``, calling ``loader()`` once if it is not there yet."""
        with self._guard:
            if key in self._items:
                return self._items[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key in self._items:
                return self._items[key]
            value = loader()
            with self._guard:
                self._items[key] = value
            return value

    async def aget(self, key: Hashable, loader: Callable[[], T]) -> T:
        """:meth:`get` from async code: loading runs in a worker thread."""
        import anyio.to_thread

        with self._guard:
            if key in self._items:
                return self._items[key]
        return await anyio.to_thread.run_sync(self.get, key, loader)

    def clear(self) -> None:
        with self._guard:
            self._items.clear()
            self._locks.clear()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items


_default = Resources()


def default_resources() -> Resources:
    """The process-wide cache."""
    return _default
