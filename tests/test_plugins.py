"""Plugin discovery, hooks documentation, registry errors, the third-party example."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from omniframe import hookspecs
from omniframe.plugins import PluginError, get_registry, register_plugin, unregister_plugin
from omniframe.stage import Stage

ROOT = Path(__file__).resolve().parents[1]


def hook_specs() -> dict[str, object]:
    return {n: f for n, f in vars(hookspecs).items()
            if callable(f) and hasattr(f, "omniframe_spec")}


def test_every_hook_is_typed_and_documented() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    specs = hook_specs()
    assert set(specs) >= {"register_stages", "register_datasets", "register_commands",
                          "register_model_resolvers", "register_observers"}
    for name, fn in specs.items():
        assert (fn.__doc__ or "").strip(), f"hook {name} has no docstring"
        sig = inspect.signature(fn)
        for p in sig.parameters.values():
            assert p.annotation is not inspect.Parameter.empty, f"{name}({p.name}) has no type"
        heading = f"### {name}({', '.join(sig.parameters)})"
        assert heading in docs, f"docs/plugins.md lacks a section {heading!r}"


def test_builtin_plugins_load_through_entry_points() -> None:
    reg = get_registry()
    assert {"omniframe_echo", "omniframe_audio"} <= set(reg.plugins)
    assert reg.plugins["omniframe_echo"].distribution == "omniframe"
    assert reg.stage("lm", "echo").__name__ == "EchoLM"


def test_unknown_stage_message_suggests() -> None:
    reg = get_registry()
    with pytest.raises(PluginError, match="no lm stage named 'ecoh'. Did you mean 'echo'"):
        reg.stage("lm", "ecoh")
    with pytest.raises(PluginError, match="unknown stage kind 'brain': no installed stage"):
        reg.stage("brain", "echo")
    with pytest.raises(PluginError, match="unknown stage kind 'processr'.*Did you mean "
                                          "'processor'"):
        reg.stage("processr", "x")


def test_duplicate_stage_is_an_error_naming_both_plugins() -> None:
    from omniframe_echo.stages import EchoLM

    from omniframe import hookimpl

    class Impostor(Stage):
        kind = "lm"
        name = "echo"

    plugin = SimpleNamespace(register_stages=hookimpl(
        lambda register: register(Impostor)))
    register_plugin(plugin, "impostor")
    try:
        with pytest.raises(PluginError, match="registered twice: by plugin 'omniframe_echo' "
                                              "and by 'impostor'"):
            get_registry()
    finally:
        unregister_plugin("impostor")
    assert get_registry().stage("lm", "echo") is EchoLM


def test_a_non_stage_registration_is_refused() -> None:
    from omniframe import hookimpl

    plugin = SimpleNamespace(register_stages=hookimpl(lambda register: register(int)))
    register_plugin(plugin, "bad")
    try:
        with pytest.raises(PluginError, match="plugin 'bad' registered .* not a Stage"):
            get_registry()
    finally:
        unregister_plugin("bad")


@pytest.mark.parametrize("hook", ["register_stages", "register_datasets",
                                  "register_model_resolvers"])
def test_a_plugin_hook_that_raises_is_a_plugin_error_naming_it(hook: str) -> None:
    from omniframe import hookimpl

    def broken(register: object) -> None:
        raise ModuleNotFoundError("No module named 'its_missing_dependency'")

    register_plugin(SimpleNamespace(**{hook: hookimpl(broken, specname=hook)}), "broken")
    try:
        with pytest.raises(PluginError, match=f"plugin 'broken' failed in its {hook} hook: "
                                              "ModuleNotFoundError: No module named "
                                              "'its_missing_dependency'. Update or reinstall"):
            get_registry()
    finally:
        unregister_plugin("broken")
    assert get_registry().stage("lm", "echo")


def test_a_huge_plugin_error_message_is_cut() -> None:
    from omniframe import hookimpl

    def broken(register: object) -> None:
        raise ValueError("x" * 100_000)

    register_plugin(SimpleNamespace(register_stages=hookimpl(broken, specname="register_stages")),
                    "broken")
    try:
        with pytest.raises(PluginError) as info:
            get_registry()
    finally:
        unregister_plugin("broken")
    assert "… (100000 chars)" in str(info.value) and len(str(info.value)) < 500


def run_py(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_allowlist_environment_variable() -> None:
    out = run_py("from omniframe.plugins import get_registry; "
                 "print(sorted(get_registry().plugins))",
                 OMNIFRAME_LOAD_PLUGINS="omniframe_echo")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['omniframe_echo']"


def test_import_omniframe_pulls_no_heavy_library() -> None:
    out = run_py(
        "import sys, omniframe, omniframe.cli, omniframe.plugins;"
        "omniframe.plugins.get_registry();"
        "heavy = {'torch','whisper','snac','transformers','faster_whisper','ctranslate2'};"
        "print(sorted(heavy & set(sys.modules)))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def shout_installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Install the third-party example into a private folder (not this environment)."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
         "--target", str(target), str(ROOT / "examples" / "omniframe-shout")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return target


def test_third_party_plugin_is_discovered_listed_and_usable(shout_installed: Path,
                                                            tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(shout_installed)}
    listing = subprocess.run([sys.executable, "-m", "omniframe", "plugins", "--json"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert listing.returncode == 0, listing.stderr
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    assert rows["shout"]["distribution"] == "omniframe-shout"
    assert rows["shout"]["version"] == "0.1.0"
    assert rows["shout"]["stages"][0]["kind"] == "lm"
    assert rows["shout"]["stages"][0]["consumes"] == ["TranscriptFrame", "UserTurnFrame"]

    cfg = tmp_path / "shout.yaml"
    cfg.write_text(
        "pipeline:\n"
        "  - {kind: source, plugin: synth}\n"
        "  - {kind: vad, plugin: energy}\n"
        "  - {kind: lm, plugin: shout, options: {suffix: '!!'}}\n"
        "  - {kind: sink, plugin: text, options: {path: out.jsonl}}\n"
    )
    run = subprocess.run([sys.executable, "-m", "omniframe", "run", str(cfg)],
                         capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    said = "".join(r.get("text", "") for r in records if r.get("event") == "text_delta")
    assert "SECONDS OF SPEECH!!" in said


def test_third_party_plugin_own_tests_pass(shout_installed: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(shout_installed)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(ROOT / "examples" / "omniframe-shout" / "tests")],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
