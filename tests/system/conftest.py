"""The system tests' shared fixtures: one .deb, one cached rootfs, and one lock per session.

They live here, not in a test module, so that every module gets the same session-scoped instances:
a second copy of `system_lock` in the same process would wait on the first one forever.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nspawn import Container
from packaged import BUILD, REPO, TIMINGS, WHEELS, depends_packages, require_host, timed


@pytest.fixture(scope="session")
def system_lock() -> Iterator[None]:
    BUILD.mkdir(exist_ok=True)
    with (BUILD / "system.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def deb(system_lock: None) -> Path:
    require_host()
    started = time.monotonic()
    result = subprocess.run([str(REPO / "scripts" / "build-deb.sh"), str(BUILD / "deb")], capture_output=True,
                            text=True, env=dict(os.environ, FORGED_WHEEL_CACHE=str(WHEELS)))
    assert result.returncode == 0, f"package build failed:\n{result.stdout}\n{result.stderr}"
    timed("dpkg-buildpackage", started)
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def rootfs_tarball(deb: Path) -> Path:
    """Debian 12 with systemd and forged's dependencies, debootstrapped once and cached."""
    started = time.monotonic()
    result = subprocess.run([str(REPO / "tests" / "system" / "make-rootfs.sh"), str(BUILD / "rootfs-cache"),
                             *depends_packages(deb)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"debootstrap failed:\n{result.stderr}"
    timed("rootfs (debootstrap or cache)", started)
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def container(rootfs_tarball: Path) -> Iterator[Container]:
    work = BUILD / "system"
    root = work / "root"
    if root.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=True)
    root.mkdir(parents=True)
    started = time.monotonic()
    subprocess.run(["tar", "-C", str(root), "-xf", str(rootfs_tarball)], check=True)
    timed("rootfs unpack", started)
    log = work / "nspawn.log"
    log.unlink(missing_ok=True)
    ctr = Container(root, log, name=f"forged-test-{os.getpid()}")
    started = time.monotonic()
    try:
        ctr.boot()
        timed("container boot", started)
        yield ctr
    finally:
        if ctr.pid1:
            (work / "journal.txt").write_text(ctr.run("journalctl --no-pager -o short-monotonic",
                                                      check=False).stdout)
        ctr.poweroff()
        (work / "timings.txt").write_text("".join(f"{label}: {secs:.1f} s\n" for label, secs in TIMINGS))
        if not os.environ.get("FORGED_SYSTEM_KEEP"):
            subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)
