"""``omniframe serve CONFIG...``: the click command (light: the app is imported on run)."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import click

__all__ = ["serve"]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("serve")
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0: any free port; the address is printed).")
@click.option("--api-key", envvar="OMNIFRAME_API_KEY", default=None,
              help="Key clients must send (Bearer header or the openai-insecure-api-key. "
                   "subprotocol); env OMNIFRAME_API_KEY.")
@click.option("--insecure", is_flag=True,
              help="Allow listening beyond loopback without an API key.")
@click.option("--max-sessions", default=4, show_default=True, type=click.IntRange(1))
@click.option("--idle-seconds", default=600.0, show_default=True, type=click.FloatRange(0.1))
@click.option("--max-session-seconds", default=3600.0, show_default=True,
              type=click.FloatRange(1))
@click.option("--max-message-bytes", default=4 * 1024 * 1024, show_default=True,
              type=click.IntRange(1024))
@click.option("--max-buffer-seconds", default=120.0, show_default=True,
              type=click.FloatRange(1), help="Input audio held for a commit (no server VAD).")
@click.option("--max-items", default=1000, show_default=True, type=click.IntRange(1))
@click.option("--max-audio-rate", default=4.0, show_default=True, type=click.FloatRange(0.5),
              help="Input audio may arrive this many times faster than real time ...")
@click.option("--audio-burst-seconds", default=120.0, show_default=True,
              type=click.FloatRange(1), help="... once this much has arrived at once.")
@click.option("--max-sessions-per-client", default=0, show_default=True,
              type=click.IntRange(0), help="Sessions one client address may hold (0: no "
              "limit; behind a proxy on loopback the X-Forwarded-For address counts).")
@click.option("--send-timeout-seconds", default=10.0, show_default=True,
              type=click.FloatRange(0.1), help="Drop a client whose event queue stays full "
              "this long (it does not read).")
@click.option("--shutdown-grace-seconds", default=10.0, show_default=True,
              type=click.FloatRange(0), help="On SIGTERM or Ctrl-C, answers in flight may "
              "finish this long before every session is ended.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Server processes sharing the port; each loads its own models and has "
                   "its own --max-sessions.")
@click.option("--allow-origin", "allow_origins", multiple=True,
              help="Browser Origin allowed besides the server's own (repeat).")
@click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
              help="Override a value in every served config.")
@click.option("--warm-up/--no-warm-up", default=True, show_default=True,
              help="Load every config's models before listening (else the first session "
                   "of each waits for them; a model that cannot load fails at once).")
@click.option("--check-events", is_flag=True,
              help="Check every emitted event against the openai SDK's types (debugging).")
def serve(configs: tuple[str, ...], host: str, port: int, api_key: str | None,
          insecure: bool, max_sessions: int, idle_seconds: float, max_session_seconds: float,
          max_message_bytes: int, max_buffer_seconds: float, max_items: int,
          max_audio_rate: float, audio_burst_seconds: float, max_sessions_per_client: int,
          send_timeout_seconds: float, shutdown_grace_seconds: float, workers: int,
          allow_origins: tuple[str, ...], overrides: tuple[str, ...], warm_up: bool,
          check_events: bool) -> None:
    """Serve pipeline CONFIGs over the OpenAI Realtime API (WebSocket /v1/realtime).

    The `model` query parameter picks a config by its name: (default: the first). Each
    config's source is replaced by the socket's audio and its sinks by the protocol's events.
    """
    from omniframe.config import ConfigError

    if not _loopback(host) and api_key is None and not insecure:
        raise click.UsageError(f"--host {host} is not loopback: give --api-key (or env "
                               f"OMNIFRAME_API_KEY), or --insecure to serve without one")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(f"{exc.name} is missing: pip install 'omniframe[serve]'"
                                   ) from None
    from omniframe.serve.app import Settings, run_server
    from omniframe.serve.bridge import Limits, load_served

    try:
        served = load_served(list(configs), list(overrides))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    limits = Limits(max_message_bytes=max_message_bytes, max_buffer_s=max_buffer_seconds,
                    max_items=max_items, idle_s=idle_seconds, max_session_s=max_session_seconds,
                    max_audio_rate=max_audio_rate, audio_burst_s=audio_burst_seconds,
                    send_timeout_s=send_timeout_seconds)
    settings = Settings(api_key=api_key, limits=limits, max_sessions=max_sessions,
                        allow_origins=allow_origins, check_events=check_events,
                        max_sessions_per_client=max_sessions_per_client,
                        shutdown_grace_s=shutdown_grace_seconds, warm_up=warm_up)
    if workers > 1:
        del served  # checked; each worker loads its own
        _run_workers(list(configs), list(overrides), settings, host, port, workers)
        return
    run_server(served, settings, host, port,
               announce=lambda line: click.echo(line, err=True))


# ------------------------------------------------------------------------------ workers


def _worker(configs: list[str], overrides: list[str], settings: Any, host: str, port: int,
            sock: socket.socket, ready: Any) -> None:
    """One worker process: its own models and sessions, the parent's listening socket."""
    os.setpgrp()  # Ctrl-C reaches the parent only, which asks each worker once (SIGTERM)
    parent = os.getppid()

    def orphaned() -> None:  # the parent died without asking: stop serving its port
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphaned, daemon=True).start()
    from omniframe.serve.app import run_server
    from omniframe.serve.bridge import load_served

    served = load_served(configs, overrides)
    run_server(served, settings, host, port, announce=lambda line: ready.put(os.getpid()),
               sockets=[sock])


def _run_workers(configs: list[str], overrides: list[str], settings: Any, host: str,
                 port: int, workers: int) -> None:
    """``--workers N``: bind once, start N worker processes (spawned) on that socket, forward
    SIGTERM / Ctrl-C to them once, and end when they have ended. A worker that dies ends the
    whole server (exit status 1): a supervisor (systemd, Kubernetes) restarts it."""
    import multiprocessing

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(configs, overrides, settings, host, port, sock,
                                               ready), daemon=False) for _ in range(workers)]
    stopping = threading.Event()
    failed: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        if stopping.is_set():
            return
        stopping.set()
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for p in procs:
        p.start()
    started = 0
    while started < workers and not stopping.is_set():
        try:
            ready.get(timeout=0.2)
            started += 1
        except Exception:  # queue.Empty
            if any(p.exitcode is not None for p in procs):
                break
    if started < workers and not stopping.is_set():
        failed.append(1)
        click.echo("omniframe serve: a worker did not start; stopping", err=True)
        stop(signal.SIGTERM, None)
    elif started == workers:
        bound = sock.getsockname()
        sock.close()  # the workers hold it: once they stop listening, connections are refused
        click.echo(f"omniframe serve: listening on ws://{bound[0]}:{bound[1]}/v1/realtime "
                   f"({workers} workers, pids {' '.join(str(p.pid) for p in procs)})",
                   err=True)
    while any(p.exitcode is None for p in procs):
        for p in procs:
            p.join(0.2)
            if p.exitcode is not None and not stopping.is_set():
                failed.append(p.exitcode)
                click.echo(f"omniframe serve: worker {p.pid} ended (status {p.exitcode}); "
                           f"stopping", err=True)
                stop(signal.SIGTERM, None)
    sock.close()
    if failed:
        sys.exit(1)
