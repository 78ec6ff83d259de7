"""The boot sequence, signals and shutdown of `forged run`.

Boot: config -> hardware -> profile -> model file check -> listeners open (requests are held) ->
model load (EXTEND_TIMEOUT_USEC while it lasts) -> engine steps -> READY=1.
SIGTERM/SIGINT: STOPPING=1, refuse new requests, let admitted ones finish up to the drain timeout,
cancel the rest, exit 0. SIGHUP: reload guards and targets live (RELOADING=1 ... READY=1).
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path

from aiohttp import web

from forged import config as config_mod
from forged import hardware as hardware_mod
from forged import paths, profiles, sanity
from forged.admission import Admission, Limits
from forged.api import auth, openai
from forged.api.app import access_summary, build_app, make_runner, open_listeners
from forged.engine import create_engine
from forged.engine.base import Engine, EngineError, EngineHooks
from forged.metrics import Metrics
from forged.schema import EXIT_CONFIG, ConfigError
from forged.state import ServiceState
from forged.systemd import Notifier, inherited_sockets, run_watchdog, watchdog_interval

log = logging.getLogger("forged")

EXIT_OK = 0
EXIT_FAILURE = 1
LOAD_EXTEND_S = 30.0
STATUS_INTERVAL_S = 2.0
# After the drain timeout, how long cancelled requests get to write their last event before forged
# hangs up on the clients that are not reading it, and then for those handlers to end.
HANG_UP_GRACE_S = 2.0


class Daemon:
    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir
        self.notifier = Notifier()
        self.state: ServiceState | None = None
        self._stop = asyncio.Event()
        self._exit_code = EXIT_OK
        self._tasks: list[asyncio.Task[None]] = []
        # The most sessions this engine can run: its sequence slots and what fits in memory, fixed at
        # load. A reload moves the limit below it, never above (that needs a restart).
        self._session_cap: int | None = None
        self._api_keys = auth.ApiKeys()

    async def run(self) -> int:
        loaded = config_mod.load(self.config_dir)
        logging.getLogger().setLevel(loaded.settings.logging.level.upper())
        # Checked before anything else starts: a key file others can read is a config error (78).
        http = loaded.settings.listen.http
        self._api_keys = auth.load_api_keys(http.api_keys_file, loaded.config_dir, http.metrics_without_key)
        if self._api_keys.configured:
            log.info("API keys: %d from %s required on TCP", len(self._api_keys), self._api_keys.path)
        raise_open_files_limit()
        hardware = hardware_mod.probe()
        selection = profiles.select(loaded, hardware)
        log.info("hardware: %s %s, %d cores, %.1f GiB; profile %s (%s)", hardware.kind, hardware.name,
                 hardware.cores, hardware.memory_total_bytes / 2**30, selection.name, selection.reason)
        # The profile's engine, its model file checked: fails before opening listeners, in one line.
        choice = create_engine(loaded, selection.name, selection.profile, hardware, paths.state_dir())
        engine = choice.engine
        model_name = engine.model_name
        # The metrics read live state at scrape time; `state` exists before any scrape can happen.
        metrics = Metrics(lambda: state.live())
        state = ServiceState(config=loaded, profile_name=selection.name, profile=selection.profile,
                             hardware=hardware, engine=engine, metrics=metrics, placement=choice.placement,
                             test_hooks=os.environ.get("FORGED_TEST_HOOKS") == "1", engine_note=choice.note,
                             gpu_unused=choice.gpu_unused)
        state.metrics.set_info(sku=selection.name, engine=engine.name, model=model_name,
                               profile=selection.name)
        self.state = state
        if state.test_hooks:
            log.warning("FORGED_TEST_HOOKS=1: fault-injection routes are enabled; never use this in production")

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))

        runner = make_runner(build_app(state, self._api_keys))
        socket_path = Path(loaded.settings.listen.unix.path or paths.run_dir() / "forged.sock")
        bound_socket: Path | None = None
        await runner.setup()
        inherited = inherited_sockets()
        auth.require_keys_beyond_loopback(inherited.values(), self._api_keys,
                                          loaded.settings.listen.http.require_keys_on_loopback)
        try:
            opened = await open_listeners(runner, loaded.settings, socket_path, inherited)
            state.access = access_summary(runner, self._api_keys.configured)
            if not inherited and loaded.settings.listen.unix.enabled:
                bound_socket = socket_path
            log.info("listening on %s", ", ".join(opened))
            # Read before the load, on the devices that will hold the KV cache (host RAM when the GPU is
            # unused): the cache then takes its share of what is free there.
            memory_before = (hardware_mod.system_memory() if choice.gpu_unused
                             else choice.placement.kv_memory(hardware))
            await self._load(engine)
            sessions = None
            if engine.kv_shape is not None:
                memory = sanity.check(selection.profile, memory_before, choice.placement.kv_shape(engine.kv_shape),
                                      engine=engine.name)
                state.memory_warning = memory.warning
                if memory.warning:
                    log.warning("%s", memory.warning)
                sessions = memory.sessions_enforced
            if engine.max_sessions is not None:
                sessions = min(sessions or engine.max_sessions, engine.max_sessions)
            self._session_cap = sessions
            state.admission = Admission(engine, Limits.from_profile(selection.profile, sessions), state.metrics)
            engine.start(loop, EngineHooks(on_preempted=state.admission.on_preempted,
                                           on_capacity_freed=state.admission.on_capacity_freed,
                                           on_fatal=self._on_fatal))
            state.phase = "ready"
            self.notifier.ready(self._status_line())
            log.info("ready: model %s, profile %s, on %s", model_name, selection.name, _runs_on(engine))
            if choice.gpu_unused:
                log.warning("%s", choice.gpu_unused)
            self._tasks.append(asyncio.create_task(self._status_loop()))
            interval = watchdog_interval()
            if interval:
                self._tasks.append(asyncio.create_task(run_watchdog(self.notifier, interval, engine.progress)))
            await self._stop.wait()
            await self._drain(runner.app)
        finally:
            for task in self._tasks:
                task.cancel()
            await runner.cleanup()
            await engine.stop()
            # Only what this process bound: a socket passed by systemd belongs to forged.socket, and
            # one that failed to bind may belong to another running instance.
            if bound_socket is not None:
                bound_socket.unlink(missing_ok=True)
        return self._exit_code

    async def _load(self, engine: Engine) -> None:
        started = time.monotonic()
        self.notifier.send(f"STATUS=loading model {Path(engine.model.path).name} ({engine.name})")
        load = asyncio.get_running_loop().run_in_executor(None, self._load_blocking, engine)
        while True:
            self.notifier.extend_timeout(LOAD_EXTEND_S)
            done, _ = await asyncio.wait({load}, timeout=LOAD_EXTEND_S / 3)
            if done:
                load.result()
                break
            if self._stop.is_set():
                log.info("stop requested while the model loads; finishing the load first")
        log.info("model loaded in %.2f s", time.monotonic() - started)

    def _load_blocking(self, engine: Engine) -> None:
        assert self.state is not None
        delay = float(os.environ.get("FORGED_TEST_LOAD_DELAY_S", "0")) if self.state.test_hooks else 0.0
        if delay:  # test hook: a slow model load, to observe the loading phase
            time.sleep(delay)
        engine.load()

    async def _drain(self, app: web.Application) -> None:
        state = self.state
        assert state is not None and state.admission is not None
        timeout = state.config.settings.server.drain_timeout_s
        if state.phase != "failed":  # a failed engine stays "failed" (readyz says why) until the exit
            state.phase = "draining"
        state.admission.start_draining()
        busy = len(state.admission.sessions) + len(state.admission.queue)
        self.notifier.stopping(f"draining {busy} requests (up to {timeout:.0f} s)")
        log.info("stopping: draining %d requests for up to %.0f s", busy, timeout)
        if not await state.admission.wait_idle(timeout):
            left = len(state.admission.sessions) + len(state.admission.queue)
            log.warning("drain timeout: cancelling %d requests still running", left)
            state.admission.cancel_all()
            # A client that is not reading cannot take its final event, and its handler would wait
            # for it up to server.write_timeout_s: hang up on it, so the exit is not held past here.
            if not await state.admission.wait_idle(HANG_UP_GRACE_S):
                hung = openai.hang_up(app)
                log.warning("drain: hung up on %d clients that did not take their final event within %g s",
                            hung, HANG_UP_GRACE_S)
                await state.admission.wait_idle(HANG_UP_GRACE_S)
        # Give handlers a moment to write their final events before the listeners close.
        await asyncio.sleep(0.1)
        # The counters die with the process: leave them in the journal, where a request admitted
        # but never ended shows as admitted > completed + cancelled + failed.
        log.info("requests at exit: %s", ", ".join(f"{k} {v}" for k, v in state.metrics.request_totals().items()))

    async def reload(self) -> None:
        """Re-read the config; apply guard and target changes live, report the rest as pending."""
        # The key file first, whatever else happens: revoking a leaked key must not wait for a
        # broken forged.yaml to be fixed, nor for the engine to be ready. Same file: rotating keys
        # needs no restart.
        if self._api_keys.configured:
            try:
                self._api_keys.reload()
                log.info("reload: API keys: %d from %s", len(self._api_keys), self._api_keys.path)
            except ConfigError as exc:
                log.error("reload: keeping the API keys in force: %s", exc)
        state = self.state
        if state is None or state.admission is None or state.phase != "ready":
            log.warning("SIGHUP ignored: not ready")
            return
        self.notifier.reloading()
        try:
            loaded = config_mod.load(self.config_dir)
            selection = profiles.select(loaded, state.hardware)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            self.notifier.ready(self._status_line())
            return
        new = selection.profile
        if selection.name != state.profile_name:
            log.warning("reload: the config now selects profile %s instead of %s; that switch needs a restart. "
                        "Applying only %s's guards and targets.", selection.name, state.profile_name,
                        state.profile_name)
            new = loaded.profiles.get(state.profile_name, state.profile)
        pending = [key for key, old_v, new_v in (
            ("tensorrt_llm", state.profile.tensorrt_llm, new.tensorrt_llm),
            ("inference.max_seq_len", state.profile.inference.max_seq_len, new.inference.max_seq_len),
            ("llama_cpp", state.profile.llama_cpp, new.llama_cpp),
            ("engine", state.profile.engine, new.engine),
            ("model", state.config.settings.model, loaded.settings.model),
            ("listen", state.config.settings.listen, loaded.settings.listen),
        ) if old_v != new_v]
        # Sessions above n_seq_max cannot exist in this context; that part waits for a restart.
        cap = self._session_cap or new.inference.max_concurrent_sessions
        sessions = min(new.inference.max_concurrent_sessions, cap)
        if new.inference.max_concurrent_sessions > cap:
            pending.append(f"inference.max_concurrent_sessions above the {cap} this engine was started with")
        state.profile = _live_profile(state.profile, new, sessions)
        state.admission.set_limits(Limits.from_profile(new, sessions))
        if selection.name != state.profile_name:
            pending.append(f"profile switch to {selection.name}")
        state.pending_restart = pending
        if pending:
            log.warning("reload: changes that need a restart are pending: %s", ", ".join(pending))
        log.info("reloaded: sessions %d, queue %d, targets %s", sessions, new.thresholds.max_queue_depth,
                 new.targets)
        self.notifier.ready(self._status_line())

    def _on_fatal(self, reason: str) -> None:
        log.critical("%s; exiting so that the service manager restarts forged", reason)
        if self.state is not None:
            self.state.phase = "failed"
            self.state.failure = reason
            if self.state.admission is not None:
                # Nobody will run what is queued: answer it now rather than at the drain timeout.
                self.state.admission.start_draining()
                self.state.admission.cancel_all()
        self._exit_code = EXIT_FAILURE
        self._stop.set()

    def _status_line(self) -> str:
        state = self.state
        assert state is not None
        if state.admission is None:
            return f"profile {state.profile_name}: {state.phase}"
        a = state.admission
        stats = state.engine.stats()
        line = (f"profile {state.profile_name}, {state.phase}: sessions {len(a.sessions)}/{a.limits.max_sessions}, "
                f"queue {len(a.queue)}/{a.limits.max_queue_depth}, "
                f"KV blocks {stats.kv_blocks_used}/{stats.kv_blocks_total}")
        warnings = [w for w in (state.gpu_unused, state.memory_warning) if w]
        return f"{line}; WARNING {'; '.join(warnings)}" if warnings else line

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            self.notifier.status(self._status_line())


def _runs_on(engine: Engine) -> str:
    device = engine.device()
    if not device:
        return engine.name
    return f"{device['runs_on']} ({device['layers_offloaded']}/{device['layers_total']} layers offloaded)"


def _live_profile(old: config_mod.Profile, new: config_mod.Profile, sessions: int) -> config_mod.Profile:
    """The profile as it now runs: new guards and targets, the old engine levers until a restart."""
    from dataclasses import replace
    return replace(old, thresholds=new.thresholds, targets=new.targets, admission=new.admission,
                   inference=replace(old.inference, max_concurrent_sessions=sessions),
                   description=new.description)


def raise_open_files_limit() -> None:
    """Every connection is a file descriptor, and the usual soft limit (1024) is far below what an
    unprivileged process may ask for (the hard limit), so forged takes the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY:
        log.info("open files limit: %s", "unlimited" if soft == resource.RLIM_INFINITY else soft)
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("open files limit raised from %d to %s", soft, "unlimited" if hard == resource.RLIM_INFINITY
                 else hard)
    except (ValueError, OSError) as exc:
        log.warning("open files limit stays at %d: raising it to the hard limit failed: %s", soft, exc)


def main(config_dir: Path) -> int:
    """Run the daemon. Startup failures are one line on stderr (the journal under systemd)."""
    # A fatal signal (SIGBUS when the mmap'd model file is overwritten in place, SIGSEGV) would
    # otherwise end the process without a word in the journal; this prints the signal and stacks.
    faulthandler.enable()
    try:
        return asyncio.run(Daemon(config_dir).run())
    except ConfigError as exc:
        print(f"forged: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (EngineError, OSError) as exc:
        print(f"forged: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
