"""The report: per-item records → figures per pipeline → markdown + JSON + PNG plots.

:func:`build_report` is a pure function of the run description, the pipelines' info and the
records, so a resumed run (records partly from before the crash) gives the same report as an
uninterrupted one. :func:`write_report` writes ``report.json``, ``report.md`` and
``plots/*.png``; every table and plot names the device the figures came from.

Each pipeline's block also gives its latency under the names VocalBench uses (``vocalbench``:
``fcl_ms``, first-chunk latency in milliseconds, and ``rtf``, real-time factor; see
:data:`VOCALBENCH_LEGEND`), and which ``jobs`` values its items ran with (latencies measured
with several items at once are not comparable with one at a time).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from omniframe_eval.scoring import (
    BREAKDOWN,
    BREAKDOWN_LABELS,
    contains_answer,
    get_normalizer,
    normalizer_name,
    summarize,
    word_errors,
)

__all__ = ["build_report", "render_markdown", "write_report"]

LATENCY_KEYS = ("voice_to_voice", "vad_wait", "response", "to_first_text", "asr", "rtf",
                "first_chunk_latency")

#: Where the VocalBench names come from and what they mean here (the report's legend).
VOCALBENCH_SOURCE = ("VocalBench (Liu et al., Shanghai Jiao Tong University and Ant Group, "
                     "arXiv 2505.15727; leaderboard at github.com/SJTU-OmniAgent/VocalBench)")
VOCALBENCH_LEGEND = (
    "RTF is how VocalBench reports a model's latency (its leaderboard's Latency column, \"a "
    "real-time factor calculation representing the computing latency\"; source: "
    f"{VOCALBENCH_SOURCE}); FCL is the first-chunk latency that speech-interaction benchmarks "
    "report beside it (the copies of VocalBench's README this project could read show RTF "
    "only). "
    "**FCL**, first-chunk latency: from the moment the user's whole input is handed to the "
    "model (here the VAD's end-of-speech decision) to the first chunk of answer audio leaving "
    "the sink, in milliseconds; the same figure as 'response' above, without the VAD's wait "
    "(voice-to-voice = VAD wait + FCL). **RTF**, real-time factor: generation time (the VAD's "
    "decision → the end of the answer) / duration of the generated answer audio; below 1 is "
    "faster than real time. Mean over items (VocalBench gives one figure per model) and "
    "median. Same names and definitions, not the same conditions: these figures come from "
    "this device, mode and pipeline, so compare them with each other, not with the numbers "
    "VocalBench publishes.")


def _lat(rec: dict[str, Any], key: str) -> float | None:
    """One latency figure of a record (records made before ``first_chunk_latency`` existed
    have it as ``response``)."""
    lat = rec.get("latency") or {}
    v = lat.get(key)
    if v is None and key == "first_chunk_latency":
        v = lat.get("response")
    return v


def _jobs(records: list[dict[str, Any]]) -> list[int]:
    """The ``jobs`` values the records ran with (1 for records from before --jobs)."""
    return sorted({int(r.get("jobs") or 1) for r in records})


def _ok(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("status") == "ok"]


def _wer_block(pairs: list[tuple[str, str]], norm: Any) -> dict[str, Any]:
    errors = words = 0
    for ref, hyp in pairs:
        we = word_errors(ref, hyp, norm)
        errors += we.errors
        words += we.ref_words
    return {"value": errors / words if words else None, "n_items": len(pairs),
            "ref_words": words, "errors": errors}


def _content(records: list[dict[str, Any]], info: dict[str, Any], entry: dict[str, Any],
             norm: Any, judges: dict[str, str | None]) -> dict[str, Any]:
    if not info.get("content_meaningful", True):
        return {"meaningful": False, "note": info.get("content_note")}
    ok = _ok(records)
    out: dict[str, Any] = {"meaningful": True, "note": None}
    # ASR word error rate: reference transcript vs the pipeline's transcript (or answer)
    hyp_key = "answer_text" if entry.get("asr_hypothesis") == "answer" else "transcript"
    pairs = [(r["reference_transcript"], r.get(hyp_key) or "") for r in ok
             if r.get("reference_transcript") and (hyp_key == "answer_text"
                                                   or r.get("has_transcript"))]
    asr = _wer_block(pairs, norm)
    if not pairs:
        asr["note"] = ("the pipeline produces no transcript (no ASR stage)"
                       if hyp_key == "transcript" else "no item has a reference transcript")
    out["asr_wer"] = asr
    # answer quality: normalized containment of any reference answer
    qa = [(r, contains_answer(r.get("answer_text") or "", r["reference_answers"], norm))
          for r in ok if r.get("task") == "qa" and r.get("reference_answers")]
    hits = [c for _, c in qa if c is not None]
    out["qa_accuracy"] = {"value": sum(hits) / len(hits) if hits else None, "n_items": len(hits),
                          "correct": int(sum(hits))}
    if not hits:
        out["qa_accuracy"]["note"] = "no item has reference answers"
    sims = [r["embedding_similarity"] for r in ok if r.get("embedding_similarity") is not None]
    emb = summarize(sims)
    out["embedding_similarity"] = {"value": emb["mean"], "n_items": emb["n"]}
    if not sims:
        out["embedding_similarity"]["note"] = (
            f"not available: {judges['embedding']}" if judges.get("embedding")
            else "not available (no embedding model loaded, or no reference answers)")
    # agreement of the spoken answer with the text answer
    spk = [(r.get("answer_text") or "", r["spoken_text"]) for r in ok
           if r.get("spoken_text") is not None and (r.get("answer_text") or "").strip()]
    agree = _wer_block(spk, norm)
    if not spk:
        agree["note"] = (f"not available: {judges['spoken_answer_asr']}"
                         if judges.get("spoken_answer_asr") else "no answer audio was transcribed")
    out["spoken_text_wer"] = agree
    return out


def _speech_quality(ok: list[dict[str, Any]], judges: dict[str, str | None]) -> dict[str, Any]:
    """DNSMOS P.835 of the spoken answers (every pipeline: it needs no reference)."""
    scores = [r["dnsmos"] for r in ok if isinstance(r.get("dnsmos"), dict)]
    out: dict[str, Any] = {"n_items": len(scores)}
    for k in ("sig", "bak", "ovrl"):
        sm = summarize([d.get(k) for d in scores])
        out[f"dnsmos_{k}"] = {"mean": sm["mean"], "p50": sm["p50"]}
    if not scores:
        out["note"] = (f"not available: {judges['dnsmos']}" if judges.get("dnsmos")
                       else "no answer audio was scored")
    return out


def _pipeline_block(name: str, records: list[dict[str, Any]], info: dict[str, Any],
                    entry: dict[str, Any], norm: Any, judges: dict[str, str | None]
                    ) -> dict[str, Any]:
    ok = _ok(records)
    failures = [{"item": r["item"], "reason": r.get("reason") or "?"} for r in records
                if r.get("status") != "ok"]
    lat = {k: summarize([_lat(r, k) for r in ok]) for k in LATENCY_KEYS}
    breakdown = {k: summarize([(r.get("latency") or {}).get(k) for r in ok])["p50"]
                 for k in BREAKDOWN}
    stage_names: list[str] = []
    for r in ok:
        for s in r.get("stage_busy_s") or {}:
            if s not in stage_names:
                stage_names.append(s)
    busy = {s: summarize([(r.get("stage_busy_s") or {}).get(s) for r in ok])["mean"]
            for s in stage_names}
    wall = sum(r.get("wall_s") or 0.0 for r in ok)
    audio_in = sum(r.get("input_audio_s") or 0.0 for r in ok)
    return {
        "name": name,
        "config": info.get("config"),
        "info": info,
        "items": len(records),
        "ok": len(ok),
        "failed": len(failures),
        "failures": failures,
        "latency": lat,
        "jobs": _jobs(records),
        "vocalbench": _vocalbench(lat),
        "breakdown_p50": breakdown,
        "stage_busy_mean_s": busy,
        "throughput": {
            "wall_s": wall, "input_audio_s": audio_in,
            "rtf": wall / audio_in if audio_in else None,
            "answer_audio_s": sum(r.get("answer_audio_s") or 0.0 for r in ok),
        },
        "content": _content(records, info, entry, norm, judges),
        "speech_quality": _speech_quality(ok, judges),
        "per_item": [
            {"item": r["item"], "status": r.get("status"),
             "v2v": (r.get("latency") or {}).get("voice_to_voice"),
             "transcript": r.get("transcript"), "answer": r.get("answer_text"),
             "spoken": r.get("spoken_text"),
             "correct": contains_answer(r.get("answer_text") or "", r["reference_answers"], norm)
             if r.get("status") == "ok" and r.get("reference_answers") else None,
             "reason": r.get("reason")}
            for r in records
        ],
    }


def _vocalbench(lat: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """First-chunk latency (ms) and real-time factor, as VocalBench names them."""
    fcl, rtf = lat["first_chunk_latency"], lat["rtf"]

    def ms(x: float | None) -> float | None:
        return None if x is None else 1000.0 * x

    return {"fcl_ms": {"mean": ms(fcl["mean"]), "p50": ms(fcl["p50"]), "n": fcl["n"]},
            "rtf": {"mean": rtf["mean"], "p50": rtf["p50"], "n": rtf["n"]},
            "source": VOCALBENCH_SOURCE}


def _fmt_s(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f} s"


def _fmt_ms(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0f}"


def _fmt_x(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _jobs_text(rep: dict[str, Any]) -> str:
    """How many items ran at once, for the report's header."""
    used = sorted({j for b in rep["pipelines"] for j in (b.get("jobs") or [1])})
    if used == [1]:
        return "1 (items one at a time)"
    text = ", ".join(map(str, used))
    return (f"{text} items at once (--jobs): latencies are measured under that load and are "
            f"not comparable with one item at a time")


def _fmt_pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _verdict(blocks: list[dict[str, Any]], run: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    timed = [(b["latency"]["voice_to_voice"]["p50"], b) for b in blocks
             if b["latency"]["voice_to_voice"]["p50"] is not None]
    timed.sort(key=lambda t: t[0])
    where = f"on {run['device_label']}, {run['mode']} mode"
    if timed:
        parts = [f"**{b['name']}** {_fmt_s(v)} "
                 f"(p90 {_fmt_s(b['latency']['voice_to_voice']['p90'])})" for v, b in timed]
        lines.append(f"Voice-to-voice latency, median: {' vs '.join(parts)} ({where}).")
    else:
        lines.append("No pipeline produced a timed answer: no latency comparison is possible.")
    for _, b in timed:
        segs = [(v, k) for k, v in b["breakdown_p50"].items() if v is not None]
        total = b["latency"]["voice_to_voice"]["p50"]
        if segs and total:
            v, k = max(segs)
            lines.append(f"Where **{b['name']}**'s time goes: {BREAKDOWN_LABELS[k]} is its "
                         f"largest segment ({_fmt_s(v)} of {_fmt_s(total)}, median).")
    meaningful = [b for b in blocks if b["content"]["meaningful"] and b["ok"]]
    scored = [(b["content"]["qa_accuracy"]["value"], b) for b in meaningful
              if b["content"]["qa_accuracy"]["value"] is not None]
    scored.sort(key=lambda t: -t[0])
    if scored:
        lines.append("Answer quality (reference answer contained in the text answer): " + ", ".join(
            f"**{b['name']}** {_fmt_pct(v)} of {b['content']['qa_accuracy']['n_items']}"
            for v, b in scored) + ".")
    wers = [(b["content"]["asr_wer"]["value"], b) for b in meaningful
            if b["content"]["asr_wer"]["value"] is not None]
    if wers:
        lines.append("ASR word error rate: " + ", ".join(
            f"**{b['name']}** {_fmt_pct(v)}" for v, b in sorted(wers, key=lambda t: t[0])) + ".")
    for b in blocks:
        if not b["content"]["meaningful"]:
            lines.append(f"**{b['name']}**: content metrics not meaningful — "
                         f"{b['content']['note']}")
    for b in blocks:
        if b["failed"] and not b["ok"]:
            first = b["failures"][0]["reason"]
            lines.append(f"**{b['name']}** produced no answer at all ({b['failed']} of "
                         f"{b['items']} items failed; first reason: {_short(first, 240)})")
        elif b["failed"]:
            lines.append(f"**{b['name']}** failed {b['failed']} of {b['items']} items "
                         f"(listed under Failures).")
    # the recommendation
    fastest = timed[0][1] if timed else None
    best = scored[0][1] if scored else None
    if len(blocks) == 1:
        pass
    elif best is not None and fastest is not None:
        if best is fastest:
            lines.append(f"**Pick {best['name']}**: it is both the fastest to first audio and "
                         f"the most accurate of the systems with meaningful answers here.")
        elif not fastest["content"]["meaningful"]:
            lines.append(
                f"**Pick {best['name']}** for answers you can use: it is the only system with "
                f"meaningful answers in this run. {fastest['name']} is faster to first audio "
                f"here, which shows what its architecture costs on this device, but its answer "
                f"quality is not measured by this run.")
        else:
            lines.append(f"**Trade-off**: pick {best['name']} for answer quality, "
                         f"{fastest['name']} for latency.")
    elif best is not None:
        lines.append(f"**Pick {best['name']}**: the best answer quality here.")
    elif fastest is not None and len(timed) > 1:
        lines.append(f"Only latency can be compared in this run: {fastest['name']} is fastest.")
    return lines


def build_report(run: dict[str, Any], pipelines: dict[str, dict[str, Any]],
                 records: dict[str, list[dict[str, Any]]],
                 judges: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Everything the report shows, as JSON-ready data."""
    judges = dict(judges or {})
    norm = get_normalizer(run.get("normalizer", "whisper"))
    entries = {p["name"]: p for p in run.get("pipelines", [])}
    blocks = [_pipeline_block(name, records.get(name, []), pipelines.get(name, {}),
                              entries.get(name, {}), norm, judges)
              for name in records]
    meaningful_any = any(b["content"]["meaningful"] for b in blocks)
    return {
        "title": f"Evaluation {run['name']}: " + " vs ".join(b["name"] for b in blocks),
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "run": {k: v for k, v in run.items() if k != "items"},
        "n_items": len(run.get("items", [])),
        "device_label": run["device_label"],
        "normalizer": normalizer_name(run.get("normalizer", "whisper")),
        "judges": {
            "spoken_answer_asr": run.get("spoken_answer_asr", {}).get("model"),
            "spoken_answer_asr_unavailable": judges.get("spoken_answer_asr"),
            "embedding": run.get("embedding", {}).get("model"),
            "embedding_unavailable": judges.get("embedding"),
        } if meaningful_any else {},
        "dnsmos_model": run.get("dnsmos", {}).get("model"),
        "dnsmos_unavailable": judges.get("dnsmos"),
        "pipelines": blocks,
        "verdict": _verdict(blocks, run),
    }


# ------------------------------------------------------------------------------- markdown


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in r) + " |"
            for r in rows]
    return "\n".join(out)


def _flat(text: str | None) -> str:
    return " ".join(str(text).split())


def _short(text: str | None, n: int = 60) -> str:
    if text is None or not text.strip():
        return "–"
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def render_markdown(rep: dict[str, Any], plots: list[tuple[str, str]] | None = None) -> str:
    """The report as markdown; ``plots`` are ``(title, relative path)`` pairs."""
    run = rep["run"]
    dev = rep["device_label"]
    mode = run["mode"]
    ds = run["dataset"]
    dinfo = run.get("device") or {}
    load = None
    if dinfo.get("load_start") is not None and dinfo.get("load_end") is not None:
        load = (dinfo["load_start"], dinfo["load_end"])
    lines = [f"# {rep['title']}", ""]
    if run.get("description"):
        lines += [run["description"].strip(), ""]
    limit = ""
    if run.get("limit"):
        how = ("spread evenly over the dataset" if run.get("sample") == "spread"
               else "the first ones")
        limit = f" (--limit {run['limit']}: {how})"
    lines += [
        f"- **Device**: {dev} (every figure below comes from this device)" + (
            f"; 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end "
            f"(other work on the machine slows every pipeline alike)" if load else ""),
        f"- **Mode**: {mode} — " + (
            "audio replayed at the speed of speech, so latencies are what a user would "
            "experience, including the VAD's end-of-speech wait (reported separately)."
            if mode == "realtime" else
            "audio fed as fast as possible (throughput); latencies include no real waiting "
            "and are not what a user would experience."),
        f"- **Dataset**: `{ds['name']}` {json.dumps(ds.get('options') or {})}: {rep['n_items']} "
        f"items{limit}",
        f"- **Seed**: {run['seed']} (Python, numpy and torch are seeded before every item)",
        f"- **Jobs**: {_jobs_text(rep)}",
        f"- **Text normalizer**: {rep['normalizer']}",
    ]
    if rep.get("judges"):
        j = rep["judges"]
        asr_line = j["spoken_answer_asr"]
        if j.get("spoken_answer_asr_unavailable"):
            asr_line += f" — not available: {j['spoken_answer_asr_unavailable']}"
        emb_line = j["embedding"]
        if j.get("embedding_unavailable"):
            emb_line += f" — not available: {j['embedding_unavailable']}"
        lines += [f"- **Spoken-answer ASR**: {asr_line}", f"- **Embedding model**: {emb_line}"]
    if run.get("command"):
        lines += [f"- **Command**: `{run['command']}`"]
    if run.get("omniframe_version"):
        lines += [f"- **omniframe**: {run['omniframe_version']}; generated {rep['generated_at']}"]
    lines.append("")
    for b in rep["pipelines"]:
        info = b["info"]
        desc = f"- **{b['name']}** (`{b['config']}`)"
        if info.get("stages"):
            desc += f": {' → '.join(info['stages'])}; torch device `{info.get('device')}`"
        lines.append(desc)
        if info.get("fallback_used"):
            lines.append(f"  - fallback used: {_flat(info.get('fallback_reason'))}")
        if info.get("start_error"):
            lines.append(f"  - could not start: {_flat(info['start_error'])}")
        for n in info.get("notes") or []:
            lines.append(f"  - note: {_flat(n)}")
    lines += ["", "## Which to pick", ""]
    lines += [f"- {v}" for v in rep["verdict"]]

    lines += ["", f"## Latency (seconds; {dev}; {mode})", "",
              "Voice-to-voice: end of user speech (last voiced audio) → first answer audio "
              "sample leaving the sink. Response: the VAD's end-of-speech decision → first "
              "audio (model side). RTF: answer compute time / answer audio duration (< 1 is "
              "faster than real time). Jobs: how many items ran at once.", ""]
    parallel = [b["name"] for b in rep["pipelines"] if max(b.get("jobs") or [1]) > 1]
    if parallel:
        lines += [f"**Note**: {', '.join(parallel)} ran several items at once (--jobs > 1): "
                  f"their items shared the device, so their latencies and RTF are measured "
                  f"under that load and are not comparable with a --jobs 1 run.", ""]
    rows = []
    for b in rep["pipelines"]:
        v = b["latency"]["voice_to_voice"]
        rows.append([
            b["name"], f"{b['ok']}/{b['items']}", _fmt_s(v["p50"]), _fmt_s(v["p90"]),
            _fmt_s(v["p95"]), _fmt_s(v["mean"]),
            _fmt_s(b["latency"]["vad_wait"]["p50"]), _fmt_s(b["latency"]["response"]["p50"]),
            _fmt_s(b["latency"]["to_first_text"]["p50"]),
            "–" if b["latency"]["rtf"]["p50"] is None else f"{b['latency']['rtf']['p50']:.2f}",
            ", ".join(map(str, b.get("jobs") or [1])),
        ])
    lines.append(_md_table(["pipeline", "ok", "v2v p50", "v2v p90", "v2v p95", "v2v mean",
                            "VAD wait p50", "response p50", "first text p50", "RTF p50",
                            "jobs"], rows))
    lines += ["", f"### First-chunk latency and RTF, as VocalBench names them ({dev}; {mode})",
              "", VOCALBENCH_LEGEND, ""]
    rows = []
    for b in rep["pipelines"]:
        vb = b.get("vocalbench") or _vocalbench(b["latency"])
        fcl, rtf = vb["fcl_ms"], vb["rtf"]
        rows.append([b["name"], _fmt_ms(fcl["mean"]), _fmt_ms(fcl["p50"]), _fmt_x(rtf["mean"]),
                     _fmt_x(rtf["p50"]), str(fcl["n"]), ", ".join(map(str, b.get("jobs") or [1]))])
    lines.append(_md_table(["pipeline", "FCL mean (ms)", "FCL p50 (ms)", "RTF mean", "RTF p50",
                            "items", "jobs"], rows))
    lines += ["", f"### Per-stage breakdown (medians, seconds; {dev})", ""]
    rows = [[b["name"], *[_fmt_s(b["breakdown_p50"][k]) for k in BREAKDOWN],
             _fmt_s(b["latency"]["voice_to_voice"]["p50"])] for b in rep["pipelines"]]
    lines.append(_md_table(["pipeline", *[BREAKDOWN_LABELS[k] for k in BREAKDOWN],
                            "voice-to-voice"], rows))
    lines += ["", "Medians of each segment need not add up to the median total. Busy time per "
                  "stage (mean seconds of compute per item):", ""]
    rows = [[b["name"], ", ".join(f"{s} {v:.3f}" for s, v in b["stage_busy_mean_s"].items()
                                  if v is not None) or "–",
             _fmt_s(b["throughput"]["wall_s"]), _fmt_s(b["throughput"]["input_audio_s"]),
             "–" if b["throughput"]["rtf"] is None else f"{b['throughput']['rtf']:.2f}"]
            for b in rep["pipelines"]]
    lines.append(_md_table(["pipeline", "busy s per stage", "total wall", "total input audio",
                            "run RTF (wall / input audio)"], rows))
    if mode == "realtime":
        lines += ["", "In real-time mode a run lasts at least as long as its audio (run RTF ≥ 1 by "
                      "construction); use --mode offline for throughput."]

    lines += ["", f"## Content ({dev})", ""]
    rows = []
    notes = []
    for b in rep["pipelines"]:
        c = b["content"]
        if not c["meaningful"]:
            rows.append([b["name"], *["not meaningful"] * 4])
            notes.append(f"- **{b['name']}**: {c['note']}")
            continue
        asr, qa, emb, agree = (c["asr_wer"], c["qa_accuracy"], c["embedding_similarity"],
                               c["spoken_text_wer"])
        rows.append([
            b["name"],
            (_fmt_pct(asr["value"]) + f" ({asr['n_items']} items, {asr['ref_words']} words)")
            if asr["value"] is not None else "n/a",
            (_fmt_pct(qa["value"]) + f" ({qa['correct']}/{qa['n_items']})")
            if qa["value"] is not None else "n/a",
            f"{emb['value']:.3f} ({emb['n_items']} items)" if emb["value"] is not None else "n/a",
            (_fmt_pct(agree["value"]) + f" ({agree['n_items']} items)")
            if agree["value"] is not None else "n/a",
        ])
        for k, label in (("asr_wer", "ASR WER"), ("qa_accuracy", "answer quality"),
                         ("embedding_similarity", "embedding similarity"),
                         ("spoken_text_wer", "spoken-vs-text WER")):
            if c[k].get("note"):
                notes.append(f"- **{b['name']}** {label}: {c[k]['note']}")
    lines.append(_md_table(["pipeline", "ASR WER (user speech)", "answer contains reference",
                            "embedding similarity to reference", "spoken-vs-text WER"], rows))
    lines += ["", "ASR WER: the pipeline's transcript against the reference transcript, corpus "
                  "level, after normalization. Answer quality: share of answers that contain "
                  "a reference answer as whole words after normalization. Embedding "
                  "similarity: cosine of mean-pooled sentence embeddings, best reference. "
                  "Spoken-vs-text WER: the produced audio transcribed by the spoken-answer ASR, "
                  "against the produced text (low = the voice says what the text says).", ""]
    lines += notes
    lines += ["", f"## Speech quality of the spoken answers ({dev})", "",
              "DNSMOS P.835 (Microsoft's non-intrusive predictor, "
              f"`{rep.get('dnsmos_model') or 'n/a'}`): SIG speech, BAK background, OVRL overall, "
              "1–5 (mean over items). It needs no reference, so it is given for every pipeline, "
              "random weights included (there it scores the noise they speak).", ""]
    rows = []
    for b in rep["pipelines"]:
        q = b.get("speech_quality") or {}
        if not q.get("n_items"):
            rows.append([b["name"], "n/a", "n/a", "n/a", q.get("note") or "–"])
            continue
        means = [f"{q[f'dnsmos_{k}']['mean']:.2f}" for k in ("sig", "bak", "ovrl")]
        rows.append([b["name"], *means, str(q["n_items"])])
    lines.append(_md_table(["pipeline", "DNSMOS SIG", "DNSMOS BAK", "DNSMOS OVRL", "items"],
                           rows))
    if plots:
        lines += ["", "## Plots", ""]
        for title, rel in plots:
            lines += [f"![{title}]({rel})", ""]
    lines += ["", "## Failures", ""]
    fails = [(b["name"], f["item"], f["reason"]) for b in rep["pipelines"] for f in b["failures"]]
    if fails:
        lines.append(_md_table(["pipeline", "item", "reason"],
                               [[p, i, _short(r, 300)] for p, i, r in fails]))
    else:
        lines.append("None: every item of every pipeline produced an answer.")
    lines += ["", "## Items", ""]
    for b in rep["pipelines"]:
        lines += [f"### {b['name']}", ""]
        meaningful = b["content"]["meaningful"]
        rows = []
        for it in b["per_item"][:100]:
            ans = _short(it["answer"]) if meaningful else "(random weights)"
            ok = "–" if it["correct"] is None or not meaningful else ("yes" if it["correct"]
                                                                      else "no")
            rows.append([it["item"], it["status"] or "?", _fmt_s(it["v2v"]),
                         _short(it["transcript"], 50), ans, ok])
        lines.append(_md_table(["item", "status", "v2v", "transcript", "answer", "correct"],
                               rows))
        if len(b["per_item"]) > 100:
            lines.append(f"\n({len(b['per_item']) - 100} more items in records.jsonl)")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------- plots


def _plots(rep: dict[str, Any], folder: Path) -> list[tuple[str, str]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    dev = rep["device_label"]
    mode = rep["run"]["mode"]
    out: list[tuple[str, str]] = []
    names = [b["name"] for b in rep["pipelines"]]

    # 1. voice-to-voice distribution
    data = [[it["v2v"] for it in b["per_item"] if it["status"] == "ok" and it["v2v"] is not None]
            for b in rep["pipelines"]]
    if any(data):
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.9 * len(names)))
        pos = list(range(1, len(names) + 1))
        nonempty = [(p, d) for p, d in zip(pos, data, strict=True) if d]
        box = {"positions": [p for p, _ in nonempty], "widths": 0.5, "showfliers": False}
        try:
            ax.boxplot([d for _, d in nonempty], orientation="horizontal", **box)
        except TypeError:  # matplotlib < 3.10
            ax.boxplot([d for _, d in nonempty], vert=False, **box)
        for p, d in nonempty:
            jitter = [p + 0.12 * ((i * 0.618) % 1 - 0.5) for i in range(len(d))]
            ax.scatter(d, jitter, s=14, alpha=0.7, zorder=3)
        ax.set_yticks(pos)
        ax.set_yticklabels([f"{n}\n(n={len(d)})" for n, d in zip(names, data, strict=True)])
        ax.set_xlabel("voice-to-voice latency, s (end of user speech → first answer audio)")
        ax.set_xlim(0, 1.08 * max(max(d) for d in data if d) + 1e-3)
        ax.set_title(f"Voice-to-voice latency ({mode})\n{dev}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "latency.png", dpi=110)
        plt.close(fig)
        out.append(("Voice-to-voice latency distribution", "latency.png"))

    # 2. per-stage breakdown (medians)
    seg = [[rep["pipelines"][i]["breakdown_p50"][k] or 0.0 for k in BREAKDOWN]
           for i in range(len(names))]
    if any(any(s) for s in seg):
        fig, ax = plt.subplots(figsize=(7, 2.2 + 0.7 * len(names)))
        left = [0.0] * len(names)
        for j, k in enumerate(BREAKDOWN):
            widths = [s[j] for s in seg]
            ax.barh(names, widths, left=left, label=BREAKDOWN_LABELS[k])
            left = [a + b for a, b in zip(left, widths, strict=True)]
        ax.set_xlabel("seconds (median of each segment)")
        ax.set_title(f"Where the latency goes ({mode})\n{dev}", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2,
                  frameon=False)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "breakdown.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        out.append(("Per-stage latency breakdown", "breakdown.png"))

    # 3. content metrics (meaningful pipelines only)
    mb = [b for b in rep["pipelines"] if b["content"]["meaningful"] and b["ok"]]
    metrics = [("answer contains reference", "qa_accuracy"), ("1 − ASR WER", "asr_wer"),
               ("embedding similarity", "embedding_similarity"),
               ("1 − spoken-vs-text WER", "spoken_text_wer")]
    vals = {b["name"]: [b["content"][k]["value"] for _, k in metrics] for b in mb}
    if vals and any(v is not None for vs in vals.values() for v in vs):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        width = 0.8 / max(1, len(vals))
        for i, (n, vs) in enumerate(vals.items()):
            ys = []
            for (_, k), v in zip(metrics, vs, strict=True):
                if v is None:
                    ys.append(0.0)
                elif k in ("asr_wer", "spoken_text_wer"):
                    ys.append(max(0.0, 1.0 - v))
                else:
                    ys.append(v)
            ax.bar([x + i * width for x in range(len(metrics))], ys, width, label=n)
        ax.set_xticks([x + width * (len(vals) - 1) / 2 for x in range(len(metrics))])
        ax.set_xticklabels([m for m, _ in metrics], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("higher is better")
        skipped = [b["name"] for b in rep["pipelines"] if not b["content"]["meaningful"]]
        sub = f"\nnot shown (not meaningful): {', '.join(skipped)}" if skipped else ""
        ax.set_title(f"Content metrics\n{dev}{sub}", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "quality.png", dpi=110)
        plt.close(fig)
        out.append(("Content metrics", "quality.png"))
    return out


def write_report(rep: dict[str, Any], folder: str | Path, plots: bool = True
                 ) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and (``plots``) the PNG plots into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made = _plots(rep, folder) if plots else []
    paths = {"json": folder / "report.json", "markdown": folder / "report.md"}
    paths["json"].write_text(json.dumps({**rep, "plots": [p for _, p in made]}, indent=2,
                                        default=str) + "\n")
    paths["markdown"].write_text(render_markdown(rep, made))
    for _, rel in made:
        paths[rel] = folder / rel
    return paths
