"""Emulated llama.cpp `llama-server` (the tools/server layout of late 2025).

- A fixed number of slots; requests beyond them are deferred in an unbounded queue.
- `/health` answers 503 `Loading model` during the start-up delay, as does every route.
- `/props` (`total_slots`, `n_ctx`), `/slots`, `/metrics` with `llamacpp:` names.
- Streams: the role rides on the first token's chunk; the last chunk carries
  `finish_reason` and `timings`; a usage chunk (with the timings) only when asked; [DONE].
- Per-slot prompt cache: `timings.cache_n` counts the prompt tokens it covered.
- The `model` field is ignored and echoed, as in single-model mode.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from emulator.cache import SlotCache
from emulator.engine import Sequence
from emulator.server import DONE, EmulatedServer, HttpError, Job, Options, reply_tokens, sse


class LlamaCppServer(EmulatedServer):
    headers_before_first_token = False
    admits_within_budget = False

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self.slots = SlotCache(options.max_running)
        self.prompt_tokens_total = 0
        self.prompt_cached_total = 0
        self.predicted_total = 0
        self.prompt_seconds_total = 0.0
        self.predicted_seconds_total = 0.0
        self.n_decode_total = 0

    # -- engine hooks
    def on_admit(self, seq: Sequence) -> None:
        seq.slot, seq.cached = self.slots.acquire(seq.prompt)

    def on_finish(self, seq: Sequence) -> None:
        if seq.slot is None:
            return
        self.slots.release(seq.slot, [*seq.prompt, *reply_tokens(seq)])
        seq.slot = None
        self.prompt_tokens_total += seq.prefill_tokens
        self.prompt_cached_total += seq.cached
        self.predicted_total += seq.produced
        if seq.admitted_at and seq.first_token_at:
            self.prompt_seconds_total += seq.first_token_at - seq.admitted_at
            if seq.finished_at:
                self.predicted_seconds_total += seq.finished_at - seq.first_token_at

    # -- wire format
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self.ready() and scope["method"] != "OPTIONS":
            body = orjson.dumps({"error": {"message": "Loading model",
                                           "type": "unavailable_error", "code": 503}})
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        await super().__call__(scope, receive, send)

    def error_body(self, error: HttpError) -> bytes:
        return orjson.dumps({"error": {"code": error.status, "message": error.message,
                                       "type": error.kind}})

    def check_model(self, model: str | None) -> None:
        return None  # single-model mode: any name is accepted and echoed

    async def get(self, path: str, query: str) -> tuple[int, bytes, bytes]:
        if path in ("/health", "/v1/health"):
            return 200, b'{"status":"ok"}', b"application/json"
        if path in ("/v1/models", "/models"):
            return 200, orjson.dumps({"object": "list", "data": [{
                "id": self.options.model, "object": "model", "created": self.created,
                "owned_by": "llamacpp", "meta": {"n_ctx_train": self.options.ctx}}]}), JSON
        if path == "/props":
            return 200, orjson.dumps({
                "total_slots": self.options.max_running,
                "model_alias": self.options.model,
                "model_path": f"/models/{self.options.model}.gguf",
                "default_generation_settings": {"n_ctx": self.options.ctx},
                "endpoint_slots": True, "endpoint_metrics": True,
                "build_info": "sluiceway-emulator",
            }), JSON
        if path == "/slots":
            if "fail_on_no_slot=1" in query and all(self.slots.busy):
                raise HttpError(503, "no slot available", "unavailable_error")
            return 200, orjson.dumps(self._slots()), JSON
        if path == "/metrics":
            return 200, self._metrics().encode(), b"text/plain; version=0.0.4"
        raise HttpError(404, "File Not Found", "not_found_error")

    def _slots(self) -> list[dict[str, Any]]:
        by_slot = {s.slot: s for s in self.engine.running if s.slot is not None}
        out = []
        for i in range(self.options.max_running):
            seq = by_slot.get(i)
            out.append({
                "id": i, "id_task": -1 if seq is None else id(seq) % 100000,
                "n_ctx": self.options.ctx, "speculative": False,
                "is_processing": seq is not None,
                "next_token": {"has_next_token": seq is not None,
                               "n_remain": 0 if seq is None else seq.max_tokens - seq.produced,
                               "n_decoded": 0 if seq is None else seq.produced},
            })
        return out

    def _metrics(self) -> str:
        rows = [
            ("prompt_tokens_total", "counter", self.prompt_tokens_total),
            ("prompt_seconds_total", "counter", self.prompt_seconds_total),
            ("tokens_predicted_total", "counter", self.predicted_total),
            ("tokens_predicted_seconds_total", "counter", self.predicted_seconds_total),
            ("n_decode_total", "counter", self.engine.steps),
            ("prompt_tokens_cached_total", "counter", self.prompt_cached_total),
            ("requests_processing", "gauge", len(self.engine.running)),
            ("requests_deferred", "gauge", len(self.engine.waiting)),
        ]
        lines = []
        for name, kind, value in rows:
            lines += [f"# HELP llamacpp:{name} {name.replace('_', ' ')}",
                      f"# TYPE llamacpp:{name} {kind}", f"llamacpp:{name} {value}"]
        return "\n".join(lines) + "\n"

    def _timings(self, job: Job) -> dict[str, Any]:
        seq = job.seq
        end = seq.finished_at or time.monotonic()
        prompt_ms = ((seq.first_token_at or end) - (seq.admitted_at or end)) * 1000
        predicted_ms = (end - (seq.first_token_at or end)) * 1000
        n = max(seq.produced - 1, 0)
        return {
            "cache_n": seq.cached,
            "prompt_n": seq.prefill_tokens,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / seq.prefill_tokens,
            "prompt_per_second": seq.prefill_tokens / (prompt_ms / 1000) if prompt_ms else 0.0,
            "predicted_n": seq.produced,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / n if n else 0.0,
            "predicted_per_second": n / (predicted_ms / 1000) if predicted_ms else 0.0,
        }

    def _usage(self, job: Job) -> dict[str, Any]:
        prompt = len(job.seq.prompt)
        return {"completion_tokens": job.seq.produced, "prompt_tokens": prompt,
                "total_tokens": prompt + job.seq.produced,
                "prompt_tokens_details": {"cached_tokens": job.seq.cached}}

    def _chunk(self, job: Job, choice: dict[str, Any], **extra: Any) -> bytes:
        return sse({"choices": [choice], "created": job.created, "id": f"chatcmpl-{job.id}",
                    "model": job.model, "system_fingerprint": "b0-emulated",
                    "object": "chat.completion.chunk" if job.chat else "text_completion",
                    **extra})

    def first_events(self, job: Job) -> list[bytes]:
        if not job.chat:
            return []
        return [self._chunk(job, {"finish_reason": None, "index": 0,
                                  "delta": {"role": "assistant", "content": None}})]

    def token_event(self, job: Job, index: int, last: bool) -> bytes:
        text = job.text(index, index + 1)
        choice = ({"finish_reason": None, "index": 0, "delta": {"content": text}} if job.chat
                  else {"text": text, "index": 0, "logprobs": None, "finish_reason": None})
        return self._chunk(job, choice)

    def final_events(self, job: Job) -> list[bytes]:
        reason = job.finish_reason
        choice = ({"finish_reason": reason, "index": 0, "delta": {}} if job.chat
                  else {"text": "", "index": 0, "logprobs": None, "finish_reason": reason})
        timings = self._timings(job)
        if not job.include_usage:
            return [self._chunk(job, choice, timings=timings), DONE]
        usage = sse({"choices": [], "created": job.created, "id": f"chatcmpl-{job.id}",
                     "model": job.model, "object": "chat.completion.chunk",
                     "usage": self._usage(job), "timings": timings})
        return [self._chunk(job, choice), usage, DONE]

    def whole(self, job: Job) -> dict[str, Any]:
        text = job.text(0, job.seq.produced)
        choice = ({"finish_reason": job.finish_reason, "index": 0,
                   "message": {"role": "assistant", "content": text}} if job.chat
                  else {"text": text, "index": 0, "logprobs": None,
                        "finish_reason": job.finish_reason})
        return {"choices": [choice], "created": job.created, "id": f"chatcmpl-{job.id}",
                "model": job.model, "object": "chat.completion" if job.chat
                else "text_completion", "usage": self._usage(job),
                "timings": self._timings(job)}


JSON = b"application/json"
