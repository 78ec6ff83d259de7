"""The arm64 package (Jetson), cross-built on this amd64 machine, checked in an arm64 Debian 12 under
qemu-user emulation.

CI's reduced check: the package's contents, the ELF machine of every native library in it, and, in an
arm64 Debian 12 root (debootstrapped once through qemu-user-static and cached in ~/.cache/forged/rootfs),
`dpkg -i`, `forged check-config`, `forged probe` and the vendored arm64 libllama loading. Each command
runs in a one-shot systemd-nspawn container (no boot); the kernel hands the arm64 programs to
qemu-aarch64-static through binfmt_misc. The full boot (systemd, READY, a completion over the socket)
is `make arm64-boot` (tests/system/arm64_boot.py): too slow under emulation for every CI run.

Needs root, debootstrap, systemd-container, crossbuild-essential-arm64, qemu-user-static and its
binfmt_misc entry (scripts/bootstrap.sh --test); fails, never skips, without them.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaged import BUILD, REPO, ROOTFS_CACHE, WHEELS, depends_packages, require_host, timed

EM_AARCH64 = 183
BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")


def require_qemu() -> None:
    require_host()
    problems = [f"{tool} is missing" for tool in ("aarch64-linux-gnu-strip", "qemu-aarch64-static")
                if not shutil.which(tool)]
    if not BINFMT.is_file() or "enabled" not in BINFMT.read_text() or "flags: PF" not in BINFMT.read_text():
        problems.append(f"{BINFMT} is not registered with the F flag (mount binfmt_misc; update-binfmts "
                        "--enable qemu-aarch64)")
    if problems:
        pytest.fail("arm64 checks cannot run here: " + "; ".join(problems) + " (scripts/bootstrap.sh --test)",
                    pytrace=False)


@pytest.fixture(scope="module")
def deb_arm64(system_lock: None) -> Path:
    require_qemu()
    started = time.monotonic()
    result = subprocess.run([str(REPO / "scripts" / "build-deb.sh"), str(BUILD / "deb-arm64"), "arm64"],
                            capture_output=True, text=True, env=dict(os.environ, FORGED_WHEEL_CACHE=str(WHEELS)))
    assert result.returncode == 0, f"arm64 package build failed:\n{result.stdout}\n{result.stderr}"
    timed("dpkg-buildpackage -a arm64", started)
    return Path(result.stdout.strip().splitlines()[-1])


def nspawn(root: Path, cmd: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """One command in the arm64 root, in a container of its own (no boot, no network)."""
    return subprocess.run(["systemd-nspawn", "-q", "-D", str(root), f"--machine=forged-arm64-{os.getpid()}",
                           "--register=no", "--keep-unit", "--private-network", "--pipe",
                           "-E", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "-E", "LANG=C.UTF-8", "sh", "-c", cmd],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def arm64_root(deb_arm64: Path) -> Iterator[Path]:
    """Debian 12 arm64 with forged's dependencies (cached tarball) and the arm64 package installed."""
    started = time.monotonic()
    result = subprocess.run([str(REPO / "tests" / "system" / "make-rootfs.sh"), "--arch", "arm64",
                             str(ROOTFS_CACHE), *depends_packages(deb_arm64)],
                            capture_output=True, text=True, timeout=5400)
    assert result.returncode == 0, f"arm64 debootstrap failed:\n{result.stderr}"
    timed("arm64 rootfs (debootstrap under qemu, or cache)", started)
    root = BUILD / "system-arm64" / "root"
    if root.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=True)
    root.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(root), "-xf", result.stdout.strip().splitlines()[-1]], check=True)
    shutil.copy(deb_arm64, root / "root" / deb_arm64.name)
    started = time.monotonic()
    installed = nspawn(root, f"dpkg -i /root/{deb_arm64.name}")
    timed("dpkg -i under qemu", started)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    yield root
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


def test_arm64_package_contents(deb_arm64: Path, deb: Path) -> None:
    fields = {f: subprocess.run(["dpkg-deb", "-f", str(deb_arm64), f], capture_output=True, text=True,
                                check=True).stdout.strip() for f in ("Architecture", "Depends", "Package")}
    assert fields["Architecture"] == "arm64" and fields["Package"] == "forged"
    # The same Debian dependencies as amd64: only the vendored native code differs.
    assert depends_packages(deb_arm64) == depends_packages(deb)
    listing = subprocess.run(["dpkg-deb", "-c", str(deb_arm64)], capture_output=True, text=True, check=True).stdout
    files = {line.split()[5].lstrip(".") for line in listing.splitlines()}
    for path in ("/usr/bin/forged", "/usr/bin/forgectl", "/lib/systemd/system/forged.service",
                 "/usr/lib/forged/vendor/llama_cpp/llama_cpp.py", "/usr/lib/forged/vendor/llama_cpp/lib/libllama.so",
                 "/usr/lib/forged/vendor/pynvml.py", "/usr/share/forged/engine-src/llama.cpp-0.3.36.tar.xz"):
        assert path in files, path


def elf_machine(path: Path) -> int | None:
    with path.open("rb") as fh:
        head = fh.read(20)
    if head[:4] != b"\x7fELF":
        return None
    return struct.unpack_from("<H" if head[5] == 1 else ">H", head, 18)[0]


def test_every_native_library_in_the_arm64_package_is_aarch64(deb_arm64: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb_arm64), str(tmp_path)], check=True)
    machines = {str(p.relative_to(tmp_path)): elf_machine(p) for p in tmp_path.rglob("*")
                if p.is_file() and not p.is_symlink()}
    elves = {name: m for name, m in machines.items() if m is not None}
    assert {Path(n).name.split(".so")[0] for n in elves} >= {"libllama", "libggml", "libggml-base", "libggml-cpu"}
    assert all(name.startswith("usr/lib/forged/vendor/llama_cpp/lib/") for name in elves), elves
    assert set(elves.values()) == {EM_AARCH64}, elves


def test_check_config_probe_and_the_engine_under_qemu(arm64_root: Path) -> None:
    started = time.monotonic()
    arch = nspawn(arm64_root, "uname -m; dpkg --print-architecture; "
                              "dpkg-query -W -f '${Status} ${Architecture}' forged")
    assert arch.stdout.split("\n")[:2] == ["aarch64", "arm64"] and "install ok installed arm64" in arch.stdout
    check = nspawn(arm64_root, "forged check-config")
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.startswith("/etc/forged: OK (") and "this machine uses cpu" in check.stdout
    probe = nspawn(arm64_root, "forged probe --json")
    assert probe.returncode == 0, probe.stderr
    doc = json.loads(probe.stdout)
    assert doc["hardware"]["kind"] == "cpu" and doc["selected"]["name"] == "cpu"
    # The vendored arm64 libllama loads (through forged's vendor dir, as the daemon loads it) and
    # reports the Arm features it was built for.
    info = nspawn(arm64_root, "python3 -c 'import sys; sys.path.insert(0, \"/usr/lib/forged/vendor\"); "
                              "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())'")
    assert info.returncode == 0, info.stderr
    assert "NEON = 1" in info.stdout and "DOTPROD = 1" in info.stdout, info.stdout
    timed("check-config, probe, libllama under qemu", started)
