"""``omniframe serve CONFIG...``: the click command (light: the app is imported on run)."""

from __future__ import annotations

import ipaddress

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
@click.option("--allow-origin", "allow_origins", multiple=True,
              help="Browser Origin allowed besides the server's own (repeat).")
@click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
              help="Override a value in every served config.")
@click.option("--check-events", is_flag=True,
              help="Check every emitted event against the openai SDK's types (debugging).")
def serve(configs: tuple[str, ...], host: str, port: int, api_key: str | None,
          insecure: bool, max_sessions: int, idle_seconds: float, max_session_seconds: float,
          max_message_bytes: int, max_buffer_seconds: float, max_items: int,
          allow_origins: tuple[str, ...], overrides: tuple[str, ...],
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
                    max_items=max_items, idle_s=idle_seconds, max_session_s=max_session_seconds)
    settings = Settings(api_key=api_key, limits=limits, max_sessions=max_sessions,
                        allow_origins=allow_origins, check_events=check_events)
    run_server(served, settings, host, port,
               announce=lambda line: click.echo(line, err=True))
