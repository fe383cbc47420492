"""Turn metrics from frames with known timestamps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from omniframe.frames import (
    EndOfTurnFrame,
    InterruptFrame,
    OutputAudioFrame,
    SpeechEndFrame,
    TextDeltaFrame,
    TranscriptFrame,
)
from omniframe.metrics import MetricsCollector, percentile


def test_latencies_from_synthetic_timestamps() -> None:
    m = MetricsCollector()
    m.on_frame("vad", "vad", SpeechEndFrame(turn=1, ts=10.5, speech_end_ts=10.0), 10.5)
    m.on_frame("encoder", "encoder", TranscriptFrame(turn=1, text="hi", ts=10.7), 10.7)
    m.on_frame("lm", "lm", TextDeltaFrame(turn=1, text="Hello", ts=10.9), 10.9)
    audio = OutputAudioFrame(turn=1, samples=np.zeros(24000, np.float32), sample_rate=24000,
                             ts=11.1)
    m.on_frame("codec", "codec", audio, 11.1)
    m.on_frame("sink", "sink", audio, 11.2)
    m.on_frame("text", "sink", audio, 11.25)  # a second sink passes it on: not counted again
    m.on_frame("lm", "lm", EndOfTurnFrame(turn=1, ts=11.5), 11.5)
    t = m.turns[1]
    assert t.vad_wait_s == pytest.approx(0.5)
    assert t.asr_s == pytest.approx(0.2)
    assert t.first_text_s == pytest.approx(0.9)
    assert t.voice_to_voice_s == pytest.approx(1.2)  # first audio left the sink at 11.2
    assert t.first_audio_codec_s == pytest.approx(1.1)  # ... and the codec at 11.1
    assert t.response_s == pytest.approx(0.7)
    assert t.audio_out_s == pytest.approx(1.0)  # counted once, where it was made
    assert t.rtf == pytest.approx(1.0)
    assert t.transcript == "hi" and t.text == "Hello"
    assert "voice-to-voice 1200ms" in t.line()


def test_interrupt_marks_previous_turn() -> None:
    m = MetricsCollector()
    m.on_frame("lm", "lm", TextDeltaFrame(turn=1, text="a"), 1.0)
    m.on_frame("vad", "vad", InterruptFrame(turn=2), 2.0)
    assert m.turns[1].interrupted


def test_percentile() -> None:
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile([5], 99) == 5
    assert percentile(list(range(101)), 99) == pytest.approx(99)
    assert math.isnan(percentile([], 50))


def test_text_is_what_went_furthest_down_the_chain() -> None:
    """A filter after the LM changes the text; a stage that passes it on does not."""
    m = MetricsCollector()
    m.on_frame("lm", "lm", TextDeltaFrame(turn=1, text="darn it"), 1.0)
    m.on_frame("filter", "processor", TextDeltaFrame(turn=1, text="d*** it"), 1.1)
    m.on_frame("lm", "lm", TextDeltaFrame(turn=1, text=", ok"), 1.2)
    m.on_frame("codec", "codec", TextDeltaFrame(turn=1, text="d*** it"), 1.3)
    m.on_frame("filter", "processor", TextDeltaFrame(turn=1, text=", ok"), 1.4)
    m.on_frame("codec", "codec", TextDeltaFrame(turn=1, text=", ok"), 1.5)
    assert m.turns[1].text == "d*** it, ok"
    assert m.turns[1].first_text_ts is not None


def test_input_audio_is_counted_at_the_stage_that_made_it() -> None:
    from omniframe.frames import AudioFrame

    m = MetricsCollector()
    chunk = AudioFrame(samples=np.zeros(1600, np.float32), sample_rate=16000)
    for stage in ("mic", "vad", "mic", "vad"):  # the VAD passes the source's audio on
        m.on_frame(stage, "whatever", chunk, 0.0)
    assert m.input_audio_s == pytest.approx(0.2)
