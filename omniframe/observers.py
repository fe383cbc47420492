"""Observers that do I/O without slowing the chain.

An observer's ``on_frame`` runs inline on the bus, so these only put a small record on a
queue; a background thread does the writing.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any

import structlog

from omniframe.frames import Frame

__all__ = ["FrameLogger", "JsonlRecorder", "frame_record"]

_SKIP = {"samples", "features"}


def frame_record(stage: str, kind: str, frame: Frame, now: float) -> dict[str, Any]:
    """A JSON-ready summary of a frame: type, stage, turn, times and small fields.

    Arrays are summarised by their length instead of being copied."""
    rec: dict[str, Any] = {"stage": stage, "kind": kind, "type": type(frame).__name__,
                           "turn": frame.turn, "ts": frame.ts, "seen": now}
    for name in getattr(frame, "__dataclass_fields__", {}):
        if name in ("turn", "ts"):
            continue
        value = getattr(frame, name)
        if name in _SKIP:
            rec[f"{name}_len"] = len(value) if hasattr(value, "__len__") else None
        elif isinstance(value, (str, int, float, bool)) or value is None:
            rec[name] = value
        elif isinstance(value, tuple):
            rec[name] = list(value)
    return rec


class JsonlRecorder:
    """Records every frame (as :func:`frame_record`) to a JSONL file from a writer thread.

    Use as a context manager, or call :meth:`close` after the run to flush the file."""

    def __init__(self, path: str | Path, stages: set[str] | None = None) -> None:
        self.path = Path(path)
        self.stages = stages
        self._q: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._file = self.path.open("w")
        self._thread = threading.Thread(target=self._write, name="omniframe-recorder",
                                        daemon=True)
        self._thread.start()

    def on_frame(self, stage: str, kind: str, frame: Frame, now: float) -> None:
        if self.stages is None or stage in self.stages:
            self._q.put(frame_record(stage, kind, frame, now))

    def _write(self) -> None:
        while True:
            rec = self._q.get()
            if rec is None:
                break
            self._file.write(json.dumps(rec) + "\n")
        self._file.close()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)

    def __enter__(self) -> JsonlRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FrameLogger:
    """Logs every frame at debug level (``omniframe -vv run ...``); control frames at info."""

    def __init__(self) -> None:
        self.log = structlog.get_logger("omniframe.frames")

    def on_frame(self, stage: str, kind: str, frame: Frame, now: float) -> None:
        from omniframe.frames import AudioFrame, ControlFrame, SystemFrame

        if isinstance(frame, AudioFrame):
            return
        level = "info" if isinstance(frame, (ControlFrame, SystemFrame)) else "debug"
        rec = frame_record(stage, kind, frame, now)
        getattr(self.log, level)(rec.pop("type"), **rec)
