"""``latency-csv``: an observer that writes each turn's latencies to a CSV file.

The example of an observer from a plugin (``register_observers``): it is not a stage, so it
sits in no chain; a config attaches it::

    observers:
      - {plugin: latency-csv, options: {path: latency.csv}}

One row per :class:`~omniframe.frames.MetricsFrame` (once per turn, after the turn's end of
turn has left the pipeline, so the write never delays an answer): the turn's latencies in
milliseconds, and each stage's busy time as ``busy_ms.<stage>``. The file is opened at the
first turn (``omniframe validate`` creates nothing) and closed when the run ends.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, TextIO

from omniframe.frames import Frame, MetricsFrame
from omniframe.stage import StageOptions

__all__ = ["LatencyCsv"]

LATENCIES = ("voice_to_voice_s", "vad_wait_s", "response_s", "first_text_s", "asr_s",
             "first_audio_codec_s", "first_audio_sink_s")


class LatencyCsv:
    """Writes one CSV row of latencies per turn."""

    class Options(StageOptions):
        path: str = "latency.csv"
        """The CSV file (its folder is made; an existing file is replaced)."""
        append: bool = False
        """Add rows to an existing file instead of replacing it (no second header)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self._file: TextIO | None = None
        self._writer: Any = None
        self._columns: list[str] = []

    def on_frame(self, stage: str, kind: str, frame: Frame, now: float) -> None:
        if type(frame) is MetricsFrame:
            self._write(frame)

    def _write(self, m: MetricsFrame) -> None:
        def ms(x: float | None) -> str:
            return "" if x is None else f"{x * 1000:.1f}"

        row = {"turn": m.turn, **{k.removesuffix("_s") + "_ms": ms(getattr(m, k))
                                  for k in LATENCIES},
               "rtf": "" if m.rtf is None else f"{m.rtf:.3f}",
               "audio_out_s": f"{m.audio_out_s:.3f}", "interrupted": int(m.interrupted),
               "end_reason": m.end_reason or "",
               **{f"busy_ms.{name}": ms(s) for name, s in m.stage_busy_s}}
        if self._file is None:
            path = Path(self.options.path).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            header = not (self.options.append and path.exists() and path.stat().st_size)
            self._file = path.open("a" if self.options.append else "w", newline="")
            self._columns = list(row)
            self._writer = csv.DictWriter(self._file, self._columns, extrasaction="ignore")
            if header:
                self._writer.writeheader()
        self._writer.writerow(row)
        self._file.flush()  # one short line per turn

    def on_run_end(self, result: Any) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
