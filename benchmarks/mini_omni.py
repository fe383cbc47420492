"""Mini-Omni speed on CPU with random weights of the released sizes.

    python benchmarks/mini_omni.py                 # fp32 and bf16, 2 threads
    python benchmarks/mini_omni.py --threads 1 --steps 24

Weights are random (``random://mini-omni`` = the released 0.5B LM, ``random://small`` = the
Whisper-small encoder, ``random://snac_24khz``): compute cost does not depend on the values.
Each dtype runs in its own process, so ``peak_rss_gb`` is what one bf16 pipeline (LM + Whisper
encoder + SNAC) needs. One decode step is one batch-parallel A1A2 step (2 rows) = 85.3 ms of
answer audio; real time needs 11.72 steps/s.

"fast" is the LM stage's default path (``faithful: false``): last-position logits only, only
the head rows that are read, shared-prefix prefill, one-query attention as two matmuls, and on
AVX512-BF16 CPUs the small-batch bf16 kernel (kernels.py) for every linear layer of a decode
step (fastpath.py). "fast_torch" is the same without that kernel (PyTorch's native bf16
kernels, oneDNN off for the step). "faithful" computes like the reference. They give the same
greedy tokens up to float rounding.

first_audio_s: a question whose speech ended at the moment the source emits it, in a running
pipeline (stages set up), to the first answer sample out of the SNAC stage.

Options that change results relative to the reference: ``encoder.trim`` (Whisper without the
30 s padding), ``dtype: bfloat16`` (LM and encoder), and the codec's ``context_frames``,
``lookahead_frames``, ``deterministic`` and ``decode_tail``. Float rounding only: the LM's
fast path and the codec's ``fast``.

The machine may be shared: the load average before and after each part is printed; numbers
taken under load are lower bounds. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

QUESTION_S = 5.0
STEP_AUDIO_S = 2048 / 24000  # 85.33 ms of answer audio per decode step


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# ------------------------------------------------------------------------------------ child


def child(dtype: str, threads: int, steps: int) -> dict[str, Any]:
    import anyio
    import torch

    torch.set_num_threads(threads)
    from omniframe_mini_omni import tokens
    from omniframe_mini_omni.fastpath import FastLM
    from omniframe_mini_omni.generate import GenerationStream
    from omniframe_mini_omni.stages import MiniOmniLM, SnacCodec, WhisperEncoderStage

    from omniframe.frames import OutputAudioFrame, UserTurnFrame
    from omniframe.pipeline import Pipeline
    from omniframe.resources import Resources
    from omniframe.session import Session
    from omniframe.stage import StageContext, _compute_executor
    from omniframe.testing import ListSource, speech_like

    out: dict[str, Any] = {"dtype": dtype, "threads": threads, "load_start": _load()}
    resources = Resources()
    session = Session()

    def ctx(name: str) -> StageContext:
        return StageContext(name=name, session=session, resources=resources)

    fast = dtype == "bfloat16"
    enc_fast = WhisperEncoderStage({"model": "random://small", "trim": True, "dtype": dtype},
                                   ctx("encoder"))
    # the faithful encoder (fp32, 30 s padding) only in the fp32 run: the bf16 run's peak RSS
    # is that of one fast pipeline
    enc_ref = enc_fast if fast else WhisperEncoderStage(
        {"model": "random://small", "trim": False}, ctx("encoder"))
    lm = MiniOmniLM({"model": "random://mini-omni", "dtype": dtype, "max_new_tokens": 12,
                     "faithful": not fast}, ctx("lm"))
    codec = SnacCodec({"model": "random://snac_24khz", "frames_per_chunk": 4,
                       "first_chunk_frames": 1 if fast else None},
                      ctx("codec"))

    async def setup() -> None:
        for st in (enc_fast, enc_ref, lm, codec):
            await st.setup()

    t0 = time.perf_counter()
    anyio.run(setup)
    out["setup_s"] = round(time.perf_counter() - t0, 2)
    out["rss_after_load_gb"] = _rss_gb()

    audio = speech_like([("speech", QUESTION_S)], seed=1)

    def measure() -> None:
        """Isolated timings, on the compute thread the stages use (one OpenMP pool)."""
        with torch.inference_mode():
            # ------------------------------------------------------------ Whisper encoder
            def timed(fn: Any, reps: int = 2) -> float:
                best = float("inf")
                for _ in range(reps):
                    t = time.perf_counter()
                    fn()
                    best = min(best, time.perf_counter() - t)
                return best

            trimmed = timed(lambda: enc_fast.encoder.encode(audio, trim=True))
            out["whisper_trim_s"] = round(trimmed, 3)
            if not fast:
                padded = timed(lambda: enc_ref.encoder.encode(audio), 1)
                out["whisper_faithful_s"] = round(padded, 3)
            feats = enc_fast.encoder.encode(audio, trim=True)
            out["whisper_frames"] = int(feats.shape[0])

            # ------------------------------------------------------------ LM prefill + decode
            model = lm.lm.model

            def prefill(faithful: bool) -> float:
                m = model if faithful else FastLM(model)
                s = GenerationStream(m, "A1A2", whisper_features=feats, batch_parallel=True,
                                     max_steps=2, faithful=faithful)
                t = time.perf_counter()
                next(s)
                dt = time.perf_counter() - t
                s.close()
                return dt

            pre: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(2):  # interleaved: both see the same load
                for faithful in (False, True):
                    pre[faithful].append(prefill(faithful))
            out["prefill_fast_s"] = round(min(pre[False]), 3)
            out["prefill_faithful_s"] = round(min(pre[True]), 3)

            # Decode steps: the variants take turns step by step (same moments, same load), each
            # exactly the forward call GenerationStream makes; the median is reported and the best
            # step (what an idle machine gives) beside it.
            s = GenerationStream(FastLM(model), "A1A2", whisper_features=feats, batch_parallel=True,
                                 max_steps=steps + 3)
            next(s)  # prefill
            t = time.perf_counter()
            n = sum(1 for _ in s)  # the real loop (sampling, Python), for reference
            out["decode_stream_steps_per_s"] = round(n / (time.perf_counter() - t), 2)
            fast_lm = FastLM(model)
            out["decode_kernel"] = fast_lm.kernel
            after_text = FastLM(model)
            after_text.text_ended()
            torch_kernels = FastLM(model, step_kernels=False)
            fast_kw = {"last_only": True, "audio_head_rows": [0], "text_head_rows": [1]}
            variants: dict[str, Any] = {
                "fast": lambda x, p: fast_lm(x, p, **fast_kw),
                "faithful": lambda x, p: model(x, p, last_only=True),  # both heads, both rows
                "fast_no_text_head": lambda x, p: after_text(x, p, **fast_kw),
                "fast_torch": lambda x, p: torch_kernels(x, p, **fast_kw),
            }
            model.set_kv_cache(2, model.config.block_size)
            x = torch.tensor([[[tokens.layershift(100 + i, i)] for i in range(7)] + [[1000]]] * 2)
            times: dict[str, list[float]] = {k: [] for k in variants}
            pos = feats.shape[0] + 3
            out["load_decode"] = _load()
            for _ in range(steps):
                for k, fn in variants.items():
                    t = time.perf_counter()
                    fn(x, pos)
                    times[k].append(time.perf_counter() - t)
                    pos += 1
            for k, v in times.items():
                out[f"decode_{k}_steps_per_s"] = round(1.0 / statistics.median(v[1:]), 2)
                out[f"decode_{k}_best_steps_per_s"] = round(1.0 / min(v), 2)
            model.clear_kv_cache()

    _compute_executor().submit(measure).result()

    # ---------------------------------------------------------------- first audio, pipeline
    enc = enc_fast if fast else enc_ref
    firsts: list[float] = []

    class FirstAudio:
        """Time of the first answer sample, and of the first frame of each kind on the way."""

        def __init__(self) -> None:
            self.t: float | None = None
            self.marks: dict[str, float] = {}

        def on_frame(self, stage: str, kind: str, frame: Any, now: float) -> None:
            self.marks.setdefault(f"{stage}:{type(frame).__name__}", now)
            if self.t is None and kind == "codec" and isinstance(frame, OutputAudioFrame):
                self.t = now

    class Question(ListSource):
        """Emits the question once the pipeline runs, stamped as ending at that moment."""

        async def generate(self) -> Any:
            await anyio.sleep(0.3)  # stages are set up and waiting
            self.sent = UserTurnFrame(samples=audio, sample_rate=16000, turn=1,
                                      speech_end_ts=time.monotonic())
            yield self.sent

    parts: list[dict[str, float]] = []
    for _ in range(3):
        obs = FirstAudio()
        src = Question([], context=ctx("source"))
        anyio.run(Pipeline([src, enc, lm, codec], observers=[obs]).run)
        assert obs.t is not None, "no audio came out"
        firsts.append(obs.t - src.sent.speech_end_ts)
        parts.append({k: round(v - src.sent.speech_end_ts, 3) for k, v in obs.marks.items()})
    best = min(range(len(firsts)), key=firsts.__getitem__)
    out["first_audio_s"] = round(firsts[best], 3)
    out["first_audio_median_s"] = round(statistics.median(firsts), 3)
    out["first_audio_parts"] = parts[best]
    out["first_audio_config"] = (
        "whisper trim bf16, LM fast bf16, SNAC 1 frame/chunk" if fast else
        "as released: whisper 30 s padding, LM faithful fp32, SNAC 4 frames/chunk")
    out["peak_rss_gb"] = _rss_gb()
    out["load_end"] = _load()
    return out


# ----------------------------------------------------------------------------------- parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32, help="decode steps measured per variant")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads, args.steps)))
        return

    results: dict[str, dict[str, Any]] = {}
    for dtype in args.dtypes.split(","):
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", dtype, "--threads", str(args.threads),
             "--steps", str(args.steps)], capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{dtype} run failed")
        results[dtype] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[dtype]["wall_s"] = round(time.perf_counter() - t, 1)

    device = f"CPU: {_cpu()}, {os.cpu_count()} cores (shared machine: see load averages)"
    print(f"Mini-Omni random weights, released sizes; {device}; torch threads {args.threads}")
    keys = ["load_start", "setup_s", "whisper_trim_s", "whisper_faithful_s", "prefill_fast_s",
            "prefill_faithful_s", "decode_stream_steps_per_s", "load_decode"]
    keys += ["decode_kernel"]
    keys += [f"decode_{v}{b}_steps_per_s" for v in ("fast", "faithful", "fast_no_text_head",
                                                    "fast_torch") for b in ("", "_best")]
    keys += ["first_audio_s", "first_audio_median_s", "peak_rss_gb", "load_end", "wall_s"]
    cols = list(results)
    print(f"{'':40s}" + "".join(f"{c:>12s}" for c in cols))
    for k in keys:
        print(f"{k:40s}" + "".join(f"{results[c].get(k, '-')!s:>12s}" for c in cols))
    for c in cols:
        print(f"first audio ({c}): {results[c]['first_audio_config']}")
        print("  first frame of each kind, s after the question ended: " + ", ".join(
            f"{k} {v}" for k, v in results[c]["first_audio_parts"].items()))

    fp32 = results.get("float32", {})
    bf16 = results.get("bfloat16", {})
    best = bf16 or fp32

    def ratio(a: Any, b: Any) -> float | None:
        return round(a / b, 2) if a and b else None

    summary = {
        "device": device,
        "threads": args.threads,
        "decode_steps_per_s_fp32": fp32.get("decode_fast_steps_per_s"),
        "decode_steps_per_s_bf16": bf16.get("decode_fast_steps_per_s"),
        "decode_steps_per_s_bf16_best": bf16.get("decode_fast_best_steps_per_s"),
        "decode_steps_per_s_bf16_after_text_end": bf16.get(
            "decode_fast_no_text_head_steps_per_s"),
        "decode_steps_per_s_bf16_after_text_end_best": bf16.get(
            "decode_fast_no_text_head_best_steps_per_s"),
        "decode_steps_per_s_bf16_torch_kernels": bf16.get("decode_fast_torch_steps_per_s"),
        "decode_kernel": bf16.get("decode_kernel"),
        "realtime_steps_per_s": round(1 / STEP_AUDIO_S, 2),
        "prefill_s_5s_question": best.get("prefill_fast_s"),
        "whisper_encoder_s_5s_question": best.get("whisper_trim_s"),
        "first_audio_s": best.get("first_audio_s"),
        "first_audio_s_as_released_fp32": fp32.get("first_audio_s"),
        "peak_rss_gb": best.get("peak_rss_gb"),
        "peak_rss_gb_fp32": fp32.get("peak_rss_gb"),
        "fast_vs_faithful_decode_fp32": ratio(fp32.get("decode_fast_steps_per_s"),
                                              fp32.get("decode_faithful_steps_per_s")),
        "fast_vs_faithful_decode_bf16": ratio(bf16.get("decode_fast_steps_per_s"),
                                              bf16.get("decode_faithful_steps_per_s")),
        "kernel_vs_torch_decode_bf16": ratio(bf16.get("decode_fast_steps_per_s"),
                                             bf16.get("decode_fast_torch_steps_per_s")),
        "first_audio_s_median": best.get("first_audio_median_s"),
        "fast_vs_faithful_prefill_bf16": ratio(bf16.get("prefill_faithful_s"),
                                               bf16.get("prefill_fast_s")),
        "trim_vs_faithful_whisper_fp32": ratio(fp32.get("whisper_faithful_s"),
                                               fp32.get("whisper_trim_s")),
        "whisper_bf16_vs_fp32_trim": ratio(fp32.get("whisper_trim_s"),
                                           bf16.get("whisper_trim_s")),
        "bf16_vs_fp32_decode": ratio(bf16.get("decode_fast_steps_per_s"),
                                     fp32.get("decode_fast_steps_per_s")),
        "load_avg": {c: [results[c]["load_start"], results[c]["load_decode"],
                         results[c]["load_end"]] for c in cols},
        "changes_results_vs_reference": ["encoder.trim", "lm.dtype=bfloat16",
                                         "codec.context_frames/lookahead_frames",
                                         "codec.deterministic", "codec.decode_tail"],
        "float_rounding_only_vs_reference": ["lm.faithful=false", "codec.fast"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
