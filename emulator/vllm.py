"""Emulated vLLM OpenAI-compatible server (0.33-era behaviour).

- `--max-num-seqs` sequences run at once; the rest wait (`vllm:num_requests_waiting`).
- While starting it refuses connections (the CLI binds the port only after the delay).
- `/health` 200 with an empty body; `/v1/models` with `max_model_len`; an unknown model
  name gets 404 `NotFoundError` with `param: "model"`; an empty or missing name is accepted.
- Streams: headers at once, a role-only chunk at the first engine output, one chunk per
  token (the last carries `finish_reason`), a usage chunk only when asked, [DONE].
- Automatic prefix caching over 16-token blocks, across requests.
"""

from __future__ import annotations

from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from emulator.cache import BlockCache
from emulator.engine import Sequence
from emulator.server import DONE, EmulatedServer, HttpError, Job, Options, reply_tokens, sse

KV_BLOCKS = 65536  # KV cache capacity in 16-token blocks (about 1M tokens)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


class VllmServer(EmulatedServer):
    headers_before_first_token = True
    admits_within_budget = True

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self.prefix_cache = BlockCache(KV_BLOCKS)
        self.registry = CollectorRegistry(auto_describe=False)
        labels = {"model_name": options.model, "engine": "0"}
        names, values = list(labels), list(labels.values())
        r = self.registry
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.",
                                     names, registry=r).labels(*values)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.",
                                         names, registry=r).labels(*values)
        self.cache_queries = Counter("vllm:prefix_cache_queries", "Prefix cache queries, "
                                     "in tokens.", names, registry=r).labels(*values)
        self.cache_hits = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.",
                                  names, registry=r).labels(*values)
        self.success = Counter("vllm:request_success", "Finished requests.",
                               [*names, "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                              names, buckets=_TTFT_BUCKETS, registry=r).labels(*values)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end latency.",
                             names, buckets=_TTFT_BUCKETS, registry=r).labels(*values)
        r.register(_Gauges(self, labels))

    # -- engine hooks
    def on_admit(self, seq: Sequence) -> None:
        seq.cached = self.prefix_cache.lookup(seq.prompt)
        self.cache_queries.inc(len(seq.prompt))
        self.cache_hits.inc(seq.cached)

    def on_finish(self, seq: Sequence) -> None:
        self.prefix_cache.insert([*seq.prompt, *reply_tokens(seq)])
        self.prompt_tokens.inc(seq.prefill_tokens)
        self.generation_tokens.inc(seq.produced)
        if seq.first_token_at is not None:
            self.ttft.observe(seq.first_token_at - seq.arrived_at)
        if seq.finished_at is not None:
            self.e2e.observe(seq.finished_at - seq.arrived_at)
            reason = "length" if seq.produced >= seq.limit else "stop"
            self.success.labels(self.options.model, "0", reason).inc()
        else:
            self.success.labels(self.options.model, "0", "abort").inc()

    def kv_usage(self) -> float:
        used = sum(len(s.prompt) + s.produced for s in self.engine.running)
        return min(1.0, used / (KV_BLOCKS * self.prefix_cache.block_size))

    # -- wire format
    def error_body(self, error: HttpError) -> bytes:
        kinds = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}
        return orjson.dumps({"error": {"message": error.message,
                                       "type": kinds.get(error.status, error.kind),
                                       "param": error.param, "code": error.status}})

    def check_model(self, model: str | None) -> None:
        if model and model != self.options.model:
            raise HttpError(404, f"The model `{model}` does not exist.", "NotFoundError",
                            "model")

    async def get(self, path: str, query: str) -> tuple[int, bytes, bytes]:
        if path == "/health":
            return 200, b"", b"text/plain"
        if path == "/v1/models":
            return 200, orjson.dumps({"object": "list", "data": [{
                "id": self.options.model, "object": "model", "created": self.created,
                "owned_by": "vllm", "root": self.options.model, "parent": None,
                "max_model_len": self.options.ctx}]}), b"application/json"
        if path == "/metrics":
            return 200, generate_latest(self.registry), b"text/plain; version=0.0.4"
        if path == "/load":
            return 200, orjson.dumps({"server_load": len(self.engine.running)
                                      + len(self.engine.waiting)}), b"application/json"
        if path == "/version":
            return 200, b'{"version":"0.33.0-emulated"}', b"application/json"
        raise HttpError(404, "Not Found", "NotFoundError")

    def _chunk(self, job: Job, choice: dict[str, Any]) -> bytes:
        return sse({"id": f"chatcmpl-{job.id}" if job.chat else f"cmpl-{job.id}",
                    "object": "chat.completion.chunk" if job.chat else "text_completion",
                    "created": job.created, "model": job.model, "choices": [choice]})

    def first_events(self, job: Job) -> list[bytes]:
        if not job.chat:
            return []
        return [self._chunk(job, {"index": 0, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None})]

    def token_event(self, job: Job, index: int, last: bool) -> bytes:
        text = job.text(index, index + 1)
        reason = job.finish_reason if last else None
        if job.chat:
            return self._chunk(job, {"index": 0, "delta": {"content": text},
                                     "logprobs": None, "finish_reason": reason})
        return self._chunk(job, {"index": 0, "text": text, "logprobs": None,
                                 "finish_reason": reason})

    def final_events(self, job: Job) -> list[bytes]:
        if not job.include_usage:
            return [DONE]
        return [sse({"id": f"chatcmpl-{job.id}" if job.chat else f"cmpl-{job.id}",
                     "object": "chat.completion.chunk" if job.chat else "text_completion",
                     "created": job.created, "model": job.model, "choices": [],
                     "usage": self._usage(job)}), DONE]

    def _usage(self, job: Job) -> dict[str, Any]:
        prompt = len(job.seq.prompt)
        return {"prompt_tokens": prompt, "completion_tokens": job.seq.produced,
                "total_tokens": prompt + job.seq.produced}

    def whole(self, job: Job) -> dict[str, Any]:
        text = job.text(0, job.seq.produced)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "logprobs": None, "finish_reason": job.finish_reason} if job.chat
                  else {"index": 0, "text": text, "logprobs": None,
                        "finish_reason": job.finish_reason})
        return {"id": f"chatcmpl-{job.id}" if job.chat else f"cmpl-{job.id}",
                "object": "chat.completion" if job.chat else "text_completion",
                "created": job.created, "model": job.model, "choices": [choice],
                "usage": self._usage(job)}


class _Gauges(Collector):
    def __init__(self, server: VllmServer, labels: dict[str, str]) -> None:
        self._server = server
        self._labels = labels

    def collect(self) -> Any:
        names, values = list(self._labels), list(self._labels.values())
        engine = self._server.engine
        for name, doc, value in (
            ("vllm:num_requests_running", "Requests in the running batch.",
             len(engine.running)),
            ("vllm:num_requests_waiting", "Requests waiting to run.", len(engine.waiting)),
            ("vllm:kv_cache_usage_perc", "KV cache usage, 0-1.", self._server.kv_usage()),
        ):
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            yield family
