"""The admin plane's FastAPI app: pool state, drain, add, remove, reload, the live page.

Errors come back in the data plane's shape, `{"error": {"message", "type", "code"}}`. Its
own API keys (Bearer or X-Api-Key) guard `/admin/*`; the page, `/docs` and the schema hold
no data and are open (the page asks for the key in its URL's fragment, `#key=...`).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from backends.config import BackendConfig
from backends.state import BackendState
from proxy import routes
from proxy.admin.actions import ActionError, Actions
from proxy.admin.models import BackendView, PoolView, ReloadResult, Removal
from proxy.admin.page import PAGE
from proxy.gateway import Gateway
from proxy.settings import AdminSettings

_STATUS = {"not_found": 404, "conflict": 409, "rejected": 422, "unauthorized": 401}


def make_app(gateway: Gateway, settings: AdminSettings, actions: Actions) -> FastAPI:
    app = FastAPI(title="sluiceway admin", version="1", docs_url="/docs",
                  redoc_url=None)
    keys = tuple(k.encode() for k in settings.api_keys)

    def authorized(authorization: Annotated[str | None, Header()] = None,
                   x_api_key: Annotated[str | None, Header()] = None) -> None:
        if not keys:
            return
        presented = x_api_key
        if authorization is not None:
            presented = authorization[7:].strip() if authorization[:7].lower() == "bearer " \
                else authorization.strip()
        if not presented or not any(hmac.compare_digest(presented.encode(), k) for k in keys):
            raise ActionError("unauthorized", "a valid admin API key is needed")

    guarded = [Depends(authorized)]

    @app.exception_handler(ActionError)
    async def _action_error(_request: Request, exc: ActionError) -> JSONResponse:
        return _error(_STATUS[exc.reason], exc.message, exc.reason)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        lines = [f"  {'.'.join(str(p) for p in e['loc'] if p != 'body') or '(body)'}: "
                 f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
                 for e in exc.errors()]
        return _error(422, "invalid request\n" + "\n".join(lines), "rejected")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE

    @app.get("/admin/backends", dependencies=guarded)
    async def list_backends() -> PoolView:
        return PoolView(policy=gateway.policy.name, queue_depth=gateway.admission.depth,
                        backends=[_view(s) for s in gateway.pool])

    @app.get("/admin/backends/{name}", dependencies=guarded)
    async def get_backend(name: str) -> BackendView:
        return _view(actions.backend(name))

    @app.post("/admin/backends/{name}/drain", dependencies=guarded)
    async def drain(name: str, wait_s: Annotated[float, Query(ge=0, le=3600)] = 0
                    ) -> BackendView:
        """No new requests go to the backend; those in flight finish. With `wait_s`, the
        reply waits up to that long for them (see `in_flight` in the reply)."""
        return _view(await actions.drain(name, True, wait_s))

    @app.post("/admin/backends/{name}/undrain", dependencies=guarded)
    async def undrain(name: str) -> BackendView:
        return _view(await actions.drain(name, False, 0))

    @app.post("/admin/backends/{name}/readmit", dependencies=guarded)
    async def readmit(name: str) -> BackendView:
        """End the backend's ejection for failing now, rather than at its backoff's end."""
        return _view(actions.readmit(name))

    @app.post("/admin/backends", dependencies=guarded, status_code=201)
    async def add(config: BackendConfig) -> BackendView:
        """Add a backend (a `[[backends]]` entry): probed and calibrated before it takes
        traffic. It lasts until a restart or a reload whose file does not have it."""
        return _view(await actions.add(config))

    @app.delete("/admin/backends/{name}", dependencies=guarded,
                responses={202: {"model": Removal}})
    async def remove(name: str, wait_s: Annotated[float, Query(ge=0, le=3600)] = 30
                     ) -> JSONResponse:
        """Drain the backend and remove it when its requests have ended: 200 when it is
        gone within `wait_s`, else 202 (it leaves by itself when the last one ends)."""
        gone, in_flight = await actions.remove(name, wait_s)
        body = Removal(name=name, removed=gone, in_flight=in_flight)
        return JSONResponse(body.model_dump(), status_code=200 if gone else 202)

    @app.post("/admin/reload", dependencies=guarded)
    async def reload() -> ReloadResult:
        """Re-read the config file (as SIGHUP does) and apply it to new requests."""
        changes = await actions.reload("admin")
        return ReloadResult.model_validate(changes.summary())

    return app


def _view(state: BackendState) -> BackendView:
    return BackendView.model_validate(routes.backend_view(state))


def _error(status: int, message: str, code: str) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}},
                        status_code=status)

