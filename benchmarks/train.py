"""Training throughput like the field reports it: tokens/s, MFU, peak memory, step time p50.

    python benchmarks/train.py --device cpu                       # tiny preset, plain vs fast
    python benchmarks/train.py --device cpu --baseline-rev 13cad6e  # + the code at a revision
    python benchmarks/train.py --device cuda --preset mini-omni --shape stage3 \\
        --micro-batch 8 --variants plain,fast,fast-ckpt,fast-compile --strategies ddp,fsdp2

Each variant runs in its own process (``python -m omniframe_train`` or ``torchrun``) on
synthetic data with precomputed features (no encoder in the timing), everything trainable
(stage-3 style). Shapes: ``asr`` (speech 8-40 frames, 2-5 words; ASR + T1T2) or ``stage3``
(speech 100-400 frames, answers 20-60 words and 60-180 SNAC frames; A1A2, A1T2, T1A2, T1T2,
ASR as in configs/train/stage3.yaml). Variants:

- ``plain``: the per-parameter AdamW loop on CPU / foreach on CUDA (torch's default), no
  prefetch, boolean-mask loss with host syncs, precision auto (fp32 CPU, bf16 autocast CUDA);
- ``fast``: the recipe's ``perf`` defaults (fused AdamW on CUDA, foreach on CPU; prefetch
  thread + pinned memory on CUDA; sync-free loss); ``fast-fp32``, ``fast-ckpt`` (activation
  checkpointing), ``fast-compile`` (regional torch.compile) add one change each;
- ``baseline`` (with ``--baseline-rev``): the project at that git revision, same recipe.

tokens/s counts real tokens (padding excluded); positions/s includes padding. Model FLOPs per
token = 6 N + 12 n_layer n_embd T (N = transformer-block matmul parameters, T the mean sequence
length), plus the head at supervised positions and the adapter at speech frames, summed per step
(``omniframe_train.fast.step_flops``). MFU = model FLOP/s / peak: ``--peak-tflops``, else the
bf16 dense peak of a known GPU, else (CPU) a measured fp32 GEMM peak of one thread, stated. The
first ``--warmup`` steps are not timed. Variants run interleaved for ``--rounds`` rounds (a
loaded machine hits all alike); medians are reported, ratios are paired per round. Table
first, one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "red",
         "green", "blue", "light", "door", "open", "close", "the", "in", "kitchen"]
SHAPES = {
    "asr": {"tasks": {"ASR": 1, "T1T2": 1}, "options": {}},
    "stage3": {"tasks": {"A1A2": 0.3, "A1T2": 0.15, "T1A2": 0.15, "T1T2": 0.2, "ASR": 0.2},
               "options": {"frames": [100, 400], "words": [20, 60], "snac_frames": [60, 180]}},
}
PLAIN = {"optimizer": "for", "prefetch": 0, "sync_free": False, "pin_memory": False}


def _tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}},
                                     unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(path))
    return path


def variant_overrides(name: str, device: str) -> dict:
    """Recipe fields of a variant (``baseline`` gets none: an older schema may lack them)."""
    if name == "baseline":
        return {}
    if name == "plain":
        return {"perf": {**PLAIN, "optimizer": "foreach" if device == "cuda" else "for"}}
    over: dict = {"perf": {}}
    if name == "fast-fp32":
        over["precision"] = "fp32"
    elif name == "fast-ckpt":
        over["activation_checkpointing"] = True
    elif name == "fast-compile":
        over["perf"]["compile"] = True
    elif name != "fast":
        raise SystemExit(f"unknown variant {name!r}: plain, fast, fast-fp32, fast-ckpt, "
                         "fast-compile, baseline")
    return over


def make_recipe(tmp: Path, tag: str, args: argparse.Namespace, nproc: int, strategy: str,
                variant: str, peak: float | None) -> Path:
    shape = SHAPES[args.shape]
    dim = 768 if args.preset == "mini-omni" else 384
    data = {
        "name": f"bench-{tag}", "seed": 0, "out_dir": str(tmp / tag),
        "model": {"init": f"random://{args.preset}", "overrides": {"whisper_adapter_dim": dim},
                  "tokenizer": str(tmp / "tokenizer.json")},
        "encoder": {"kind": "none"},
        "trainable": {"adapter": True, "blocks": True, "embedding": "all"},
        "data": {"train": [{"source": "synthetic", "tasks": shape["tasks"],
                            "options": {"n": args.records, "dim": dim, "vocab": WORDS,
                                        **shape["options"]}}],
                 "bucket_size": 8},
        "steps": args.warmup + args.steps, "micro_batch": args.micro_batch,
        "global_batch": args.micro_batch * nproc * args.accumulation,
        "log": {"every": 1, "tensorboard": False, "plot": False},
        "eval": {"at_start": False, "wer": False},
        "checkpoint": {"resume": "never"},
        "distributed": {"strategy": strategy},
        "threads": args.threads,
    }
    over = variant_overrides(variant, args.device)
    if variant != "baseline":  # no final checkpoint + export (GBs at the released size)
        data["checkpoint"]["at_end"] = False
    if peak and "perf" in over:
        over["perf"]["peak_tflops"] = peak
    data.update(over)
    if not over.get("perf", True):
        data.pop("perf", None)
    path = tmp / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(tmp: Path, tag: str, recipe: Path, nproc: int, torchrun: bool,
            pythonpath: str | None, timeout: float) -> dict:
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_port()}", "-m", "omniframe_train",
               str(recipe)]
    else:
        cmd = [sys.executable, "-m", "omniframe_train", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode:
        tail = (proc.stdout[-1500:] + "\n" + proc.stderr[-2500:]).strip()
        return {"error": f"exit {proc.returncode}: {tail}"}
    import csv

    rows = list(csv.DictReader((tmp / tag / "train.csv").open()))
    summary = json.loads((tmp / tag / "summary.json").read_text())
    shutil.rmtree(tmp / tag, ignore_errors=True)  # checkpoints of a baseline run: GBs
    return {"rows": rows, "summary": summary, "wall_s": time.perf_counter() - t0}


def stats(res: dict, warmup: int) -> dict:
    if "error" in res:
        return {"error": res["error"][-600:]}
    rows = [r for r in res["rows"] if int(float(r["step"])) > warmup]
    if not rows:
        return {"error": "no timed steps (raise --steps)"}

    def col(name: str) -> list[float]:
        return [float(r[name]) for r in rows if r.get(name) not in (None, "", "nan")]

    def mean(name: str) -> float | None:
        v = col(name)
        return sum(v) / len(v) if v else None

    step = col("step_s") if "step_s" in rows[0] else []  # an old revision does not log it
    out = {
        "tokens_per_s": mean("real_tokens_per_s") or None,
        "positions_per_s": mean("tokens_per_s"),
        "samples_per_s": mean("samples_per_s"),
        "model_tflops": mean("model_tflops"),
        "mfu": mean("mfu"),
        "padding_frac": mean("padding_frac"),
        "step_s_p50": statistics.median(step) if step else None,
        "peak_mem_gb": max(col("peak_mem_gb")) if col("peak_mem_gb") else None,
        "peak_rss_gb": res["summary"].get("peak_rss_gb"),
        "final_loss": float(rows[-1]["loss"]),
        "wall_s": res["wall_s"],
    }
    return out


def merge(results: list[dict]) -> dict:
    """Medians over rounds (peak memory: the maximum); an error if every round failed."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    out: dict = {}
    for key in ok[0]:
        vals = [r[key] for r in ok if r.get(key) is not None]
        if not vals:
            out[key] = None
        elif key.startswith("peak"):
            out[key] = max(vals)
        else:
            out[key] = statistics.median(vals)
    out["rounds"] = len(ok)
    return out


def cpu_gemm_peak(threads: int) -> float:
    """Measured fp32 GEMM TFLOP/s of this process's thread budget (best of 5, 1024^3)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        dt = (time.perf_counter() - t0) / 4
        best = max(best, 2 * 1024**3 / dt / 1e12)
    return best


def baseline_tree(rev: str, tmp: Path) -> str:
    """The project's python packages at ``rev`` (git archive; the work tree is untouched)."""
    dest = tmp / f"rev-{rev}"
    dest.mkdir()
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "omniframe", "plugins"],
                          capture_output=True, check=False)
    if arch.returncode:
        raise SystemExit(f"--baseline-rev {rev}: git archive failed: {arch.stderr.decode()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch.stdout, check=True)
    return os.pathsep.join([str(dest / "plugins"), str(dest)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--preset", default=None, help="tiny (CPU default) or mini-omni (CUDA)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="asr (CPU default) or stage3 (CUDA default)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (CPU 10, CUDA 20)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--accumulation", type=int, default=1)
    ap.add_argument("--records", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--variants", default="plain,fast")
    ap.add_argument("--strategies", default="",
                    help="also run the fast variant under torchrun: 'ddp,fsdp2' (world --nproc)")
    ap.add_argument("--nproc", type=int, default=None,
                    help="processes for --strategies (CPU default 2 with gloo, CUDA 1 NCCL)")
    ap.add_argument("--baseline-rev", default=None, help="also time the code at this revision")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU")
    ap.add_argument("--timeout", type=float, default=900, help="per-variant seconds")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved repetitions, medians reported (CPU 3, CUDA 1)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.preset = args.preset or ("mini-omni" if cuda else "tiny")
    args.shape = args.shape or ("stage3" if cuda else "asr")
    args.steps = args.steps or (20 if cuda else 10)
    nproc = args.nproc or (1 if cuda else 2)
    args.rounds = args.rounds or (1 if cuda else 3)
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible (torch.cuda.is_available())")
        dev_name = torch.cuda.get_device_name(0)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the runs must not pick a GPU
        dev_name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    peak = args.peak_tflops
    peak_note = "--peak-tflops" if peak else ""
    if peak is None and not cuda:
        peak = cpu_gemm_peak(args.threads)
        peak_note = f"measured fp32 GEMM, {args.threads} thread(s)"
    elif peak is None:
        from omniframe_train.fast import GPU_PEAK_TFLOPS

        peak = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in dev_name), None)
        peak_note = "bf16 dense datasheet peak" if peak else "unknown GPU: pass --peak-tflops"

    from omniframe_mini_omni.config import Config
    from omniframe_train.fast import block_params, flops_per_token

    cfg = Config.from_name(args.preset)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        _tokenizer(tmp / "tokenizer.json")
        plan = [(v, 1, "ddp", False, None) for v in args.variants.split(",") if v]
        if args.baseline_rev:
            plan.insert(0, ("baseline", 1, "ddp", False, baseline_tree(args.baseline_rev, tmp)))
        for s in [s for s in args.strategies.split(",") if s]:
            plan.append((f"fast-{s}-x{nproc}", nproc, s, True, None))
        rounds: list[dict[str, dict]] = []
        for r in range(args.rounds):  # interleaved: load changes hit every variant alike
            rounds.append({})
            for tag, n, strategy, torchrun, pp in plan:
                variant = "fast" if torchrun else tag
                run_tag = f"{tag}-r{r}"
                recipe = make_recipe(tmp, run_tag, args, n, strategy, variant, peak)
                print(f"round {r + 1}/{args.rounds}: {tag} ...", file=sys.stderr, flush=True)
                res = run_one(tmp, run_tag, recipe, n, torchrun, pp, args.timeout)
                rounds[-1][tag] = stats(res, args.warmup)
                if "error" in rounds[-1][tag]:
                    print(f"{tag}: {rounds[-1][tag]['error']}", file=sys.stderr)
        runs = {tag: merge([rd[tag] for rd in rounds]) for tag, *_ in plan}
    seq = None
    for r in runs.values():
        if r.get("tokens_per_s") and r.get("samples_per_s"):
            seq = r["tokens_per_s"] / r["samples_per_s"]
            break
    fpt = flops_per_token(cfg, int(seq or 0))
    print(f"device: {dev_name}; preset {args.preset} ({block_params(cfg) / 1e6:.1f} M block "
          f"matmul params), shape {args.shape}, micro-batch {args.micro_batch}, "
          f"{args.steps} timed steps after {args.warmup}, {args.threads} thread(s)/process")
    print(f"model FLOPs per token: 6 N + 12 n_layer n_embd T = {fpt:.4g} FLOP at the mean "
          f"sequence length T = {seq or 0:.0f} (+ head at supervised positions, adapter at "
          f"speech frames); peak {peak or float('nan'):.3f} TFLOP/s ({peak_note})")
    hdr = (f"{'variant':<18} | {'tokens/s':>9} | {'positions/s':>11} | {'MFU':>7} | "
           f"{'step p50 s':>10} | {'peak mem GB':>11} | {'padding':>7} | {'loss':>7}")
    print(hdr)
    print("-" * len(hdr))
    for tag, r in runs.items():
        if "error" in r:
            print(f"{tag:<18} | failed: {r['error'][:120]}")
            continue
        mem = r["peak_mem_gb"] if r["peak_mem_gb"] is not None else r["peak_rss_gb"]

        def f(v: float | None, fmt: str) -> str:
            width = int(fmt.split(".")[0] or 0)
            return format(v, fmt) if v is not None else "n/a".rjust(width)

        print(f"{tag:<18} | {f(r['tokens_per_s'], '9.0f')} | {f(r['positions_per_s'], '11.0f')}"
              f" | {f(r['mfu'] * 100 if r['mfu'] is not None else None, '6.2f')}% | "
              f"{f(r['step_s_p50'], '10.3f')} | {f(mem, '11.2f')} | "
              f"{f(r['padding_frac'] * 100 if r['padding_frac'] is not None else None, '6.1f')}%"
              f" | {f(r['final_loss'], '7.3f')}")
    ratios = {}
    base = "baseline" if "baseline" in runs else "plain"
    for tag in runs:
        if tag == base:
            continue
        # paired per round (same load), positions/s (an old revision logs only those), median
        per = [rd[tag]["positions_per_s"] / rd[base]["positions_per_s"] for rd in rounds
               if "error" not in rd[tag] and "error" not in rd.get(base, {"error": 1})]
        if per:
            ratios[f"{tag}_vs_{base}"] = round(statistics.median(per), 3)
    if ratios:
        print(f"throughput ratios (positions/s, paired per round, median of {args.rounds}): "
              + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print(json.dumps({
        "device": args.device, "device_name": dev_name, "preset": args.preset,
        "shape": args.shape, "micro_batch": args.micro_batch,
        "flops_per_token": fpt, "peak_tflops": peak, "peak_note": peak_note,
        "variants": {k: {kk: (round(vv, 5) if isinstance(vv, float) else vv)
                         for kk, vv in v.items()} for k, v in runs.items()},
        "ratios": ratios,
    }))


if __name__ == "__main__":
    main()
