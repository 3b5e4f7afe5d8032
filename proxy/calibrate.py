"""Calibration: one short measured request to each backend before it takes traffic.

A proxy that has just started knows nothing about its backends' speed, and the first
decisions are the ones a user counts (a deploy, a restart, the first run of a sweep). The
engine-kind shapes (policies/priors.py) say how a curve bends, not how fast this
deployment of this model is: on the real CPU pool of the tests, vLLM streams 6x faster
than llama-server, and a fresh proxy that only had the shapes sent llama-server one or two
requests per level before anything came back (0.55-0.60x the best single engine over
whole runs at 2-8 concurrent). Measuring is cheaper than guessing: each backend, when it
is first seen healthy and idle with nothing learned, gets one streamed chat request of
`calibrate_tokens` output tokens behind a prompt of about PROMPT_WORDS words, unique to
the run so no prefix cache serves it. Its result is learned exactly as a routed request's
(the slot is taken and freed through the pool; TTFT, per-stream decode rate at one stream,
prefill speed), so `adaptive` starts from this machine's single-stream rates and prefill
speeds instead of a guess. A second probe, with a prompt twenty times as long (LONG_WORDS
words, or half the backend's context if that is less) and a two-token reply, measures the
prefill speed as the slope between the two TTFTs (BackendStats.calibrate_prefill): one
short probe's bytes / TTFT is mostly fixed overhead on a fast prefiller, and a fresh proxy
took vLLM for 1.3-3.9x as fast as llama.cpp at prefill where the profiles say 7.2x.

Backends are calibrated one at a time, in config order, so on a machine they share (the
tests' CPU pool) one probe's timing is not another's contention. At start-up the gateway
waits for the first round (bounded by `timeout_s` per backend) before it serves, and
later rounds follow the health probes, for a backend that was down or loading at start.
A probe that fails teaches nothing and is tried again in a later round; a request counts
as calibrated once it has been answered (or once the backend learned from real traffic).
Probes are not client requests: they appear in the log, not in the request metrics.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from time import perf_counter

import orjson

from backends.config import EngineKind
from backends.pool import Pool
from backends.snapshot import Health
from backends.state import BackendState
from backends.stats import RequestResult
from proxy.admission import Admission
from proxy.attempt import Attempt
from proxy.errors import ProxyError
from proxy.sse import StreamObserver
from proxy.upstream import Upstream

log = logging.getLogger("sluiceway.calibrate")

TIMEOUT_S = 30.0  # a probe that takes longer is abandoned (it delays start-up at most this)
PROMPT_WORDS = 200  # enough prefill (>= 64 tokens) for its time to mean something
LONG_WORDS = 4000  # the second probe's prompt, context permitting: the prefill slope
LONG_TOKENS = 2  # only its first token is timed
WORDS = ("river", "stone", "lamp", "orbit", "cedar", "violet", "harbor", "signal",
         "meadow", "copper", "lantern", "quartz", "falcon", "ember", "tundra", "willow")


def probe_body(model: str, kind: EngineKind, tokens: int, nonce: str,
               words_n: int = PROMPT_WORDS) -> bytes:
    words = " ".join(WORDS[(i * 7 + len(nonce)) % len(WORDS)] for i in range(words_n))
    payload: dict[str, object] = {
        "model": model,
        "stream": True,
        "max_tokens": tokens,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"{nonce} {words}. Continue the list."}],
    }
    if kind is not EngineKind.OPENAI:  # llama.cpp and vLLM take it; a strict API may not
        payload["ignore_eos"] = True  # so a real model does not stop after a few tokens
    return orjson.dumps(payload)


class Calibrator:
    def __init__(self, pool: Pool, slots: Admission, upstream: Upstream, tokens: int) -> None:
        self._pool = pool
        self._slots = slots
        self._upstream = upstream
        self.tokens = tokens  # a reload may change it; 0 turns calibration off
        self._nonce = secrets.token_hex(6)

    def due(self, state: BackendState) -> bool:
        """Not yet measured (by a probe or by traffic), up, idle, and not being removed."""
        return (self.tokens > 0 and not state.stats.curve.samples and not state.removing
                and state.health is Health.HEALTHY and state.in_flight == 0
                and state.served_model is not None)

    async def round(self) -> None:
        """Calibrate every backend that is due, one at a time, each within TIMEOUT_S."""
        for state in list(self._pool):  # the pool may change while a probe runs
            if self.due(state):
                try:
                    async with asyncio.timeout(TIMEOUT_S):
                        await self.calibrate(state)
                except TimeoutError:
                    log.warning("calibrating backend %s: no answer within %g s",
                                state.name, TIMEOUT_S)

    async def calibrate(self, state: BackendState) -> None:
        name, model = state.name, state.served_model
        assert model is not None
        body = probe_body(model, state.config.kind, self.tokens, self._nonce)
        attempt = await self._probe(state, body, learn=True, what="calibrating")
        if attempt is None:
            return
        log.info("calibrated backend %s: TTFT %.3f s for %d prompt tokens, %.1f tok/s from "
                 "one stream", name, attempt.ttft_s or 0.0, attempt.prompt_tokens,
                 (attempt.output_tokens - 1) / (attempt.decode_s or 1.0))
        words = long_words(state.discovered.max_model_len, attempt.prompt_tokens)
        if words is None or attempt.ttft_s is None:
            return  # too small a context to measure a slope in: bytes / TTFT it is
        longer = probe_body(model, state.config.kind, LONG_TOKENS, self._nonce + "-long",
                            words)
        second = await self._probe(state, longer, learn=False,
                                   what="the long-prompt probe of")
        if second is None or second.ttft_s is None:
            return
        if state.stats.calibrate_prefill((len(body), attempt.ttft_s),
                                         (len(longer), second.ttft_s)):
            log.info("calibrated backend %s: prefill %.0f body bytes/s, %.4f s of TTFT "
                     "besides prefill (TTFT %.3f s for %d prompt tokens)", name,
                     state.stats.prefill_chars_per_s.value or 0.0,
                     state.stats.prefill_overhead_s or 0.0, second.ttft_s,
                     second.prompt_tokens)

    async def _probe(self, state: BackendState, body: bytes, learn: bool,
                     what: str) -> Attempt | None:
        """Send one probe through a slot of `state`; the answered attempt, or None (logged
        as `what` backend NAME failed). With `learn`, the backend learns from it as from a
        routed request; without, nothing."""
        name = state.name
        headers = {"content-type": "application/json"}
        if state.upstream_key:
            headers["authorization"] = f"Bearer {state.upstream_key}"
        slot = await self._slots.hold(name)
        if slot is None:
            return None  # full (other replicas' traffic): it is measured by that traffic
        attempt = Attempt(name, self._pool.load_area(name), len(body))
        observer = StreamObserver(strip_usage=False)
        problem = ""

        def sink(data: bytes) -> None:
            observer.feed(data, perf_counter())

        try:
            resp = await self._upstream.post(name, state.config.base_url
                                             + "/v1/chat/completions", body, headers)
            try:
                if resp.status == 200:
                    sink(resp.first_chunk())
                    if not resp.complete:
                        sink(await resp.relay(sink))
                else:
                    problem = f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
            except BaseException:
                resp.close()
                raise
            resp.release()
        except ProxyError as exc:
            problem = exc.message
        finally:
            attempt.read_stream(observer)
            # a decode rate needs two tokens; the long probe needs only its first
            answered = (not problem and attempt.answered
                        and attempt.output_tokens > (1 if learn else 0))
            attempt.end("ok" if answered else "rejected")
            attempt.settle(self._pool.load_area(name))
            # a failed probe teaches nothing (nor counts for ejection); the next round
            # tries again
            result = attempt.result() if answered and learn else RequestResult("unmeasured")
            self._slots.release(slot, result)
        if not answered:
            log.warning("%s backend %s failed: %s%s", what, name,
                        problem or "the stream ended early",
                        "" if learn else " (its prefill speed stays the first probe's)")
            return None
        return attempt


def long_words(max_model_len: int | None, prompt_tokens: int) -> int | None:
    """Words for the second probe: LONG_WORDS, or as many as fill half the context (at
    the first probe's tokens per word); None when that is under twice the first probe's."""
    words = LONG_WORDS
    if max_model_len and prompt_tokens:
        words = min(words, int(max_model_len / 2 / (prompt_tokens / PROMPT_WORDS)))
    return words if words >= 2 * PROMPT_WORDS else None
