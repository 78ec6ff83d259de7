"""API keys on the TCP listener: the key file, the check at startup, and the middleware.

Policy (docs/api.md, Security):
- With `listen.http.api_keys_file` set, every TCP request needs `Authorization: Bearer <key>`,
  except the probes in EXEMPT_ROUTES (they say only alive/ready). A missing or wrong key gets 401.
- The UNIX socket needs no key: its mode and group (open_listeners) decide who may connect at all.
- Without keys forged serves TCP on loopback only (config validation; `require_keys_beyond_loopback`
  for sockets systemd passes), and not at all with `listen.http.require_keys_on_loopback: true`:
  loopback TCP without keys is open to every local user, whatever the socket's group says.
- Keys are never logged; the log says how many were loaded and from where.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pwd
import socket
import stat
from collections.abc import Iterable
from pathlib import Path

from aiohttp import web

from forged.api.errors import Handler, app_key, error_response
from forged.config import is_loopback
from forged.schema import ConfigError

# Probes carry no data and must work for a load balancer or kubelet that has no key.
EXEMPT_ROUTES = frozenset({"/healthz", "/readyz"})
# With listen.http.metrics_without_key: for scrapers that cannot send a key (the inference gateway's
# endpoint picker).
METRICS_ROUTE = "/metrics"
MIN_KEY_CHARS = 16
MAX_KEY_FILE_BYTES = 64 * 1024


class ApiKeys:
    """The accepted keys, held as SHA-256 digests so that every comparison is of equal length.

    `path` None means no keys are configured (TCP open, loopback only). The set can be replaced by
    `reload()` (SIGHUP); a failed reload keeps the keys in force.
    """

    def __init__(self, path: Path | None = None, exempt: frozenset[str] = EXEMPT_ROUTES) -> None:
        self.path = path
        self.exempt = exempt  # the routes TCP serves without a key
        self._digests: tuple[bytes, ...] = ()
        if path is not None:
            self.reload()

    @property
    def configured(self) -> bool:
        return self.path is not None

    def __len__(self) -> int:
        return len(self._digests)

    def reload(self) -> None:
        """Re-read the key file. Raises ConfigError (one line naming the file and the fix)."""
        assert self.path is not None
        keys = parse_keys(read_private_file(self.path), str(self.path))
        self._digests = tuple(_digest(key) for key in keys)

    def accepts(self, token: str) -> bool:
        presented = _digest(token)
        matched = False
        # Every key is compared, match or not: the time taken says nothing about which one matched.
        for digest in self._digests:
            matched |= hmac.compare_digest(digest, presented)
        return matched


API_KEYS = app_key("api_keys", ApiKeys)


def load_api_keys(keys_file: str | None, config_dir: Path, metrics_without_key: bool = False) -> ApiKeys:
    """The keys `listen.http.api_keys_file` names (relative paths from the config dir)."""
    if keys_file is None:
        return ApiKeys()
    exempt = EXEMPT_ROUTES | {METRICS_ROUTE} if metrics_without_key else EXEMPT_ROUTES
    return ApiKeys(config_dir / keys_file, exempt)


def read_private_file(path: Path) -> str:
    """The file's text, after checking that only the user forged runs as can read or change it."""
    user = _user_name(os.geteuid())
    try:
        # Checked through the open file (no swap between check and read). O_NONBLOCK: a FIFO put in
        # its place must not hang the start or a reload; only a regular file of sane size is read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(f"{path}: the API key file must be a regular file")
            data = f.read(MAX_KEY_FILE_BYTES + 1)
        if len(data) > MAX_KEY_FILE_BYTES:
            raise ConfigError(f"{path}: the API key file is over {MAX_KEY_FILE_BYTES} bytes; one key per line")
    except FileNotFoundError:
        raise ConfigError(f"{path}: the API key file (listen.http.api_keys_file) does not exist; create it "
                          f"with one key per line (install -m 0600 -o {user} /dev/null {path}) or unset "
                          f"listen.http.api_keys_file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: the API key file must be a regular file, not a directory") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the API key file as user {user}: {exc.strerror}; "
                          f"run chown {user} {path} && chmod 0600 {path}") from None
    if info.st_uid != os.geteuid():
        raise ConfigError(f"{path}: the API key file is owned by {_user_name(info.st_uid)}, not by {user} that "
                          f"forged runs as; run chown {user} {path} && chmod 0600 {path}")
    if info.st_mode & 0o077:
        raise ConfigError(f"{path}: the API key file is open to group or others (mode "
                          f"{info.st_mode & 0o777:04o}); run chmod 0600 {path}")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the API key file must be ASCII text, one key per line") from None


def parse_keys(text: str, where: str) -> list[str]:
    """One key per line; blank lines and lines starting with # are ignored. Errors cite file:line,
    never the key."""
    keys = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.isprintable() or any(c.isspace() for c in line):
            raise ConfigError(f"{where}:{number}: an API key must be printable ASCII without spaces")
        if len(line) < MIN_KEY_CHARS:
            raise ConfigError(f"{where}:{number}: an API key must have at least {MIN_KEY_CHARS} characters; "
                              f"generate one with: openssl rand -hex 32")
        keys.append(line)
    if not keys:
        raise ConfigError(f"{where}: no API key in the file; add one key per line "
                          f"(generate one with: openssl rand -hex 32)")
    return keys


def require_keys_beyond_loopback(sockets: Iterable[socket.socket], keys: ApiKeys,
                                 on_loopback_too: bool = False) -> None:
    """Sockets systemd passes bypass the config's loopback rule; the same rule applies to them, and
    with `on_loopback_too` (listen.http.require_keys_on_loopback) to loopback sockets as well."""
    if keys.configured:
        return
    for sock in sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = sock.getsockname()[0]
            if on_loopback_too:
                raise ConfigError(f"forged.socket passed a TCP socket on {host}, listen.http.require_keys_on_loopback "
                                  f"is true and no API keys are configured; set listen.http.api_keys_file or "
                                  f"remove the TCP ListenStream from forged.socket (docs/api.md, Security)")
            if not is_loopback(host):
                raise ConfigError(f"forged.socket passed a TCP socket on {host}, which is not loopback, and no "
                                  f"API keys are configured; set listen.http.api_keys_file or listen on "
                                  f"127.0.0.1 (docs/api.md, Security)")


@web.middleware
async def require_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    keys = request.app[API_KEYS]
    if not keys.configured or request.path in keys.exempt or _over_unix_socket(request):
        return await handler(request)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _unauthorized("no API key: send the header Authorization: Bearer <key>")
    if not keys.accepts(token.strip()):
        return _unauthorized("invalid API key")
    return await handler(request)


def _over_unix_socket(request: web.Request) -> bool:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    # No socket to ask (the client is gone): treat it as TCP, never as the trusted socket.
    return sock is not None and sock.family == socket.AF_UNIX


def _unauthorized(message: str) -> web.Response:
    response = error_response(401, message, "invalid_api_key")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
