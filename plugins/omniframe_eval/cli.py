"""``omniframe eval CONFIG``: run an evaluation config, write records and the report."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from omniframe.cli import once

__all__ = ["eval_command"]


@click.command("eval")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), multiple=True, callback=once,
              help="Run folder: records.jsonl, answer audio, report (default: "
                   "runs/eval/<config name>).")
@click.option("--report-dir", type=click.Path(file_okay=False), multiple=True, callback=once,
              help="Write report.md/report.json/plots here instead of the run folder "
                   "(e.g. docs/eval to commit a report without the audio).")
@click.option("--mode", type=click.Choice(["realtime", "offline"]), multiple=True,
              callback=once,
              help="realtime: replay audio at the speed of speech (user-experienced latency); "
                   "offline: as fast as possible (throughput). Default: the config's.")
@click.option("--limit", type=click.IntRange(min=1), multiple=True, callback=once,
              help="Only the first N dataset items.")
@click.option("--jobs", type=click.IntRange(min=1), multiple=True, callback=once,
              metavar="N",
              help="Run N items of a pipeline at once (asyncio tasks over the same loaded "
                   "models). Deterministic pipelines give the same results as with 1; "
                   "latencies are then measured under that load, so compare them only with "
                   "runs of the same N. Default: the config's jobs (1).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Reuse results of an interrupted run in the same folder.")
@click.option("--retry-failed", is_flag=True, help="With --resume, run failed items again.")
@click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
              help="Override the eval config (mode=offline, dataset.options.rates=[160]) or a "
                   "pipeline (cascade:lm.options.max_new_tokens=32).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bars on stderr.")
def eval_command(config: str, out: str | None, report_dir: str | None, mode: str | None,
                 limit: int | None, jobs: int | None, resume: bool, retry_failed: bool,
                 overrides: tuple[str, ...], progress: bool) -> None:
    """Evaluate the pipelines of CONFIG (an evaluation config, e.g. configs/eval/ab.yaml) on
    its dataset: latency, ASR WER, spoken-vs-text agreement and answer quality, one report.

    \b
    Every pipeline is validated before any item runs. Exit status:
      0  every item of every pipeline ran ok
      1  the run finished, but some items failed (the report lists each with its reason)
      2  bad command line or config (eval config, a pipeline, --set): nothing ran
      130  interrupted (finished items are kept: run the same command again to resume)
    """
    import anyio

    from omniframe.config import ConfigError
    from omniframe_eval.datasets import DatasetError
    from omniframe_eval.evalconfig import EvalConfigError, load_eval_config
    from omniframe_eval.harness import Harness, HarnessError
    from omniframe_eval.report import write_report

    sets = list(overrides)
    if mode:
        sets.append(f"mode={mode}")
    if jobs:
        sets.append(f"jobs={jobs}")
    try:
        cfg = load_eval_config(config, sets)
    except EvalConfigError as exc:
        _fail(str(exc))
    run_dir = Path(out) if out else Path("runs") / "eval" / cfg.name
    for folder, what in ((run_dir, "--out"), (Path(report_dir) if report_dir else None,
                                              "--report-dir")):
        why = _unusable_folder(folder) if folder is not None else None
        if why:
            _fail(f"{what}: {why}")
    argv = ["omniframe", "eval", *sys.argv[2:]] if sys.argv[1:2] == ["eval"] else None
    harness = Harness(cfg, run_dir, resume=resume, retry_failed=retry_failed, limit=limit,
                      progress=progress, command=shlex.join(argv) if argv else None)
    click.echo(f"evaluating {', '.join(p.name for p in cfg.pipelines)} on "
               f"{cfg.dataset.name} ({cfg.mode}) into {run_dir}"
               + (f", {cfg.jobs} items at once" if cfg.jobs > 1 else ""), err=True)
    if cfg.jobs > 1:
        click.echo(f"note: with --jobs {cfg.jobs} the latencies (voice-to-voice, first-chunk "
                   f"latency, RTF) are measured with {cfg.jobs} items sharing the device: "
                   f"compare them only with runs of the same --jobs", err=True)
    from omniframe.interrupts import InterruptGuard

    # the first Ctrl-C cancels the run (the item in flight stops, finished ones are saved);
    # if it has not ended 1.2 s later, or on a second Ctrl-C, the process exits at once
    guard = InterruptGuard(grace=1.2)

    async def main() -> dict[str, Any] | None:
        with anyio.CancelScope() as scope:
            guard.attach(scope.cancel)
            return await harness.run()
        return None  # cancelled by the guard

    try:
        with guard:
            rep = anyio.run(main)
        if rep is None:
            raise KeyboardInterrupt
    except (HarnessError, EvalConfigError, DatasetError, ConfigError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        click.echo(f"interrupted: finished items are saved in {run_dir / 'records.jsonl'}; "
                   f"run the same command again to resume", err=True)
        sys.exit(130)
    paths = write_report(rep, report_dir or run_dir)
    for b in rep["pipelines"]:
        v = b["latency"]["voice_to_voice"]["p50"]
        lat = "-" if v is None else f"{v:.2f}s"
        click.echo(f"{b['name']}: {b['ok']}/{b['items']} ok, voice-to-voice p50 {lat}"
                   + (f" (--jobs {cfg.jobs})" if cfg.jobs > 1 else ""), err=True)
    click.echo(f"report: {paths['markdown']}")
    failed = sum(b["failed"] for b in rep["pipelines"])
    if failed:
        total = sum(b["items"] for b in rep["pipelines"])
        click.echo(f"error: {failed} of {total} item runs failed; the report lists each with "
                   f"its reason", err=True)
        sys.exit(1)


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _unusable_folder(folder: Path) -> str | None:
    """Why ``folder`` cannot be made or written, or None."""
    p = folder.expanduser().absolute()
    if p.exists() and not p.is_dir():
        return f"{str(folder)!r} is a file, not a folder"
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"cannot make {str(folder)!r}: {str(p)!r} is a file, not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"cannot write in {str(p)!r} (permissions); choose another folder"
    return None
