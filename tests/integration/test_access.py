"""Access control against the real daemon: the UNIX socket's mode and group, loopback-only TCP without
keys, API keys on TCP, forgectl sending them, and prompts kept out of the log.

The tests run as root, which bypasses file permissions, so the socket checks run their client as real
throwaway system users (created with groupadd/useradd here, removed afterwards) through
`setpriv --reuid --regid --init-groups`: one in the socket's group, one outside it.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO, Daemon, sse_events

from forged.api.app import bind_private_unix_socket
from forged.cli import forgectl_main
from forged.config import HttpListener, load

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates system users; run the suite as root")

KEYS = ["fk-" + "a1" * 16, "fk-" + "b2" * 16]
# Connects as whoever runs it and prints the status line, or the errno of a refused connect.
PROBE = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("errno", exc.errno)
    sys.exit(0)
s.sendall(("GET " + sys.argv[2] + " HTTP/1.0\\r\\nHost: forged\\r\\n\\r\\n").encode())
print(s.recv(200).split(b"\\r\\n")[0].decode())
"""
SYSTEM_PYTHON = "/usr/bin/python3"  # the test's own interpreter may sit in a directory only root can read


class Users:
    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.group, self.member, self.outsider = f"fgacc{tag}", f"fgin{tag}", f"fgout{tag}"

    def create(self) -> None:
        subprocess.run(["groupadd", "--system", self.group], check=True)
        for user, extra in ((self.member, ["-G", self.group]), (self.outsider, [])):
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            "--no-user-group", "--gid", "nogroup", *extra, user], check=True)

    def remove(self) -> None:
        for user in (self.member, self.outsider):
            subprocess.run(["userdel", user], check=False, capture_output=True)
        subprocess.run(["groupdel", self.group], check=False, capture_output=True)

    def run_as(self, user: str, *argv: str) -> str:
        cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--init-groups", SYSTEM_PYTHON, "-c", PROBE, *argv]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    made = Users()
    made.create()
    try:
        yield made
    finally:
        made.remove()


def write_keys(path: Path, keys: list[str], mode: int = 0o600) -> Path:
    path.write_text("# forged API keys, one a line\n\n" + "".join(f"{k}\n" for k in keys))
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, model_path: Path, users: Users) -> Iterator[Daemon]:
    """A daemon with API keys and a socket for `users.group`, in a directory every user may search (the
    pytest temp dirs are 0700), started under umask 000 so that a socket left to the umask would show."""
    root = tmp_path_factory.mktemp("secured")
    sock_dir = Path(tempfile.mkdtemp(prefix="forged-access-", dir="/tmp"))
    sock_dir.chmod(0o755)
    keys = write_keys(root / "api-keys", KEYS)
    daemon = Daemon(root, model_path, settings={"listen": {
        "http": {"api_keys_file": str(keys)},
        "unix": {"path": str(sock_dir / "forged.sock"), "group": users.group}}})
    daemon.socket_path = sock_dir / "forged.sock"
    previous = os.umask(0)
    try:
        daemon.start(wait_ready=False)
    finally:
        os.umask(previous)
    daemon.wait_ready()
    yield daemon
    daemon.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)
    shutil.rmtree(root / "state", ignore_errors=True)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def start_fails(daemon: Daemon) -> tuple[int, list[str]]:
    """Start a daemon expected to refuse; its exit status and its output lines."""
    daemon.start(wait_ready=False)
    assert daemon.proc is not None
    code = daemon.proc.wait(60)
    return code, daemon.log_path.read_text().splitlines()


# ---------------------------------------------------------------- the UNIX socket

def test_socket_is_0660_with_the_configured_group_under_umask_000(secured: Daemon, users: Users) -> None:
    info = secured.socket_path.stat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == grp.getgrnam(users.group).gr_gid


def test_group_member_connects_and_other_users_get_eacces(secured: Daemon, users: Users) -> None:
    path = str(secured.socket_path)
    # The UNIX socket needs no API key: its permissions already decided who is talking.
    assert users.run_as(users.member, path, "/v1/models") == "HTTP/1.0 200 OK"
    assert users.run_as(users.outsider, path, "/healthz") == f"errno {errno.EACCES}"
    assert users.outsider not in grp.getgrnam(users.group).gr_mem  # refused for the group, not by accident
    assert pwd.getpwnam(users.outsider).pw_uid != 0


def test_socket_is_bound_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    """Between bind() and the chmod to the configured mode, the socket must already be closed to others."""
    previous = os.umask(0)
    try:
        sock = bind_private_unix_socket(tmp_path / "s.sock")
        assert os.umask(0) == 0  # restored right after the bind
    finally:
        os.umask(previous)
    sock.close()
    assert stat.S_IMODE((tmp_path / "s.sock").stat().st_mode) == 0o600


def test_socket_in_a_world_writable_directory_is_refused(make_daemon: Any) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="forged-open-", dir="/tmp"))
    try:
        sock_dir.chmod(0o777)  # no sticky bit: anyone could swap the socket for their own
        daemon = make_daemon(settings={"listen": {"unix": {"path": str(sock_dir / "forged.sock")}}})
        code, lines = start_fails(daemon)
        assert code == 78, lines
        refusal = [line for line in lines if "config error" in line]
        assert len(refusal) == 1 and str(sock_dir) in refusal[0] and "chmod o-w" in refusal[0], lines
        assert not (sock_dir / "forged.sock").exists()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


# ---------------------------------------------------------------- TCP: loopback unless keys

def _listening_addresses(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_tcp_binds_loopback_by_default(secured: Daemon) -> None:
    assert HttpListener().host == "127.0.0.1"
    assert load(REPO / "etc" / "forged").settings.listen.http.host == "127.0.0.1"
    # `secured` sets no host: the kernel's table shows 127.0.0.1 only (little-endian hex).
    assert _listening_addresses(secured.port) == {"0100007F"}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_non_loopback_host_without_keys_refuses_to_start(make_daemon: Any, host: str) -> None:
    code, lines = start_fails(make_daemon(settings={"listen": {"http": {"host": host}}}))
    assert code == 78
    assert len(lines) == 1, lines
    assert "listen.http.host" in lines[0] and repr(host) in lines[0] and "api_keys_file" in lines[0]


def test_socket_activation_on_a_non_loopback_address_without_keys_refuses(make_daemon: Any) -> None:
    """forged.socket's ListenStream= bypasses listen.http.host; the same rule holds for what systemd passes.
    The socket is bound but never listens, so nothing is exposed while the test runs."""
    daemon = make_daemon()
    exposed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    exposed.bind(("0.0.0.0", 0))
    # sd_listen_fds: the socket at fd 3, LISTEN_PID the daemon's own pid (exec keeps it).
    become_socket_activated = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
                               "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
                               "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")
    with exposed:
        done = subprocess.run([sys.executable, "-c", become_socket_activated, str(exposed.fileno()), "-m", "forged",
                               "--config-dir", str(daemon.config_dir), "run"], env=daemon.env,
                              pass_fds=(exposed.fileno(),), capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stderr
    refusal = [line for line in done.stderr.splitlines() if "config error" in line]
    assert len(refusal) == 1 and "0.0.0.0" in refusal[0] and "api_keys_file" in refusal[0], done.stderr


def test_non_loopback_host_with_keys_passes_config_validation(tmp_path: Path) -> None:
    (tmp_path / "forged.yaml").write_text(json.dumps({"listen": {"http": {
        "host": "0.0.0.0", "api_keys_file": str(write_keys(tmp_path / "keys", KEYS))}}}))
    shutil.copy(REPO / "etc" / "forged" / "sku_profiles.yaml", tmp_path)
    done = subprocess.run([sys.executable, "-m", "forged", "--config-dir", str(tmp_path), "check-config"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_keys_required_on_loopback_without_a_key_file_refuses_to_start(tmp_path: Path, make_daemon: Any) -> None:
    """The switch that closes loopback TCP to local users without a key: with no key file it cannot be
    honoured, so check-config and the daemon refuse in one line (78)."""
    (tmp_path / "forged.yaml").write_text(json.dumps({"listen": {"http": {"require_keys_on_loopback": True}}}))
    shutil.copy(REPO / "etc" / "forged" / "sku_profiles.yaml", tmp_path)
    done = subprocess.run([sys.executable, "-m", "forged", "--config-dir", str(tmp_path), "check-config"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stderr
    assert "listen.http.require_keys_on_loopback" in done.stderr and "api_keys_file" in done.stderr
    code, lines = start_fails(make_daemon(settings={"listen": {"http": {"require_keys_on_loopback": True}}}))
    assert code == 78 and len(lines) == 1 and "require_keys_on_loopback" in lines[0], lines
    # Without TCP there is nothing to protect: the switch is satisfied.
    (tmp_path / "forged.yaml").write_text(json.dumps({"listen": {"http": {"require_keys_on_loopback": True,
                                                                          "enabled": False}}}))
    done = subprocess.run([sys.executable, "-m", "forged", "--config-dir", str(tmp_path), "check-config"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_socket_activation_on_loopback_without_keys_refuses_when_keys_are_required(make_daemon: Any) -> None:
    daemon = make_daemon(settings={"listen": {"http": {"enabled": False, "require_keys_on_loopback": True}}})
    loopback = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    loopback.bind(("127.0.0.1", 0))
    become_socket_activated = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
                               "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
                               "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")
    with loopback:
        done = subprocess.run([sys.executable, "-c", become_socket_activated, str(loopback.fileno()), "-m", "forged",
                               "--config-dir", str(daemon.config_dir), "run"], env=daemon.env,
                              pass_fds=(loopback.fileno(),), capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stderr
    refusal = [line for line in done.stderr.splitlines() if "config error" in line]
    assert len(refusal) == 1 and "127.0.0.1" in refusal[0] and "require_keys_on_loopback" in refusal[0], done.stderr


def test_status_and_doctor_show_who_can_reach_tcp(secured: Daemon, make_daemon: Any,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """With keys, TCP is closed to a caller without one: doctor passes it. Without keys (the packaged
    default) doctor warns that every local user can generate over TCP, and says how to close it."""
    open_tcp = make_daemon().start()
    for daemon, keyed in ((secured, True), (open_tcp, False)):
        with daemon.unix_client(timeout=10) as client:
            access = client.get("/v1/status").json()["access"]
        assert access == {"tcp": [f"127.0.0.1:{daemon.port}"], "unix": [str(daemon.socket_path)],
                          "tcp_api_keys": keyed}
        capsys.readouterr()
        assert forgectl_main(["--socket", str(daemon.socket_path), "--json", "doctor"]) in (0, 1)
        check = next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "TCP access control")
        if keyed:
            assert check["result"] == "pass" and "needs an API key" in check["reason"], check
        else:
            assert check["result"] == "warn", check
            assert f"127.0.0.1:{daemon.port}" in check["reason"] and "require_keys_on_loopback" in check["reason"]


# ---------------------------------------------------------------- the key file

@pytest.mark.parametrize("problem", ["group_readable", "other_readable", "foreign_owner", "missing", "no_keys",
                                     "short_key"])
def test_bad_key_file_refuses_to_start(make_daemon: Any, users: Users, tmp_path: Path, problem: str) -> None:
    path = tmp_path / "api-keys"
    expect = {"group_readable": "chmod 0600", "other_readable": "chmod 0600", "foreign_owner": "chown root",
              "missing": "does not exist", "no_keys": "no API key", "short_key": f"{path}:3:"}[problem]
    if problem != "missing":
        write_keys(path, {"no_keys": [], "short_key": ["tooshort"]}.get(problem, KEYS),
                   {"group_readable": 0o640, "other_readable": 0o604}.get(problem, 0o600))
    if problem == "foreign_owner":
        os.chown(path, pwd.getpwnam(users.outsider).pw_uid, -1)
    code, lines = start_fails(make_daemon(settings={"listen": {"http": {"api_keys_file": str(path)}}}))
    assert code == 78
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and expect in lines[0], lines[0]
    assert not any(key in lines[0] for key in [*KEYS, "tooshort"])


# ---------------------------------------------------------------- API keys on TCP

def test_tcp_requests_need_a_valid_key(secured: Daemon) -> None:
    for headers in ({}, bearer("fk-" + "00" * 16), {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": "Bearer"}):
        for method, route in (("GET", "/v1/models"), ("GET", "/v1/status"), ("GET", "/metrics"),
                              ("POST", "/v1/completions"), ("GET", "/no/such/route")):
            r = httpx.request(method, f"{secured.url}{route}", headers=headers, json={"prompt": "hi"}, timeout=10)
            assert r.status_code == 401, (headers, route, r.text)
            assert r.headers["WWW-Authenticate"] == "Bearer"
            error = r.json()["error"]
            assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
            assert set(error) == {"message", "type", "param", "code"}
    for key in KEYS:
        assert httpx.get(f"{secured.url}/v1/models", headers=bearer(key), timeout=10).status_code == 200
    r = httpx.post(f"{secured.url}/v1/completions", headers=bearer(KEYS[1]), timeout=60,
                   json={"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_probes_are_exempt_and_the_unix_socket_needs_no_key(secured: Daemon) -> None:
    for route in ("/healthz", "/readyz"):
        assert httpx.get(f"{secured.url}{route}", timeout=10).status_code == 200
    with secured.unix_client(timeout=10) as client:
        assert client.get("/v1/status").status_code == 200


def test_metrics_without_key_opens_only_metrics(make_daemon: Any, tmp_path: Path) -> None:
    """For scrapers that cannot send a key (the inference gateway's endpoint picker): /metrics alone."""
    keys = write_keys(tmp_path / "api-keys", [KEYS[0]])
    daemon = make_daemon(settings={"listen": {"http": {"api_keys_file": str(keys),
                                                       "metrics_without_key": True}}}).start()
    r = httpx.get(f"{daemon.url}/metrics", timeout=10)
    assert r.status_code == 200 and "forge_kv_cache_usage_ratio" in r.text
    for route in ("/v1/models", "/v1/status"):
        assert httpx.get(f"{daemon.url}{route}", timeout=10).status_code == 401


def test_sighup_rereads_the_key_file(make_daemon: Any, tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "api-keys", [KEYS[0]])
    daemon = make_daemon(settings={"listen": {"http": {"api_keys_file": str(keys)}}}).start()
    models = f"{daemon.url}/v1/models"
    assert httpx.get(models, headers=bearer(KEYS[0]), timeout=10).status_code == 200
    write_keys(keys, [KEYS[1]])
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while httpx.get(models, headers=bearer(KEYS[1]), timeout=10).status_code != 200:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.1)
    assert httpx.get(models, headers=bearer(KEYS[0]), timeout=10).status_code == 401
    # A key file that became readable by others is refused at reload too; the keys in force stay.
    keys.chmod(0o644)
    daemon.proc.send_signal(signal.SIGHUP)
    while "keeping the API keys in force" not in daemon.log():
        assert time.monotonic() < deadline + 30, daemon.log()
        time.sleep(0.1)
    assert httpx.get(models, headers=bearer(KEYS[1]), timeout=10).status_code == 200
    assert not any(key in daemon.log() for key in KEYS)


# ---------------------------------------------------------------- forgectl

def test_forgectl_sends_the_key_over_tcp(secured: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORGED_API_KEY", raising=False)
    key_file = write_keys(tmp_path / "client-key", [KEYS[1]], mode=0o644)  # the client's copy: any mode
    assert forgectl_main(["--url", secured.url, "--json", "status"]) == 1
    assert "HTTP 401" in capsys.readouterr().err
    assert forgectl_main(["--url", secured.url, "--api-key-file", str(key_file), "--json", "status"]) == 0
    assert json.loads(capsys.readouterr().out)["status"]["phase"] == "ready"
    monkeypatch.setenv("FORGED_API_KEY", KEYS[0])
    assert forgectl_main(["--url", secured.url, "status"]) == 0
    monkeypatch.delenv("FORGED_API_KEY")
    assert forgectl_main(["--socket", str(secured.socket_path), "status"]) == 0
    capsys.readouterr()
    # bench streams through its own connections; they must carry the key too.
    assert forgectl_main(["--url", secured.url, "--api-key-file", str(key_file), "--json", "bench", "--users", "1",
                          "--prompt-tokens", "30", "--max-tokens", "2", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["ok"] == 1, report["summary"]
    assert forgectl_main(["--url", secured.url, "--api-key-file", str(tmp_path / "nope"), "status"]) == 2
    assert "nope" in capsys.readouterr().err


# ---------------------------------------------------------------- prompts stay out of the log

def test_prompt_text_never_reaches_the_log_at_the_default_level(secured: Daemon) -> None:
    marker = f"PROMPT-MARKER-{uuid.uuid4().hex}"
    completion = {"prompt": f"Say {marker}", "max_tokens": 3}
    chat = {"messages": [{"role": "user", "content": f"Say {marker}"}], "max_tokens": 3}
    with httpx.Client(base_url=secured.url, headers=bearer(KEYS[0]), timeout=60) as tcp, \
            secured.unix_client(timeout=60) as unix:
        for client in (tcp, unix):
            for route, body in (("/v1/completions", completion), ("/v1/chat/completions", chat)):
                assert client.post(route, json=body).status_code == 200
                with client.stream("POST", route, json={**body, "stream": True}) as r:
                    assert r.status_code == 200 and list(sse_events(r.iter_lines()))[-1] == "[DONE]"
                # Rejected: an unknown field, a bad role, broken JSON.
                assert client.post(route, json={**body, "bogus": marker}).status_code == 400
            bad_chat = {"messages": [{"role": "wizard", "content": marker}]}
            assert client.post("/v1/chat/completions", json=bad_chat).status_code == 400
            r = client.post("/v1/completions", content=f'{{"prompt": "{marker}"'.encode(),
                            headers={"Content-Type": "application/json"})
            assert r.status_code == 400
        # A wrong key carrying the marker: refused, and the key it tried is not logged either.
        assert httpx.get(f"{secured.url}/v1/models", headers=bearer(marker), timeout=10).status_code == 401
    # Broken HTTP framing: aiohttp's parser rejects it before forged sees a request.
    with socket.create_connection(("127.0.0.1", secured.port), timeout=10) as raw:
        raw.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    f"zz{marker}\r\n".encode())
        assert b" 400 " in raw.recv(100).split(b"\r\n")[0]
    time.sleep(0.5)  # let the daemon write whatever it would log about these
    log = secured.log_path.read_text(errors="replace")
    assert "ready: model" in log  # the right log, at its default (info) level
    assert marker not in log
    assert not any(key in log for key in KEYS)
