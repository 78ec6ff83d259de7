"""`make arm64-boot`: the arm64 package in an arm64 Debian 12 booted under qemu-user emulation, up to
READY and one short completion over the UNIX socket. Run as root after `make test` (or the arm64
system test) has built build/deb-arm64 and the cached arm64 rootfs:

    sudo .venv/bin/python tests/system/arm64_boot.py

systemd runs as PID 1 of a systemd-nspawn container whose every program is emulated (binfmt_misc ->
qemu-aarch64-static), so this takes minutes; CI runs the reduced check in test_arm64.py instead, and
docs/install.md records this script's last result. It prints each step's time and writes them to
build/arm64-boot/result.txt.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nspawn import Container
from packaged import BUILD, REPO, ROOTFS_CACHE, depends_packages

SOCK = "/run/forged/forged.sock"
# qemu-user cannot set up the unit's private IPC namespace (systemd: "Failed to set up IPC
# namespacing: Input/output error", status 226/NAMESPACE); every other hardening setting works under
# emulation. The unit as shipped is tested natively (test_package.py, test_units.py).
QEMU_DROPIN = """[Service]
PrivateIPC=no
"""


def main() -> int:
    steps: list[tuple[str, float]] = []
    t0 = time.monotonic()

    def step(label: str, started: float) -> None:
        steps.append((label, time.monotonic() - started))
        print(f"[{time.monotonic() - t0:6.0f} s] {label}: {steps[-1][1]:.1f} s", flush=True)

    deb = next((BUILD / "deb-arm64").glob("forged_*_arm64.deb"), None)
    if deb is None:
        print("arm64-boot: no build/deb-arm64/forged_*_arm64.deb; run scripts/build-deb.sh build/deb-arm64 arm64",
              file=sys.stderr)
        return 1
    started = time.monotonic()
    tarball = subprocess.run([str(REPO / "tests" / "system" / "make-rootfs.sh"), "--arch", "arm64",
                              str(ROOTFS_CACHE), *depends_packages(deb)], capture_output=True, text=True,
                             check=True, timeout=5400).stdout.strip().splitlines()[-1]
    step("arm64 rootfs (cache)", started)
    work = BUILD / "arm64-boot"
    root = work / "root"
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=True)
    root.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(root), "-xf", tarball], check=True)
    sys.path.insert(0, str(REPO))
    from forged.config import ModelSettings
    from forged.engine.model_files import resolve_model

    model, _ = resolve_model(ModelSettings(), BUILD / "test-state")
    ctr = Container(root, work / "nspawn.log", name="forged-arm64")
    ok = False
    try:
        started = time.monotonic()
        ctr.boot(timeout=600)
        step("boot: systemd under qemu to running", started)
        ctr.copy_in(deb, f"/root/{deb.name}")
        ctr.copy_in(model, f"/root/{model.name}")
        started = time.monotonic()
        ctr.run(f"apt-get install -y /root/{deb.name}", timeout=900)
        step("apt install ./forged_arm64.deb", started)
        started = time.monotonic()
        ctr.run(f"forgectl model install /root/{model.name}", timeout=600)
        step("forgectl model install", started)
        ctr.write("/etc/systemd/system/forged.service.d/qemu.conf", QEMU_DROPIN)
        ctr.run("systemctl daemon-reload")
        started = time.monotonic()
        ctr.run("systemctl restart forged.service", timeout=1200)  # returns at READY=1 (Type=notify)
        status = ctr.show("forged.service", "ActiveState", "StatusText")
        step("systemctl restart forged (until READY)", started)
        print(f"forged.service: {status}")
        started = time.monotonic()
        body = json.dumps({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
        answer = json.loads(ctr.curl(f"--unix-socket {SOCK} http://forged/v1/completions "
                                     f"-H 'Content-Type: application/json' -d '{body}'", timeout=600))
        step("one completion over the UNIX socket (4 tokens)", started)
        print(f"completion: {answer['choices'][0]['text']!r}, usage {answer['usage']}")
        ok = status["ActiveState"] == "active" and answer["choices"][0]["finish_reason"] in ("length", "stop")
        print(ctr.journal(lines=15))
    finally:
        result = "\n".join(f"{label}: {secs:.1f} s" for label, secs in steps)
        (work / "result.txt").write_text(f"{'PASS' if ok else 'FAIL'} {time.strftime('%Y-%m-%d')}\n{result}\n")
        ctr.poweroff(timeout=120)
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
