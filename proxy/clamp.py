"""Fitting a request's `max_tokens` to the context of the backend chosen for it.

Agents ask for more output than a small context leaves: Claude Code sends `max_tokens`
128000 for its own model names (32000 for others), and vLLM answers a request whose
prompt plus `max_tokens` passes `--max-model-len` with a 400. Where the backend's context
is known (vLLM's `max_model_len`, llama.cpp's per-slot `n_ctx`), a request that cannot fit
has its `max_tokens` lowered to the room its prompt leaves. The prompt is not tokenized
here: its token count is the body's size times the backend's tokens-per-byte ratio as
measured from its own usage reports, with a margin; before any report, half a token per
byte (a JSON body's bytes count far more than its tokens, so this leaves less room than
there is, never more). A prompt that leaves almost no room is sent as it is: the backend's
own error says more than a reply of a few tokens would.
"""

from __future__ import annotations

import math

MARGIN = 1.25  # on the measured tokens-per-byte ratio
UNMEASURED_TOKENS_PER_BYTE = 0.5
MIN_ROOM = 16  # tokens; below this the request goes as it is


def fitted_max_tokens(requested: int | None, body_bytes: int, context: int | None,
                      tokens_per_byte: float | None) -> int | None:
    """The lower `max_tokens` to send, or None to leave the request unchanged."""
    if requested is None or context is None:
        return None
    ratio = tokens_per_byte * MARGIN if tokens_per_byte else UNMEASURED_TOKENS_PER_BYTE
    room = context - math.ceil(body_bytes * ratio)
    if requested <= room or room < MIN_ROOM:
        return None
    return room
