"""System test: a hung engine step loop under real systemd.

The step loop is wedged through the test hook (a drop-in sets FORGED_TEST_HOOKS=1 and a short
WatchdogSec) while a request is pending: /readyz turns 503, forged withholds WATCHDOG=1, systemd's
watchdog kills it and restarts it, and the new process is READY again. Unlike SIGSTOP (see
test_package.py), the process and its event loop stay alive: only the engine stops making progress.

It uses the shared fixtures of conftest.py (the .deb, the cached rootfs, a booted container of its
own for this module) and installs the package itself, so it also runs alone:
    pytest tests/system/test_engine_hang.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from nspawn import Container, quote
from packaged import timed
from test_package import MODEL, UNIX, wait_for

WATCHDOG_S = 6
DROPIN = f"""[Service]
Environment=FORGED_TEST_HOOKS=1
WatchdogSec={WATCHDOG_S}s
RestartSec=1s
TimeoutAbortSec=10s
"""
DROPIN_PATH = "/etc/systemd/system/forged.service.d/test-hang.conf"


def test_install_with_the_fault_hook(container: Container, deb: Path, model_path: Path) -> None:
    ctr = container
    ctr.copy_in(deb, f"/root/{deb.name}")
    ctr.run(f"apt-get install -y /root/{deb.name}", timeout=300)
    ctr.run("systemctl stop forged.service")
    ctr.copy_in(model_path, f"/root/{MODEL}")
    ctr.run(f"forgectl model install /root/{MODEL}")
    ctr.write(DROPIN_PATH, DROPIN)
    ctr.run("systemctl daemon-reload && systemctl start forged.service", timeout=120)
    props = ctr.show("forged.service", "ActiveState", "WatchdogUSec")
    assert props == {"ActiveState": "active", "WatchdogUSec": f"{WATCHDOG_S}s"}, props
    assert "fault-injection routes are enabled" in ctr.journal()


def _readyz(ctr: Container) -> tuple[int, dict[str, str]]:
    out = ctr.run(f"curl -sS --max-time 5 -w '\\n%{{http_code}}' {UNIX}/readyz", check=False).stdout
    body, _, code = out.rpartition("\n")
    return int(code or 0), (json.loads(body) if body.startswith("{") else {})


def _stalled(ctr: Container) -> dict[str, str] | None:
    code, body = _readyz(ctr)
    return body if code == 503 else None


def test_hung_step_loop_is_restarted_by_the_watchdog(container: Container) -> None:
    ctr = container
    before = ctr.show("forged.service", "MainPID", "NRestarts")
    assert _readyz(ctr)[0] == 200
    fault = quote(json.dumps({"kind": "hang", "seconds": 600}))
    ctr.curl(f"{UNIX}/_test/fault -H 'content-type: application/json' -d {fault}")
    started = time.monotonic()
    # Work for the wedged loop: a request that is admitted and never gets a step.
    request = quote(json.dumps({"prompt": "Hello", "max_tokens": 8}))
    pending = ctr.popen(f"curl -sS --max-time 120 {UNIX}/v1/completions -H 'content-type: application/json' "
                        f"-d {request}")
    try:
        # /readyz says so before the watchdog fires (after half a ping interval without a step).
        body = wait_for(lambda: _stalled(ctr), WATCHDOG_S, "/readyz to report the stalled engine", interval=0.1)
        assert body["status"] == "stalled", body

        def restarted() -> bool:
            now = ctr.show("forged.service", "MainPID", "NRestarts", "ActiveState")
            return int(now["NRestarts"]) == int(before["NRestarts"]) + 1 and now["ActiveState"] == "active" \
                and now["MainPID"] not in ("0", before["MainPID"])

        wait_for(restarted, 60, "systemd's watchdog to kill forged and start it again")
        timed("hang -> watchdog -> restarted and ready", started)
    finally:
        pending.kill()
        pending.wait(10)
    journal = ctr.journal(lines=200)
    assert "engine made no progress" in journal and "withholding WATCHDOG=1" in journal, journal
    assert f"Watchdog timeout (limit {WATCHDOG_S}s)" in journal, journal
    # The new process is READY (Type=notify: active only after READY=1) and serves.
    props = ctr.show("forged.service", "StatusText")
    assert props["StatusText"].startswith("profile cpu, ready"), props
    assert _readyz(ctr)[0] == 200
    body = quote(json.dumps({"prompt": "Hello", "max_tokens": 4, "ignore_eos": True}))
    out = json.loads(ctr.curl(f"{UNIX}/v1/completions -H 'content-type: application/json' -d {body}"))
    assert out["usage"]["completion_tokens"] == 4, out
