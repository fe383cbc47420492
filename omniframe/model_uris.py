"""Model URIs: where weights come from.

* ``hf://org/name[@revision]``: a Hugging Face snapshot, in huggingface_hub's usual cache.
* ``pkg://package/sub/path``: a file or folder inside an installed Python package.
* ``random://preset``: random weights of a named size (tests, speed benchmarks).
* anything else: a local path (``~`` expanded).

Plugins add schemes with the ``register_model_resolvers`` hook. Resolution never imports a
model library; downloading imports huggingface_hub only when an ``hf://`` URI is resolved.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BUILTIN_RESOLVERS",
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


BUILTIN_RESOLVERS: dict[str, Callable[[str], ModelRef]] = {
    "file": _resolve_file,
    "pkg": _resolve_pkg,
    "random": _resolve_random,
    "hf": _resolve_hf,
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
