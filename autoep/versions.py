"""The installed Transformers version and the checks that gate presets on it."""

from __future__ import annotations

from functools import lru_cache

from packaging.version import Version


class UnsupportedTransformersError(RuntimeError):
    """The installed Transformers cannot run a preset (too old, or an unsupported layout)."""


@lru_cache(maxsize=None)
def transformers_version() -> Version:
    import transformers

    return Version(transformers.__version__)


def at_least(version: str) -> bool:
    return transformers_version() >= Version(version)
