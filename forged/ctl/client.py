"""A small HTTP client for forgectl: the daemon's UNIX socket by default, TCP with --url.

Over TCP it sends the API key (--api-key-file, else $FORGED_API_KEY) as `Authorization: Bearer`;
the UNIX socket needs none (its file permissions decide who may connect).

Standard library only (http.client), one connection per request, so that it is safe to use from
many threads at once (`forgectl bench` runs one thread per simulated user).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from forged import paths


class DaemonUnreachable(Exception):
    """The daemon did not answer (no socket, connection refused, timeout)."""


class BadAnswer(Exception):
    """The daemon answered, but not with what the route should return."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class Client:
    url: str | None = None
    socket_path: str | None = None
    timeout: float = 10.0
    api_key: str | None = None

    @classmethod
    def from_args(cls, args: Any) -> Client:
        return cls(getattr(args, "url", None), getattr(args, "socket", None) or default_socket(),
                   api_key=getattr(args, "api_key", None))

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.url and self.api_key else {}

    @property
    def where(self) -> str:
        return self.url or f"unix:{self.socket_path}"

    def connection(self, timeout: float | None = None) -> http.client.HTTPConnection:
        t = self.timeout if timeout is None else timeout
        if self.url:
            parts = urlsplit(self.url)
            if parts.scheme == "https":
                return http.client.HTTPSConnection(parts.hostname or "127.0.0.1", parts.port or 443, timeout=t)
            return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=t)
        assert self.socket_path is not None
        return _UnixHTTPConnection(self.socket_path, t)

    def request(self, method: str, route: str, body: Any = None,
                timeout: float | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request; returns status, headers (lower-case names) and the whole body."""
        conn = self.connection(timeout)
        try:
            headers = self.auth_headers()
            if body is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, route, body=None if body is None else json.dumps(body), headers=headers)
            response = conn.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        except OSError as exc:
            raise DaemonUnreachable(f"cannot reach forged at {self.where}: {exc}") from None
        finally:
            conn.close()

    def get_json(self, route: str) -> Any:
        status, _, data = self.request("GET", route)
        try:
            doc = json.loads(data)
        except ValueError:
            raise BadAnswer(f"GET {route}: HTTP {status}, not JSON: {data[:200]!r}") from None
        if status >= 400:
            message = doc.get("error", {}).get("message") if isinstance(doc, dict) else None
            raise BadAnswer(f"GET {route}: HTTP {status}: {message or data[:200]!r}")
        return doc

    def get_text(self, route: str) -> str:
        status, _, data = self.request("GET", route)
        if status != 200:
            raise BadAnswer(f"GET {route}: HTTP {status}: {data[:200]!r}")
        return data.decode("utf-8", errors="replace")

    def post_json(self, route: str, body: Any, timeout: float | None = None) -> tuple[int, Any]:
        status, _, data = self.request("POST", route, body, timeout)
        try:
            return status, json.loads(data)
        except ValueError:
            raise BadAnswer(f"POST {route}: HTTP {status}, not JSON: {data[:200]!r}") from None


def read_api_key(key_file: str | None) -> str | None:
    """The key forgectl sends over TCP: the first key in `key_file` (the daemon's key-file format),
    else $FORGED_API_KEY. Raises ValueError with one line saying what is wrong."""
    if key_file is None:
        return os.environ.get("FORGED_API_KEY") or None
    from forged.api.auth import parse_keys
    from forged.schema import ConfigError
    try:
        with open(key_file, encoding="ascii") as f:
            return parse_keys(f.read(), key_file)[0]
    except (OSError, UnicodeDecodeError, ConfigError) as exc:
        raise ValueError(f"--api-key-file {key_file}: {getattr(exc, 'strerror', None) or exc}") from None


def default_socket() -> str:
    return str(paths.run_dir() / "forged.sock")


def sse_payloads(response: http.client.HTTPResponse) -> Iterator[Any]:
    """The `data:` payloads of a server-sent-events body, parsed as JSON; '[DONE]' as the string."""
    while True:
        line = response.readline()
        if not line:
            return
        text = line.decode("utf-8", errors="replace").rstrip("\r\n")
        if not text.startswith("data:"):
            continue
        data = text[5:].strip()
        if data == "[DONE]":
            yield data
            return
        try:
            yield json.loads(data)
        except ValueError:
            continue
