"""The session table in Redis: one key per session, `{prefix}:session:{digest}`, whose
value is `chars backend` (see policies/sessions.py) and whose TTL restarts at every turn.

One key per session rather than one hash: Redis 7.0 (Debian's) has no expiry per hash
field, and a TTL on a whole hash would forget every session at once. The affinity key is
digested, so what a client sent as its session id never appears in Redis."""

from __future__ import annotations

import hashlib


def session_key(prefix: str, affinity_key: str) -> str:
    digest = hashlib.blake2b(affinity_key.encode(), digest_size=16).hexdigest()
    return f"{prefix}:session:{digest}"


def encode(backend: str, chars: int) -> str:
    return f"{chars} {backend}"


def decode(raw: bytes | str | None) -> tuple[str, int] | None:
    if raw is None:
        return None
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    chars, _, backend = text.partition(" ")
    if not backend or not chars.isdigit():
        return None
    return backend, int(chars)
