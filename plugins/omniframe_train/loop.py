"""The training loop: one recipe, one process or many (torchrun), DDP or FSDP2.

Per optimizer step: take the next global batch of the deterministic plan, build this rank's
micro-batches, count the supervised positions of the whole step (all ranks, all micro-batches)
so that every stream's CE is a mean over the global batch, run forward/backward per micro-batch
(gradient sync only on the last), mask frozen embedding rows, clip, step. Rank 0 logs a line
every ``log.every`` steps, writes CSV (and TensorBoard when installed), evaluates, checkpoints
(DCP) and finally exports the official format and plots the loss curves.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import torch

from . import ckpt
from .data import FeatureStore, TrainData, dummy_sample, load_source
from .dist import DistEnv, all_reduce_max, all_reduce_sum, barrier, init, no_sync, shutdown, wrap
from .evaluate import eval_items, evaluate
from .fast import Prefetcher, PreparedStep, peak_tflops, prepare_step, step_flops, to_device
from .loss import STREAM_NAMES, TrainModel, combine, stream_weights
from .optim import bind_row_masks, lr_at, make_optimizer, select_trainable
from .recipe import Recipe
from .start import build_model, export, param_summary

log = structlog.get_logger("omniframe_train")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class MetricsLog:
    """CSV (always), TensorBoard (when installed and asked), PNG curves at the end. Rank 0."""

    def __init__(self, out: Path, tensorboard: bool) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except Exception:  # tensorboard not installed: CSV only
                self.tb = None
                log.info("tensorboard_unavailable", hint="pip install tensorboard; CSV only")
        for kind in self.rows:
            p = out / f"{kind}.csv"
            if p.is_file():  # resumed run: keep the history
                with p.open() as f:
                    self.rows[kind] = [
                        {k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]

    def add(self, kind: str, step: int, values: dict[str, Any]) -> None:
        row = {"step": step, **{k: v for k, v in values.items() if isinstance(v, int | float)}}
        rows = [r for r in self.rows[kind] if r["step"] < step] + [row]
        self.rows[kind] = rows
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        with (self.out / f"{kind}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def plot(self, title: str) -> Path | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        tr, ev = self.rows["train"], self.rows["eval"]
        if not tr:
            return None
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name in ["loss", *[f"loss_{s}" for s in STREAM_NAMES]]:
            pts = [(r["step"], r[name]) for r in tr if name in r and r[name] == r[name]]
            if pts:
                axes[0].plot(*zip(*pts, strict=True), label=name,
                             lw=2 if name == "loss" else 1)
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("train loss")
        axes[0].set_yscale("log")
        axes[0].legend(fontsize=7)
        for name in ("wer", "loss_text", "acc_text"):
            pts = [(r["step"], r[name]) for r in ev if name in r]
            if pts:
                axes[1].plot(*zip(*pts, strict=True), marker="o", label=f"eval {name}")
        axes[1].set_xlabel("step")
        if axes[1].get_lines():
            axes[1].legend(fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        path = self.out / "curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _num(v: str) -> float | str:
    try:
        return float(v) if v not in ("", None) else float("nan")
    except ValueError:
        return v


def _autocast(env: DistEnv, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    use_bf16 = precision == "bf16-mixed" or (precision == "auto" and env.device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)


def enable_activation_checkpointing(gpt: torch.nn.Module) -> None:
    """Recompute each block's activations in backward (non-reentrant); keys unchanged."""
    from torch.utils.checkpoint import checkpoint

    for block in gpt.transformer.h:  # type: ignore[union-attr]
        fwd = block.forward

        def wrapped(*args: Any, _fwd: Callable = fwd, **kwargs: Any) -> Any:
            return checkpoint(_fwd, *args, use_reentrant=False, **kwargs)

        block.forward = wrapped  # type: ignore[method-assign]


def run(recipe: Recipe, *, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train per ``recipe``; returns a summary (final metrics, paths). Collective: every rank
    of a torchrun job calls it."""
    env = init(recipe.distributed.backend)
    try:
        return _run(recipe, env, echo or (lambda s: print(s, flush=True)))
    finally:
        shutdown(env)


def _run(recipe: Recipe, env: DistEnv, echo: Callable[[str], None]) -> dict[str, Any]:
    say = echo if env.is_main else (lambda s: None)
    out = Path(recipe.out_dir)
    if recipe.threads > 0:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    gpt, config, tok_path = build_model(recipe.model, recipe.seed)
    if tok_path is None:
        raise ValueError(
            "no tokenizer: set model.tokenizer to a tokenizer.json (the init folder has none)")
    from omniframe_mini_omni.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(tok_path)
    names, row_masks = select_trainable(gpt, recipe.trainable)
    gpt.to(env.device)
    if recipe.activation_checkpointing:
        enable_activation_checkpointing(gpt)
    if recipe.perf.compile:
        for block in gpt.transformer.h:  # regional: small graphs, parameter names unchanged
            block.compile(backend=recipe.perf.compile_backend)
    feature_dim = config.whisper_adapter_dim
    model = TrainModel(gpt)
    use_bf16 = recipe.precision == "bf16-mixed" or (
        recipe.precision == "auto" and env.device.type == "cuda")
    model = wrap(model, env, recipe.distributed.strategy,
                 find_unused=recipe.distributed.find_unused_parameters,
                 mixed_bf16=use_bf16 and recipe.distributed.strategy == "fsdp2")
    row_masks = bind_row_masks(model, row_masks)
    perf = recipe.perf
    optimizer = make_optimizer(model, recipe.optim, perf.optimizer, env.device)
    cuda = env.device.type == "cuda"
    prefetch = perf.prefetch if perf.prefetch >= 0 else (2 if cuda else 0)
    peak = peak_tflops(env.device, perf.peak_tflops)
    autocast = _autocast(env, recipe.precision)
    accum = recipe.accumulation(env.world)
    weights = stream_weights(recipe.loss.text_weight, recipe.loss.audio_weight)

    # ---------------------------------------------------------------- data
    features = FeatureStore(recipe.encoder)
    train_recs = [load_source(s, feature_dim=feature_dim, seed=recipe.seed)
                  for s in recipe.data.train]
    data = TrainData(recipe.data.train, train_recs, tokenizer, seed=recipe.seed,
                     global_batch=recipe.global_batch, max_len=min(recipe.data.max_len,
                                                                   config.block_size),
                     bucket_size=recipe.data.bucket_size)
    eval_data = None
    items: list = []
    if recipe.data.eval:
        eval_recs = [load_source(s, feature_dim=feature_dim, seed=recipe.seed + 1)
                     for s in recipe.data.eval]
        eval_data = TrainData(recipe.data.eval, eval_recs, tokenizer, seed=recipe.seed,
                              global_batch=1, max_len=data.max_len)
        items = eval_items(eval_data, recipe.eval.max_samples)

    if features.cache is not None:  # encode every utterance once, before the clock starts
        t0 = time.perf_counter()
        all_recs = [r for recs in train_recs for r in recs]
        if eval_data is not None:
            all_recs += [r for recs in eval_data.records for r in recs]
        n = features.precompute(all_recs, env.rank, env.world, report=say)
        barrier(env)
        if n:
            say(f"features: encoded {n} utterances in {time.perf_counter() - t0:.1f} s "
                f"({recipe.encoder.kind} {recipe.encoder.model})")

    # ---------------------------------------------------------------- resume
    ck_root = out / "checkpoints"
    start_step, epoch, batch_idx = 0, 0, 0
    resumed = None
    if recipe.checkpoint.resume == "auto":
        resumed = ckpt.latest(ck_root)
        if resumed is not None:
            st = ckpt.load(resumed, model, optimizer)
            start_step, epoch, batch_idx = st["step"], st["epoch"], st["batch"]
            say(f"resumed from {resumed} at step {start_step} (epoch {epoch}, batch {batch_idx})")
    metrics = MetricsLog(out, recipe.log.tensorboard) if env.is_main else None
    summ = param_summary(gpt)
    say(f"omniframe train: {recipe.name} (stage {recipe.stage}) | {env.world} process(es) "
        f"{env.backend or 'single'} on {env.device} | strategy {recipe.distributed.strategy} | "
        f"params {summ['params']:,} trainable {summ['trainable']:,} ({', '.join(_groups(names))})"
        f" | global batch {recipe.global_batch} = {recipe.micro_batch} x {env.world} x {accum} "
        f"| {sum(len(r) for r in train_recs)} train records, {len(items)} eval samples")

    def run_eval(step: int) -> dict[str, Any]:
        if eval_data is None or not items:
            return {}
        t0 = time.perf_counter()
        res = evaluate(model, gpt, eval_data, items, features, device=env.device,
                       micro_batch=recipe.micro_batch, max_new=recipe.eval.max_new_tokens,
                       do_wer=recipe.eval.wer, feature_dim=feature_dim, autocast=autocast)
        res["eval_s"] = time.perf_counter() - t0
        if metrics is not None:
            metrics.add("eval", step, res)
        parts = [f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float)
                 and (k.startswith("wer") or k.endswith("text"))]
        say(f"eval step {step}: " + ", ".join(parts))
        for ref, hyp in res.get("examples", []):
            say(f"    ref: {ref!r}\n    hyp: {hyp!r}")
        return res

    first_eval = run_eval(start_step) if (recipe.eval.at_start and resumed is None) else {}

    # ---------------------------------------------------------------- loop
    model.train()
    it = data.iter_steps(epoch, batch_idx)
    pin = cuda and perf.pin_memory

    def produce() -> PreparedStep:
        return prepare_step(data, features, next(it), rank=env.rank, world=env.world,
                            accum=accum, feature_dim=feature_dim, pin=pin, dummy=dummy_sample)

    steps_left = recipe.steps - start_step
    feed = Prefetcher(produce, prefetch) if prefetch > 0 and steps_left > 0 else None
    dev = env.device
    # window sums stay on the device (no host sync per step): 8 loss sums, 8 correct, 8 counts,
    # loss, padded positions, samples, real tokens
    win = torch.zeros(28, dtype=torch.float64, device=dev)
    win_steps = 0
    win_flops = 0.0
    t_last = time.perf_counter()
    last_eval = first_eval
    step = start_step
    tokens_total = 0.0
    flops_total = 0.0
    step_times: list[float] = []
    t_start = time.perf_counter()
    try:
        for step in range(start_step, recipe.steps):
            t_step = time.perf_counter()
            prep = next(feed) if feed is not None else produce()
            epoch, batch_idx = prep.epoch, prep.batch_idx
            stats = all_reduce_sum(prep.stats.to(dev, non_blocking=True), env)
            global_counts = stats[:8]
            lr = lr_at(step, recipe.optim, recipe.steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            step_acc = torch.zeros(17, dtype=torch.float64, device=dev)
            n_mb = len(prep.batches)
            for k, hb in enumerate(prep.batches):
                b = to_device(hb, dev)
                with no_sync(model, recipe.distributed.strategy, k < n_mb - 1):
                    with autocast():
                        sums, _, corr = model(
                            b["input_ids"], None if perf.sync_free else b["labels"],
                            b["features"], b["whisper_lens"],
                            index=b["index"] if perf.sync_free else None)
                        loss = combine(sums, global_counts, weights) * env.world
                    loss.backward()
                step_acc[:8] += sums.detach().double()
                step_acc[8:16] += corr.detach().double()
                step_acc[16] += loss.detach().double() / env.world
            for m in row_masks:
                m.apply()
            if recipe.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], recipe.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # -------------------------------------------------------- logging
            step_acc = all_reduce_sum(step_acc, env)
            win[:16] += step_acc[:16]
            win[16:24] += global_counts
            win[24] += step_acc[16]
            win[25:28] += stats[8:11]
            win_steps += 1
            # this rank's model FLOPs (its own micro-batches); summed over ranks below
            f = step_flops(config, prep.lengths, prep.stats[:8], prep.whisper)
            win_flops += f
            flops_total += f
            done = step + 1
            if not cuda:
                step_times.append(time.perf_counter() - t_step)
            if done % recipe.log.every == 0 or done == recipe.steps:
                w = win.cpu()  # the one host sync per log window
                dt = time.perf_counter() - t_last
                fl = all_reduce_sum(torch.tensor([win_flops], dtype=torch.float64,
                                                 device=dev), env).item()
                tokens_total += float(w[25])
                row: dict[str, Any] = {
                    "loss": float(w[24]) / win_steps, "lr": lr,
                    "tokens_per_s": float(w[25]) / dt,
                    "real_tokens_per_s": float(w[27]) / dt,
                    "padding_frac": 1.0 - float(w[27]) / max(float(w[25]), 1.0),
                    "samples_per_s": float(w[26]) / dt,
                    "model_tflops": fl / dt / 1e12,
                    "step_s": dt / win_steps,
                    "epoch": epoch, "peak_rss_gb": peak_rss_gb()}
                if peak:
                    row["mfu"] = fl / dt / 1e12 / (peak * env.world)
                if cuda:
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 1024**3
                for j, name in enumerate(STREAM_NAMES):
                    if w[16 + j] > 0:
                        row[f"loss_{name}"] = float(w[j] / w[16 + j])
                        row[f"acc_{name}"] = float(w[8 + j] / w[16 + j])
                if metrics is not None:
                    metrics.add("train", done, row)
                streams = " ".join(f"{n}={row[f'loss_{n}']:.3f}" for n in STREAM_NAMES
                                   if f"loss_{n}" in row)
                mfu = f"MFU {100 * row['mfu']:.1f}%" if "mfu" in row else \
                    f"{row['model_tflops']:.3f} TFLOP/s (MFU: set perf.peak_tflops)"
                say(f"step {done:>6}/{recipe.steps} loss {row['loss']:.4f} [{streams}] "
                    f"lr {lr:.2e} {row['real_tokens_per_s']:.0f} tok/s "
                    f"({row['tokens_per_s']:.0f} positions/s, "
                    f"{100 * row['padding_frac']:.0f}% padding) {mfu} "
                    f"{row['samples_per_s']:.1f} samples/s")
                t_last = time.perf_counter()
                win.zero_()
                win_steps = 0
                win_flops = 0.0
            if recipe.eval.every and done % recipe.eval.every == 0 and done < recipe.steps:
                last_eval = run_eval(done)
            if recipe.checkpoint.every and done % recipe.checkpoint.every == 0 and \
                    done < recipe.steps:
                ckpt.save(ck_root, done, model, optimizer,
                          {"epoch": epoch, "batch": batch_idx + 1}, env, recipe.checkpoint.keep)
    finally:
        if feed is not None:
            feed.close()
    train_s = time.perf_counter() - t_start
    final_step = max(step + 1, start_step) if recipe.steps > start_step else start_step
    # ---------------------------------------------------------------- finish
    at_end = recipe.checkpoint.at_end
    if recipe.steps > start_step and at_end:
        ckpt.save(ck_root, final_step, model, optimizer,
                  {"epoch": epoch, "batch": batch_idx + 1}, env, recipe.checkpoint.keep)
    final_eval = run_eval(final_step) if recipe.steps > start_step or not last_eval else last_eval
    full = ckpt.full_model_state(model) if at_end else {}
    export_path = None
    if env.is_main and at_end:
        from omniframe_mini_omni.model import GPT

        fresh = GPT(config)
        fresh.load_state_dict({k: v for k, v in full.items()}, strict=False)
        fresh.tie_weights()
        export_path = export(fresh, config, recipe.export_path, tok_path)
        say(f"exported {export_path} (lit_model.pth + model_config.yaml + tokenizer)")
    png = metrics.plot(f"{recipe.name}") if metrics is not None and recipe.log.plot else None
    if metrics is not None:
        metrics.close()
    summary = {
        "steps": final_step, "train_s": train_s,
        "tokens_per_s": tokens_total / train_s if train_s > 0 else float("nan"),
        "model_flops": flops_total,
        "step_s_p50": (sorted(step_times)[len(step_times) // 2] if step_times else None),
        "first_eval": _plain(first_eval), "final_eval": _plain(final_eval),
        "export": str(export_path) if export_path else None,
        "curves": str(png) if png else None, "skipped_samples": data.skipped,
        "features_encoded": features.encoded, "world": env.world,
        "peak_rss_gb": all_reduce_max(peak_rss_gb(), env),  # the largest process
    }
    if env.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, int | float) and not (
        isinstance(v, float) and math.isnan(v))}


def _groups(names: list[str]) -> list[str]:
    groups = []
    for prefix, label in (("whisper_adapter.", "adapter"), ("transformer.h.", "blocks"),
                          ("transformer.ln_f.", "ln_f"), ("transformer.wte.", "embedding")):
        if any(n.startswith(prefix) for n in names):
            groups.append(label)
    return groups


def main(argv: list[str] | None = None) -> None:
    """``python -m omniframe_train RECIPE [--set k=v ...]`` (what ``--nproc`` execs)."""
    from .cli import train_command

    train_command.main(args=argv if argv is not None else sys.argv[1:],
                       prog_name="omniframe train", standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
