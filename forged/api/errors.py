"""OpenAI-style error objects, and the middleware that guarantees every error is one."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)


class BadRequest(Exception):
    """A request forged refuses; the error middleware answers it with an OpenAI error object."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


def app_key(name: str, kind: type) -> Any:
    """A typed aiohttp AppKey where aiohttp has them (3.9+); a plain string key on Debian 12's 3.8."""
    factory = getattr(web, "AppKey", None)
    return factory(name, kind) if factory else name


MAX_BODY = app_key("max_body_bytes", int)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
          417: "invalid_request_error", 431: "invalid_request_error", 503: "service_unavailable"}


def error_response(status: int, message: str, code: str | None = None, *, param: str | None = None,
                   retry_after: int | None = None) -> web.Response:
    body = {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.json_response(body, status=status, headers=headers)


def sse_error(message: str, code: str) -> bytes:
    """The error event of a stream that had already started when things went wrong."""
    payload = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return f"data: {json.dumps(payload)}\n\n".encode()


# A request handler, or the rest of the middleware chain: what every middleware of forged wraps.
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadRequest as exc:
        response = error_response(exc.status, exc.message, exc.code, param=exc.param)
        if exc.status == 408:
            # Answer, then hang up at once: aiohttp would otherwise linger up to 10 s reading the rest
            # of the body from a client that has shown it will not send it.
            await response.prepare(request)
            await response.write_eof()
            if request.transport is not None:
                request.transport.close()
        return response
    except asyncio.CancelledError:
        raise  # the client went away (aiohttp cancelled the handler): nothing to answer, nothing to log
    except ConnectionResetError:
        # The client went away mid-body or mid-answer (or was hung up on). Raised on, aiohttp would log
        # it as an error with a traceback; answered, its write fails quietly on the closed connection.
        if request.transport is not None:
            request.transport.abort()
        return error_response(400, "the client closed the connection", "client_closed")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        message = {404: f"no route {request.method} {request.path}",
                   405: f"method {request.method} is not allowed on {request.path}"}.get(exc.status, exc.reason)
        if exc.status == 413:
            message = f"request body is larger than the limit of {request.app[MAX_BODY]} bytes"
        return error_response(exc.status, message, code)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal error in forged; see the daemon log", "internal_error")
