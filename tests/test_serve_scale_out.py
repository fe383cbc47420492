"""examples/scale_out/run.sh: two ``omniframe serve`` processes behind a real nginx, on
loopback ports, nginx from a temporary prefix (no root paths). Sessions opened through nginx
with the openai SDK's realtime client get their answers, and both backends serve some.
Skips where nginx is not installed (scripts/setup.sh installs it). About 5 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "examples" / "scale_out" / "run.sh"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK)
                                  else None)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install -y "
                                             "nginx; scripts/setup.sh does it)"),
]


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture
def scale_out() -> Iterator[tuple[int, int, int]]:
    """run.sh with nginx on one free port, two servers on two others; stopped after."""
    front, b1, b2 = _free_ports(3)
    env = {k: v for k, v in os.environ.items() if k != "OMNIFRAME_API_KEY"}
    env.update(PORT=str(front), BACKEND_PORTS=f"{b1} {b2}", PYTHON=sys.executable,
               NGINX=str(NGINX))
    proc = subprocess.Popen(["bash", str(RUN), "configs/serve_echo.yaml"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 90
        while not any("ready:" in x for x in lines):
            assert proc.poll() is None, "run.sh ended:\n" + "".join(lines)
            assert time.monotonic() < deadline, "run.sh not ready:\n" + "".join(lines)
            time.sleep(0.1)
        yield front, b1, b2
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    assert proc.returncode in (143, 0), "".join(lines)
    for port in (front, b1, b2):  # nginx and both servers are gone
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


async def test_two_backends_behind_nginx(scale_out: tuple[int, int, int]) -> None:
    """Four sessions open at once through nginx: two on each backend (least_conn), each
    answered; plain HTTP (/health) passes through too."""
    front, b1, b2 = scale_out
    assert _health(front)["status"] == "ok"

    client = openai.AsyncOpenAI(api_key="unused-on-loopback",
                                base_url=f"http://127.0.0.1:{front}/v1")
    answers: dict[str, str] = {}
    opened = anyio.Event()
    count = {"open": 0}
    counts: dict[int, int] = {}

    async def session(word: str) -> None:
        async with client.realtime.connect(model="echo") as conn:
            first = json.loads(await conn.recv_bytes())
            assert first["type"] == "session.created", first
            count["open"] += 1
            if count["open"] == 4:
                opened.set()
            await opened.wait()  # all four are open at once: nginx spread them
            if word == "w0":
                counts.update({b1: _health(b1)["sessions"], b2: _health(b2)["sessions"]})
            await conn.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": word}]}})
            await conn.send({"type": "response.create"})
            while True:
                e = json.loads(await conn.recv_bytes())
                assert e["type"] != "error", e
                if e["type"] == "response.done":
                    answers[word] = e["response"]["output"][0]["content"][0]["transcript"]
                    return

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(session, f"w{i}")
    assert answers == {f"w{i}": f"You said: w{i}" for i in range(4)}
    assert counts == {b1: 2, b2: 2}, counts  # least_conn: two sessions on each backend
