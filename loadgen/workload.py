"""Request bodies: fixed-length prompts and outputs, and the agent conversation pattern."""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass
from typing import Any

import orjson

# Short, common words: one token each for the emulators, and mostly one for BPE
# tokenizers. The server's own count (`usage.prompt_tokens`) is what gets reported.
_WORDS = (
    "time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child",
    "world", "school", "state", "family", "student", "group", "country", "problem", "hand",
    "part", "place", "case", "week", "company", "system", "program", "question", "work",
    "number", "night", "point", "home", "water", "room", "mother", "area", "money", "story",
)
CHAT_TEMPLATE_TOKENS = 5
RUN_NONCE = os.urandom(4).hex()  # differs per process: prompts never repeat across runs
_COUNTER = itertools.count()  # what a chat template adds around one user message (approximate)


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(0, n)))


@dataclass(frozen=True)
class Span:
    """A size drawn per request, uniformly from low..high inclusive ("500" or "50-500")."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> Span:
        low, _, high = text.partition("-")
        try:
            span = cls(int(low), int(high or low))
        except ValueError:
            raise ValueError(f"not a size or a range A-B: {text!r}") from None
        if span.low < 0 or span.high < span.low:
            raise ValueError(f"a range must be 0 <= A <= B: {text!r}")
        return span

    def draw(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True)
class Workload:
    endpoint: str  # "chat" | "completions"
    model: str
    input_len: int
    output_len: int
    ignore_eos: bool = True
    tokenizer: str | None = None  # counts the output of streams without usage (a path)
    prompts: tuple[str, ...] = ()  # given prompts, sent in order (--prompts); else made

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    def prompt(self, rng: random.Random) -> str:
        """A prompt of about input_len tokens whose first word is unique to this request
        and this process, so no prefix cache serves it from an earlier request or an
        earlier run (the rest of the prompt follows the seeded `rng`). Given `prompts`
        are sent in order instead (from the start again when all were sent)."""
        if self.prompts:
            return self.prompts[next(_COUNTER) % len(self.prompts)]
        n = self.input_len - (CHAT_TEMPLATE_TOKENS if self.endpoint == "chat" else 0)
        return f"r{RUN_NONCE}x{next(_COUNTER)} " + words(n - 1, rng)

    def body(self, rng: random.Random) -> bytes:
        return self.body_for(self.prompt(rng), None)

    def body_for(self, prompt: str | None, messages: list[dict[str, str]] | None,
                 max_tokens: int | None = None) -> bytes:
        request: dict[str, Any] = {
            "model": self.model, "stream": True, "max_tokens": max_tokens or self.output_len,
            "stream_options": {"include_usage": True}, "temperature": 0,
        }
        if self.ignore_eos:
            request["ignore_eos"] = True
        if self.endpoint == "chat":
            request["messages"] = messages or [{"role": "user", "content": prompt or ""}]
        else:
            request["prompt"] = prompt
        return orjson.dumps(request)


@dataclass
class Conversation:
    """A coding agent's session: a stable shared prefix, then turns that grow."""

    session_id: str
    messages: list[dict[str, str]]
    turn: int = 0

    @classmethod
    def start(cls, index: int, shared_prefix: str) -> Conversation:
        return cls(f"agent-{index:04d}", [{"role": "system", "content": shared_prefix}])

    def ask(self, text: str) -> list[dict[str, str]]:
        self.messages.append({"role": "user", "content": text})
        return self.messages

    def answered(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})
        self.turn += 1


def read_prompts(path: str) -> tuple[str, ...]:
    """Prompts from a JSON-lines file, one `{"prompt": "..."}` per line (the format of
    `vllm bench serve --dataset-name custom`)."""
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc})") from exc
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
                raise ValueError(f'{path}:{number}: expected {{"prompt": "..."}}')
            prompts.append(entry["prompt"])
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return tuple(prompts)
