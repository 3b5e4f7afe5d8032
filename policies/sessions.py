"""Where each session went: the table behind session affinity (policies/adaptive.py).

A session is known by its affinity key; the table keeps, for the most recent MAX_SESSIONS
keys, the backend that served its last request and that request's body size (what the
backend holds in its prompt cache). Several replicas share it through Redis
(cluster/replica.py): a replica reads a session's entry there before routing it and
writes the choice back, so a conversation returns to its backend whichever replica it
reaches.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol, runtime_checkable

MAX_SESSIONS = 65536


class Sessions:
    """Most-recently-used table: affinity key -> (backend, chars of its last request)."""

    __slots__ = ("_table",)

    def __init__(self) -> None:
        self._table: OrderedDict[str, tuple[str, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def get(self, key: str) -> tuple[str, int] | None:
        return self._table.get(key)

    def put(self, key: str, backend: str, chars: int) -> None:
        self._table[key] = (backend, chars)
        self._table.move_to_end(key)
        if len(self._table) > MAX_SESSIONS:
            self._table.popitem(last=False)


@runtime_checkable
class KeepsSessions(Protocol):
    """A policy with session affinity: `sessions` is None while affinity is off."""

    sessions: Sessions | None
