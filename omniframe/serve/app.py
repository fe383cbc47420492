"""The Starlette app: ``/v1/realtime`` (WebSocket), auth, origin check, session cap, limits.

Each connection gets its own :class:`~omniframe.serve.bridge.RealtimeSession` (its own
pipeline and conversation; models are shared through the process-wide cache), a bounded
queue of server events and a bounded queue of input audio. A session ends with a close code
and a reason, after an ``error`` event saying why when the server ends it:

=====  ===================================================================
1008   policy: unknown model, conversation too long
1009   too big: a message over the limit, the input audio buffer over the limit
1011   the pipeline failed
1008   policy: input audio faster than ``--max-audio-rate``; a client that does not read
       (its event queue full for ``--send-timeout-seconds``: dropped, no event can reach it)
1013   the server is full (``--max-sessions``), or this client address is
       (``--max-sessions-per-client``): try again later
1001   idle timeout, session length limit, server shutting down (after answers in flight
       finish, up to ``--shutdown-grace-seconds``)
=====  ===================================================================

A missing or wrong API key is refused before the WebSocket opens (HTTP 401), as a foreign
``Origin`` is (HTTP 403).

Over HTTP: ``/`` is the browser page (``omniframe/serve/static/``: only the regular files
found there at start-up are served, each with a Content-Security-Policy and ``nosniff``),
``/v1/models`` lists the served configs (OpenAI's list shape; it needs the API key when one
is set) and ``/health`` answers without one.

Client secrets (as OpenAI's ``POST /v1/realtime/client_secrets``): a backend holding the API
key mints a short-lived key (``ek_...``, 10 s to 2 h, default 10 min) and hands it to a
browser, which opens sessions with it (Bearer or the ``openai-insecure-api-key.``
subprotocol) until it expires, without ever seeing the API key. Secrets are signed with the
API key (HMAC-SHA256), not stored: every worker and every server behind a load balancer that
has the same key accepts them. A secret cannot mint secrets.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import structlog

from omniframe.serve import protocol as P
from omniframe.serve.bridge import Limits, RealtimeSession, ServedModel
from omniframe.serve.protocol import ProtocolError

__all__ = ["Settings", "create_app", "run_server"]

log = structlog.get_logger("omniframe.serve")

KEY_PROTOCOL = "openai-insecure-api-key."


@dataclass
class Settings:
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_sessions: int = 4
    allow_origins: tuple[str, ...] = ()
    check_events: bool = False  # validate every emitted event (tests, debugging)
    max_sessions_per_client: int = 0  # per client address (0: no limit)
    shutdown_grace_s: float = 10.0  # on shutdown, answers in flight may finish this long
    static_dir: Path | None = None  # the browser page's files (None: the package's own)
    warm_up: bool = True  # load every served config's models before listening


@dataclass
class _Close:
    code: int
    reason: str


@dataclass(eq=False)
class _Live:
    """A running session, as shutdown sees it."""

    bridge: RealtimeSession
    out: Any  # its event queue's send end
    close: Any  # async (code, reason) -> None

    def busy(self) -> bool:  # an answer streams, or the user is speaking
        return bool(self.bridge.responses) or self.bridge.vad_turn is not None

    async def end(self) -> None:
        with contextlib.suppress(Exception):  # a full queue: the close says it alone
            self.out.send_nowait(P.error_event(ProtocolError(
                "server_shutting_down", "the server is shutting down: this session ends "
                "(reconnect to go on)", type_="server_error")))
        await self.close(1001, "server shutting down")


def _offered_key(ws: Any) -> tuple[str | None, list[str]]:
    protocols = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")
                 if p.strip()]
    auth = ws.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip(), protocols
    for p in protocols:
        if p.startswith(KEY_PROTOCOL):
            return p[len(KEY_PROTOCOL):], protocols
    return None, protocols


SECRET_PREFIX = "ek_"
SECRET_TTL_S = (10, 7200, 600)  # min, max, default seconds (OpenAI's bounds)


def mint_secret(api_key: str, seconds: float, now: float | None = None) -> tuple[str, int]:
    """A client secret valid for ``seconds``: ``ek_<expiry>.<nonce>.<signature>``."""
    expires = int((time.time() if now is None else now) + seconds)
    payload = f"{expires}.{secrets.token_urlsafe(12)}"
    return f"{SECRET_PREFIX}{payload}.{_sign(api_key, payload)}", expires


def _sign(api_key: str, payload: str) -> str:
    return hmac.new(api_key.encode(), payload.encode(), hashlib.sha256).hexdigest()[:40]


def secret_ok(api_key: str, token: str, now: float | None = None) -> bool:
    """Whether ``token`` is a secret minted with ``api_key`` that has not expired."""
    if not token.startswith(SECRET_PREFIX) or len(token) > 200:
        return False
    parts = token[len(SECRET_PREFIX):].split(".")
    if len(parts) != 3 or not parts[0].isdigit() or len(parts[0]) > 12:
        return False
    expires, nonce, sig = parts
    if not hmac.compare_digest(sig.encode(), _sign(api_key, f"{expires}.{nonce}").encode()):
        return False
    return int(expires) > (time.time() if now is None else now)


def key_ok(settings: Settings, key: str | None, *, secrets_too: bool = True) -> bool:
    """The API key (or, with ``secrets_too``, a valid client secret); True without a key."""
    api_key = settings.api_key
    if api_key is None:
        return True
    if key is None:
        return False
    if hmac.compare_digest(key.encode(), api_key.encode()):
        return True
    return secrets_too and secret_ok(api_key, key)


def _origin_ok(ws: Any, allowed: tuple[str, ...]) -> bool:
    origin = ws.headers.get("origin")
    if origin is None:  # not a browser (the SDK sends none): the API key is the guard
        return True
    if origin in allowed or "*" in allowed:
        return True
    return urlsplit(origin).netloc == ws.headers.get("host")


STATIC_DIR = Path(__file__).with_name("static")
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
                ".ico": "image/x-icon", ".json": "application/json"}
# the page loads only its own scripts and styles and talks only to its own origin (CSP 'self'
# covers ws:/wss: to the same host in browsers that implement CSP level 3; the explicit
# ws(s)://host is added per request for the others)
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self' {ws}; media-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'")


_HOST = re.compile(r"[A-Za-z0-9.\[\]:-]{1,255}")


def static_files(directory: Path) -> dict[str, Path]:
    """The page's files by name: regular files directly in ``directory`` with a known type
    (no symlinks, no subfolders, no dotfiles), read once, so no request path reaches the
    file system."""
    out: dict[str, Path] = {}
    if not directory.is_dir():
        return out
    for f in sorted(directory.iterdir()):
        if (f.name.startswith(".") or f.is_symlink() or not f.is_file()
                or f.suffix not in _MEDIA_TYPES):
            continue
        out[f.name] = f
    return out


def _models_list(served: dict[str, ServedModel]) -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "omniframe",
         "description": getattr(m.cfg, "description", "") or ""}
        for name, m in served.items()]}


def create_app(served: dict[str, ServedModel], settings: Settings,
               hooks: dict[str, Any] | None = None) -> Any:
    """The app; ``hooks["drain"](stop_now)`` (filled in when given) ends its sessions
    gracefully, for the server's shutdown."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket

    default_model = next(iter(served))
    state: dict[str, Any] = {"sessions": 0, "clients": {}, "live": set(), "draining": False}

    async def deny(ws: WebSocket, status: int, code: str, message: str) -> None:
        body = {"error": {"type": "invalid_request_error", "code": code, "message": message}}
        try:
            await ws.send_denial_response(JSONResponse(body, status_code=status))
        except RuntimeError:  # the server cannot answer a handshake with HTTP
            await ws.close(1008, code)

    async def realtime(ws: WebSocket) -> None:
        key, protocols = _offered_key(ws)
        if not key_ok(settings, key):
            log.info("session refused: bad or missing API key", client=str(ws.client))
            await deny(ws, 401, "invalid_api_key", "missing, wrong or expired API key or "
                       "client secret (send Authorization: Bearer <key>)")
            return
        if not _origin_ok(ws, settings.allow_origins):
            await deny(ws, 403, "origin_not_allowed", "this Origin may not open sessions")
            return
        subprotocol = "realtime" if "realtime" in protocols else None
        await ws.accept(subprotocol=subprotocol)
        name = ws.query_params.get("model") or default_model
        if name not in served:
            await _refuse(ws, "model_not_found", f"no served model {name[:80]!r}; served: "
                          f"{', '.join(served)}", 1008)
            return
        if state["draining"]:
            await _refuse(ws, "server_shutting_down", "the server is shutting down", 1001)
            return
        if state["sessions"] >= settings.max_sessions:
            await _refuse(ws, "session_limit_reached", f"the server holds its maximum of "
                          f"{settings.max_sessions} sessions; try again later", 1013)
            return
        client = ws.client.host if ws.client else "?"
        per = settings.max_sessions_per_client
        if per and state["clients"].get(client, 0) >= per:
            await _refuse(ws, "client_session_limit_reached", f"this client address holds "
                          f"its maximum of {per} sessions; try again later", 1013)
            return
        state["sessions"] += 1
        state["clients"][client] = state["clients"].get(client, 0) + 1
        try:
            await _session(ws, served[name], settings,
                           metrics=ws.query_params.get("omniframe_metrics") == "1",
                           live=state["live"])
        finally:
            state["sessions"] -= 1
            state["clients"][client] -= 1
            if not state["clients"][client]:
                del state["clients"][client]

    async def drain(stop_now: Any) -> None:
        """Shutdown: no new sessions; answers in flight may finish (up to the grace time),
        then each session gets server_shutting_down and close 1001."""
        state["draining"] = True
        deadline = time.monotonic() + settings.shutdown_grace_s
        while (any(s.busy() for s in state["live"])  # noqa: ASYNC110 (polls session states)
               and time.monotonic() < deadline and not stop_now()):
            await anyio.sleep(0.05)
        for s in list(state["live"]):
            await s.end()
        deadline = time.monotonic() + 3
        while state["live"] and time.monotonic() < deadline and not stop_now():  # noqa: ASYNC110
            await anyio.sleep(0.05)

    if hooks is not None:
        hooks["drain"] = drain

    async def health(request: Any) -> Any:
        return JSONResponse({"status": "ok", "models": list(served),
                             "sessions": state["sessions"], "pid": os.getpid()})

    def http_error(status: int, code: str, message: str) -> Any:
        return JSONResponse({"error": {"type": "invalid_request_error", "code": code,
                                       "message": message}}, status_code=status,
                            headers={"www-authenticate": "Bearer"} if status == 401 else None)

    async def models(request: Any) -> Any:
        if not key_ok(settings, _offered_key(request)[0]):
            return http_error(401, "invalid_api_key", "missing or wrong API key (send "
                              "Authorization: Bearer <key>)")
        return JSONResponse(_models_list(served), headers={"cache-control": "no-store"})

    async def client_secrets(request: Any) -> Any:
        """Mint a short-lived client secret (OpenAI's request and response shapes)."""
        if settings.api_key is None:
            return http_error(400, "no_api_key", "this server has no API key: sessions need "
                              "no secret (start it with --api-key to use client secrets)")
        if not key_ok(settings, _offered_key(request)[0], secrets_too=False):
            return http_error(401, "invalid_api_key", "minting a client secret needs the API "
                              "key itself (Authorization: Bearer <key>), not a secret")
        raw = await request.body()
        if len(raw) > 64 * 1024:
            return http_error(413, "request_too_large", "the request body is over 64 KiB")
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return http_error(400, "invalid_json", "the request body is not JSON")
        lo, hi, default = SECRET_TTL_S
        after = body.get("expires_after", {}) if isinstance(body, dict) else None
        seconds = after.get("seconds", default) if isinstance(after, dict) else None
        if (not isinstance(seconds, int | float) or isinstance(seconds, bool)
                or not lo <= seconds <= hi):
            return http_error(400, "invalid_expires_after", f"expires_after.seconds must be "
                              f"a number from {lo} to {hi} (default {default})")
        session = body.get("session", {}) if isinstance(body, dict) else {}
        model = session.get("model", default_model) if isinstance(session, dict) else None
        if model not in served:
            return http_error(400, "model_not_found", f"no served model {str(model)[:80]!r}; "
                              f"served: {', '.join(served)}")
        value, expires = mint_secret(settings.api_key, seconds)
        log.info("client secret minted", seconds=seconds, model=model)
        return JSONResponse({"value": value, "expires_at": expires,
                             "session": {"type": "realtime", "model": model}},
                            headers={"cache-control": "no-store"})

    files = static_files(settings.static_dir or STATIC_DIR)
    contents = {name: f.read_bytes() for name, f in files.items()}

    def page_file(name: str, request: Any) -> Any:
        body = contents.get(name)
        if body is None:
            return Response("not found\n", status_code=404, media_type="text/plain",
                            headers={"x-content-type-options": "nosniff"})
        host = request.headers.get("host", "")
        ws = f"ws://{host} wss://{host}" if _HOST.fullmatch(host) else ""
        return Response(body, media_type=_MEDIA_TYPES[Path(name).suffix], headers={
            "content-security-policy": _CSP.format(ws=ws),
            "x-content-type-options": "nosniff",
            "referrer-policy": "no-referrer",
            "cross-origin-opener-policy": "same-origin",
            "permissions-policy": "microphone=(self), camera=(), geolocation=()",
            "cache-control": "no-cache"})

    async def index(request: Any) -> Any:
        return page_file("index.html", request)

    async def static(request: Any) -> Any:
        return page_file(request.path_params["name"], request)

    return Starlette(routes=[WebSocketRoute("/v1/realtime", realtime),
                             Route("/health", health),
                             Route("/v1/models", models),
                             Route("/v1/realtime/client_secrets", client_secrets,
                                   methods=["POST"]),
                             Route("/", index),
                             Route("/static/{name}", static)])


async def _refuse(ws: Any, code: str, message: str, close: int) -> None:
    event = P.error_event(ProtocolError(code, message))
    await ws.send_text(json.dumps(event))
    await ws.close(close, code)


async def _session(ws: Any, served: ServedModel, settings: Settings, metrics: bool,
                   live: set[_Live] | None = None) -> None:
    from starlette.websockets import WebSocketDisconnect

    limits = settings.limits
    out_tx, out_rx = anyio.create_memory_object_stream[Any](limits.event_queue)
    checker = None
    if settings.check_events:
        from omniframe.serve.contract import ContractChecker

        checker = ContractChecker(allow_extensions=metrics)
    closing = anyio.Event()
    forced: list[_Close] = []  # the queue was full: close without waiting for it
    scope: list[anyio.CancelScope] = []

    async def send(event: dict[str, Any]) -> None:
        with anyio.move_on_after(limits.send_timeout_s):
            await out_tx.send(event)
            return
        # memory stays bounded, and the pipeline must not wait forever: drop the client
        log.warning("dropping the session: the client does not read", session=bridge.id,
                    queued=limits.event_queue, seconds=limits.send_timeout_s)
        await close(1008, "slow_client")

    async def close(code: int, reason: str) -> None:
        closing.set()
        try:
            out_tx.send_nowait(_Close(code, reason))
        except anyio.WouldBlock:  # a client that does not read: no error event reaches it
            forced.append(_Close(code, reason))
            if scope:
                scope[0].cancel()

    bridge = RealtimeSession(served, limits, send, close, metrics_events=metrics)
    bridge.send_nowait = out_tx.send_nowait
    me = _Live(bridge, out_tx, close)
    if live is not None:
        live.add(me)
    log.info("session started", session=bridge.id, model=served.name, client=str(ws.client))

    async with anyio.create_task_group() as tg:
        scope.append(tg.cancel_scope)

        async def sender() -> None:
            async for item in out_rx:
                if isinstance(item, _Close):
                    await ws.close(item.code, item.reason)
                    tg.cancel_scope.cancel()
                    return
                if checker is not None:
                    problem = checker.problem(item)
                    if problem is not None:
                        log.error("server event breaks the contract", problem=problem)
                        item = P.error_event(ProtocolError(
                            "server_contract_violation", problem[:500], type_="server_error"))
                await ws.send_text(json.dumps(item))

        async def receiver() -> None:
            while True:
                with anyio.move_on_after(limits.idle_s) as idle:
                    msg = await ws.receive()
                if idle.cancelled_caught:
                    await send(P.error_event(ProtocolError(
                        "session_idle_timeout", f"no client event for {limits.idle_s:g} s")))
                    await close(1001, "idle timeout")
                    return
                if msg["type"] == "websocket.disconnect":
                    tg.cancel_scope.cancel()
                    return
                event_id = None
                try:
                    text = msg.get("text")
                    if text is None:
                        raise ProtocolError("invalid_event", "binary messages are not part "
                                            "of the protocol: send JSON text")
                    if len(text) > limits.max_message_bytes:
                        raise ProtocolError("message_too_large", f"a message may have at most "
                                            f"{limits.max_message_bytes} bytes", close=1009)
                    event = P.parse_client_event(text)
                    event_id = event.get("event_id") if isinstance(
                        event.get("event_id"), str) else None
                    await bridge.handle(event)
                except ProtocolError as exc:
                    await send(P.error_event(exc, event_id))
                    if exc.close is not None:
                        await close(exc.close, exc.code)
                        return
                except Exception as exc:  # a bug or a pipeline that ended: say so, no trace
                    log.exception("client event failed", session=bridge.id)
                    await send(P.error_event(ProtocolError(
                        "server_error", f"the server could not handle the event: "
                        f"{type(exc).__name__}", type_="server_error"), event_id))

        async def lifetime() -> None:
            await anyio.sleep(limits.max_session_s)
            await send(P.error_event(ProtocolError(
                "session_expired", f"sessions last at most {limits.max_session_s:g} s")))
            await close(1001, "session expired")

        tg.start_soon(bridge.run_pipeline)
        tg.start_soon(sender)
        tg.start_soon(lifetime)
        await bridge.start()
        try:
            await receiver()
        except WebSocketDisconnect:
            tg.cancel_scope.cancel()
        if closing.is_set():
            with anyio.move_on_after(5):  # the sender closes the socket, then cancels
                await anyio.sleep_forever()
        tg.cancel_scope.cancel()
    bridge.stop()
    if live is not None:
        live.discard(me)
    if forced:  # the socket may not take even the close: do not wait for it long
        with contextlib.suppress(Exception), anyio.move_on_after(2):
            await ws.close(forced[0].code, forced[0].reason)
    log.info("session ended", session=bridge.id)


def run_server(served: dict[str, ServedModel], settings: Settings, host: str, port: int,
               announce: Any = print, sockets: list[Any] | None = None) -> None:
    """Serve until interrupted; ``announce(line)`` gets the address once listening.
    ``sockets``: listen there instead (``--workers``: the parent's socket)."""
    import asyncio

    import uvicorn

    hooks: dict[str, Any] = {}
    app = create_app(served, settings, hooks)

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            for s in self.servers:  # no new connections while the sessions end
                s.close()
            await hooks["drain"](lambda: self.force_exit)  # a second Ctrl-C: at once
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                            ws_max_size=2 * settings.limits.max_message_bytes + (1 << 20),
                            timeout_graceful_shutdown=5)
    server = _Server(config)

    async def main() -> None:
        if settings.warm_up:
            from omniframe.serve.bridge import warm_up

            for model in served.values():
                try:
                    seconds = await warm_up(model)
                except Exception as exc:  # a model that cannot load: say so now, not per session
                    log.error("cannot load the models of a served config", model=model.name,
                              config=model.label, error=f"{type(exc).__name__}: {exc}"[:1000])
                    raise SystemExit(1) from None
                log.info("models loaded", model=model.name, seconds=round(seconds, 2))
        task = asyncio.create_task(server.serve(sockets=sockets))
        while not server.started and not task.done():  # noqa: ASYNC110 (uvicorn has no event)
            await asyncio.sleep(0.02)
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()
            announce(f"omniframe serve: listening on ws://{bound[0]}:{bound[1]}/v1/realtime "
                     f"(models: {', '.join(served)}); the browser page: "
                     f"http://{bound[0]}:{bound[1]}/")
        await task

    asyncio.run(main())
