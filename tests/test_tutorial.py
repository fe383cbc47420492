"""The tutorial in docs/plugins.md runs as written: every ``python`` block, in order, in one
namespace, in a scratch folder (issue 10: "each step runnable")."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from omniframe.plugins import unregister_plugin

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def _blocks() -> list[str]:
    text = DOC.read_text()
    tutorial = text[text.index("## Tutorial: a processor and a sink"):]
    return re.findall(r"```python\n(.*?)```", tutorial, flags=re.S)


def test_the_tutorial_runs_step_by_step(tmp_path, monkeypatch):
    blocks = _blocks()
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("omniframe_tutorial")  # as a script's __main__ would be
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    try:
        for i, block in enumerate(blocks, start=1):
            try:
                exec(compile(block, f"docs/plugins.md tutorial block {i}", "exec"), namespace)
            except Exception as exc:  # name the block that broke
                pytest.fail(f"tutorial block {i} failed: {type(exc).__name__}: {exc}\n{block}")
    finally:
        unregister_plugin("tutorial")
        unregister_plugin("tutorial-sink")
