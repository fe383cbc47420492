"""Client secrets (``POST /v1/realtime/client_secrets``, as OpenAI's): minted with the API
key, they open sessions until they expire; they are signed, not stored; a secret cannot mint
secrets; bad requests get clear errors."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
websockets = pytest.importorskip("websockets")

from omniframe.serve.app import mint_secret, secret_ok  # noqa: E402
from tests.test_serve import KEY, Server  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


class Reply:
    def __init__(self, status: int, text: str) -> None:
        self.status_code, self.text = status, text

    def json(self) -> Any:
        return json.loads(self.text)


def _post(server: Server, data: bytes, key: str | None) -> Reply:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/realtime/client_secrets",
                                 data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return Reply(r.status, r.read().decode())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read().decode())


def _mint(server: Server, key: str | None = KEY, **body: Any) -> Reply:
    return _post(server, json.dumps(body).encode() if body else b"", key)


async def test_a_secret_opens_a_session_and_cannot_mint(server: Server) -> None:
    r = _mint(server, expires_after={"anchor": "created_at", "seconds": 60},
              session={"type": "realtime", "model": "echo"})
    assert r.status_code == 200, r.text
    got = r.json()
    secret = got["value"]
    assert secret.startswith("ek_") and KEY not in secret
    assert got["session"]["model"] == "echo" and got["expires_at"] > 0
    # the browser's way: the secret as the subprotocol key
    async with websockets.connect(
            server.url + "?model=echo",
            subprotocols=["realtime", f"openai-insecure-api-key.{secret}"]) as ws:
        assert '"session.created"' in await ws.recv()
    # a secret is not the API key: it cannot mint
    r2 = _mint(server, key=secret)
    assert r2.status_code == 401 and r2.json()["error"]["code"] == "invalid_api_key"


async def test_tampered_or_foreign_secrets_are_refused(server: Server) -> None:
    secret = _mint(server).json()["value"]
    expires, nonce, sig = secret[3:].split(".")
    longer = f"ek_{int(expires) + 3600}.{nonce}.{sig}"  # a later expiry, same signature
    foreign, _ = mint_secret("another-key", 60)
    for bad in (longer, foreign, secret[:-1] + ("0" if secret[-1] != "0" else "1")):
        with pytest.raises(websockets.exceptions.InvalidStatus) as err:
            async with websockets.connect(server.url,
                                          additional_headers={"Authorization": f"Bearer {bad}"}):
                pass
        assert err.value.response.status_code == 401


@pytest.mark.parametrize(("body", "code"), [
    ({"expires_after": {"seconds": 5}}, "invalid_expires_after"),
    ({"expires_after": {"seconds": 99999}}, "invalid_expires_after"),
    ({"expires_after": {"seconds": "600"}}, "invalid_expires_after"),
    ({"session": {"model": "nope"}}, "model_not_found"),
])
def test_bad_requests_say_what_is_wrong(server: Server, body, code) -> None:
    r = _mint(server, **body)
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
    assert _mint(server, key=None).status_code == 401
    bad_json = _post(server, b"{not json", KEY)
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"


def test_secrets_expire() -> None:
    secret, expires = mint_secret("k", 10, now=1000.0)
    assert expires == 1010
    assert secret_ok("k", secret, now=1009.0)
    assert not secret_ok("k", secret, now=1010.0)
    assert not secret_ok("other", secret, now=1009.0)


@given(st.text(max_size=300))
def test_no_arbitrary_string_is_a_secret(token: str) -> None:
    assert not secret_ok("k", token, now=0.0)
