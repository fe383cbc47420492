"""Load on ``omniframe serve``: N concurrent Realtime sessions on loopback, each a person
speaking questions in real time.

    nice -n 10 python benchmarks/serve.py --sessions 4                  # echo, N = 4
    nice -n 10 python benchmarks/serve.py --config configs/cascade.yaml --sweep 1,2
    python benchmarks/serve.py --url ws://127.0.0.1:8000/v1/realtime --sessions 2

Unless ``--url`` is given the benchmark starts ``omniframe serve CONFIG --port 0`` itself
(``--set`` overrides are passed on). Each client is a plain ``websockets`` connection that
uses the server's default session (server VAD from the config), plays espeak-ng questions
(scripts/make_question.py, 24 kHz) as ``input_audio_buffer.append`` events of ``--chunk-ms``
each, sent when that much audio has been "recorded" (real time, like a microphone), and keeps
sending silence between questions. The next question starts after the answer has been played
(client-side playback simulation) plus ``--pause`` seconds.

Per turn, in the client's own clock:

* ``v2v``: the end of the question's speech (the last voiced sample's moment in the real-time
  stream) → the first ``response.output_audio.delta`` received. It includes the VAD's
  end-of-speech wait (the config's hangover), the chunking, both directions of the socket.
* real time: playback of the answer starts at its first delta (plus ``--prebuffer-ms``) and
  plays at 24 kHz; a delta that arrives more than ``--gap-ms`` after the played audio ran out
  is a gap. A session is real time when none of its turns has a gap, every question got an
  answer and no error came. ``realtime_sessions`` is the largest N tested at which every
  session was real time with no errors.
* errors: ``error`` events, unexpected closes, questions with no answer in
  ``--turn-timeout`` s.

Server overhead per turn (``server_overhead_ms``), paired per turn: the session asks for the
``omniframe.metrics`` extension event (``?omniframe_metrics=1``), which carries the pipeline's
own voice-to-voice (the input frame holding the last voiced audio reaching the VAD → the first
answer audio reaching the Realtime sink, measured inside the server); ``speech_stopped``'s
``audio_end_ms`` says which chunk held the VAD's end of speech (with the server's
resampler's look-ahead: the chunk that released it). overhead = (first delta received − the
moment that chunk was sent) − that pipeline v2v: the input's trip (JSON, base64, the socket,
resampling, the audio queue) plus the output's (event, queue, JSON, socket) for the same turn,
so the pipeline's own run-to-run noise cancels. The pipeline's own breakdown
(``pipeline_ms_p50``: VAD wait, first text, first codec audio, first audio at the sink, each
from the end of speech) is in the JSON rows. Also, unless ``--no-inprocess``: the same stages
in this process (``bridge.assemble``, the server's own session assembly, with a recording sink
instead of the protocol), fed the same chunks on the same schedule; its v2v
p50 next to the server's at N = 1 is the unpaired comparison.

A table (N, v2v p50/p99, real time, errors, overhead) then one JSON line last.
Timings on a shared machine are noisy: the load average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "plugins"))

RATE = 24000
STAGE_KEYS = ("vad_wait_s", "first_text_s", "first_audio_codec_s", "first_audio_sink_s")
QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "Name a fruit that is yellow.", "What color is the sky on a clear day?"]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(q * (len(s) - 1))))], 1)


# --------------------------------------------------------------------------- questions


@dataclass
class Question:
    text: str
    samples: np.ndarray  # float32, 24 kHz
    speech_end: int  # index after the last voiced sample


def make_questions(texts: list[str]) -> list[Question]:
    import tempfile

    import soundfile as sf
    from make_question import make_question

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(texts):
            path = Path(tmp) / f"q{i}.wav"
            make_question(path, text, sample_rate=RATE, pad_s=0.3)
            x, _ = sf.read(path, dtype="float32")
            # the end of the last 20 ms window at or above -40 dBFS RMS: where the energy
            # VAD (serve_echo.yaml) puts the end of speech; other VADs differ by a window
            w = RATE // 50
            n = len(x) // w
            rms = np.sqrt(np.mean(np.square(x[:n * w].reshape(n, w)), axis=1))
            voiced = np.nonzero(rms >= 0.01)[0]
            out.append(Question(text, x.astype(np.float32), int(voiced[-1] + 1) * w))
    return out


# ---------------------------------------------------------------------- microphone


class Mic:
    """A real-time microphone: ``next()`` waits until the next chunk has been "recorded"."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.start = time.monotonic()
        self.pos = 0  # samples recorded so far

    def at(self, pos: int) -> float:
        return self.start + pos / RATE

    async def wait_chunk(self) -> None:
        await asyncio.sleep(max(0.0, self.at(self.pos + self.chunk) - time.monotonic()))


# --------------------------------------------------------------------------- a client


@dataclass
class Turn:
    question: str
    speech_end_t: float  # the moment the speech ended (client clock)
    vad_end_sent_t: float | None = None  # the chunk holding the VAD's end of speech was sent
    first_delta_t: float | None = None
    done: bool = False
    status: str = ""
    gaps: int = 0
    audio_s: float = 0.0
    play_end_t: float = 0.0
    pipeline_v2v_s: float | None = None
    stages: dict[str, float | None] = field(default_factory=dict)  # the pipeline's own

    @property
    def v2v_ms(self) -> float | None:
        if self.first_delta_t is None:
            return None
        return (self.first_delta_t - self.speech_end_t) * 1000

    @property
    def overhead_ms(self) -> float | None:
        if (self.first_delta_t is None or self.pipeline_v2v_s is None
                or self.vad_end_sent_t is None):
            return None
        return (self.first_delta_t - self.vad_end_sent_t - self.pipeline_v2v_s) * 1000


@dataclass
class SessionResult:
    turns: list[Turn] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    extra_responses: int = 0

    @property
    def realtime(self) -> bool:
        return (not self.errors and bool(self.turns)
                and all(t.done and t.status in ("completed", "incomplete") and not t.gaps
                        for t in self.turns))  # incomplete: the answer hit max tokens


async def run_client(url: str, key: str | None, questions: list[Question], turns: int,
                     args: argparse.Namespace, delay: float) -> SessionResult:
    import websockets

    res = SessionResult()
    await asyncio.sleep(delay)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    sep = "&" if "?" in url else "?"
    chunk = int(RATE * args.chunk_ms / 1000)
    silence = np.zeros(chunk, dtype=np.float32)
    try:
        async with websockets.connect(url + sep + "omniframe_metrics=1",
                                      additional_headers=headers, max_size=None,
                                      open_timeout=60) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 900))
            if first.get("type") != "session.created":
                res.errors.append(f"first event {first.get('type')}: {first}"[:200])
                return res
            current: list[Turn] = []  # the turn being asked / answered
            answered = asyncio.Event()
            responses: dict[str, Turn | None] = {}
            metrics: list[dict[str, Any]] = []
            sent: list[tuple[int, int, float]] = []  # (stream from, to, when sent)

            async def receiver() -> None:
                async for raw in ws:
                    e = json.loads(raw)
                    kind = e.get("type")
                    now = time.monotonic()
                    t = current[-1] if current else None
                    if kind == "error":
                        res.errors.append(f"{e['error'].get('code')}: "
                                          f"{e['error'].get('message')}"[:200])
                    elif kind == "input_audio_buffer.speech_stopped" and t is not None:
                        # the sample before audio_end_ms leaves the server's resampler with
                        # the chunk that holds the filter's look-ahead past it
                        end = int(e.get("audio_end_ms", 0)) * RATE // 1000 + args.lag
                        t.vad_end_sent_t = next((ts for a, b, ts in reversed(sent)
                                                 if a < end <= b), None)
                    elif kind == "response.created":
                        # an answer before the question ended: the VAD split the question
                        own = t is not None and not t.done and now >= t.speech_end_t
                        responses[e["response"]["id"]] = t if own else None
                        if not own:
                            res.extra_responses += 1
                    elif kind == "response.output_audio.delta":
                        t2 = responses.get(e["response_id"])
                        if t2 is None:
                            continue
                        dur = len(base64.b64decode(e["delta"])) / 2 / RATE
                        if t2.first_delta_t is None:
                            t2.first_delta_t = now
                            t2.play_end_t = now + args.prebuffer_ms / 1000
                        elif now > t2.play_end_t + args.gap_ms / 1000:
                            t2.gaps += 1
                        t2.play_end_t = max(t2.play_end_t, now) + dur
                        t2.audio_s += dur
                    elif kind == "response.done":
                        t2 = responses.pop(e["response"]["id"], None)
                        if t2 is not None:
                            t2.status = e["response"]["status"]
                            t2.done = True
                            answered.set()
                    elif kind == "omniframe.metrics":
                        metrics.append(e)

            async def microphone() -> None:
                mic = Mic(chunk)
                for k in range(turns):
                    q = questions[k % len(questions)]
                    q_start = mic.pos
                    turn = Turn(q.text, mic.at(q_start + q.speech_end))
                    current.append(turn)
                    answered.clear()
                    for i in range(0, len(q.samples), chunk):
                        await mic.wait_chunk()
                        piece = q.samples[i:i + chunk]
                        await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                                  "audio": _pcm16(piece)}))
                        sent.append((mic.pos, mic.pos + len(piece), time.monotonic()))
                        mic.pos += len(piece)
                    deadline = turn.speech_end_t + args.turn_timeout
                    # silence, as a microphone sends, until the answer has been played
                    while True:
                        await mic.wait_chunk()
                        await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                                  "audio": _pcm16(silence)}))
                        now = time.monotonic()
                        sent.append((mic.pos, mic.pos + chunk, now))
                        mic.pos += chunk
                        del sent[:-2000]
                        if turn.done and now >= turn.play_end_t + args.pause:
                            break
                        if not turn.done and now > deadline:
                            res.errors.append(f"no answer to {q.text!r} in "
                                              f"{args.turn_timeout:g} s")
                            break
                    res.turns.append(turn)
                await asyncio.sleep(0.3)  # the last turn's metrics event

            recv_task = asyncio.create_task(receiver())
            try:
                await microphone()
            finally:
                recv_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await recv_task
            answered_turns = [t for t in res.turns if t.first_delta_t is not None]
            with_v2v = [m for m in metrics if m.get("voice_to_voice_s") is not None]
            for t, m in zip(answered_turns, with_v2v, strict=False):
                t.pipeline_v2v_s = m["voice_to_voice_s"]
                t.stages = {k: m.get(k) for k in STAGE_KEYS}
    except Exception as exc:  # a refused or broken connection is this session's error
        res.errors.append(f"{type(exc).__name__}: {exc}"[:200])
    return res


def _pcm16(x: np.ndarray) -> str:
    return base64.b64encode((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()).decode()


async def run_load(url: str, key: str | None, n: int, questions: list[Question],
                   args: argparse.Namespace) -> list[SessionResult]:
    rng = random.Random(n)
    tasks = [run_client(url, key, questions[i % len(questions):] + questions[:i % len(questions)],
                        args.turns, args, rng.uniform(0, args.stagger)) for i in range(n)]
    return list(await asyncio.gather(*tasks))


# ---------------------------------------------------------------- in-process baseline


async def run_inprocess(config: str, overrides: list[str], questions: list[Question],
                        args: argparse.Namespace) -> list[float]:
    """The server's session assembly in this process, no protocol: v2v per turn."""
    import anyio
    from omniframe_audio.resampling import StreamResampler

    from omniframe.frames import EndOfTurnFrame, OutputAudioFrame
    from omniframe.serve.bridge import assemble, load_served

    served = next(iter(load_served([config], overrides).values()))
    pipeline = assemble(served)
    src, sink = pipeline.stages[0], pipeline.stages[-1]
    tx, src.rx = anyio.create_memory_object_stream[np.ndarray](256)
    src.ready = anyio.Event()
    first: dict[int, float] = {}
    ended: set[int] = set()

    class Recorder:
        async def on_frame(self, frame: Any) -> None:
            if isinstance(frame, OutputAudioFrame) and frame.turn not in first:
                first[frame.turn] = time.monotonic()
            elif isinstance(frame, EndOfTurnFrame):
                ended.add(frame.turn)

        async def on_interrupt(self, frame: Any) -> None:
            return None

        def on_metrics(self, frame: Any) -> None:
            return None

    sink.bridge = Recorder()
    resampler = None if served.input_rate == RATE else StreamResampler(RATE, served.input_rate)
    chunk = int(RATE * args.chunk_ms / 1000)
    v2v: list[float] = []

    async def feed() -> None:
        await src.ready.wait()
        mic = Mic(chunk)
        for k in range(args.turns + 1):
            q = questions[k % len(questions)]
            end_t = mic.at(mic.pos + q.speech_end)
            seen = set(first)
            x = np.concatenate([q.samples, np.zeros(int(args.turn_timeout * RATE), np.float32)])
            for i in range(0, len(x), chunk):
                await mic.wait_chunk()
                piece = x[i:i + chunk]
                y = resampler.push(piece) if resampler is not None else piece
                if len(y):
                    await tx.send(np.asarray(y, dtype=np.float32))
                mic.pos += len(piece)
                new = [t for t in first if t not in seen and first[t] >= end_t]
                if new and new[0] in ended:
                    v2v.append((first[new[0]] - end_t) * 1000)
                    # the answer plays for about as long as the client's would
                    await anyio.sleep(args.pause)
                    break
        await tx.aclose()

    async with anyio.create_task_group() as tg:
        tg.start_soon(pipeline.run)
        await feed()
        tg.cancel_scope.cancel()
    return v2v


# ------------------------------------------------------------------------- the server


class Server:
    def __init__(self, config: str, overrides: list[str], max_sessions: int) -> None:
        cmd = [sys.executable, "-m", "omniframe", "serve", config, "--port", "0",
               "--max-sessions", str(max_sessions), "--idle-seconds", "900"]
        for o in overrides:
            cmd += ["--set", o]
        env = {k: v for k, v in os.environ.items() if k != "OMNIFRAME_API_KEY"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = ""
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not self.url:
            for line in list(self.lines):
                m = re.search(r"(ws://127\.0\.0\.1:\d+/v1/realtime)", line)
                if m:
                    self.url = m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        if not self.url:
            self.stop()
            raise SystemExit("serve benchmark: the server did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _resampler_lag(config: str, overrides: list[str]) -> int:
    """Input samples (24 kHz) the server's resampler holds back for the config's rate."""
    from omniframe_audio.resampling import StreamResampler

    from omniframe.cli import prepare_config
    from omniframe.config import resolve_stages

    cfg, label = prepare_config(config, list(overrides))
    src = resolve_stages(cfg, label)[0]
    rate = src.spec.options.get("sample_rate")
    if rate is None:
        f = src.cls.Options.model_fields.get("sample_rate")
        rate = f.default if f is not None and isinstance(f.default, int) else 16000
    return 0 if int(rate) == RATE else StreamResampler(RATE, int(rate)).margin


def _device(config: str, overrides: list[str]) -> str:
    dev = "cpu"
    with contextlib.suppress(Exception):
        import yaml

        dev = str((yaml.safe_load(Path(config).read_text()) or {}).get("device", "cpu"))
    for o in overrides:
        if o.startswith("device="):
            dev = o.split("=", 1)[1]
    if dev.startswith("cuda"):
        with contextlib.suppress(Exception):
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            return f"cuda: {out.stdout.strip().splitlines()[0]}"
        return dev
    name = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"cpu: {name} ({os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=2, help="concurrent sessions (N)")
    ap.add_argument("--sweep", default=None,
                    help="comma-separated N values to run in turn (default: --sessions only)")
    ap.add_argument("--config", default="configs/serve_echo.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="PATH=VALUE", help="passed to omniframe serve (repeat)")
    ap.add_argument("--url", default=None, help="use a running server instead of starting one")
    ap.add_argument("--api-key", default=os.environ.get("OMNIFRAME_API_KEY"))
    ap.add_argument("--turns", type=int, default=3, help="questions per session")
    ap.add_argument("--chunk-ms", type=float, default=40.0, help="audio per append")
    ap.add_argument("--pause", type=float, default=0.5,
                    help="seconds of silence after an answer has been played")
    ap.add_argument("--stagger", type=float, default=1.0,
                    help="sessions start at random times within this many seconds")
    ap.add_argument("--prebuffer-ms", type=float, default=0.0)
    ap.add_argument("--gap-ms", type=float, default=50.0,
                    help="a delta this late after playback ran dry is a gap")
    ap.add_argument("--turn-timeout", type=float, default=30.0)
    ap.add_argument("--warmup", type=int, default=1,
                    help="questions asked in one session before measuring (0: none)")
    ap.add_argument("--server-log", default=None, help="write the server's log here")
    ap.add_argument("--no-inprocess", action="store_true",
                    help="skip the in-process comparison (it loads the models here too)")
    args = ap.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    args.lag = _resampler_lag(args.config, args.overrides)
    sweep = ([int(s) for s in args.sweep.split(",") if s.strip()] if args.sweep
             else [args.sessions])
    questions = make_questions(QUESTIONS)
    print(f"load average: {os.getloadavg()[0]:.2f}; config {args.config}; "
          f"overrides {args.overrides}; sweep {sweep}", file=sys.stderr)

    server = None
    url = args.url
    if url is None:
        t0 = time.monotonic()
        server = Server(args.config, args.overrides, max(sweep))
        url = server.url
        print(f"server up in {time.monotonic() - t0:.1f} s at {url}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    all_overhead: list[float] = []
    try:
        if args.warmup:  # the first session loads the models (the process-wide cache)
            warm = argparse.Namespace(**{**vars(args), "turns": args.warmup,
                                         "turn_timeout": max(args.turn_timeout, 900.0)})
            t0 = time.monotonic()
            res = asyncio.run(run_load(url, args.api_key, 1, questions, warm))
            print(f"warm-up: {args.warmup} turn(s) in {time.monotonic() - t0:.1f} s, v2v "
                  f"{[round(t.v2v_ms or -1) for r in res for t in r.turns]} ms, errors "
                  f"{[e for r in res for e in r.errors]}", file=sys.stderr)
        for n in sweep:
            t0 = time.monotonic()
            results = asyncio.run(run_load(url, args.api_key, n, questions, args))
            turns = [t for r in results for t in r.turns]
            v2v = [t.v2v_ms for t in turns if t.v2v_ms is not None]
            over = [t.overhead_ms for t in turns if t.overhead_ms is not None]
            all_overhead += over if n == sweep[0] else []
            errors = [e for r in results for e in r.errors]
            rt = sum(r.realtime for r in results)
            rows.append({
                "sessions": n, "turns": len(turns), "answered": len(v2v),
                "v2v_ms_p50": _pct(v2v, 0.5), "v2v_ms_p99": _pct(v2v, 0.99),
                "realtime": rt == n and not errors, "realtime_count": rt,
                "gaps": sum(t.gaps for t in turns), "errors": len(errors),
                "split_turns": sum(r.extra_responses for r in results),
                "overhead_ms_p50": _pct(over, 0.5), "overhead_ms_p99": _pct(over, 0.99),
                # the pipeline's own breakdown (omniframe.metrics), from the end of speech
                "pipeline_ms_p50": {k[:-2]: _pct([t.stages[k] * 1000 for t in turns
                                                  if t.stages.get(k) is not None], 0.5)
                                    for k in STAGE_KEYS},
                "load": round(os.getloadavg()[0], 2),
                "wall_s": round(time.monotonic() - t0, 1),
            })
            for e in errors[:5]:
                print(f"  N={n} error: {e}", file=sys.stderr)
            print(f"  N={n}: {rows[-1]}", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
            tb = "".join(server.lines)
            if args.server_log:
                Path(args.server_log).write_text(tb)
            if "Traceback" in tb:
                print("server log:\n" + tb[-3000:], file=sys.stderr)

    inproc: list[float] = []
    if not args.no_inprocess:
        # one more turn than measured: the first loads the models here
        inproc = asyncio.run(run_inprocess(args.config, args.overrides, questions, args))
        inproc = inproc[1:] if len(inproc) > 1 else inproc

    print(f"\n{'N':>3} {'turns':>5} {'v2v p50 ms':>11} {'v2v p99 ms':>11} {'realtime':>9} "
          f"{'gaps':>5} {'errors':>6} {'overhead p50/p99 ms':>20} {'load':>5}")
    for r in rows:
        over = f"{r['overhead_ms_p50']} / {r['overhead_ms_p99']}"
        print(f"{r['sessions']:>3} {r['answered']:>2}/{r['turns']:<2} {r['v2v_ms_p50']!s:>11} "
              f"{r['v2v_ms_p99']!s:>11} {'yes' if r['realtime'] else 'no':>9} {r['gaps']:>5} "
              f"{r['errors']:>6} {over:>20} {r['load']:>5}")
    if inproc:
        print(f"in-process (same stages, no protocol), 1 session: v2v p50 "
              f"{_pct(inproc, 0.5)} ms over {len(inproc)} turns")
    ok = [r["sessions"] for r in rows if r["realtime"]]
    first_row = rows[0] if rows else {}
    summary = {
        "v2v_ms_p50": first_row.get("v2v_ms_p50") if len(rows) == 1 else {
            str(r["sessions"]): r["v2v_ms_p50"] for r in rows},
        "v2v_ms_p99": first_row.get("v2v_ms_p99") if len(rows) == 1 else {
            str(r["sessions"]): r["v2v_ms_p99"] for r in rows},
        "realtime_sessions": max(ok) if ok else 0,
        "errors": sum(r["errors"] for r in rows),
        "server_overhead_ms_p50": _pct(all_overhead, 0.5),
        "server_overhead_ms_p99": _pct(all_overhead, 0.99),
        "inprocess_v2v_ms_p50": _pct(inproc, 0.5),
        "config": args.config, "overrides": args.overrides,
        "device": _device(args.config, args.overrides),
        "rows": rows,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
