"""What the system tests share: paths, the wheel cache, the host check, and the step timings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build"
WHEELS = Path(os.environ.get("FORGED_WHEEL_CACHE", Path.home() / ".cache" / "forged" / "wheels"))
# The arm64 root takes tens of minutes to debootstrap through qemu: kept for every checkout on the machine.
ROOTFS_CACHE = Path(os.environ.get("FORGED_ROOTFS_CACHE", Path.home() / ".cache" / "forged" / "rootfs"))
TIMINGS: list[tuple[str, float]] = []


def timed(label: str, started: float) -> None:
    TIMINGS.append((label, time.monotonic() - started))


def require_host() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("not root (systemd-nspawn and debootstrap need root)")
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "dpkg-buildpackage", "dh", "pgrep", "lintian"):
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            problems.append(f"{tool} is missing")
    if problems:
        pytest.fail("system tests cannot run on this machine: " + "; ".join(problems)
                    + " (run scripts/bootstrap.sh --test as root)", pytrace=False)


def depends_packages(deb: Path) -> list[str]:
    """The package names in the .deb's Depends (first alternative, no versions)."""
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True,
                             check=True).stdout
    names = []
    for item in depends.split(","):
        first = item.split("|")[0].strip()
        name = re.split(r"[\s(:]", first, maxsplit=1)[0]
        if name:
            names.append(name)
    return sorted(set(names))
