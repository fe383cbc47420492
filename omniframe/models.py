"""The old name of :mod:`omniframe.model_uris` (model URIs), kept for code that imports it."""

from omniframe.model_uris import (
    BUILTIN_RESOLVERS,
    ModelNotAvailable,
    ModelRef,
    model_cache_key,
    resolve_model,
    split_uri,
)

__all__ = ["BUILTIN_RESOLVERS", "ModelNotAvailable", "ModelRef", "model_cache_key",
           "resolve_model", "split_uri"]
