"""Preemptive end of speech: voice-to-voice with the VAD's tentative end off and on, and the
compute wasted on retracted turns, on scripted pauses.

    python benchmarks/preemptive.py                          # Mini-Omni (random, bf16) + cascade
    python benchmarks/preemptive.py --pipelines cascade --pauses 0,250,400 --repeats 2

Each question is espeak-ng speech; a variant has a silent pause of ``P`` ms in the middle
(between two words). Replayed in real time (the file source paces it) through the pipeline
with ``vad.options.tentative_ms`` unset (off) and set (on, ``--tentative-ms``). A pause longer
than the tentative wait and shorter than the hangover makes a tentative end that speech
retracts: its work is thrown away; ``wasted_s`` is the stages' busy time it took
(``RunResult.retracted``). Per run: voice-to-voice (user stopped → first answer audio out of
the sink), whether the answer (text and audio bytes) is identical with and without
preemption.

Mini-Omni runs random weights of the released size (``random://mini-omni``, bf16, trimmed
Whisper window, 1-frame first SNAC chunk, 24 decode steps): latency is real, answers are
noise but must still be identical. The cascade runs configs/cascade.yaml's models.

Prints a table, then one JSON line: ``v2v_s_p50_off/on`` per pipeline, ``identical`` (all
runs), ``retractions``, ``wasted_s`` (total), the device. The machine may be shared: compare
on and off of the same run only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

QUESTIONS = [("What is the capital", "of France?"),
             ("How many legs", "does a spider have?"),
             ("What color is", "the sky on a clear day?")]

PIPELINES: dict[str, tuple[str, list[str]]] = {
    "mini-omni": ("configs/mini_omni.yaml", [
        "encoder.options.model=random://small", "encoder.options.trim=true",
        "encoder.options.dtype=bfloat16", "lm.options.model=random://mini-omni",
        "lm.options.dtype=bfloat16", "lm.options.max_new_tokens=24",
        "codec.options.model=random://snac_24khz", "codec.options.first_chunk_frames=1",
        # SNAC adds random noise as released: off, so that answers can be compared by bytes
        "codec.options.deterministic=true"]),
    "cascade": ("configs/cascade.yaml", []),
}


def _trimmed(x: Any) -> Any:
    import numpy as np

    loud = np.flatnonzero(np.abs(x) > 1e-3)
    return x[loud[0]:loud[-1] + 1]


def question_wav(path: Path, parts: tuple[str, str], pause_ms: int) -> Path:
    import numpy as np
    import soundfile as sf

    from omniframe.testing import espeak

    sr = 16000
    head, tail = (_trimmed(espeak(p, rate=175)) for p in parts)
    x = np.concatenate([np.zeros(sr // 2, np.float32), head,
                        np.zeros(int(pause_ms * sr / 1000), np.float32), tail])
    sf.write(path, x, sr, subtype="PCM_16")
    return path


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


async def run_once(config: str, overrides: list[str], wav: Path, out: Path) -> dict[str, Any]:
    from omniframe.config import apply_overrides, build_pipeline, parse_config, read_yaml

    data = read_yaml(ROOT / config)
    data["pipeline"] = [s for s in data["pipeline"] if s.get("plugin") != "text"]
    data = apply_overrides(data, [
        f"source.options.path={json.dumps(str(wav))}", "source.options.realtime=true",
        "source.options.tail_silence_s=1.0", f"wav.options.path={json.dumps(str(out))}",
        "wav.options.realtime=false", *overrides])
    result = await build_pipeline(parse_config(data, config)).run()
    turns = [t for t in result.turns if t.voice_to_voice_s is not None]
    return {
        "v2v": turns[-1].voice_to_voice_s if turns else None,
        "vad_wait": turns[-1].vad_wait_s if turns else None,
        "turns": len(result.turns),
        "text": [t.text for t in result.turns],
        "audio": _read(out),
        "retractions": len(result.retracted),
        "wasted_s": sum(r["busy_s"] or 0.0 for r in result.retracted),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    pauses = [int(p) for p in args.pauses.split(",")]
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        for name in args.pipelines.split(","):
            config, overrides = PIPELINES[name]
            # warm-up: load the models once (they stay in the process-wide cache)
            await run_once(config, overrides, question_wav(tmp / "w.wav", QUESTIONS[0], 0),
                           tmp / "w_out.wav")
            for rep in range(args.repeats):
                for qi, parts in enumerate(QUESTIONS[:args.questions]):
                    for pause in pauses:
                        wav = question_wav(tmp / f"q{qi}_{pause}.wav", parts, pause)
                        off = await run_once(config, overrides + ["vad.options.tentative_ms=null"],
                                             wav, tmp / "off.wav")
                        on = await run_once(config, overrides
                                            + [f"vad.options.tentative_ms={args.tentative_ms}"],
                                            wav, tmp / "on.wav")
                        same = off["text"] == on["text"] and off["audio"] == on["audio"]
                        row = {"pipeline": name, "question": qi, "pause_ms": pause, "rep": rep,
                               "v2v_off": off["v2v"], "v2v_on": on["v2v"],
                               "vad_wait": off["vad_wait"], "retractions": on["retractions"],
                               "wasted_s": round(on["wasted_s"], 3), "identical": same}
                        rows.append(row)
                        print(f"{name:10s} q{qi} pause {pause:4d} ms  v2v off {_f(off['v2v'])} "
                              f"on {_f(on['v2v'])}  retracted {on['retractions']}  wasted "
                              f"{on['wasted_s']:.3f} s  identical {same}", file=sys.stderr)
    return summarize(rows, args)


def _f(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"


def summarize(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    print(f"\n{'pipeline':10s} {'pause':>6s} {'v2v off':>8s} {'v2v on':>8s} {'saved':>7s} "
          f"{'retracted':>9s} {'wasted s':>9s} {'identical':>9s}")
    out: dict[str, Any] = {"tentative_ms": args.tentative_ms}
    for name in dict.fromkeys(r["pipeline"] for r in rows):
        mine = [r for r in rows if r["pipeline"] == name]
        for pause in dict.fromkeys(r["pause_ms"] for r in mine):
            rs = [r for r in mine if r["pause_ms"] == pause]
            off = [r["v2v_off"] for r in rs if r["v2v_off"] is not None]
            on = [r["v2v_on"] for r in rs if r["v2v_on"] is not None]
            mo, mn = (statistics.median(off) if off else None), \
                (statistics.median(on) if on else None)
            saved = None if mo is None or mn is None else mo - mn
            print(f"{name:10s} {pause:6d} {_f(mo):>8s} {_f(mn):>8s} {_f(saved):>7s} "
                  f"{sum(r['retractions'] for r in rs):9d} "
                  f"{sum(r['wasted_s'] for r in rs):9.3f} "
                  f"{str(all(r['identical'] for r in rs)):>9s}")
        off = [r["v2v_off"] for r in mine if r["v2v_off"] is not None]
        on = [r["v2v_on"] for r in mine if r["v2v_on"] is not None]
        out[f"{name}_v2v_s_p50_off"] = round(statistics.median(off), 3) if off else None
        out[f"{name}_v2v_s_p50_on"] = round(statistics.median(on), 3) if on else None
    out["identical"] = all(r["identical"] for r in rows)
    out["retractions"] = sum(r["retractions"] for r in rows)
    out["wasted_s"] = round(sum(r["wasted_s"] for r in rows), 3)
    out["runs"] = len(rows)
    out["device"] = platform.processor() or platform.machine()
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipelines", default="mini-omni,cascade")
    ap.add_argument("--pauses", default="0,300", help="mid-question pauses, ms")
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tentative-ms", type=float, default=150)
    args = ap.parse_args()
    unknown = sorted(set(args.pipelines.split(",")) - set(PIPELINES))
    if unknown:
        ap.error(f"unknown pipeline(s) {', '.join(unknown)}; choose from {', '.join(PIPELINES)}")
    try:
        if any(int(p) < 0 for p in args.pauses.split(",")):
            raise ValueError
    except ValueError:
        ap.error(f"--pauses must be comma-separated milliseconds >= 0, got {args.pauses!r}")
    if not 1 <= args.questions <= len(QUESTIONS) or args.repeats < 1:
        ap.error(f"--questions must be 1..{len(QUESTIONS)} and --repeats >= 1")
    from omniframe.logging import configure_logging

    configure_logging(os.environ.get("BENCH_LOG", "warning"))
    print(json.dumps(asyncio.run(main(args))))
