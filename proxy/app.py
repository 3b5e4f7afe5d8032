"""The ASGI application: lifespan, dispatch, authentication and the access log.

Raw ASGI rather than a framework: the forwarded routes are the hot path, and the few
other routes are small enough not to need one.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
from time import perf_counter
from typing import Any

import orjson

from proxy import routes
from proxy.asgi import (
    ClientGone,
    Receive,
    Scope,
    Send,
    header,
    read_body,
    respond,
    respond_error,
    respond_json,
)
from proxy.attempt import Attempt
from proxy.errors import (
    ProxyError,
    method_not_allowed,
    not_found,
    unauthorized,
    unknown_model,
)
from proxy.gateway import Gateway
from proxy.metrics import CONTENT_TYPE
from proxy.request import ROUTED, Endpoint, parse
from proxy.settings import Settings

access_log = logging.getLogger("sluiceway.access")

_OWN_GET_ROUTES = frozenset({"/v1/models", "/health", "/ready", "/metrics", "/admin/backends"})
_PUBLIC = frozenset({"/health", "/ready", "/metrics"})


class App:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._keys = tuple(k.encode() for k in settings.server.api_keys)
        self._body_limit = int(settings.server.max_body_mb * 1024 * 1024)
        self._gateway: Gateway | None = None
        self._id_prefix = os.urandom(6).hex()  # request ids: unique per app and request,
        self._id_counter = itertools.count()  # without uuid4's os.urandom on every call

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter):010x}"

    @property
    def gateway(self) -> Gateway:
        if self._gateway is None:
            raise RuntimeError("the app has not started (lifespan startup did not run)")
        return self._gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            self._gateway = await Gateway.start(self.settings)
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self.gateway.stop()
        await send({"type": "lifespan.shutdown.complete"})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        request_id = (header(scope, b"x-request-id") or b"").decode("latin-1") or self._new_id()
        id_header = [(b"x-request-id", request_id.encode("latin-1"))]
        endpoint = ROUTED.get(path)
        anthropic = endpoint is not None and endpoint.anthropic
        try:
            if path not in _PUBLIC and not self._authorized(scope):
                raise unauthorized()
            if endpoint is not None:
                if method != "POST":
                    raise method_not_allowed(method, path)
                await self._forward(scope, receive, send, endpoint, request_id)
            elif path in _OWN_GET_ROUTES:
                if method not in ("GET", "HEAD"):
                    raise method_not_allowed(method, path)
                await self._own_route(path, send, id_header)
            else:
                raise not_found(path)
        except ProxyError as exc:
            await respond_error(send, exc, id_header, anthropic)

    def _authorized(self, scope: Scope) -> bool:
        if not self._keys:
            return True
        presented = header(scope, b"x-api-key")
        auth = header(scope, b"authorization")
        if auth is not None:
            presented = auth[7:].strip() if auth[:7].lower() == b"bearer " else auth.strip()
        if not presented:
            return False
        return any(hmac.compare_digest(presented, key) for key in self._keys)

    async def _own_route(self, path: str, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
        gw = self.gateway
        if path == "/health":
            await respond_json(send, 200, b'{"status":"ok"}', headers)
        elif path == "/ready":
            status, body = routes.ready(gw.pool)
            await respond_json(send, status, body, headers)
        elif path == "/metrics":
            await respond(send, 200, gw.metrics.render(),
                          [(b"content-type", CONTENT_TYPE.encode()), *headers])
        elif path == "/v1/models":
            await respond_json(send, 200, routes.models(gw.pool), headers)
        else:
            body = routes.admin_backends(gw.pool, gw.policy.name, gw.admission.depth)
            await respond_json(send, 200, body, headers)

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, endpoint: Endpoint, request_id: str
    ) -> None:
        gw = self.gateway
        started = perf_counter()
        try:
            raw = await read_body(scope, receive, self._body_limit)
            request = parse(endpoint, raw, scope["headers"], request_id)
            if not gw.pool.knows_model(request.route.model):
                raise unknown_model(request.route.model)
        except ClientGone:
            return
        except ProxyError as exc:  # bad input: answered by the caller, counted and logged here
            gw.metrics.requests.labels("none", endpoint.name, exc.outcome).inc()
            self._log(request_id, endpoint, None, exc.status, exc.message, [], started)
            raise
        task = asyncio.current_task()
        assert task is not None
        gone = asyncio.Event()
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, task, gone))
        attempts: list[Attempt] = []
        status, error = 0, ""
        try:
            await gw.forwarder.forward(request, send, attempts)
            status = attempts[-1].status
        except ProxyError as exc:
            status, error = exc.status, exc.message
            if not attempts:  # refused before any backend was tried
                gw.metrics.requests.labels("none", endpoint.name, exc.outcome).inc()
            await respond_error(
                send, exc, [(b"x-request-id", request_id.encode("latin-1"))], endpoint.anthropic
            )
        except asyncio.CancelledError:
            if not gone.is_set():
                raise
            task.uncancel()
            status, error = 499, "client closed the connection"
        finally:
            watcher.cancel()
        self._log(request_id, endpoint, request.route.model, status, error, attempts, started)

    def _log(
        self, request_id: str, endpoint: Endpoint, model: str | None, status: int, error: str,
        attempts: list[Attempt], started: float,
    ) -> None:
        if self.settings.server.access_log:
            _log(request_id, endpoint, model, status, error, attempts, started)


async def _cancel_on_disconnect(
    receive: Receive, task: asyncio.Task[Any], gone: asyncio.Event
) -> None:
    """Cancel the request's task as soon as its client disconnects, which closes the
    upstream connection at once (and so frees a llama.cpp slot). The handler cancels this
    watcher synchronously after its last send, so a finished response is never cancelled."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
    task.cancel()


def _log(
    request_id: str, endpoint: Endpoint, model: str | None, status: int, error: str,
    attempts: list[Attempt], started: float,
) -> None:
    last = attempts[-1] if attempts else None
    ttft = last.ttft_s if last else None
    record = {
        "request_id": request_id,
        "endpoint": endpoint.name,
        "model": model,
        "backend": last.backend if last else None,
        "status": status,
        "outcome": last.outcome if last else "rejected",
        "attempts": len(attempts),
        "ttft_ms": round(ttft * 1000, 1) if ttft is not None else None,
        "prompt_tokens": last.prompt_tokens if last else 0,
        "output_tokens": last.output_tokens if last else 0,
        "duration_ms": round((perf_counter() - started) * 1000, 1),
    }
    if error:
        record["error"] = error
    access_log.info(orjson.dumps(record).decode())
