"""Plugin hooks of omniframe_audio: sources, VADs and sinks (stage modules load lazily)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from omniframe import hookimpl

if TYPE_CHECKING:
    from omniframe.stage import Stage


@hookimpl
def register_stages(register: Callable[[type[Stage]], None]) -> None:
    """Register file/synth/mic/text sources, energy/silero/webrtc VADs, wav/speaker/text/null
    sinks."""
    from omniframe_audio.sinks import NullSink, SpeakerSink, TextSink, WavSink
    from omniframe_audio.sources import FileSource, MicSource, SynthSource
    from omniframe_audio.text_source import TextSource
    from omniframe_audio.vad import EnergyVAD, SileroVAD, WebRTCVAD

    for cls in (FileSource, SynthSource, MicSource, TextSource, EnergyVAD, SileroVAD, WebRTCVAD,
                WavSink, TextSink, NullSink, SpeakerSink):
        register(cls)


@hookimpl
def register_observers(register: Callable[[str, Callable[..., object]], None]) -> None:
    """Register ``latency-csv``: each turn's latencies to a CSV file."""
    from omniframe_audio.latency_csv import LatencyCsv

    register("latency-csv", LatencyCsv)
