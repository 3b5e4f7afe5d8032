"""Errors the proxy answers with, and their one rendering into the OpenAI error shape.

Foreign exceptions (aiohttp, timeouts) are translated into these in `proxy.upstream`, the
one boundary with the network; everything above it deals only in `ProxyError`.
"""

from __future__ import annotations

import orjson

from backends.outlier import Fault


class ProxyError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str,
        *,
        param: str | None = None,
        retry_after_s: int | None = None,
        outcome: str = "rejected",
        retryable: bool = False,
        backend_down: bool = False,
        fault: Fault = Fault.NONE,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s
        self.outcome = outcome  # the `outcome` label this error counts under
        self.retryable = retryable  # another backend may be tried, if nothing was sent yet
        self.backend_down = backend_down  # the backend could not be reached at all
        self.fault = fault  # how the backend failed, if it did (counts towards ejection)

    def body(self, anthropic: bool = False) -> bytes:
        """OpenAI's `{"error": {...}}`, or Anthropic's shape on `/v1/messages`."""
        if anthropic:
            kind = "overloaded_error" if self.status == 503 else self.type
            return orjson.dumps({"type": "error", "error": {"type": kind, "message": self.message}})
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return orjson.dumps({"error": error})

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after_s is None:
            return []
        return [(b"retry-after", str(self.retry_after_s).encode())]


def bad_request(message: str, param: str | None = None) -> ProxyError:
    return ProxyError(400, message, "invalid_request_error", "invalid_request", param=param)


def unauthorized() -> ProxyError:
    return ProxyError(
        401, "Invalid or missing API key.", "authentication_error", "invalid_api_key"
    )


def unknown_model(model: str, alias_of: str | None = None) -> ProxyError:
    message = f"The model {model!r} does not exist." if alias_of is None else (
        f"The model {model!r} is an alias of {alias_of!r}, which no backend serves.")
    return ProxyError(404, message, "invalid_request_error", "model_not_found", param="model")


def model_not_listed_yet(model: str, unlisted: list[str]) -> ProxyError:
    """No backend lists `model`, but some have not listed their models yet: it may be
    theirs once they are up, so the answer is "retry", not "does not exist"."""
    waiting = ", ".join(unlisted)
    return ProxyError(
        503, f"No backend lists the model {model!r} yet; these have not listed their "
        f"models (loading, or not reachable since sluiceway started): {waiting}. Retry "
        "shortly.", "server_error",
        "model_not_listed_yet", param="model", retry_after_s=1,
    )


def not_found(path: str) -> ProxyError:
    return ProxyError(404, f"No route for {path}.", "invalid_request_error", "not_found")


def method_not_allowed(method: str, path: str) -> ProxyError:
    return ProxyError(
        405, f"{method} is not allowed on {path}.", "invalid_request_error", "method_not_allowed"
    )


def too_large(limit_bytes: int) -> ProxyError:
    return ProxyError(
        413, f"Request body exceeds {limit_bytes} bytes.", "invalid_request_error",
        "request_too_large",
    )


def no_capacity(reason: str, retry_after_s: int) -> ProxyError:
    return ProxyError(
        503, f"No backend can take the request: {reason}.", "server_error",
        "no_capacity", retry_after_s=retry_after_s,
    )


def upstream_failed(
    message: str, fault: Fault, *, retryable: bool = True, backend_down: bool = False
) -> ProxyError:
    return ProxyError(
        502, message, "server_error", "upstream_error",
        outcome="upstream_error", retryable=retryable, backend_down=backend_down, fault=fault,
    )


def upstream_overloaded(message: str, retry_after_s: int | None, fault: Fault) -> ProxyError:
    return ProxyError(
        503, message, "server_error", "upstream_overloaded", retry_after_s=retry_after_s or 1,
        outcome="upstream_error", retryable=True, fault=fault,
    )


def upstream_timeout(message: str, *, retryable: bool = False) -> ProxyError:
    """A backend that said nothing in time: hung, or far too slow. Retryable while nothing
    has reached the client (a timeout before the first byte)."""
    return ProxyError(504, message, "server_error", "upstream_timeout", outcome="timeout",
                      retryable=retryable, fault=Fault.DOWN)


def headers_too_large(limit_bytes: int) -> ProxyError:
    return ProxyError(
        431, f"Request headers exceed {limit_bytes} bytes.", "invalid_request_error",
        "headers_too_large",
    )


def request_timeout() -> ProxyError:
    return ProxyError(408, "The request did not arrive in time.", "invalid_request_error",
                      "request_timeout")


def too_many_connections() -> ProxyError:
    return ProxyError(503, "Too many open connections; try again.", "server_error", "busy",
                      retry_after_s=1)


def unsupported_transfer_encoding(coding: str) -> ProxyError:
    return ProxyError(501, f"Transfer-Encoding {coding!r} is not supported: send the body "
                      "chunked or with a Content-Length.", "invalid_request_error",
                      "unsupported_transfer_encoding")


def internal_error() -> ProxyError:
    return ProxyError(500, "Internal error in the proxy.", "server_error", "internal_error")
