"""The arm64 package (Jetson), cross-built on this amd64 machine, checked in an arm64 Debian 12 under
qemu-user emulation.

CI's reduced check: the package's fields and files, the ELF machine of every native library in it,
and the vendored libllama loading in an arm64 process under qemu-user (the cross toolchain's glibc as
its root) and reporting its Arm features. An arm64 Debian 12 root takes a debootstrap under emulation
(39 minutes once on this 2-core box), too slow for CI: `make arm64-boot` (tests/system/arm64_boot.py)
installs the package there with apt, boots it under systemd, and serves a completion over the socket.

Needs root, crossbuild-essential-arm64 and qemu-user-static (scripts/bootstrap.sh --test); fails,
never skips, without them.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from packaged import BUILD, REPO, WHEELS, depends_packages, require_host, timed

EM_AARCH64 = 183


def require_qemu() -> None:
    require_host()
    missing = [tool for tool in ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-strip", "qemu-aarch64-static")
               if not shutil.which(tool)]
    if missing:
        pytest.fail(f"arm64 checks cannot run here: {', '.join(missing)} missing (scripts/bootstrap.sh --test)",
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


PROBE_C = r"""
#include <dlfcn.h>
#include <stdio.h>
int main(int argc, char **argv) {
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 2; }
    void (*init)(void) = (void (*)(void))dlsym(lib, "llama_backend_init");
    const char *(*info)(void) = (const char *(*)(void))dlsym(lib, "llama_print_system_info");
    if (!init || !info) { fprintf(stderr, "dlsym: %s\n", dlerror()); return 3; }
    init();
    puts(info());
    return 0;
}
"""


def test_the_vendored_arm64_engine_loads_under_qemu(deb_arm64: Path, tmp_path: Path) -> None:
    """The package's libllama, with every library it needs from the package, loads in an arm64
    process (qemu-user, the cross toolchain's glibc and libstdc++ as the root) and reports the Arm
    features it was built for. dlopen with RTLD_NOW resolves every symbol, so a library built for the
    wrong ABI or missing from the package fails here."""
    subprocess.run(["dpkg-deb", "-x", str(deb_arm64), str(tmp_path / "root")], check=True)
    (tmp_path / "probe.c").write_text(PROBE_C)
    subprocess.run(["aarch64-linux-gnu-gcc", "-O1", "-o", str(tmp_path / "probe"), str(tmp_path / "probe.c"), "-ldl"],
                   check=True)
    lib = tmp_path / "root/usr/lib/forged/vendor/llama_cpp/lib/libllama.so"
    info = subprocess.run(["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu", str(tmp_path / "probe"), str(lib)],
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "NEON = 1" in info.stdout and "DOTPROD = 1" in info.stdout, info.stdout
