"""The emulator's tokenizer and its deterministic output text.

One whitespace-separated word is one token. A chat prompt is rendered with a ChatML-like
template whose markers are tokens too, so a conversation that grows turn by turn keeps a
stable token prefix (which is what prompt caches reuse). Generated text is a fixed cycle of
words offset by a hash of the prompt: the same request always gets the same reply.
"""

from __future__ import annotations

import zlib
from typing import Any

VOCAB = (
    "the", "router", "sends", "each", "request", "to", "a", "backend", "with", "room",
    "and", "measures", "time", "first", "token", "under", "load", "while", "streams",
    "flow", "through", "one", "endpoint", "for", "every", "agent", "on", "your", "own",
    "hardware", "so", "nothing", "waits", "longer", "than", "it", "must",
)


def tokenize(text: str) -> list[str]:
    return text.split()


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def chat_prompt(messages: list[dict[str, Any]]) -> list[str]:
    tokens: list[str] = []
    for message in messages:
        tokens += ["<|im_start|>", str(message.get("role", "user"))]
        tokens += tokenize(_content_text(message.get("content")))
        tokens.append("<|im_end|>")
    return [*tokens, "<|im_start|>", "assistant"]


def completion_prompt(prompt: Any) -> list[str]:
    if isinstance(prompt, list):  # a list of strings, or of token ids
        return [str(p) for item in prompt for p in (tokenize(item) if isinstance(item, str)
                                                    else [item])]
    return tokenize(str(prompt or ""))


def seed_of(tokens: list[str]) -> int:
    return zlib.crc32(" ".join(tokens[-64:]).encode())


def natural_length(seed: int) -> int:
    """How long a reply runs when nothing stops it earlier (no ignore_eos)."""
    return 16 + seed % 240


def word(seed: int, i: int) -> str:
    return VOCAB[(seed + i) % len(VOCAB)]
