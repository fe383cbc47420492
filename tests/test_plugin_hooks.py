"""Hooks go through pluggy: tracing sees every call, implementations may take fewer
arguments; a plugin that fails to import is skipped and reported."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from omniframe import hookimpl, plugins
from omniframe.plugins import (
    PluginError,
    get_registry,
    pm,
    register_plugin,
    reset_plugins,
    unregister_plugin,
)

HOOKS = ("register_stages", "register_datasets", "register_model_resolvers",
         "register_observers", "register_commands")


def test_every_hook_call_goes_through_pluggy_monitoring() -> None:
    from omniframe.plugins import plugin_commands

    calls: list[tuple[str, list[str]]] = []
    undo = pm.add_hookcall_monitoring(
        lambda name, impls, kwargs: calls.append((name, [i.plugin_name for i in impls])),
        lambda outcome, name, impls, kwargs: None)
    try:
        reset_plugins()
        get_registry()
        plugin_commands()
    finally:
        undo()
        reset_plugins()
    called = {name for name, _ in calls}
    implemented = {h for h in HOOKS if getattr(pm.hook, h).get_hookimpls()}
    assert {"register_stages", "register_observers", "register_commands"} <= implemented
    assert implemented <= called
    # one plugin per call, so each registration is known to be that plugin's
    assert all(len(impls) == 1 for _, impls in calls)
    assert ("register_stages", ["omniframe_echo"]) in calls


def test_an_implementation_may_take_fewer_arguments_than_its_spec() -> None:
    seen: list[str] = []
    register_plugin(SimpleNamespace(
        register_stages=hookimpl(lambda: seen.append("stages"), specname="register_stages"),
        register_commands=hookimpl(lambda: seen.append("commands"),
                                   specname="register_commands")), "terse")
    try:
        assert get_registry().stage("lm", "echo")
        import click

        from omniframe.cli import add_plugin_commands

        assert add_plugin_commands(click.Group()) == []
    finally:
        unregister_plugin("terse")
    assert seen == ["stages", "commands"]


def test_two_plugins_registering_one_observer_name_is_an_error() -> None:
    class A:
        def on_frame(self, *args: object) -> None: ...

    register_plugin(SimpleNamespace(register_observers=hookimpl(
        lambda register: register("latency-csv", A))), "copycat")
    try:
        with pytest.raises(PluginError, match="observer 'latency-csv' is registered twice: by "
                                              "plugin 'omniframe_audio' and by 'copycat'"):
            get_registry()
    finally:
        unregister_plugin("copycat")


BROKEN_EP = ("importlib.metadata.EntryPoint(name='broken', group='omniframe', "
             "value='omniframe_no_such_module.plugin')")


@pytest.fixture
def broken_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.entry_points

    def entry_points(**kw: object) -> object:
        eps = real(**kw)  # type: ignore[arg-type]
        if kw.get("group") == "omniframe":
            return [*eps, eval(BROKEN_EP)]
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "_failed", {})
    reset_plugins()
    yield
    reset_plugins()


def test_a_plugin_that_fails_to_import_is_skipped(broken_entry_point: None) -> None:
    failed = plugins.failed_plugins()
    assert list(failed) == ["broken"]
    assert ("plugin 'broken' (omniframe_no_such_module.plugin, from unknown distribution) "
            "failed to import and was skipped: ModuleNotFoundError") in failed["broken"]
    reg = get_registry()
    assert reg.stage("lm", "echo")  # everything else works
    with pytest.raises(PluginError, match="no lm stage named 'nope'.*plugin 'broken'"):
        reg.stage("lm", "nope")


def test_the_cli_still_works_with_a_broken_plugin(tmp_path: Path) -> None:
    code = ("import importlib.metadata, sys\n"
            "real = importlib.metadata.entry_points\n"
            "def eps(**kw):\n"
            "    out = real(**kw)\n"
            f"    return [*out, {BROKEN_EP}] if kw.get('group') == 'omniframe' else out\n"
            "importlib.metadata.entry_points = eps\n"
            "from omniframe.cli import main\n"
            "main(sys.argv[1:])\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              text=True, timeout=120, env={**os.environ})

    helped = run("--help")
    assert helped.returncode == 0, helped.stderr
    assert "plugins" in helped.stdout and "eval" in helped.stdout
    assert "warning: plugin 'broken'" in helped.stderr and "Traceback" not in helped.stderr
    listed = run("plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert "failed to import" in rows["broken"]["error"]
    assert rows["omniframe_echo"]["stages"]
    assert rows["omniframe_audio"]["observers"] == ["latency-csv"]
    ran = run("run", "--json", "-o", str(tmp_path / "a.wav"))
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.count("warning: plugin 'broken'") == 1
