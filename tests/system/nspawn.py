"""A Debian 12 system container under systemd-nspawn with real systemd as PID 1.

The host needs root, debootstrap and systemd-container. Commands run in the container through
nsenter (machinectl cannot reach a container booted with --register=no). The container has its own
network namespace (loopback only): forged's 127.0.0.1:8000 there never meets the host's.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

CONTAINER_ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "HOME=/root",
                 "DEBIAN_FRONTEND=noninteractive", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0"]


class CommandFailed(AssertionError):
    pass


class Container:
    def __init__(self, root: Path, log_path: Path, name: str) -> None:
        self.root = root
        self.log_path = log_path
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    # ------------------------------------------------------------------ lifecycle

    def boot(self, timeout: float = 60) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.root), "-b", f"--machine={self.name}", "--register=no",
             "--keep-unit", "--private-network", "--console=pipe"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.pid1:
            if self.proc.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited with {self.proc.returncode}:\n{self.log()}")
            self.pid1 = self._find_init()
            time.sleep(0.1)
        if not self.pid1:
            raise AssertionError(f"no systemd in the container after {timeout} s:\n{self.log()}")
        # Right after PID 1 appears, systemctl may not reach it yet: retry until it answers.
        state, result = "", None
        while time.monotonic() < deadline and state not in ("running", "degraded"):
            result = self.run("systemctl is-system-running --wait", check=False,
                              timeout=max(1.0, deadline - time.monotonic()))
            state = result.stdout.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.5)
        if state not in ("running", "degraded"):
            raise AssertionError(f"container systemd is {state!r} ({result.stderr.strip() if result else ''}):\n"
                                 f"{self.log()}")
        if state == "degraded":
            print("container degraded:", self.run("systemctl --failed --no-legend", check=False).stdout)

    def _find_init(self) -> int:
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-x", "systemd"], capture_output=True,
                             text=True).stdout.split()
        return int(out[0]) if out else 0

    def poweroff(self, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.run("systemctl poweroff", check=False, timeout=10)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    # ------------------------------------------------------------------ commands

    def _argv(self, cmd: str, network: bool = False) -> list[str]:
        # -a enters every namespace; without the net namespace apt would reach the host network.
        ns = ["-a"] if not network else ["-m", "-u", "-i", "-p", "-C"]
        return ["nsenter", "-t", str(self.pid1), *ns, "--", *CONTAINER_ENV, "sh", "-c", cmd]

    def run(self, cmd: str, check: bool = True, timeout: float = 120,
            network: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self._argv(cmd, network), capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise CommandFailed(f"in the container: {cmd!r} -> rc {result.returncode}\n"
                                f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}")
        return result

    def popen(self, cmd: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self._argv(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str = "forged.service", lines: int = 80) -> str:
        return self.run(f"journalctl -u {unit} --no-pager -n {lines} -o short-monotonic",
                        check=False).stdout

    def curl(self, args: str, check: bool = True, timeout: float = 120) -> str:
        return self.run(f"curl -sS --fail-with-body --max-time {int(timeout)} {args}", check=check,
                        timeout=timeout + 10).stdout

    def write(self, path: str, text: str) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def copy_in(self, source: Path, path: str) -> None:
        """Hard-link when on the same filesystem (the model is 250 MB), else copy."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


def quote(text: str) -> str:
    return shlex.quote(text)
