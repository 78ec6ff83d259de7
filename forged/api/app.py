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
import stat
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from forged.api import body, openai, openapi, ops, redact
from forged.api.auth import API_KEYS, ApiKeys, require_api_key
from forged.api.errors import MAX_BODY, Handler, error_middleware
from forged.config import Settings
from forged.schema import ConfigError
from forged.state import ServiceState
from forged.targets import LatencyWindow

log = logging.getLogger(__name__)

ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/v1/completions", openai.completions),
    ("POST", "/v1/chat/completions", openai.chat_completions),
    ("GET", "/v1/models", openai.models),
    ("GET", "/v1/models/{model_id:.+}", openai.model),
    ("GET", "/v1/status", ops.status),
    ("GET", "/v1/performance/targets", ops.performance_targets),
    ("GET", "/v1/tensorrt-llm/config", ops.engine_config),
    ("GET", "/healthz", ops.healthz),
    ("GET", "/readyz", ops.readyz),
    ("GET", "/metrics", ops.metrics),
    ("GET", "/openapi.json", openapi.openapi_json),
]
TEST_ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/_test/fault", ops.test_fault),
]


@web.middleware
async def stamp_arrival(request: web.Request, handler: Handler) -> web.StreamResponse:
    # TTFT is measured from here: the earliest point the application sees the request.
    request["received"] = time.monotonic()
    return await handler(request)


# How long aiohttp's own shutdown waits for a handler (its default: 60 s, then 60 s more).
SHUTDOWN_TIMEOUT_S = 1.0
# Routes whose body is read by body.read_json, which answers `Expect: 100-continue` itself.
BODY_ROUTES = frozenset({openai.completions, openai.chat_completions})


def build_app(state: ServiceState, api_keys: ApiKeys | None = None) -> web.Application:
    server = state.config.settings.server
    app = web.Application(middlewares=[body.close_unread_body, stamp_arrival, require_api_key, error_middleware],
                          client_max_size=server.max_body_bytes)
    app[API_KEYS] = api_keys or ApiKeys()
    redact.install()
    app[openai.STATE] = state
    app[openai.WINDOW] = LatencyWindow()
    app[openai.WRITE_TIMEOUT] = server.write_timeout_s
    app[openai.ANSWERING] = {}
    openai.add_tokenizer_pool(app)
    body.setup(app, server.max_body_bytes_in_flight, server.body_timeout_s)
    app[MAX_BODY] = server.max_body_bytes
    app[openapi.ROUTES_KEY] = ROUTES  # what /openapi.json documents: the routes every daemon serves
    routes = ROUTES + (TEST_ROUTES if state.test_hooks else [])
    for method, path, handler in routes:
        app.router.add_route(method, path, handler,
                             expect_handler=body.expect_continue_later if handler in BODY_ROUTES else None)
    return app


def make_runner(app: web.Application) -> web.AppRunner:
    server = app[openai.STATE].config.settings.server
    # aiohttp's own defaults differ between versions (max_headers 32768 on Debian 12's 3.8, 128 later;
    # keep-alive 75 s, later 3630 s): forged sets each limit itself (docs/api.md, Limits).
    kwargs: dict[str, object] = {"access_log": None, "keepalive_timeout": server.keepalive_timeout_s,
                                 "max_line_size": server.max_header_bytes,
                                 "max_field_size": server.max_header_bytes, "max_headers": server.max_headers}
    # aiohttp >= 3.9 no longer cancels a handler when its client disconnects unless asked to;
    # forged needs that cancellation to free the session and its KV at once.
    if "handler_cancellation" in inspect.signature(web.AppRunner.__init__).parameters or \
            "handler_cancellation" in inspect.signature(web.Server.__init__).parameters:
        kwargs["handler_cancellation"] = True
    # The daemon's drain has ended every admitted request before the runner shuts down; what is left
    # (a body still arriving, an idle connection) must not hold the exit for aiohttp's default 60 s.
    # aiohttp 3.9+ takes the timeout on the runner, 3.8 (Debian 12) on each site (_site_kwargs).
    if _RUNNER_TAKES_SHUTDOWN_TIMEOUT:
        kwargs["shutdown_timeout"] = SHUTDOWN_TIMEOUT_S
    return web.AppRunner(app, **kwargs)  # type: ignore[arg-type]


_RUNNER_TAKES_SHUTDOWN_TIMEOUT = "shutdown_timeout" in inspect.signature(web.BaseRunner.__init__).parameters


def _site_kwargs() -> dict[str, Any]:
    return {} if _RUNNER_TAKES_SHUTDOWN_TIMEOUT else {"shutdown_timeout": SHUTDOWN_TIMEOUT_S}


async def open_listeners(runner: web.AppRunner, settings: Settings, socket_path: Path,
                         inherited: dict[str, socket.socket]) -> list[str]:
    """Start a site per listener. Sockets handed over by systemd (LISTEN_FDS) are used as they are;
    without them forged binds its own. Returns a description of each for the log."""
    opened: list[str] = []
    if inherited:
        for name, sock in inherited.items():
            await web.SockSite(runner, sock, **_site_kwargs()).start()
            opened.append(f"{name} (from systemd)")
        return opened
    http = settings.listen.http
    if http.enabled:
        site = web.TCPSite(runner, http.host, http.port, reuse_address=True, **_site_kwargs())
        await site.start()
        opened.append(f"http://{http.host}:{_bound_port(site, http.port)}")
    unix = settings.listen.unix
    if unix.enabled:
        socket_path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        gid = grp.getgrnam(unix.group).gr_gid if unix.group else None
        _check_socket_dir(socket_path.parent, gid)
        if socket_path.is_socket():
            if _socket_in_use(socket_path):
                raise OSError(errno.EADDRINUSE, f"{socket_path} is in use by another process")
            socket_path.unlink()  # stale, from a previous run that did not exit cleanly
        sock = bind_private_unix_socket(socket_path)
        try:
            # Group first, then mode: at no point can anyone outside the final owner and group connect.
            if gid is not None:
                os.chown(socket_path, -1, gid)
            os.chmod(socket_path, int(unix.mode, 8))
        except OSError:
            sock.close()
            raise
        await web.SockSite(runner, sock, **_site_kwargs()).start()
        opened.append(f"unix:{socket_path}")
    return opened


def access_summary(runner: web.AppRunner, tcp_needs_keys: bool) -> dict[str, object]:
    """Who can reach what, for /v1/status and `forgectl doctor`: the TCP addresses served (any local
    user can connect to a loopback one), the UNIX sockets (their mode and group decide), and whether
    TCP needs an API key."""
    tcp: list[str] = []
    unix: list[str] = []
    for address in runner.addresses:
        if isinstance(address, (tuple, list)):
            host, port = address[0], address[1]
            tcp.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        else:
            unix.append(address.decode(errors="replace") if isinstance(address, bytes) else str(address))
    return {"tcp": tcp, "unix": unix, "tcp_api_keys": tcp_needs_keys}


def bind_private_unix_socket(path: Path) -> socket.socket:
    """A UNIX socket bound at `path` with mode 0600, whatever the process umask: nobody but its owner
    can connect before open_listeners grants the configured mode and group. The umask is
    process-wide, so it is narrowed only around bind(), which never yields to the event loop."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(previous)
    return sock


def _check_socket_dir(directory: Path, gid: int | None) -> None:
    info = directory.stat()
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise ConfigError(f"listen.unix.path: {directory} is writable by every user without the sticky bit, so "
                          f"anyone could replace forged's socket with their own; put the socket in a directory "
                          f"only forged can write (e.g. /run/forged) or run chmod o-w {directory}")
    reachable = info.st_mode & stat.S_IXOTH or (info.st_mode & stat.S_IXGRP and info.st_gid == gid)
    if gid is not None and not reachable:
        log.warning("listen.unix.group: members of group %s cannot reach the socket: %s is mode %04o, group %s; "
                    "give that group search permission on the directory (chgrp/chmod g+x)",
                    _group_name(gid), directory, info.st_mode & 0o777, _group_name(info.st_gid))


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


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
