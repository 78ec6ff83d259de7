"""`forgectl engine build`: compile the CUDA libllama for this machine's GPU, and install it for forged.

    sudo forgectl engine build [--arch 87] [--jobs N] [--source TARBALL] [--dry-run] [--force]

The package carries the llama.cpp source that its llama-cpp-python binds (scripts/llama-source.sh,
installed as /usr/share/forged/engine-src/llama.cpp-<version>.tar.xz); this command compiles
libllama + ggml with the machine's CUDA toolkit for one architecture: `--arch`, else the selected
profile's `llama_cpp.cuda_architecture`, else the compute capability the probe reports (the two must
agree). The result goes to <state dir>/engines/<key>/ (key: llama-cpp-python version, CUDA version,
architecture and a hash of the flags), and <state dir>/engines/current is switched to it with one
rename, so forged, at its next start, loads it (forged/engine/llama_cpp/library.py) and an
interrupted or failed build leaves the engine in use as it was. docs/install.md says why this way.

Planning (`plan()`) is pure: what the toolchain and the probe say go in as values, so that every
refusal is unit-tested without a compiler. `build()` runs the plan.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from forged import __version__, paths, profiles
from forged import config as config_mod
from forged import hardware as hardware_mod
from forged.engine.llama_cpp import library
from forged.hardware import HardwareInfo
from forged.schema import ConfigError

SOURCE_DIR = Path("/usr/share/forged/engine-src")
NVCC_PLACES = ("/usr/local/cuda/bin/nvcc", "/opt/cuda/bin/nvcc")
JOB_MEMORY_BYTES = 2 * 2**30  # nvcc on ggml's flash-attention kernels peaks near 2 GB a job
# The CPU part of the engine: the same portable targets as the vendored CPU engine (bootstrap.sh),
# because a native build on a CPU with AMX crashed inside VMs that do not grant AMX state. No OpenMP:
# forged calls llama_decode from its engine thread, where OpenMP cost ~16 ms a step (architecture.md).
CPU_FLAGS = {
    "x86_64": ["-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON"],
    "aarch64": ["-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"],  # Orin's Cortex-A78AE and newer
}
COMMON_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_CUDA=ON", "-DGGML_NATIVE=OFF",
    "-DGGML_OPENMP=OFF", "-DGGML_CCACHE=OFF", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    # The libraries find each other ($ORIGIN) and the CUDA runtime they were built against without
    # LD_LIBRARY_PATH: forged's unit sets no environment for them.
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
]
ARCH_EXAMPLES = "87 Jetson Orin, 110 Jetson Thor, 89 Ada, 90 Hopper, 120 Blackwell"


class BuildRefused(Exception):
    """Why the engine cannot be built here, as the one line the operator reads, naming the fix."""


@dataclass(frozen=True)
class Toolchain:
    """What was found on this machine to build with (`find_toolchain`)."""

    nvcc: Path | None
    cuda_version: str | None = None  # "13.0"
    gpu_architectures: frozenset[int] = frozenset()  # nvcc --list-gpu-arch: 75, 80, ..., 120
    cuda_lib_dir: Path | None = None  # where libcudart.so is, for the RUNPATH
    cublas: bool = True  # libcublas.so beside libcudart (ggml's CUDA backend links it)
    cmake: Path | None = None
    cxx: Path | None = None
    ninja: Path | None = None


@dataclass(frozen=True)
class BuildPlan:
    arch: int
    arch_reason: str
    source: Path
    source_sha256: str
    version: str
    key: str
    engines: Path
    cmake_args: tuple[str, ...]
    jobs: int
    toolchain: Toolchain
    notes: tuple[str, ...] = field(default=())

    @property
    def target(self) -> Path:
        return self.engines / self.key

    def describe(self) -> str:
        tc = self.toolchain
        lines = [f"engine    llama.cpp of llama-cpp-python {self.version}, CUDA {tc.cuda_version}, sm_{self.arch} "
                 f"({self.arch_reason})",
                 f"source    {self.source}",
                 f"nvcc      {tc.nvcc}",
                 f"build     {(tc.ninja and 'ninja') or 'make'}, {self.jobs} jobs, target libllama",
                 f"install   {self.target} (then {self.engines / library.CURRENT} -> {self.key})"]
        lines += [f"note      {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------- planning (pure)

def nvcc_missing(hardware: HardwareInfo) -> str:
    where = "$CUDACXX, PATH, $CUDA_HOME/bin, " + ", ".join(str(Path(p).parent) for p in NVCC_PLACES)
    if hardware.kind == "jetson":
        fix = ("install JetPack's CUDA toolkit: sudo apt install nvidia-jetpack (or only its cuda-toolkit-X-Y "
               "package, e.g. cuda-toolkit-13-0 on JetPack 7, cuda-toolkit-12-6 on JetPack 6)")
    else:
        fix = ("install NVIDIA's CUDA toolkit: add NVIDIA's CUDA repository for this distribution "
               "(https://developer.nvidia.com/cuda-downloads), then sudo apt install cuda-toolkit")
    return f"nvcc, the CUDA compiler, is not installed (looked in {where}); {fix}"


def choose_arch(hardware: HardwareInfo, profile_name: str | None, profile_arch: int | None,
                arch_flag: int | None) -> tuple[int, str]:
    """The one CUDA architecture to build for, and why."""
    probed = library.cuda_architecture(hardware.compute_capability) if hardware.kind != "cpu" else None
    probe_text = (f"the probe: {hardware.name}, compute capability {hardware.compute_capability}"
                  if probed else "")
    if arch_flag is not None:
        why = "given with --arch"
        if probed and probed != arch_flag:
            why += f"; {probe_text}, which needs sm_{probed}, cannot run it"
        return arch_flag, why
    if profile_arch is not None and probed is not None and profile_arch != probed:
        raise BuildRefused(f"profile {profile_name} says llama_cpp.cuda_architecture {profile_arch}, but {probe_text} "
                           f"(sm_{probed}); fix the profile, or build for one of them with --arch")
    if probed is not None:
        agree = f"; profile {profile_name} agrees" if profile_arch is not None else ""
        return probed, probe_text + agree
    if profile_arch is not None:
        return profile_arch, f"profile {profile_name} llama_cpp.cuda_architecture (the probe found no GPU)"
    notes = f" ({'; '.join(hardware.notes)})" if hardware.notes else ""
    raise BuildRefused(f"the probe found no NVIDIA GPU here{notes}; to build for another machine, name its "
                       f"architecture with --arch ({ARCH_EXAMPLES})")


def default_jobs(cores: int, memory_available: int) -> int:
    """One job a core, but no more than memory allows (an 8 GB Orin Nano would swap at 6 nvcc jobs)."""
    return max(1, min(cores, memory_available // JOB_MEMORY_BYTES))


def plan(hardware: HardwareInfo, toolchain: Toolchain, *, source: Path, version: str | None, engines: Path,
         profile_name: str | None = None, profile_arch: int | None = None, arch_flag: int | None = None,
         jobs: int | None = None, cores: int = 1, memory_available: int = 0,
         machine: str | None = None, source_sha256: str | None = None) -> BuildPlan:
    """Everything the build will do, or BuildRefused with the reason and the fix."""
    machine = machine or platform.machine()
    if version is None:
        raise BuildRefused("llama-cpp-python is not installed, so there is no binding to build an engine for")
    if toolchain.nvcc is None:
        raise BuildRefused(nvcc_missing(hardware))
    for tool, found, package in (("cmake", toolchain.cmake, "cmake"), ("a C++ compiler (c++)", toolchain.cxx, "g++")):
        if found is None:
            raise BuildRefused(f"{tool} is not installed; sudo apt install {package}")
    if not toolchain.cublas:
        raise BuildRefused(f"the CUDA toolkit of {toolchain.nvcc} has no cuBLAS (no libcublas.so beside "
                           f"{toolchain.cuda_lib_dir}), which ggml's CUDA backend links; install the whole toolkit "
                           f"(cuda-toolkit, or its libcublas-dev package)")
    arch, why = choose_arch(hardware, profile_name, profile_arch, arch_flag)
    if toolchain.gpu_architectures and arch not in toolchain.gpu_architectures:
        known = ", ".join(str(a) for a in sorted(toolchain.gpu_architectures))
        raise BuildRefused(f"nvcc {toolchain.cuda_version} ({toolchain.nvcc}) cannot build for sm_{arch} ({why}); it "
                           f"knows {known}. Install a CUDA toolkit that does (Thor's 110 needs CUDA 13, Blackwell's "
                           f"120 CUDA 12.8)")
    if not source.is_file():
        raise BuildRefused(f"{source}: the llama.cpp source is missing; it comes with the forged package "
                           f"({SOURCE_DIR}), or give --source (scripts/llama-source.sh makes it in a checkout)")
    if f"llama.cpp-{version}." not in source.name:
        raise BuildRefused(f"{source} is not the llama.cpp of llama-cpp-python {version}, which forged binds: "
                           f"the library and the binding must come from the same release")
    if machine not in CPU_FLAGS:
        raise BuildRefused(f"no CPU flags for a {machine} engine (known: {', '.join(CPU_FLAGS)})")
    rpath = "$ORIGIN" + (f";{toolchain.cuda_lib_dir}" if toolchain.cuda_lib_dir else "")
    args = (*COMMON_FLAGS, *CPU_FLAGS[machine], f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
            f"-DCMAKE_CUDA_COMPILER={toolchain.nvcc}", f"-DCMAKE_INSTALL_RPATH={rpath}",
            *(("-G", "Ninja") if toolchain.ninja else ()))
    sha = source_sha256 or _sha256(source)
    digest = hashlib.sha256(json.dumps([args, sha, machine]).encode()).hexdigest()[:10]
    key = f"llama.cpp-{version}-cuda{toolchain.cuda_version}-sm{arch}-{digest}"
    notes = () if toolchain.cuda_lib_dir else (
        f"no libcudart.so found near {toolchain.nvcc}: the engine will rely on the system's library path for "
        "the CUDA runtime",)
    return BuildPlan(arch, why, source, sha, version, key, engines, args,
                     jobs or default_jobs(cores, memory_available), toolchain, notes)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_nvcc_version(text: str) -> str | None:
    """`nvcc --version`'s 'Cuda compilation tools, release 13.0, V13.0.88' -> '13.0'."""
    m = re.search(r"release (\d+\.\d+)", text)
    return m.group(1) if m else None


def parse_gpu_architectures(text: str) -> frozenset[int]:
    """`nvcc --list-gpu-arch` ('compute_75' ... 'compute_120') -> {75, ..., 120}."""
    return frozenset(int(n) for n in re.findall(r"compute_(\d+)\b", text))


# ---------------------------------------------------------------- this machine's toolchain

def find_nvcc(env: Mapping[str, str], which: Callable[[str], str | None] = shutil.which) -> Path | None:
    candidates = [env.get("CUDACXX"), which("nvcc")]
    candidates += [str(Path(env[var]) / "bin" / "nvcc") for var in ("CUDA_HOME", "CUDA_PATH") if env.get(var)]
    candidates += list(NVCC_PLACES)
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return Path(candidate).resolve()
    return None


def _lib_dirs(root: Path) -> list[Path]:
    return [root / "lib64", root / "lib", *sorted(root.glob("targets/*/lib"))]


def cuda_lib_dir(root: Path) -> Path | None:
    """The directory of a toolkit's libcudart.so (lib64, or targets/<arch>-linux/lib)."""
    return next((d for d in _lib_dirs(root) if any(d.glob("libcudart.so*"))), None)


def has_cublas(root: Path) -> bool:
    return any(any(d.glob("libcublas.so*")) for d in _lib_dirs(root))


def parse_toolkit_root(dryrun: str) -> Path | None:
    """`nvcc --dryrun`'s '#$ TOP=/usr/local/cuda-13.0/bin/..' -> /usr/local/cuda-13.0: the toolkit
    itself, also when the nvcc on PATH is a wrapper script."""
    m = re.search(r"^#\$ TOP=(.+)$", dryrun, re.M)
    return Path(os.path.normpath(m.group(1).strip())) if m else None


def find_toolchain(env: Mapping[str, str] = os.environ) -> Toolchain:
    nvcc = find_nvcc(env)
    cmake, cxx, ninja = (Path(p) if (p := shutil.which(t)) else None for t in ("cmake", "c++", "ninja"))
    if nvcc is None:
        return Toolchain(None, cmake=cmake, cxx=cxx, ninja=ninja)
    dryrun = subprocess.run([str(nvcc), "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                            capture_output=True, text=True)
    root = parse_toolkit_root(dryrun.stdout + dryrun.stderr) or nvcc.parent.parent
    if (root / "bin" / "nvcc").is_file():
        nvcc = root / "bin" / "nvcc"  # the real compiler, for CMake
    version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
    archs = subprocess.run([str(nvcc), "--list-gpu-arch"], capture_output=True, text=True).stdout
    libs = cuda_lib_dir(root)
    return Toolchain(nvcc, parse_nvcc_version(version), parse_gpu_architectures(archs), libs,
                     libs is None or has_cublas(root), cmake, cxx, ninja)


# ---------------------------------------------------------------- building

Runner = Callable[[Sequence[str], Path, Callable[[str], None]], int]


def run_streaming(argv: Sequence[str], log_path: Path, on_line: Callable[[str], None]) -> int:
    """Run a build step, appending its output to `log_path` and handing each line to `on_line`."""
    with log_path.open("a") as log, subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     text=True, errors="replace") as proc:
        log.write(f"$ {' '.join(argv)}\n")
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            on_line(line.rstrip("\n"))
        return proc.wait()


class Progress:
    """Build progress from ninja's `[n/total]` or make's `[ nn%]`, shown at most every 5% or 30 s (on
    a terminal, one line rewritten in place)."""

    _NINJA = re.compile(r"^\[(\d+)/(\d+)\]")
    _MAKE = re.compile(r"^\[\s*(\d+)%\]")

    def __init__(self, out: TextIO, started: float | None = None) -> None:
        self.out = out
        self.started = time.monotonic() if started is None else started
        self.tty = out.isatty()
        self._shown_pct = -100.0
        self._shown_at = 0.0

    def line(self, text: str) -> None:
        if m := self._NINJA.match(text):
            done, total = int(m.group(1)), int(m.group(2))
            pct = 100.0 * done / total
            what = f"{done}/{total} steps"
        elif m := self._MAKE.match(text):
            pct = float(m.group(1))
            what = f"{pct:.0f}%"
        else:
            return
        now = time.monotonic()
        if self.tty or pct - self._shown_pct >= 5 or now - self._shown_at >= 30 or pct >= 100:
            self._shown_pct, self._shown_at = pct, now
            text = f"building: {pct:5.1f}% ({what}, {now - self.started:.0f} s)"
            self.out.write(f"\r{text}" if self.tty else f"{text}\n")
            self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")


def build(plan: BuildPlan, *, out: TextIO = sys.stdout, run: Runner = run_streaming, force: bool = False) -> Path:
    """Build and install the engine; return its directory. Nothing visible to forged changes until the
    finished engine is renamed into place and `current` is switched; on any failure or interrupt the
    half-built files are removed and the engine in use stays."""
    engines = plan.engines
    engines.mkdir(parents=True, exist_ok=True)
    if not force and (plan.target / library.RECORD).is_file():
        switch_current(engines, plan.key)
        out.write(f"already built: {plan.target}; {engines / library.CURRENT} points to it\n")
        return plan.target
    started = time.monotonic()
    work = engines / f".work-{plan.key}-{os.getpid()}"
    staging = engines / f".staging-{plan.key}-{os.getpid()}"
    log_path = engines / "last-build.log"
    log_path.write_text(f"forgectl engine build {plan.key}\n{plan.describe()}\n")
    try:
        out.write(f"unpacking {plan.source}\n")
        src = _unpack(plan.source, work, plan.version)
        build_dir = work / "build"
        configure = ["cmake", "-S", str(src), "-B", str(build_dir), *plan.cmake_args]
        out.write("configuring (cmake)\n")
        out.flush()
        _step(run(configure, log_path, lambda _line: None), "cmake configure", log_path)
        progress = Progress(out, started)
        compile_ = ["cmake", "--build", str(build_dir), "--target", "llama", "--parallel", str(plan.jobs)]
        rc = run(compile_, log_path, progress.line)
        progress.done()
        _step(rc, "the build", log_path)
        _stage(build_dir / "bin", staging / "lib")
        seconds = time.monotonic() - started
        record = library.BuildRecord(
            key=plan.key, llama_cpp_python=plan.version, backend="cuda", cuda_architecture=plan.arch,
            machine=platform.machine(), cuda_version=plan.toolchain.cuda_version or "?",
            nvcc=str(plan.toolchain.nvcc), cmake_args=list(plan.cmake_args),
            source=f"{plan.source.name} sha256:{plan.source_sha256}",
            built_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            build_seconds=round(seconds, 1), forged=__version__)
        record.write(staging)  # last: a directory without its record is not an engine
        if plan.target.exists():
            shutil.rmtree(plan.target)
        os.rename(staging, plan.target)
        previous = switch_current(engines, plan.key)
        _prune(engines, keep={plan.key, previous})
        out.write(f"built in {seconds:.0f} s: {plan.target}\n")
        return plan.target
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def _step(rc: int, what: str, log_path: Path) -> None:
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise BuildRefused(f"{what} failed (exit status {rc}); the last lines of {log_path}:\n" + "\n".join(tail))


def _unpack(source: Path, work: Path, version: str) -> Path:
    work.mkdir(parents=True)
    with tarfile.open(source) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(work, filter="data")
        else:  # Python without the extraction filters: the tarball is the package's own
            tar.extractall(work)
    src = work / f"llama.cpp-{version}"
    try:
        manifest = json.loads((src / "FORGED-SOURCE.json").read_text())
    except (OSError, ValueError) as exc:
        raise BuildRefused(f"{source} is not a source tarball made by scripts/llama-source.sh: {exc}") from None
    if manifest.get("llama_cpp_python") != version:
        raise BuildRefused(f"{source} holds the llama.cpp of llama-cpp-python {manifest.get('llama_cpp_python')}, "
                           f"but forged binds {version}")
    return src


def _stage(bin_dir: Path, lib_dir: Path) -> None:
    """The built shared libraries (with their soname links) into `lib_dir`."""
    lib_dir.mkdir(parents=True)
    for item in sorted(bin_dir.glob("lib*.so*")):
        target = lib_dir / item.name
        if item.is_symlink():
            target.symlink_to(os.readlink(item))
        else:
            shutil.copy2(item, target)
    for needed in ("libllama.so", "libggml.so", "libggml-cuda.so"):
        if not (lib_dir / needed).exists():
            raise BuildRefused(f"the build finished without {needed} in {bin_dir}")


def switch_current(engines: Path, key: str) -> str | None:
    """Point engines/current at `key` with one rename; return what it pointed to before."""
    current = engines / library.CURRENT
    previous = os.readlink(current) if current.is_symlink() else None
    tmp = engines / f".current-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(key)
    os.replace(tmp, current)
    return previous


def _prune(engines: Path, keep: set[str | None]) -> None:
    """Engines other than the new one and the one it replaced: each is tens of MB."""
    for entry in engines.iterdir():
        if entry.is_dir() and not entry.is_symlink() and not entry.name.startswith(".") and entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)


# ---------------------------------------------------------------- the command

def add_parser(sub: Any) -> None:
    engine = sub.add_parser("engine", help="build the CUDA engine (libllama) for this machine's GPU")
    engine_sub = engine.add_subparsers(dest="engine_command", required=True)
    p = engine_sub.add_parser("build", help="compile libllama with this machine's CUDA toolkit and install it for "
                              "forged's next start", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, help=f"CUDA architecture, sm_XX ({ARCH_EXAMPLES}); default: the profile's "
                   "llama_cpp.cuda_architecture, else the probe's compute capability")
    p.add_argument("--jobs", type=int, help="parallel compile jobs (default: the cores, at most one per 2 GB free)")
    p.add_argument("--source", type=Path, help=f"llama.cpp source tarball (default: {SOURCE_DIR}/llama.cpp-<version>"
                   ".tar.xz)")
    p.add_argument("--engines-dir", type=Path, help="where engines are installed (default: <state dir>/engines, "
                   "/var/lib/forged/engines for root)")
    p.add_argument("--config-dir", help="directory with the profiles (default: $FORGED_CONFIG_DIR, else /etc/forged)")
    p.add_argument("--dry-run", action="store_true", help="show the plan and stop")
    p.add_argument("--force", action="store_true", help="build again even when this engine is already built")


def main(args: argparse.Namespace) -> int:
    hw = hardware_mod.probe()
    profile_name, profile_arch = None, None
    try:
        selection = profiles.select(config_mod.load(config_mod.resolve_config_dir(args.config_dir)), hw)
        profile_name, profile_arch = selection.name, selection.profile.llama_cpp.cuda_architecture
    except ConfigError as exc:
        print(f"forgectl: engine build: the profiles do not load, building without them: {exc}", file=sys.stderr)
    version = library.binding_version()
    source = args.source or SOURCE_DIR / f"llama.cpp-{version}.tar.xz"
    engines = args.engines_dir or library.engines_dir(paths.state_dir())
    try:
        the_plan = plan(hw, find_toolchain(), source=source, version=version, engines=engines,
                        profile_name=profile_name, profile_arch=profile_arch, arch_flag=args.arch, jobs=args.jobs,
                        cores=len(os.sched_getaffinity(0)),
                        memory_available=hardware_mod.system_memory().available_bytes)
        print(the_plan.describe())
        if args.dry_run:
            return 0
        target = build(the_plan, force=args.force)
    except BuildRefused as exc:
        print(f"forgectl: engine build: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("forgectl: engine build: interrupted; the engine in use is unchanged", file=sys.stderr)
        return 130
    print(f"forged uses {target} from its next start: sudo systemctl restart forged")
    return 0
