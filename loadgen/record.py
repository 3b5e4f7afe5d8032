"""What one request measured, with the same definitions as `vllm bench serve`.

t0 is taken right before the request is sent (after the concurrency slot is acquired).
TTFT fires on the first SSE `data:` message whose `choices` is non-empty (a role-only
chunk counts, as in vLLM); ITL is one gap per such message; E2EL ends at the last such
message (the usage chunk and [DONE] do not extend it). First byte and first content are
kept apart as well, because servers differ in what their first chunk carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Failure:
    """Failure classes, counted per target and per backend."""

    HTTP = "http_status"  # a non-200 answer (the status is kept)
    CONNECT = "connect_error"  # could not connect or send
    TIMEOUT_FIRST = "timeout_before_first_token"
    TIMEOUT_STREAM = "timeout_mid_stream"
    CUT = "stream_cut"  # the stream ended early, or an error event arrived mid-way
    PAYLOAD = "bad_payload"  # 200 but no usable chunk / JSON


@dataclass(slots=True)
class RequestRecord:
    arrival: float  # when the request was due (open loop) or created (closed loop)
    t0: float = 0.0
    first_byte: float | None = None
    first_choice: float | None = None  # vLLM's TTFT event
    first_content: float | None = None  # first non-empty generated text
    last_choice: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False  # no usage came: output_tokens counted another way
    resent: int = 0  # sent again after a stale keep-alive connection failed before any reply
    status: int = 0
    backend: str | None = None
    error: str | None = None  # a Failure class; None when successful
    detail: str = ""
    turn: int = 0  # agent workload: which turn of its conversation
    text: list[str] | None = None  # generated text, collected only when asked for

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return None if self.first_choice is None else self.first_choice - self.t0

    @property
    def e2el(self) -> float | None:
        return None if self.last_choice is None else self.last_choice - self.t0

    @property
    def tpot(self) -> float | None:
        if self.output_tokens > 1 and self.e2el is not None and self.ttft is not None:
            return (self.e2el - self.ttft) / (self.output_tokens - 1)
        return None

    @property
    def queue_time(self) -> float:
        return self.t0 - self.arrival
