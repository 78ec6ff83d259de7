"""The aiohttp application: the route table (the one place routes are defined) and the listeners.

The same application is served on every listener: TCP on loopback and a UNIX socket.
"""

from __future__ import annotations

import errno
import grp
import inspect
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from forged.api import openai, ops
from forged.api.errors import MAX_BODY, error_middleware
from forged.config import Settings
from forged.state import ServiceState
from forged.targets import LatencyWindow

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/v1/completions", openai.completions),
    ("POST", "/v1/chat/completions", openai.chat_completions),
    ("GET", "/v1/models", openai.models),
    ("GET", "/v1/status", ops.status),
    ("GET", "/v1/performance/targets", ops.performance_targets),
    ("GET", "/v1/tensorrt-llm/config", ops.engine_config),
    ("GET", "/healthz", ops.healthz),
    ("GET", "/readyz", ops.readyz),
    ("GET", "/metrics", ops.metrics),
]
TEST_ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/_test/fault", ops.test_fault),
]


@web.middleware
async def stamp_arrival(request: web.Request, handler: Handler) -> web.StreamResponse:
    # TTFT is measured from here: the earliest point the application sees the request.
    request["received"] = time.monotonic()
    return await handler(request)


def build_app(state: ServiceState) -> web.Application:
    max_body = state.config.settings.server.max_body_bytes
    app = web.Application(middlewares=[stamp_arrival, error_middleware], client_max_size=max_body)
    app[openai.STATE] = state
    app[openai.WINDOW] = LatencyWindow()
    app[MAX_BODY] = max_body
    routes = ROUTES + (TEST_ROUTES if state.test_hooks else [])
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app


def make_runner(app: web.Application) -> web.AppRunner:
    kwargs: dict[str, object] = {"access_log": None}
    # aiohttp >= 3.9 no longer cancels a handler when its client disconnects unless asked to;
    # forged needs that cancellation to free the session and its KV at once.
    if "handler_cancellation" in inspect.signature(web.AppRunner.__init__).parameters or \
            "handler_cancellation" in inspect.signature(web.Server.__init__).parameters:
        kwargs["handler_cancellation"] = True
    return web.AppRunner(app, **kwargs)  # type: ignore[arg-type]


async def open_listeners(runner: web.AppRunner, settings: Settings, socket_path: Path,
                         inherited: dict[str, socket.socket]) -> list[str]:
    """Start a site per listener. Sockets handed over by systemd (LISTEN_FDS) are used as they are;
    without them forged binds its own. Returns a description of each for the log."""
    opened: list[str] = []
    if inherited:
        for name, sock in inherited.items():
            await web.SockSite(runner, sock).start()
            opened.append(f"{name} (from systemd)")
        return opened
    http = settings.listen.http
    if http.enabled:
        site = web.TCPSite(runner, http.host, http.port, reuse_address=True)
        await site.start()
        opened.append(f"http://{http.host}:{_bound_port(site, http.port)}")
    unix = settings.listen.unix
    if unix.enabled:
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        if socket_path.is_socket():
            if _socket_in_use(socket_path):
                raise OSError(errno.EADDRINUSE, f"{socket_path} is in use by another process")
            socket_path.unlink()  # stale, from a previous run that did not exit cleanly
        await web.UnixSite(runner, str(socket_path)).start()
        os.chmod(socket_path, int(unix.mode, 8))
        if unix.group:
            os.chown(socket_path, -1, grp.getgrnam(unix.group).gr_gid)
        opened.append(f"unix:{socket_path}")
    return opened


def _socket_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def _bound_port(site: web.TCPSite, configured: int) -> int:
    server = site._server  # port 0 asks the kernel for one; report the real one
    sockets = getattr(server, "sockets", None) or []
    return sockets[0].getsockname()[1] if sockets else configured
