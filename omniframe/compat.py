"""Checking, before anything runs, that each stage gets the frames it needs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omniframe.stage import Stage

__all__ = ["IncompatibleStages", "check_chain"]


class IncompatibleStages(ValueError):
    """A stage consumes frames that no stage before it produces."""


def _names(types: Sequence[type]) -> str:
    return ", ".join(t.__name__ for t in types) or "nothing"


def check_chain(stages: Sequence[Stage]) -> None:
    """Raise :class:`IncompatibleStages` if a stage can never receive what it consumes.

    Frames flow down the chain and every stage passes on what it does not consume, so what
    reaches stage *k* is everything the stages before it produce. A stage is satisfied when
    at least one of its ``consumes`` types (or a subclass) can reach it. Sinks that consume
    several types are satisfied by any one of them. A stage that declares a base class
    (``Frame``) may produce any of its subclasses.
    """
    available: list[type] = []
    for i, st in enumerate(stages):
        if i and st.consumes:
            ok = any(issubclass(a, c) or issubclass(c, a) for a in available for c in st.consumes)
            if not ok:
                prev = stages[i - 1]
                raise IncompatibleStages(
                    f"stage {st.context.name!r} ({st.kind}: {st.name}) consumes "
                    f"{_names(st.consumes)}, but no stage before it produces any of these; "
                    f"the stage before it, {prev.context.name!r} ({prev.kind}: {prev.name}), "
                    f"produces {_names(prev.produces)}. Put a stage that produces "
                    f"{st.consumes[0].__name__} before {st.context.name!r}."
                )
        available.extend(st.produces)
