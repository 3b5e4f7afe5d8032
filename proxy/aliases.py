"""Model aliases: the names clients send mapped to models the pool serves.

`[models.aliases]` maps a name or a glob (`"claude-*" = "qwen3.6-35b-a3b"`) to a model;
an exact name beats any glob, and globs are tried in the order the file gives them. A
name no alias matches is its own model. Pure: built from the settings, no I/O.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

_GLOB_CHARS = frozenset("*?[")


class Aliases:
    def __init__(self, mapping: Mapping[str, str]) -> None:
        self._exact = {k: v for k, v in mapping.items() if not _GLOB_CHARS & set(k)}
        self._globs = tuple((k, v) for k, v in mapping.items() if _GLOB_CHARS & set(k))

    def resolve(self, name: str) -> str:
        target = self._exact.get(name)
        if target is not None:
            return target
        for pattern, target in self._globs:
            if fnmatch.fnmatchcase(name, pattern):
                return target
        return name

    @property
    def names(self) -> Mapping[str, str]:
        """The exact aliases (globs cannot be listed), alias -> model."""
        return self._exact
