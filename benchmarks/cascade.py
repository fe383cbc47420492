#!/usr/bin/env python3
"""Latency of the offline cascade (configs/cascade.yaml) on one-sentence spoken questions.

Each question is spoken by espeak-ng, written to a wav file and fed in real time (the file
source paces it like a microphone), so the VAD's end-of-speech wait is real wall time. The
models load once (process-wide cache); a warm-up question runs first and is not counted.

Per question it prints, in seconds from the end of the user's speech:

* vad: the end of speech to the VAD's decision (hangover);
* asr: the VAD's decision to the transcript;
* lm_first: the transcript to the LM's first text token;
* clause: the first token to the first speakable piece being complete (LM writing);
* tts: synthesis of that piece, to its first audio chunk leaving the TTS stage;
* v2v: voice-to-voice, the end of speech to the first audio sample leaving the sink.

The last line is one JSON object: ``voice_to_voice_s`` (median), ``asr_s``,
``lm_first_token_s``, ``tts_first_audio_s`` (medians; tts = first text token to first audio,
i.e. clause + tts), the per-question values, the device and the machine's load.

    python benchmarks/cascade.py                  # 8 questions
    python benchmarks/cascade.py -n 3 --set lm.options.max_new_tokens=24
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cascade.yaml"

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What color is the sky on a clear day?",
    "Who wrote the play Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "How many days are there in a week?",
    "What do bees make?",
    "What is the boiling point of water?",
    "Which animal is known as the king of the jungle?",
    "What is the opposite of hot?",
]
WARMUP = "Can you hear me?"


class Timeline:
    """Observer: when each frame of interest left each stage (monotonic seconds)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, str, Any]] = []

    def on_frame(self, stage: str, kind: str, frame: Any, now: float) -> None:
        self.events.append((now, stage, kind, frame))


def _first(events: list[tuple[float, str, str, Any]], kind: str, cls: type,
           after: float = 0.0) -> tuple[float, Any] | None:
    for now, _, k, f in events:
        if k == kind and isinstance(f, cls) and now >= after:
            return now, f
    return None


def measure(timeline: Timeline, result: Any) -> dict[str, Any] | None:
    """The per-stage latencies of the (single) answered turn of one run."""
    from omniframe.frames import OutputAudioFrame, TextDeltaFrame, TranscriptFrame

    turns = [t for t in result.turns if t.transcript]
    if not turns or turns[0].voice_to_voice_s is None:
        return None
    t = turns[0]
    ev = timeline.events
    tr = _first(ev, "encoder", TranscriptFrame)
    tok = _first(ev, "lm", TextDeltaFrame)
    audio = _first(ev, "codec", OutputAudioFrame)
    if tr is None or tok is None or audio is None:
        return None
    # the text delta the TTS passed on just before its first audio completed the first piece
    last_delta = max(now for now, _, k, f in ev
                     if k == "codec" and isinstance(f, TextDeltaFrame) and now <= audio[0])
    return {
        "question": "",
        "transcript": t.transcript,
        "answer": t.text,
        "v2v": t.voice_to_voice_s,
        "vad": t.vad_wait_s,
        "asr": tr[0] - t.vad_end_ts,
        "lm_first": tok[0] - tr[0],
        "clause": last_delta - tok[0],
        "tts": audio[0] - last_delta,
        "tts_first_audio": audio[0] - tok[0],
        "sink": t.first_audio_ts - audio[0],
    }


def build(cfg_overrides: list[str], wav: Path, out: Path, timeline: Timeline) -> Any:
    from omniframe.config import apply_overrides, build_pipeline, parse_config, read_yaml

    data = read_yaml(CONFIG)
    # no stdout text sink in a benchmark; the wav sink writes (not paced) to a temp file
    data["pipeline"] = [s for s in data["pipeline"] if s.get("plugin") != "text"]
    data = apply_overrides(data, [
        f"source.options.path={json.dumps(str(wav))}", "source.options.realtime=true",
        "source.options.tail_silence_s=1.0", f"sink.options.path={json.dumps(str(out))}",
        "sink.options.realtime=false", *cfg_overrides])
    return build_pipeline(parse_config(data, str(CONFIG)), observers=[timeline])


async def run_one(question: str, tmp: Path, overrides: list[str]) -> dict[str, Any] | None:
    """One question through a fresh pipeline (the models stay loaded in the process)."""
    import soundfile as sf

    from omniframe.testing import espeak

    wav = tmp / "q.wav"
    sf.write(wav, espeak(question, rate=175), 16000, subtype="PCM_16")
    timeline = Timeline()
    pipeline = build(overrides, wav, tmp / "answer.wav", timeline)
    result = await pipeline.run()
    row = measure(timeline, result)
    if row is not None:
        row["question"] = question
    return row


def fmt(x: float | None) -> str:
    return "   -  " if x is None else f"{x:6.3f}"


def device() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {os.cpu_count()} x {cpu}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--questions", type=int, default=8, help="how many questions")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="PATH=VALUE", help="config override, e.g. lm.options.dtype=bfloat16")
    args = ap.parse_args(argv)
    from omniframe.logging import configure_logging

    configure_logging(os.environ.get("BENCH_LOG", "warning"))

    import anyio

    load0 = os.getloadavg()
    rows: list[dict[str, Any]] = []
    setup_s = 0.0

    async def all_questions(tmp: Path) -> None:
        nonlocal setup_s
        t0 = time.perf_counter()
        await run_one(WARMUP, tmp, args.overrides)  # loads the models, warms the caches
        setup_s = time.perf_counter() - t0
        for q in (QUESTIONS * 10)[: args.questions]:
            row = await run_one(q, tmp, args.overrides)
            if row is None:
                print(f"no answer to {q!r}", file=sys.stderr)
                continue
            rows.append(row)

    with tempfile.TemporaryDirectory(prefix="omniframe-bench-") as tmp_s:
        anyio.run(all_questions, Path(tmp_s))  # one event loop, as a server would have
    load1 = os.getloadavg()
    if not rows:
        print(json.dumps({"error": "no question was answered"}))
        return 1

    print(f"cascade latency, {len(rows)} one-sentence questions (espeak-ng, fed in real time); "
          f"{device()}; load average {load0[0]:.1f} -> {load1[0]:.1f}; warm-up + model load "
          f"{setup_s:.1f} s")
    head = (f"{'v2v':>6} {'vad':>6} {'asr':>6} {'lm1st':>6} {'clause':>6} {'tts':>6} "
            f"{'sink':>6}  question -> answer")
    print(head)
    print("-" * len(head))
    keys = ["v2v", "vad", "asr", "lm_first", "clause", "tts", "sink"]
    for r in rows:
        print(" ".join(fmt(r[k]) for k in keys) + f"  {r['question']} -> {r['answer'][:60]!r}")
    med = {k: statistics.median(r[k] for r in rows) for k in [*keys, "tts_first_audio"]}
    print("-" * len(head))
    print(" ".join(fmt(med[k]) for k in keys) + "  median")
    target = 1.5
    verdict = "meets" if med["v2v"] <= target else "misses"
    print(f"voice-to-voice median {med['v2v']:.3f} s: {verdict} the {target} s target")
    summary = {
        "voice_to_voice_s": round(med["v2v"], 4),
        "asr_s": round(med["asr"], 4),
        "lm_first_token_s": round(med["lm_first"], 4),
        "tts_first_audio_s": round(med["tts_first_audio"], 4),
        "vad_wait_s": round(med["vad"], 4),
        "tts_synthesis_s": round(med["tts"], 4),
        "first_clause_s": round(med["clause"], 4),
        "voice_to_voice_p90_s": round(sorted(r["v2v"] for r in rows)[
            min(len(rows) - 1, int(0.9 * len(rows)))], 4),
        "n": len(rows),
        "device": device(),
        "load_average": [round(load0[0], 2), round(load1[0], 2)],
        "per_question_v2v_s": [round(r["v2v"], 4) for r in rows],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
