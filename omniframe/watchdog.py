"""The pipeline's watchdog: a stage that stops making progress stops the run, by name.

Every stage's activity is tracked by phase (``setup``, ``process``, ``interrupt``,
``end_of_stream``, ``teardown``; sources ``generate``). Progress is the start of a phase and
every frame the stage emits; time spent waiting for a full downstream queue does not count
(the slow stage is the one downstream). When a stage is silent for longer than its phase's
limit, the run fails with a :class:`StageStuck` naming the stage, the phase and how long it
was silent.

Two watchers cover the ways a stage can hang:

* an async task on the event loop, for a stage that awaits forever or waits on a thread
  (``run_sync``/``run_compute``) that never returns;
* a thread, for a stage that blocks the event loop itself (``time.sleep`` or a busy loop in
  ``process``). It names the stage from the loop thread's stack, raises :class:`StageStuck`
  in that thread (which ends Python code, not a blocking C call), and if the loop is still
  blocked two seconds later calls ``on_hang`` (the CLI prints the error and exits).

Limits come from the config (``watchdog:`` at the top for all stages, ``watchdog:`` on a stage
to change its own), then the stage class (``Stage.watchdog``), then :class:`WatchdogLimits`'s
defaults, chosen never to fire on a healthy run.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from omniframe.stage import Stage

__all__ = ["Activity", "LoopMonitor", "StageStuck", "WatchdogLimits", "merge_limits"]

log = structlog.get_logger("omniframe.watchdog")

PHASES = ("setup", "generate", "process", "interrupt", "end_of_stream", "teardown")


class StageStuck(Exception):
    """A stage made no progress for longer than its watchdog limit."""


class WatchdogLimits(BaseModel):
    """Seconds a stage may stay silent in each phase; ``null`` turns a limit off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    setup: float | None = Field(default=900.0, gt=0,
                                description="loading models (a first download included)")
    generate: float | None = Field(default=None, gt=0,
                                   description="a source between two frames (off: a live "
                                               "input may be silent for long)")
    process: float | None = Field(default=120.0, gt=0,
                                  description="one frame's processing, between two outputs")
    interrupt: float | None = Field(default=30.0, gt=0, description="handling a barge-in")
    end_of_stream: float | None = Field(default=300.0, gt=0,
                                        description="flushing at the end of the input")
    teardown: float | None = Field(default=60.0, gt=0, description="releasing resources")

    def limit(self, phase: str) -> float | None:
        return getattr(self, phase)


def merge_limits(*layers: Mapping[str, float | None] | WatchdogLimits | None) -> WatchdogLimits:
    """Later layers override earlier ones, field by field (only the fields they set)."""
    merged: dict[str, float | None] = {}
    for layer in layers:
        if layer is None:
            continue
        if isinstance(layer, WatchdogLimits):
            merged.update(layer.model_dump(exclude_unset=True))
        else:
            merged.update(layer)
    return WatchdogLimits.model_validate(merged)


@dataclass
class Activity:
    """What one stage is doing now, for the watchdog.

    The stage's side only sets ``phase`` and counts ``ticks`` (a phase entered, a frame
    emitted): no clock reads on the hot path. The watchdog, polling, stamps ``since`` when it
    sees the count move.
    """

    name: str
    kind: str
    limits: WatchdogLimits
    phase: str | None = None
    ticks: int = 0  # progress events so far
    waiting: bool = False  # blocked on a full downstream queue: not the stage's silence
    since: float = 0.0  # when the watchdog last saw progress
    source: Activity | None = None  # another activity whose ticks count as progress too
    _seen: int = -1

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.ticks += 1

    def leave(self) -> None:
        self.phase = None

    def overdue(self, now: float) -> tuple[str, float, float] | None:
        """``(phase, silent_s, limit_s)`` when over the limit, else None."""
        ticks = self.ticks + (self.source.ticks if self.source is not None else 0)
        if ticks != self._seen:
            self._seen, self.since = ticks, now
            return None
        phase = self.phase
        if phase is None or self.waiting:
            self.since = now  # silence starts when the stage's turn to work does
            return None
        limit = self.limits.limit(phase)
        silent = now - self.since
        if limit is None or silent <= limit:
            return None
        return phase, silent, limit

    def error(self, phase: str, silent: float, limit: float, how: str = "") -> StageStuck:
        key = f"watchdog.{phase}"
        return StageStuck(
            f"no progress for {silent:.1f} s in {phase}{how} (limit {limit:g} s). If the "
            f"stage is just slow, raise its limit: `{key}: <seconds>` on the stage in the "
            f"config (or at the top for every stage), or --set pipeline[i].{key}=<seconds>"
        )


def _stage_on_stack(thread_id: int, stages: Sequence[Stage]) -> Stage | None:
    """The innermost stage method running on ``thread_id``'s stack."""
    frame = sys._current_frames().get(thread_id)
    ids = {id(s): s for s in stages}
    while frame is not None:
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in ids:
            return ids[id(owner)]
        frame = frame.f_back
    return None


class LoopMonitor:
    """A thread that notices when the event loop stops turning, and why.

    The loop side calls :meth:`beat` often (a task in the pipeline). When no beat came for
    longer than the blocking stage's limit (its current phase's), the monitor reports a
    :class:`StageStuck` through ``report``, raises it in the loop thread, and calls
    ``on_hang`` if the loop is still blocked ``grace`` seconds later.
    """

    def __init__(self, activities: Mapping[str, Activity], stages: Sequence[Stage],
                 report: Callable[[str, str, StageStuck], None],
                 on_hang: Callable[[str], None] | None, *, grace: float = 2.0,
                 poll: float = 0.25) -> None:
        self.activities = activities
        self.stages = stages
        self.report = report
        self.on_hang = on_hang
        self.grace = grace
        self.poll = poll
        self.loop_thread = threading.get_ident()
        self.last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="omniframe-watchdog",
                                        daemon=True)

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        fired_at: float | None = None
        while not self._stop.wait(self.poll):
            now = time.monotonic()
            blocked = now - self.last_beat
            if fired_at is not None:
                if self.last_beat > fired_at:
                    fired_at = None  # the loop turned again: the error is on its way
                elif now - fired_at > self.grace and self.on_hang is not None:
                    self.on_hang(self._message)
                    return
                continue
            if blocked < 1.0:
                continue
            stage = _stage_on_stack(self.loop_thread, self.stages)
            if stage is None:
                continue
            act = self.activities.get(stage.context.name)
            if act is None or act.phase is None:
                continue
            limit = act.limits.limit(act.phase)
            if limit is None or blocked <= limit:
                continue
            err = act.error(act.phase, blocked, limit, " (it blocks the event loop: "
                            "use run_sync/run_compute for blocking calls)")
            self._message = (f"stage {act.name!r} ({act.kind}) failed during {act.phase}: "
                             f"StageStuck: {err}")
            self.report(act.name, act.phase, err)
            fired_at = now
            _raise_in_thread(self.loop_thread, StageStuck)


def _raise_in_thread(thread_id: int, exc_type: type[BaseException]) -> None:
    """Raise ``exc_type`` in another thread at its next Python instruction (CPython only)."""
    set_async_exc: Any = getattr(ctypes.pythonapi, "PyThreadState_SetAsyncExc", None)
    if set_async_exc is None:  # pragma: no cover - not CPython
        return
    set_async_exc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))
