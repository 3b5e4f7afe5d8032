"""Fitting max_tokens to a backend's context (proxy/clamp.py), as a pure function."""

from __future__ import annotations

from proxy.clamp import MIN_ROOM, fitted_max_tokens


def test_only_a_request_that_cannot_fit_is_lowered() -> None:
    # unknown context or no max_tokens: left alone
    assert fitted_max_tokens(None, 1000, 2048, 0.25) is None
    assert fitted_max_tokens(128000, 1000, None, 0.25) is None
    # it fits: left alone; it does not: the room its prompt leaves, with the margin
    assert fitted_max_tokens(100, 4000, 2048, 0.25) is None
    assert fitted_max_tokens(128000, 4000, 2048, 0.25) == 2048 - 1250
    # before any usage from the backend: half a token per body byte
    assert fitted_max_tokens(128000, 1000, 2048, None) == 2048 - 500
    # a prompt that leaves (almost) nothing goes as it is: the backend says why
    assert fitted_max_tokens(128000, 8000, 2048, 0.25) is None
    assert fitted_max_tokens(128000, 6520, 2048, 0.25) is None  # 10 tokens of room
    assert fitted_max_tokens(128000, 6400, 2048, 0.25) == 48 >= MIN_ROOM
