"""Model URIs: local paths, package paths, random presets, the hub (offline here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from omniframe.model_uris import ModelNotAvailable, resolve_model, split_uri


def test_split() -> None:
    assert split_uri("hf://a/b@v1") == ("hf", "a/b@v1")
    assert split_uri("/x/y") == ("file", "/x/y")


def test_local_path(tmp_path: Path) -> None:
    ref = resolve_model(str(tmp_path))
    assert ref.scheme == "file" and ref.path == tmp_path.resolve()
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        resolve_model(str(tmp_path / "missing-model"))


def test_package_path() -> None:
    ref = resolve_model("pkg://omniframe/configs/demo.yaml")
    assert ref.path is not None and ref.path.name == "demo.yaml"
    with pytest.raises(ModelNotAvailable, match="package 'no_such_pkg_xyz' is not installed"):
        resolve_model("pkg://no_such_pkg_xyz/model")
    with pytest.raises(ModelNotAvailable, match="has no 'nothing/here'"):
        resolve_model("pkg://omniframe/nothing/here")


def test_random_and_unknown_scheme() -> None:
    ref = resolve_model("random://tiny")
    assert ref.is_random and ref.preset == "tiny" and ref.path is None
    with pytest.raises(ModelNotAvailable, match="needs a preset"):
        resolve_model("random://")
    with pytest.raises(ModelNotAvailable, match="unknown model URI scheme 'ftp'"):
        resolve_model("ftp://host/model")
    with pytest.raises(ModelNotAvailable, match="expected hf://org/name"):
        resolve_model("hf://just-a-name")


def test_hub_failure_is_a_clear_message(tmp_path: Path) -> None:
    """Offline (as here, and as HF_HUB_OFFLINE forces): say what was tried and what to do."""
    code = (
        "from omniframe.model_uris import resolve_model, ModelNotAvailable\n"
        "try:\n"
        "    resolve_model('hf://gpt-omni/mini-omni')\n"
        "except ModelNotAvailable as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert "could not download 'hf://gpt-omni/mini-omni'" in out.stdout
    assert "pass the local folder instead" in out.stdout
