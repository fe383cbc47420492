"""Checking, before anything runs, that each stage gets the frames it needs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omniframe.stage import Stage

__all__ = ["IncompatibleStages", "check_chain", "satisfies"]


class IncompatibleStages(ValueError):
    """A stage needs frames that no stage before it produces.

    Attributes:
        stage: the stage's name in the pipeline.
        needs: the frame types of which it needs one (its :meth:`~Stage.required_inputs`).
        available: the frame types the stages before it produce.
        suggestion: which stage to put before it, in words.
    """

    def __init__(self, message: str, *, stage: str = "", needs: Sequence[type] = (),
                 available: Sequence[type] = (), suggestion: str = "") -> None:
        super().__init__(message)
        self.stage = stage
        self.needs = tuple(needs)
        self.available = tuple(available)
        self.suggestion = suggestion


def _names(types: Sequence[type]) -> str:
    return ", ".join(t.__name__ for t in types) or "nothing"


def _or(types: Sequence[type]) -> str:
    names = [t.__name__ for t in types]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _label(st: Stage) -> str:
    return f"{st.context.name!r} ({st.kind}: {st.name})"


def satisfies(produced: Sequence[type], needed: Sequence[type]) -> bool:
    """True when one of ``produced`` can be one of ``needed``: the same type, a subclass, or a
    base class (a stage that declares ``Frame`` may produce anything). Nothing needed: True."""
    if not needed:
        return True
    return any(issubclass(a, n) or issubclass(n, a) for a in produced for n in needed)


def _registered_producers(needed: Sequence[type], limit: int = 5) -> list[str]:
    """``kind: name`` of registered stages that declare one of ``needed``."""
    try:
        from omniframe.plugins import get_registry

        stages = get_registry().stages
    except Exception:  # the hint is optional; the error must not fail
        return []
    out = []
    for (kind, name), cls in sorted(stages.items()):
        if any(issubclass(p, n) for p in cls.produces for n in needed):
            out.append(f"{kind}: {name}")
    return out[:limit]


def _suggestion(stages: Sequence[Stage], i: int, needed: Sequence[type]) -> str:
    st = stages[i]
    later = [s for s in stages[i + 1:]
             if any(issubclass(p, n) for p in s.produces for n in needed)]
    if later:
        return (f"{_label(later[0])}, after it, produces {_or(needed)}: "
                f"put {later[0].context.name!r} before {st.context.name!r}")
    known = _registered_producers(needed)
    eg = f" (e.g. {', '.join(known)})" if known else ""
    return f"put a stage that produces {_or(needed)}{eg} before {st.context.name!r}"


def check_chain(stages: Sequence[Stage]) -> None:
    """Raise :class:`IncompatibleStages` if a stage can never receive its main input.

    Frames flow down the chain and every stage passes on what it does not consume, so what
    can reach stage *k* is everything the stages before it produce. Stage *k* is satisfied
    when one of its :meth:`~omniframe.stage.Stage.required_inputs` (or a subclass) can reach
    it: control frames alone (an end of turn) do not satisfy a codec or a sink. A stage that
    declares a base class (``Frame``) may produce any of its subclasses.
    """
    from omniframe.stage import Stage

    available: list[type] = []
    for i, st in enumerate(stages):
        if i:
            needed = st.required_inputs()
            if not satisfies(available, needed):
                upstream = list(dict.fromkeys(available))
                suggestion = _suggestion(stages, i, needed)
                general = Stage.required_inputs(st)  # the class's, whatever its options
                note = ""
                if tuple(general) != tuple(needed) and satisfies(available, general):
                    fits = [t for t in general if satisfies(available, (t,))]
                    note = (f" with its options (with other options it reads {_or(fits)}, "
                            f"which the stages before it produce)")
                prev = stages[i - 1]
                raise IncompatibleStages(
                    f"stage {_label(st)} consumes {_or(needed)} as its main input{note}, but the "
                    f"stages before it produce only {_names(upstream)} (the one right before "
                    f"it, {_label(prev)}, produces {_names(prev.produces)}). "
                    f"{suggestion[0].upper()}{suggestion[1:]}.",
                    stage=st.context.name, needs=needed, available=upstream,
                    suggestion=suggestion,
                )
        available.extend(st.produces)
