"""Forwarding one client request: admission, attempts across backends, streaming.

Before any byte reaches the client, a connection failure, a 5xx or a 429 sends the request
to another backend (at most `max_attempts` tries, never the same backend twice). After
that, an upstream failure ends the stream with an SSE error event. Streaming responses are
not committed to the client until the first body bytes arrive from the upstream, so a
backend that dies during prefill is still retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import replace
from time import perf_counter
from typing import Any

from backends.outlier import Fault
from backends.pool import Pool
from backends.snapshot import Health
from proxy.admission import Admission, Slot
from proxy.attempt import Attempt
from proxy.clamp import fitted_max_tokens
from proxy.errors import ProxyError
from proxy.keepalive import error_event, keepalive_event
from proxy.metrics import Metrics
from proxy.request import ClientRequest
from proxy.server import Headers, Reply
from proxy.sse import CHAT, StreamObserver, might_hold_usage, token_counts, usage_in
from proxy.translate import CHAT_PATH, TRANSLATIONS, Reshaper, Translation
from proxy.upstream import Upstream, UpstreamResponse, status_error

_STREAM_HEADERS: Headers = (
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)


class Forwarder:
    def __init__(
        self,
        pool: Pool,
        admission: Admission,
        upstream: Upstream,
        metrics: Metrics,
        max_attempts: int,
        clamp_max_tokens: bool = True,
        keepalive_s: float = 0.0,
    ) -> None:
        self._pool = pool
        self._admission = admission
        self._upstream = upstream
        self._metrics = metrics
        self.max_attempts = max_attempts  # a reload may change it
        self.clamp_max_tokens = clamp_max_tokens
        self.keepalive_s = keepalive_s  # 0: streams are held until the first upstream byte

    async def forward(self, request: ClientRequest, reply: Reply, attempts: list[Attempt]) -> None:
        """Serve the request, appending each try to `attempts` (the last one answered).

        Raises ProxyError when the client has not been answered and must get an error.
        """
        last_error: ProxyError | None = None
        for _ in range(self.max_attempts):
            route = request.route
            if attempts:
                route = replace(route, exclude=frozenset(a.backend for a in attempts))
            queued_at = perf_counter()
            try:
                slot = await self._admission.admit(route)
            except ProxyError:
                if last_error is not None:
                    raise last_error from None  # what the backends said beats "none left"
                raise
            name = slot.backend
            self._metrics.queue_wait.observe(perf_counter() - queued_at)
            self._metrics.decisions.labels(name, self._admission.policy_name).inc()
            attempt = Attempt(name, self._pool.load_area(name), route.prompt_chars,
                              slot.backlog)
            attempts.append(attempt)
            try:
                await self._try(request, attempt, reply)
                return
            except ProxyError as exc:
                attempt.end(exc.outcome, exc.fault)
                attempt.status = exc.status
                if exc.backend_down:
                    self._pool.set_health(name, Health.DOWN, exc.message)
                if not exc.retryable or attempt.started:
                    raise
                self._metrics.retries.labels(name).inc()
                last_error = exc
            except asyncio.CancelledError:
                attempt.end("ok" if attempt.answered else "client_closed")
                raise
            finally:
                self._finish(request, attempt, slot)
        assert last_error is not None
        raise last_error

    def _finish(self, request: ClientRequest, attempt: Attempt, slot: Slot) -> None:
        if attempt.ended_at is None:
            attempt.end(attempt.outcome)
        attempt.settle(self._pool.load_area(attempt.backend))
        self._admission.release(slot, attempt.result(), attempt.backlog)
        m, name = self._metrics, attempt.backend
        m.requests.labels(name, request.endpoint.name, attempt.outcome).inc()
        m.duration.labels(name).observe(attempt.duration_s)
        if attempt.ttft_s is not None:
            m.ttft.labels(name).observe(attempt.ttft_s)
        if attempt.prompt_tokens:
            m.prompt_tokens.labels(name).inc(attempt.prompt_tokens)
        if attempt.output_tokens:
            m.output_tokens.labels(name).inc(attempt.output_tokens)
            if attempt.estimated:
                m.estimated_tokens.labels(name).inc(attempt.output_tokens)
            decode_s = attempt.decode_s
            if decode_s is not None and attempt.output_tokens > 1:
                m.tpot.labels(name).observe(decode_s / (attempt.output_tokens - 1))

    async def _try(self, request: ClientRequest, attempt: Attempt, reply: Reply) -> None:
        state = self._pool[attempt.backend]
        fitted = fitted_max_tokens(
            request.route.max_tokens, len(request.raw), state.discovered.max_model_len,
            state.stats.tokens_per_byte.value) if self.clamp_max_tokens else None
        if fitted is not None:
            self._metrics.clamped.labels(attempt.backend).inc()
        translation = None if state.config.serves(request.endpoint.name) \
            else TRANSLATIONS.get(request.endpoint.name)
        if translation is None:
            path, body = request.endpoint.path, request.body_for(state.served_model, fitted)
        else:
            self._metrics.translated.labels(attempt.backend, translation.api).inc()
            path = CHAT_PATH
            body = translation.body(request.payload, state.served_model or request.route.model,
                                    fitted)
        post = self._upstream.post(
            attempt.backend, state.config.base_url + path, body,
            request.headers_for(state.upstream_key), stream=request.stream,
        )
        if not (request.stream and self.keepalive_s > 0):
            resp = await post
        else:
            try:
                resp = await self._first_bytes_kept_alive(post, request, attempt, reply)
            except ProxyError as exc:
                if not attempt.started:
                    raise
                self._end_in_band(request, attempt, reply, exc)
                return
        # the first bytes (a stream's first event, or the whole reply): prefill is done
        self._pool.prefilled(attempt.backend, attempt.backlog)
        attempt.backlog = 0.0
        try:
            if attempt.started and resp.status != 200:  # headers went out early: in-band
                late = status_error(attempt.backend, resp.status, await resp.read(),
                                    resp.retry_after)
                resp.release()
                self._end_in_band(request, attempt, reply, late)
                return
            if resp.status >= 500 or resp.status == 429:
                raise status_error(attempt.backend, resp.status, await resp.read(),
                                   resp.retry_after)
            if request.stream and resp.status == 200:
                await self._stream(request, attempt, resp, reply, translation)
            else:
                await self._whole(request, attempt, resp, reply, translation)
        except BaseException:
            resp.close()
            raise
        resp.release()

    async def _first_bytes_kept_alive(
        self, post: Coroutine[Any, Any, UpstreamResponse], request: ClientRequest,
        attempt: Attempt, reply: Reply,
    ) -> UpstreamResponse:
        """Wait for the backend's first bytes; past `keepalive_s` of silence, commit the
        stream and send a keep-alive event every `keepalive_s` (proxy/keepalive.py)."""
        task = asyncio.ensure_future(post)
        try:
            while True:
                done, _ = await asyncio.wait((task,), timeout=self.keepalive_s)
                if done:
                    return task.result()
                if not attempt.started:
                    self._commit(request, attempt, reply, "text/event-stream")
                reply.write(keepalive_event(request.endpoint.name))
        except BaseException:
            task.cancel()
            raise

    def _end_in_band(self, request: ClientRequest, attempt: Attempt, reply: Reply,
                     error: ProxyError) -> None:
        """A failure after the headers went out early: an error event ends the stream."""
        attempt.end(error.outcome, error.fault)
        reply.end(error_event(request.endpoint.name, error))

    def _commit(self, request: ClientRequest, attempt: Attempt, reply: Reply,
                content_type: str) -> None:
        """Send the stream's status and headers: from here on, no retry."""
        attempt.status = 200
        attempt.started = True
        reply.start(200, (*self._headers(request, attempt, content_type), *_STREAM_HEADERS))

    def _headers(self, request: ClientRequest, attempt: Attempt, content_type: str) -> Headers:
        return (
            (b"content-type", content_type.encode("latin-1")),
            (b"x-sluiceway-backend", attempt.backend.encode()),
            (b"x-request-id", request.request_id.encode("latin-1")),
        )

    async def _whole(
        self, request: ClientRequest, attempt: Attempt, resp: UpstreamResponse, reply: Reply,
        translation: Translation | None,
    ) -> None:
        body = await resp.read()
        if resp.status == 200 and might_hold_usage(body):
            attempt.tokens(*token_counts(usage_in(body)))
        attempt.status = resp.status
        attempt.started = True
        attempt.whole = True
        content_type = resp.content_type
        if translation is not None:
            body = translation.whole(resp.status, body, request.route.model)
            content_type = "application/json"
        reply.respond(resp.status, body, self._headers(request, attempt, content_type))
        attempt.end("ok" if resp.status < 400 else "rejected")

    async def _stream(
        self, request: ClientRequest, attempt: Attempt, resp: UpstreamResponse, reply: Reply,
        translation: Translation | None,
    ) -> None:
        """Relay an SSE stream. The first bytes are awaited (a backend failing before them
        can still be retried); the rest is written to the client from the upstream socket's
        own callback, one write per socket read, with reading paused while the client's
        socket is full. The bytes that come with the end of the upstream body leave with
        the end of the reply, in one write."""
        if translation is None:
            observer = StreamObserver(request.strip_usage, request.endpoint.content)
            reshape: Reshaper = _AS_IS
        else:  # the upstream speaks Chat; the client hears its own API
            observer = StreamObserver(False, CHAT)
            reshape = translation.reshaper(request.route.model)
        first = resp.first_chunk()
        if not attempt.started:  # else committed early, with keep-alives
            self._commit(request, attempt, reply,
                         resp.content_type if translation is None else "text/event-stream")

        def relay(data: bytes) -> None:
            out = reshape.feed(observer.feed(data, perf_counter()))
            if out:
                reply.write(out)
                if reply.paused:
                    resp.pause_reading()

        outcome, fault = "ok", Fault.NONE
        reply.on_resume(resp.resume_reading)
        try:
            last = first
            if not resp.complete:
                relay(first)
                last = await resp.relay(relay)
            tail = reshape.feed((observer.feed(last, perf_counter()) if last else b"")
                                + observer.flush()) + reshape.finish()
        except ProxyError as exc:  # the upstream failed mid-stream: tell the client in-band
            outcome, fault = exc.outcome, exc.fault
            if translation is None:
                lead = b"\n\n" if observer.mid_event else b""
                tail = observer.complete_events() + lead \
                    + error_event(request.endpoint.name, exc)
            else:
                tail = reshape.feed(observer.complete_events()) \
                    + reshape.error(exc.body(request.endpoint.anthropic))
        finally:
            # also when the client leaves: what passed is counted, and a client that has
            # the stream's last event (the openai SDK and Codex close right after it,
            # before the upstream's end of body) was answered in full
            reply.on_resume(None)
            attempt.read_stream(observer)
        attempt.end(outcome, fault)
        reply.end(tail)



class _AsIs:
    """No translation: the bytes pass as they are."""

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def finish(self) -> bytes:
        return b""

    def error(self, body: bytes) -> bytes:
        return body


_AS_IS = _AsIs()
