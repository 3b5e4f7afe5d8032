"""The application: dispatch, authentication, the access log, and the service's lifetime.

Runs on the proxy's own HTTP server (proxy/server.py): the forwarded routes are the hot
path, and the few other routes are small enough not to need a framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import logging
import os
import signal
from collections.abc import Callable
from time import perf_counter

import orjson

from proxy import routes
from proxy.admin.actions import ActionError, Actions
from proxy.admin.app import make_app as make_admin_app
from proxy.admin.server import AdminServer
from proxy.attempt import Attempt
from proxy.errors import (
    ProxyError,
    method_not_allowed,
    model_not_listed_yet,
    not_found,
    too_large,
    unauthorized,
    unknown_model,
)
from proxy.fdlimit import ensure_room
from proxy.gateway import Gateway
from proxy.metrics import CONTENT_TYPE
from proxy.request import ROUTED, ClientRequest, Endpoint, parse
from proxy.server import Headers, HttpServer, Reply, Request
from proxy.settings import Settings

log = logging.getLogger("sluiceway")
access_log = logging.getLogger("sluiceway.access")

_OWN_GET_ROUTES = frozenset({"/v1/models", "/health", "/ready", "/metrics", "/admin/backends"})
_PUBLIC = frozenset({"/health", "/ready", "/metrics"})
_JSON = (b"content-type", b"application/json")


async def serve(settings: Settings, stop: asyncio.Event | None = None,
                reread: Callable[[], Settings] | None = None) -> None:
    """Run the proxy until SIGINT or SIGTERM (or `stop`): start the gateway (backends
    probed before the port opens), serve, then drain requests in progress and stop.
    `reread` reads the config file again, for SIGHUP and the admin plane's reload."""
    gateway = await Gateway.start(settings)
    admin: AdminServer | None = None
    try:
        app = App(settings, gateway)
        limits = settings.server
        ensure_room(limits.max_connections)
        server = HttpServer(app.handle, max_body=app.body_limit,
                            head_timeout_s=limits.head_timeout_s,
                            max_connections=limits.max_connections)
        await server.listen(settings.server.host, settings.server.port)
        gateway.metrics.watch_server(lambda: (len(server.connections),
                                              server.refused_connections))
        log.info("sluiceway listening on http://%s:%d (policy %s, %d backends)",
                 settings.server.host, server.ports[0], gateway.policy.name,
                 len(settings.backends))
        actions = Actions(gateway, reread)
        if settings.admin is not None:
            admin = AdminServer(make_admin_app(gateway, settings.admin, actions),
                                settings.admin.host, settings.admin.port)
            await admin.start()
            log.info("admin plane on http://%s:%d", settings.admin.host, admin.port)
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[object]] = set()

        def hangup() -> None:
            task = loop.create_task(_reload_quietly(actions))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, hangup)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("shutting down: finishing requests in progress (up to %g s)",
                 settings.server.shutdown_grace_s)
        await server.shutdown(settings.server.shutdown_grace_s)
        for task in reloads:
            task.cancel()
    finally:
        if admin is not None:
            await admin.stop()
        await gateway.stop()


async def _reload_quietly(actions: Actions) -> None:
    """SIGHUP: reload; a rejected file is logged (by `Actions`) and changes nothing."""
    with contextlib.suppress(ActionError):
        await actions.reload("SIGHUP")


class App:
    def __init__(self, settings: Settings, gateway: Gateway) -> None:
        self.settings = settings
        self.gateway = gateway
        self._keys = tuple(k.encode() for k in settings.server.api_keys)
        self.body_limit = int(settings.server.max_body_mb * 1024 * 1024)
        self._id_prefix = os.urandom(6).hex()  # request ids: unique per app and request,
        self._id_counter = itertools.count()  # without uuid4's os.urandom on every call

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter):010x}"

    async def handle(self, request: Request, reply: Reply) -> None:
        path, method = request.path, request.method
        request_id = (request.header(b"x-request-id") or b"").decode("latin-1") \
            or self._new_id()
        id_header = (b"x-request-id", request_id.encode("latin-1"))
        endpoint = ROUTED.get(path)
        anthropic = endpoint is not None and endpoint.anthropic
        try:
            if path not in _PUBLIC and not self._authorized(request):
                raise unauthorized()
            if endpoint is not None:
                if method != "POST":
                    raise method_not_allowed(method, path)
                await self._forward(request, reply, endpoint, request_id)
            elif path in _OWN_GET_ROUTES:
                if method not in ("GET", "HEAD"):
                    raise method_not_allowed(method, path)
                self._own_route(request, reply, id_header)
            else:
                raise not_found(path)
        except ProxyError as exc:
            _respond_error(reply, exc, id_header, anthropic)

    def _authorized(self, request: Request) -> bool:
        if not self._keys:
            return True
        presented = request.header(b"x-api-key")
        auth = request.header(b"authorization")
        if auth is not None:
            presented = auth[7:].strip() if auth[:7].lower() == b"bearer " else auth.strip()
        if not presented:
            return False
        return any(hmac.compare_digest(presented, key) for key in self._keys)

    def _own_route(self, request: Request, reply: Reply, id_header: tuple[bytes, bytes]
                   ) -> None:
        gw, path = self.gateway, request.path
        if path == "/health":
            status, body = 200, b'{"status":"ok"}'
        elif path == "/ready":
            status, body = routes.ready(gw.pool, gw.cluster)
        elif path == "/metrics":
            reply.respond(200, gw.metrics.render(), ((b"content-type", _METRICS_TYPE), id_header))
            return
        elif path == "/v1/models":
            status, body = 200, routes.models(gw.pool, gw.aliases,
                                              anthropic=request.header(b"anthropic-version")
                                              is not None)
        else:
            status, body = 200, routes.admin_backends(gw.pool, gw.policy.name,
                                                      gw.admission.depth)
        reply.respond(status, body, (_JSON, id_header))

    async def _forward(
        self, request: Request, reply: Reply, endpoint: Endpoint, request_id: str
    ) -> None:
        gw = self.gateway
        started = perf_counter()
        try:
            if request.oversized:
                raise too_large(self.body_limit)
            client_request = parse(endpoint, request.body, request.headers, request_id)
            asked = client_request.route.model
            model = gw.aliases.resolve(asked)
            if model != asked:
                client_request = client_request.aliased(model)
            if not gw.pool.knows_model(model):
                unlisted = gw.pool.unlisted()
                if unlisted:
                    raise model_not_listed_yet(asked, unlisted)
                raise unknown_model(asked, None if model == asked else model)
        except ProxyError as exc:  # bad input: answered by the caller, counted and logged here
            gw.metrics.requests.labels("none", endpoint.name, exc.outcome).inc()
            self._log(request_id, endpoint, None, exc.status, exc.message, [], started)
            raise
        attempts: list[Attempt] = []
        status, error = 0, ""
        try:
            await gw.forwarder.forward(client_request, reply, attempts)
            status = attempts[-1].status
        except ProxyError as exc:
            status, error = exc.status, exc.message
            if not attempts:  # refused before any backend was tried
                gw.metrics.requests.labels("none", endpoint.name, exc.outcome).inc()
            _respond_error(reply, exc, (b"x-request-id", request_id.encode("latin-1")),
                           endpoint.anthropic)
        except asyncio.CancelledError:
            if not reply.gone:  # the client's disconnect cancels the request; nothing else
                raise
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            if attempts and attempts[-1].outcome == "ok":  # it left after the last event
                status = attempts[-1].status
            else:
                status, error = 499, "client closed the connection"
        self._log(request_id, endpoint, client_request.route.model, status, error, attempts,
                  started, client_request)

    def _log(
        self, request_id: str, endpoint: Endpoint, model: str | None, status: int, error: str,
        attempts: list[Attempt], started: float, request: ClientRequest | None = None,
    ) -> None:
        if self.settings.server.access_log:
            _log(request_id, endpoint, model, status, error, attempts, started, request)


_METRICS_TYPE = CONTENT_TYPE.encode()


def _respond_error(reply: Reply, error: ProxyError, id_header: tuple[bytes, bytes],
                   anthropic: bool = False) -> None:
    headers: Headers = (_JSON, *error.headers(), id_header)
    reply.respond(error.status, error.body(anthropic), headers)


def _log(
    request_id: str, endpoint: Endpoint, model: str | None, status: int, error: str,
    attempts: list[Attempt], started: float, request: ClientRequest | None,
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
    if request is not None and request.payload.get("model") != model:
        record["alias"] = request.payload.get("model")  # the name the client sent
    if request is not None and request.affinity_source is not None:
        # which session key routed it, and a digest of it (never the key itself)
        key = request.route.affinity_key or ""
        digest = hashlib.blake2b(key.encode(), digest_size=4).hexdigest()
        record["session"] = f"{request.affinity_source}:{digest}"
    if last and last.estimated:
        record["output_tokens_estimated"] = True  # the backend sent no usage
    if error:
        record["error"] = error
    access_log.info(orjson.dumps(record).decode())
