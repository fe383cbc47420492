"""``omniframe serve`` loads each served config's models before it listens (``--warm-up``,
the default), so that the first session does not wait for them; a model that cannot load
stops the server at start with a message naming the config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from omniframe.serve.bridge import load_served, warm_up  # noqa: E402

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]


async def test_warm_up_loads_the_models_into_the_process_cache() -> None:
    from omniframe.resources import default_resources

    served = load_served([str(ROOT / "configs/mini_omni_t1t2.yaml")], [
        "lm.options.model=random://tiny"])
    model = next(iter(served.values()))
    before = set(default_resources()._items)
    seconds = await warm_up(model)
    assert seconds >= 0
    loaded = set(default_resources()._items) - before
    assert any("random://tiny" in str(k) for k in loaded), loaded  # the LM is in the cache


def test_a_model_that_cannot_load_stops_the_server_at_start(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "omniframe", "serve", "configs/mini_omni_t1t2.yaml",
         "--port", "0", "--set", f"lm.options.model={tmp_path}/missing"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "cannot load the models" in proc.stderr and "listening" not in proc.stderr
