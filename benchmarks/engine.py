"""Many Mini-Omni conversations on one model through the engine (omniframe/engine.py).

    python benchmarks/engine.py --device cpu --sessions 3            # bf16, N = 1..3
    python benchmarks/engine.py --device cuda --ns 1,8,32,64 --dtype bfloat16   # static engine

``--engine static`` (default on CUDA) runs static_engine.py's step (KV slot pool, one masked
attention for all rows, sampling on the device, CUDA graphs captured before the run, time
stated as ``capture_s``); ``dynamic`` (default on CPU) runs engine.py's (per-request caches, the
small-batch CPU kernel). ``--ns`` picks the N to run (the first should be 1: the 1-session
figures come from it; ``realtime_sessions`` is then the largest N run that stays real time).

Random weights of the released size (``random://mini-omni``, 0.5B): compute cost does not
depend on the values. For each N = 1..``--sessions``, N conversations run at once: each user
asks a 5 s question (251 Whisper positions) at a random time within ``--spread`` seconds;
its A1A2 answer (batch-parallel, 2 rows) of ``--answer-steps`` decode steps streams to a sink
that plays audio in real time from the first frame on (one frame = one step = 85.3 ms).

Per N: ``step_ms_p50/p99`` of the engine's steps that only decode, ``first_audio_ms`` (the
question submitted → its first SNAC frame out of the LM: LM prefill + 7 steps + queueing; the
SNAC decode is not run here), each session's decode rate (steps/s from its first to its last
step) and audio gaps (a frame that arrives after the sink needs it). A session is real time
when its rate is >= 11.72 steps/s and it has no gap; ``realtime_sessions`` is the largest N
whose sessions all are.

Also measured: the solo path (GenerationStream over FastLM, what the LM stage runs without
the engine), one session, for comparison.

The last line is one JSON object: ``step_ms_p50/p99`` at 1 session, ``first_audio_ms_p50/p99``
at the largest N, ``realtime_sessions``, ``peak_gpu_mem_gb`` (CUDA) or ``peak_rss_gb``, the
device, and the table (one row per N). ``--plot`` writes a PNG of the table.

``--pace FRAMES`` makes each sink take frames no earlier than a player with FRAMES frames of
buffer needs them: a fast device then runs ahead only by that buffer plus the engine's backlog
(64 steps), after which backpressure holds the session, and long answers last as long as
their speech, so N sessions really overlap (on a GPU, without it, a 48-step answer is over in
a fraction of a second).

The machine may be shared: the load average is printed; numbers under load are lower bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

STEP_AUDIO_S = 2048 / 24000  # 85.33 ms of answer audio per decode step
REALTIME_STEPS_S = 1 / STEP_AUDIO_S  # 11.72
QUESTION_FRAMES = 251  # 5 s of speech: int(5000 / 20) + 1 LM positions


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(q * (len(s) - 1))))], 1)


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    from mini_omni import _cpu  # benchmarks/mini_omni.py: the CPU's model name

    return _cpu()


def solo_step_ms(model: Any, steps: int) -> float:
    """One A1A2 turn on the solo path; the median decode step."""
    import torch
    from omniframe_mini_omni.fastpath import FastLM
    from omniframe_mini_omni.generate import GenerationStream

    feats = torch.randn(QUESTION_FRAMES, 768)
    with torch.inference_mode():
        stream = GenerationStream(FastLM(model), "A1A2", whisper_features=feats,
                                  max_steps=steps + 1)
        next(stream)  # prefill
        times = []
        t = time.perf_counter()
        for _ in stream:
            now = time.perf_counter()
            times.append((now - t) * 1000)
            t = now
    return round(statistics.median(times), 1)


def static_model(model: Any, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """One static engine model for every N (its pool holds the largest N; graphs are
    captured once, greedy buckets only: the benchmark decodes greedily)."""
    from omniframe_mini_omni.static_engine import StaticEngineModel

    em = StaticEngineModel(model, capacity=max(args.ns), max_len=args.max_len,
                           graphs=args.graphs, compile=args.compile, attention=args.attention)
    t = time.perf_counter()
    captured = em.capture([(r, n, False) for r, n in em.buckets()]) if args.capture else 0
    # with --compile the first capture also compiles (inductor): both are setup time
    return em, {"graphs_captured": captured, "capture_s": round(time.perf_counter() - t, 2),
                "compile": args.compile, "attention": args.attention or "default"}


async def simulate(model: Any, n: int, args: argparse.Namespace,
                   em: Any = None) -> dict[str, Any]:
    import torch
    from omniframe_mini_omni.engine import MiniOmniEngineModel, TurnRequest

    from omniframe.engine import Engine

    if em is None:
        em = MiniOmniEngineModel(model, exact=args.exact)
    engine = Engine(em, capacity=max(n, 1), prefill_budget=args.prefill_budget,
                    device=args.device, name="bench")
    engine.step_log = []
    rng = random.Random(1000 + n)
    g = torch.Generator().manual_seed(n)
    questions = [torch.randn(QUESTION_FRAMES, 768, generator=g) for _ in range(n)]
    arrivals = sorted(rng.uniform(0, args.spread) for _ in range(n))
    arrivals[0] = 0.0

    async def session(i: int) -> dict[str, Any]:
        await asyncio.sleep(arrivals[i])
        req = TurnRequest("A1A2", whisper_features=questions[i], max_steps=args.answer_steps)
        t_submit = time.perf_counter()
        step_times: list[float] = []
        frame_times: list[float] = []
        async with engine.submit(req) as answer:
            async for step in answer:
                now = time.perf_counter()
                step_times.append(now)
                if step.frame is not None:
                    frame_times.append(now)
                    if args.pace:  # a sink with a buffer of --pace frames: take no earlier
                        due = frame_times[0] + (len(frame_times) - args.pace) * STEP_AUDIO_S
                        await asyncio.sleep(max(0.0, due - now))
        start = frame_times[0] if frame_times else t_submit
        # the sink plays frame k at start + k * 85.3 ms: a later arrival is a gap
        gaps = sum(1 for k, t in enumerate(frame_times) if t > start + k * STEP_AUDIO_S + 1e-3)
        span = step_times[-1] - step_times[0] if len(step_times) > 1 else 0.0
        rate = (len(step_times) - 1) / span if span > 0 else 0.0
        return {"first_audio_ms": (start - t_submit) * 1000, "gaps": gaps,
                "steps_per_s": rate, "steps": len(step_times)}

    try:
        sessions = await asyncio.gather(*(session(i) for i in range(n)))
    finally:
        engine.close()
    decode_only = [s * 1000 for p, d, s in engine.step_log if p == 0 and d > 0]
    realtime = all(s["steps_per_s"] >= REALTIME_STEPS_S and s["gaps"] == 0 for s in sessions)
    first = [s["first_audio_ms"] for s in sessions]
    return {
        "sessions": n,
        "step_ms_p50": _pct(decode_only, 0.5),
        "step_ms_p99": _pct(decode_only, 0.99),
        "first_audio_ms_p50": _pct(first, 0.5),
        "first_audio_ms_p99": _pct(first, 0.99),
        "min_steps_per_s": round(min(s["steps_per_s"] for s in sessions), 2),
        "gaps": sum(s["gaps"] for s in sessions),
        "realtime": realtime,
        "engine_steps": engine.steps,
    }


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["sessions"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ns, [r["min_steps_per_s"] for r in rows], "o-", label="slowest session steps/s")
    a1.axhline(REALTIME_STEPS_S, color="r", ls="--", label="real time (11.72)")
    a1.set_xlabel("sessions")
    a1.legend()
    a2.plot(ns, [r["step_ms_p50"] for r in rows], "o-", label="step ms p50")
    a2.plot(ns, [r["first_audio_ms_p50"] for r in rows], "s-", label="first audio ms p50")
    a2.set_xlabel("sessions")
    a2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sessions", type=int, default=3, help="largest N (runs 1..N)")
    ap.add_argument("--ns", help="the N to run, comma separated (instead of 1..--sessions)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--answer-steps", type=int, default=48, help="decode steps per answer")
    ap.add_argument("--spread", type=float, default=3.0, help="questions arrive within (s)")
    ap.add_argument("--pace", type=int, default=0, metavar="FRAMES",
                    help="take answer frames no earlier than a sink with a buffer of FRAMES "
                    "frames needs them (0: as fast as they come). Answers longer than FRAMES + "
                    "the engine's backlog (64) then run at the pace of speech, so sessions "
                    "overlap as in a service; an answer is real time when no frame arrives "
                    "after its playback time")
    ap.add_argument("--prefill-budget", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exact", action=argparse.BooleanOptionalAction, default=None,
                    help="per-request linears (default: exact in float32, shared in bf16)")
    ap.add_argument("--engine", choices=["auto", "static", "dynamic"], default="auto",
                    help="static: KV slot pool, device sampling, CUDA graphs (static_engine.py);"
                    " dynamic: per-request caches and the CPU kernel (engine.py); auto: static"
                    " on CUDA")
    ap.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="static engine: replay CUDA graphs (default on CUDA)")
    ap.add_argument("--capture", action=argparse.BooleanOptionalAction, default=True,
                    help="static engine with graphs: capture every bucket before the run")
    ap.add_argument("--attention", choices=["efficient", "cudnn", "math"], default=None,
                    help="static engine: force the step's SDPA backend (default: PyTorch's)")
    ap.add_argument("--compile", action="store_true",
                    help="static engine: torch.compile the blocks' pre/post-attention work")
    ap.add_argument("--max-len", type=int, default=512,
                    help="static engine: KV positions per turn (prompt + answer)")
    ap.add_argument("--plot", help="write a PNG of the table here")
    args = ap.parse_args()
    if args.engine == "auto":
        args.engine = "static" if args.device.startswith("cuda") else "dynamic"
    args.ns = (sorted({int(v) for v in args.ns.split(",")}) if args.ns
               else list(range(1, args.sessions + 1)))
    if not args.ns or args.ns[0] < 1:
        ap.error("--ns: session counts must be >= 1")
    if args.pace < 0:
        ap.error("--pace: frames of buffer must be >= 0")
    if args.answer_steps < 1:
        ap.error("--answer-steps must be >= 1")
    need = QUESTION_FRAMES + 3 + args.answer_steps + 1
    if args.engine == "static" and args.max_len < need:
        ap.error(f"--max-len {args.max_len} cannot hold a 5 s question and "
                 f"{args.answer_steps} answer steps: it needs at least {need}")

    import torch
    from omniframe_mini_omni import kernels
    from omniframe_mini_omni.lm_stage import _random_lm

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    print(f"load {os.getloadavg()[0]:.2f}; building random://mini-omni in {args.dtype} "
          f"on {args.device}", flush=True)
    model = _random_lm("mini-omni", dtype, args.device, 0).model
    kernel = None
    if args.device == "cpu" and dtype == torch.bfloat16:
        kernel = kernels.load() is not None
        if not kernel:
            print(f"small-batch kernel off: {kernels.unavailable_reason()}", flush=True)
    if args.device == "cpu":  # where the engine's steps run (one OpenMP pool per thread)
        from omniframe.stage import _compute_executor

        solo = _compute_executor().submit(solo_step_ms, model,
                                          min(args.answer_steps, 24)).result()
    else:
        solo = solo_step_ms(model, min(args.answer_steps, 24))
    print(f"solo path (no engine), 1 session: step {solo} ms", flush=True)
    em, static_info = static_model(model, args) if args.engine == "static" else (None, {})
    if static_info:
        print(f"static engine: {static_info}", flush=True)
    rows = []
    print(f"{'N':>3} {'step p50':>9} {'p99':>7} {'first audio p50':>16} {'p99':>7} "
          f"{'min steps/s':>12} {'gaps':>5} realtime", flush=True)
    for n in args.ns:
        r = asyncio.run(simulate(model, n, args, em))
        rows.append(r)
        print(f"{n:>3} {r['step_ms_p50']!s:>9} {r['step_ms_p99']!s:>7} "
              f"{r['first_audio_ms_p50']!s:>16} {r['first_audio_ms_p99']!s:>7} "
              f"{r['min_steps_per_s']:>12} {r['gaps']:>5} {r['realtime']}", flush=True)
    ok = [r["sessions"] for r in rows if r["realtime"]]
    peak_gpu = (round(torch.cuda.max_memory_allocated() / 1e9, 3)
                if args.device.startswith("cuda") else None)
    name = _device_name(args.device)
    if args.plot:
        plot(rows, args.plot, f"Mini-Omni engine, {args.dtype}, {name}")
    print(json.dumps({
        "device": name, "dtype": args.dtype, "threads": args.threads,
        "cpu_kernel": kernel, "engine": args.engine, **static_info,
        "graphs": bool(args.graphs if args.graphs is not None
                       else args.engine == "static" and args.device.startswith("cuda")),
        "exact": args.exact if args.exact is not None else dtype == torch.float32,
        "step_ms_p50": rows[0]["step_ms_p50"], "step_ms_p99": rows[0]["step_ms_p99"],
        "steps_per_s_1_session": round(1000 / rows[0]["step_ms_p50"], 2)
        if rows[0]["step_ms_p50"] else None,
        "solo_step_ms_p50": solo,
        "first_audio_ms_p50": rows[-1]["first_audio_ms_p50"],
        "first_audio_ms_p99": rows[-1]["first_audio_ms_p99"],
        "first_audio_at_sessions": rows[-1]["sessions"],
        "realtime_sessions": max(ok) if ok else 0,
        "peak_gpu_mem_gb": peak_gpu,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        "load_after": round(os.getloadavg()[0], 2),
        "table": rows,
    }))


if __name__ == "__main__":
    main()
