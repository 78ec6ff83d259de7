"""Receiving a generation request's body: bounded in size, in time and, across all connections, in
the bytes being received and parsed at once; parsed off the event loop.

Limits (docs/api.md, Limits):
- A declared `Content-Length` over `server.max_body_bytes` is refused (413) before a byte is read; a
  body without one is refused once it grows past the limit.
- `server.max_body_bytes_in_flight` bounds what all bodies being received and parsed hold at once.
  A body counts its declared length (or max_body_bytes when it declares none) from the moment its
  headers are read until it is parsed. One that does not fit is refused at once: 503 `server_busy`.
- `server.body_timeout_s` bounds how long a body may take to arrive (408).
- `Expect: 100-continue` is answered only once the body is going to be read: a body that would be
  refused never gets `100 Continue`, so a client that waits for it never sends the body at all.
- A refused body is not read: when what is left of it is unbounded (no length, a length over the
  limit, or a client still waiting for `100 Continue`), the answer is sent and the connection
  closed, where aiohttp would read and discard the rest for up to 10 s to keep the connection.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from forged.api.errors import MAX_BODY, Handler, app_key, error_response
from forged.api.requests import BadRequest

# Set on a request whose `Expect: 100-continue` has not been answered yet (expect_continue_later).
CONTINUE_PENDING = "forged.continue_pending"
# JSON parsing holds the GIL, so more threads would not parse faster; one bounds the parses at once.
PARSE_THREADS = 1


class BodyBudget:
    """Bytes of request bodies being received and parsed now, against a limit. Used on the event
    loop only: parse threads hand their release back with call_soon_threadsafe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def try_take(self, size: int) -> bool:
        if self.in_use + size > self.limit:
            return False
        self.in_use += size
        return True

    def give(self, size: int) -> None:
        self.in_use -= size


class Busy(Exception):
    """The body budget is spent: 503 server_busy with Retry-After."""


BUDGET = app_key("body_budget", BodyBudget)
BODY_TIMEOUT = app_key("body_timeout_s", float)
PARSE_POOL = app_key("parse_pool", ThreadPoolExecutor)


def setup(app: web.Application, limit: int, timeout: float) -> None:
    """The budget, the body timeout and the parse thread, joined when the app is cleaned up."""
    app[BUDGET] = BodyBudget(limit)
    app[BODY_TIMEOUT] = timeout
    app[PARSE_POOL] = pool = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="forged-parse")

    async def join(_: web.Application) -> None:
        pool.shutdown(wait=True)

    app.on_cleanup.append(join)


async def expect_continue_later(request: web.Request) -> web.StreamResponse | None:
    """The generation routes' Expect handler. aiohttp's own sends `100 Continue` before any
    middleware or handler runs, so a client would send a body that is then refused; this one leaves
    the answer to read_json, which sends it only once the body is going to be read."""
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        return error_response(417, f"Expect: {expect!r} is not supported (only 100-continue)", "expectation_failed")
    if request.version >= (1, 1):  # HTTP/1.0 has no 100 Continue: the client sends the body anyway
        request[CONTINUE_PENDING] = True
    return None


async def read_json(request: web.Request) -> Any:
    """The request body as JSON. Raises HTTPRequestEntityTooLarge (413), Busy (503) or BadRequest
    (400, or 408 when the body does not arrive in time)."""
    max_body = request.app[MAX_BODY]
    declared = request.content_length
    if declared is not None and declared > max_body:
        # Refused before a byte of it is read: the declared length alone is over the limit.
        raise web.HTTPRequestEntityTooLarge(max_body, declared)
    cost = max_body if declared is None else declared
    budget = request.app[BUDGET]
    if not budget.try_take(cost):
        raise Busy(f"forged is receiving {budget.in_use} bytes of other request bodies, and this one's {cost} "
                   f"would pass server.max_body_bytes_in_flight ({budget.limit}); retry shortly")
    handed_over = False
    try:
        if request.get(CONTINUE_PENDING):
            request[CONTINUE_PENDING] = False
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        timeout = request.app[BODY_TIMEOUT]
        try:
            # aiohttp waits for a stalled body forever; this bounds what a slow client can hold.
            raw = await asyncio.wait_for(request.read(), timeout)
        except TimeoutError:
            raise BadRequest(f"the request body was not received within {timeout:g} s", status=408,
                             code="request_timeout") from None
        # Parsed in the parse thread, not on the event loop. The budget is given back when the parse
        # is really over (done or never started), not when this handler stops waiting for it.
        loop = asyncio.get_running_loop()
        parse = request.app[PARSE_POOL].submit(_parse, raw)
        del raw
        parse.add_done_callback(lambda _: loop.call_soon_threadsafe(budget.give, cost))
        handed_over = True
        return await asyncio.wrap_future(parse)
    finally:
        if not handed_over:
            budget.give(cost)


def _parse(raw: bytes) -> Any:
    try:
        # Decoded here, strictly: json.loads would let an encoded surrogate (invalid UTF-8) through.
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("the request body is not valid UTF-8") from None
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None


@web.middleware
async def close_unread_body(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer without reading the rest of a body that is left unread and unbounded (module doc)."""
    response = await handler(request)
    transport = request.transport
    if transport is None or transport.is_closing() or not request.can_read_body:
        return response
    declared = request.content_length
    bounded = declared is not None and declared <= request.app[MAX_BODY] and not request.get(CONTINUE_PENDING)
    if bounded:
        return response  # aiohttp reads and drops the rest (at most max_body_bytes), keeping the connection
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    transport.close()
    return response
