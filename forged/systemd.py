"""Talking to systemd: sd_notify messages, the progress watchdog, and inherited listen sockets.

Without NOTIFY_SOCKET every notification is a silent no-op (sdnotify's own behaviour), so the same
code runs in the foreground, under tests and under systemd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

import sdnotify

from forged.engine.base import Progress

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier()
        self._last_status = ""

    def send(self, *lines: str) -> None:
        if self.enabled:
            self._notifier.notify("\n".join(lines))

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises; None when the watchdog is off
    or meant for another process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


async def run_watchdog(notifier: Notifier, interval: float, progress: Callable[[], Progress]) -> None:
    """Ping only while the loop is responsive (this task runs on it) and the engine has moved
    whenever it had work. A wedged step loop therefore stops the pings and systemd restarts us."""
    last_steps = progress().steps
    while True:
        await asyncio.sleep(interval)
        now = progress()
        if now.pending_work and now.steps == last_steps:
            log.warning("engine made no progress in %.1f s with work pending; withholding WATCHDOG=1", interval)
            continue
        last_steps = now.steps
        notifier.watchdog()


def inherited_sockets() -> dict[str, socket.socket]:
    """Sockets passed by systemd socket activation (sd_listen_fds semantics), by FileDescriptorName."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    out: dict[str, socket.socket] = {}
    for i in range(count):
        fd = 3 + i
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        out[f"{name}#{i}" if name in out else name] = sock
    return out
