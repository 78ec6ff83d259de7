"""`forgectl engine build` without a compiler: the plan (architecture, cache key, refusals) from values,
the install step around a build step that the test plays, and forged's choice of the result.

No CUDA toolkit can exist on this machine; what nvcc would say is given as the text it prints
(`parse_nvcc_version`, `parse_gpu_architectures`). The real build runs on the GPU machine
(scripts/gpu-proof.sh, docs/install.md).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import platform
import sys
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures"))

from machine import machine

from forged import config, hardware, profiles
from forged.ctl import engine as eb
from forged.ctl import probe as probe_cmd
from forged.engine.llama_cpp import library
from forged.hardware.nvml import NvmlSession

REPO = Path(__file__).resolve().parents[3]
VERSION = "0.3.36"
NVCC_13 = ("nvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) 2005-2025 NVIDIA Corporation\n"
           "Built on Wed_Jul_16_07:30:01_PM_PDT_2025\nCuda compilation tools, release 13.0, V13.0.48\n"
           "Build cuda_13.0.r13.0/compiler.36260728_0\n")
ARCHS_13 = "\n".join(f"compute_{a}" for a in (75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121)) + "\n"
ARCHS_12_6 = "\n".join(f"compute_{a}" for a in (50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90)) + "\n"


def probed(name: str) -> hardware.HardwareInfo:
    root, nvml = machine(name)
    return hardware.probe(root, nvml=NvmlSession(nvml), env={}, use_jtop=False)


def toolchain(archs: str = ARCHS_13, version: str = NVCC_13, nvcc: str | None = "/usr/local/cuda/bin/nvcc",
              **kw: object) -> eb.Toolchain:
    found = eb.Toolchain(Path(nvcc) if nvcc else None, eb.parse_nvcc_version(version),
                         eb.parse_gpu_architectures(archs), Path("/usr/local/cuda/lib64"),
                         cmake=Path("/usr/bin/cmake"), cxx=Path("/usr/bin/c++"), ninja=Path("/usr/bin/ninja"))
    return dataclasses.replace(found, **kw)  # type: ignore[arg-type]


def source_tarball(tmp: Path, version: str = VERSION, manifest_version: str | None = None) -> Path:
    """A stand-in for scripts/llama-source.sh's tarball: the layout and the manifest, no sources."""
    path = tmp / f"llama.cpp-{version}.tar.xz"
    manifest = json.dumps({"llama_cpp_python": manifest_version or version}).encode()
    with tarfile.open(path, "w:xz") as tar:
        info = tarfile.TarInfo(f"llama.cpp-{version}/FORGED-SOURCE.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    return path


def make_plan(tmp: Path, hw: hardware.HardwareInfo | str = "h200", **kw: object) -> eb.BuildPlan:
    args: dict[str, object] = dict(source=source_tarball(tmp), version=VERSION, engines=tmp / "engines", cores=16,
                                   memory_available=128 * 2**30, machine="x86_64")
    args.update(kw)
    tc = args.pop("toolchain", None) or toolchain()
    return eb.plan(probed(hw) if isinstance(hw, str) else hw, tc, **args)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the architecture

@pytest.mark.parametrize(("name", "arch"), [("h200", 90), ("rtx4000ada", 89), ("thor", 110), ("orin", 87)])
def test_the_architecture_comes_from_the_probe(tmp_path: Path, name: str, arch: int) -> None:
    plan = make_plan(tmp_path, name, machine="aarch64" if name in ("thor", "orin") else "x86_64")
    assert plan.arch == arch and f"-DCMAKE_CUDA_ARCHITECTURES={arch}" in plan.cmake_args
    assert plan.arch_reason.startswith("the probe: ")


@pytest.mark.parametrize(("name", "profile", "cc", "arch"), [("thor", "jetson_thor", "11.0", 110),
                                                           ("orin", "jetson_orin", "8.7", 87)])
def test_jetson_profiles_probe_and_engine_build_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      name: str, profile: str, cc: str, arch: int) -> None:
    """The devicetree fixtures: the probe's compute capability, the profile it selects, that profile's
    cuda_architecture, `forged probe`'s CUDA line and the build plan all say the same."""
    monkeypatch.setenv("FORGED_PROFILES_DIR", "")
    hw = probed(name)
    assert (hw.kind, hw.compute_capability) == ("jetson", cc)
    loaded = config.load(REPO / "etc" / "forged")
    selection = profiles.select(loaded, hw)
    assert selection.name == profile and selection.profile.llama_cpp.cuda_architecture == arch
    assert probe_cmd.report(hw, loaded)["cuda"] == {"compute_capability": cc, "probe_architecture": arch,
                                                   "profile_architecture": arch, "agree": True}
    plan = make_plan(tmp_path, hw, profile_name=profile, profile_arch=arch, machine="aarch64")
    assert plan.arch == arch and plan.arch_reason.endswith(f"profile {profile} agrees")
    assert "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16" in plan.cmake_args


def test_orin_without_nvml_takes_its_compute_capability_from_the_soc() -> None:
    hw = probed("orin")
    assert hw.gpus == () and hw.jetson is not None and hw.jetson.soc == "tegra234"
    assert hw.jetson.l4t == "36.4.3" and hw.jetson.jetpack == "6.2"
    assert any("NVML not used" in note for note in hw.notes)


def test_a_profile_that_disagrees_with_the_probe_is_refused(tmp_path: Path) -> None:
    with pytest.raises(eb.BuildRefused, match=r"profile jetson_thor says llama_cpp.cuda_architecture 110, but the "
                       r"probe: NVIDIA Jetson AGX Orin Developer Kit, compute capability 8.7 \(sm_87\)"):
        make_plan(tmp_path, "orin", profile_name="jetson_thor", profile_arch=110, machine="aarch64")


def test_arch_flag_wins_and_says_what_it_overrides(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, "h200", arch_flag=89)
    assert plan.arch == 89 and "given with --arch" in plan.arch_reason and "needs sm_90" in plan.arch_reason


def test_no_gpu_and_no_arch_is_refused_naming_the_flag(tmp_path: Path) -> None:
    with pytest.raises(eb.BuildRefused, match=r"the probe found no NVIDIA GPU here .*--arch \(87 Jetson Orin"):
        make_plan(tmp_path, "cpu")
    assert make_plan(tmp_path, "cpu", arch_flag=120).arch == 120
    only_profile = make_plan(tmp_path, "cpu", profile_name="jetson_orin", profile_arch=87)
    assert only_profile.arch == 87 and "the probe found no GPU" in only_profile.arch_reason


def test_an_nvcc_that_cannot_build_the_architecture_is_refused(tmp_path: Path) -> None:
    with pytest.raises(eb.BuildRefused, match=r"nvcc 12.6 \(/usr/local/cuda/bin/nvcc\) cannot build for sm_110 .*"
                       r"Thor's 110 needs CUDA 13"):
        make_plan(tmp_path, "thor", machine="aarch64", toolchain=toolchain(
            ARCHS_12_6, NVCC_13.replace("release 13.0, V13.0.48", "release 12.6, V12.6.68")))


# ---------------------------------------------------------------- missing tools, wrong source

def test_missing_nvcc_names_the_package_that_brings_it(tmp_path: Path) -> None:
    with pytest.raises(eb.BuildRefused) as workstation:
        make_plan(tmp_path, "h200", toolchain=toolchain(nvcc=None))
    assert "nvcc, the CUDA compiler, is not installed" in str(workstation.value)
    assert "sudo apt install cuda-toolkit" in str(workstation.value)
    with pytest.raises(eb.BuildRefused) as jetson:
        make_plan(tmp_path, "thor", toolchain=toolchain(nvcc=None), machine="aarch64")
    assert "JetPack's CUDA toolkit: sudo apt install nvidia-jetpack" in str(jetson.value)


def test_missing_cmake_or_compiler_is_refused(tmp_path: Path) -> None:
    with pytest.raises(eb.BuildRefused, match="cmake is not installed; sudo apt install cmake"):
        make_plan(tmp_path, toolchain=toolchain(cmake=None))
    with pytest.raises(eb.BuildRefused, match=r"C\+\+ compiler \(c\+\+\) is not installed; sudo apt install g\+\+"):
        make_plan(tmp_path, toolchain=toolchain(cxx=None))


def test_the_source_must_exist_and_match_the_binding(tmp_path: Path) -> None:
    with pytest.raises(eb.BuildRefused, match=r"the llama\.cpp source is missing"):
        make_plan(tmp_path, source=tmp_path / "nowhere" / f"llama.cpp-{VERSION}.tar.xz")
    other = tmp_path / "old"
    other.mkdir()
    with pytest.raises(eb.BuildRefused, match=r"not the llama\.cpp of llama-cpp-python 0\.3\.36"):
        make_plan(tmp_path, source=source_tarball(other, "0.3.30"))
    with pytest.raises(eb.BuildRefused, match="no binding to build an engine for"):
        make_plan(tmp_path, version=None)


def test_nvcc_is_found_where_jetpack_and_cuda_put_it(tmp_path: Path) -> None:
    fake = tmp_path / "cuda" / "bin" / "nvcc"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert eb.find_nvcc({"CUDA_HOME": str(tmp_path / "cuda")}, which=lambda _: None) == fake
    assert eb.find_nvcc({"CUDACXX": str(fake)}, which=lambda _: None) == fake
    assert eb.find_nvcc({}, which=lambda _: str(fake)) == fake
    (tmp_path / "cuda" / "targets" / "sbsa-linux" / "lib").mkdir(parents=True)
    (tmp_path / "cuda" / "targets" / "sbsa-linux" / "lib" / "libcudart.so.13").touch()
    assert eb.cuda_lib_dir(tmp_path / "cuda") == tmp_path / "cuda" / "targets" / "sbsa-linux" / "lib"


def test_nvcc_output_parsing() -> None:
    assert eb.parse_nvcc_version(NVCC_13) == "13.0"
    assert eb.parse_gpu_architectures(ARCHS_13) >= {87, 89, 90, 110, 120}
    assert eb.parse_nvcc_version("no such thing") is None
    # What nvcc 13.0 printed here for `--dryrun -x cu -c /dev/null -o /dev/null`, run through a wrapper
    # script in /usr/local/bin: the toolkit is where TOP says.
    dryrun = ('#$ _NVVM_BRANCH_=nvvm\n#$ _SPACE_= \n#$ TOP=/usr/local/cuda-13.0/bin/..\n'
              '#$ LIBRARIES=  "-L/usr/local/cuda-13.0/bin/../targets/x86_64-linux/lib"\n')
    assert eb.parse_toolkit_root(dryrun) == Path("/usr/local/cuda-13.0")
    assert eb.parse_toolkit_root("nvcc fatal: no input") is None


def test_a_toolkit_without_cublas_is_refused(tmp_path: Path) -> None:
    with pytest.raises(eb.BuildRefused, match=r"has no cuBLAS \(no libcublas.so beside /usr/local/cuda/lib64\)"):
        make_plan(tmp_path, toolchain=toolchain(cublas=False))
    root = tmp_path / "cuda-13.0"
    (root / "targets" / "x86_64-linux" / "lib").mkdir(parents=True)
    (root / "targets" / "x86_64-linux" / "lib" / "libcudart.so.13").touch()
    assert not eb.has_cublas(root)
    (root / "targets" / "x86_64-linux" / "lib" / "libcublas.so.13").touch()
    assert eb.has_cublas(root)


# ---------------------------------------------------------------- the cache key and the jobs

def test_the_cache_key_names_version_cuda_and_arch_and_hashes_the_flags(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    assert plan.key.startswith("llama.cpp-0.3.36-cuda13.0-sm90-") and len(plan.key.rsplit("-", 1)[1]) == 10
    assert make_plan(tmp_path).key == plan.key  # the same inputs, the same engine: no rebuild
    assert make_plan(tmp_path, arch_flag=89).key != plan.key
    assert make_plan(tmp_path, source_sha256="0" * 64).key != plan.key
    assert make_plan(tmp_path, toolchain=toolchain(ninja=None)).key != plan.key  # other generator flags
    assert make_plan(tmp_path, machine="aarch64").key != plan.key
    assert "-DGGML_OPENMP=OFF" in plan.cmake_args and "-DGGML_NATIVE=OFF" in plan.cmake_args
    assert "-DCMAKE_INSTALL_RPATH=$ORIGIN;/usr/local/cuda/lib64" in plan.cmake_args


def test_jobs_are_limited_by_memory() -> None:
    assert eb.default_jobs(16, 128 * 2**30) == 16
    assert eb.default_jobs(6, 7 * 2**30) == 3  # an 8 GB Orin Nano
    assert eb.default_jobs(4, 2**30) == 1


# ---------------------------------------------------------------- building and installing

Run = Callable[[Sequence[str], Path, Callable[[str], None]], int]


def fake_compiler(fail_with: int | BaseException | None = None) -> Run:
    """Plays cmake: configure succeeds; the build prints ninja progress and writes the shared libraries
    (with their soname links) into build/bin, or fails as told, after writing half of them."""
    def run(argv: Sequence[str], log_path: Path, on_line: Callable[[str], None]) -> int:
        if "--build" not in argv:
            return 0
        bin_dir = Path(argv[argv.index("--build") + 1]) / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "libggml-base.so.0.25.3").write_bytes(b"\x7fELF half")
        for i in range(1, 41):
            on_line(f"[{i}/40] Building CUDA object ggml/src/ggml-cuda/x{i}.cu.o")
        if isinstance(fail_with, BaseException):
            raise fail_with
        if fail_with is not None:
            with log_path.open("a") as log:
                log.write("nvcc fatal   : Unsupported gpu architecture 'compute_90'\n")
            return fail_with
        for name in ("libllama.so.0.5.0", "libggml.so.0.25.3", "libggml-cuda.so.0.25.3", "libggml-cpu.so.0.25.3"):
            (bin_dir / name).write_bytes(b"\x7fELF")
            base, major = name.split(".so.")[0] + ".so", name.split(".so.")[1].split(".")[0]
            (bin_dir / f"{base}.{major}").symlink_to(name)
            (bin_dir / base).symlink_to(f"{base}.{major}")
        return 0
    return run


def installed_engine(engines: Path, key: str) -> None:
    """An engine built earlier, in use."""
    (engines / key / "lib").mkdir(parents=True)
    (engines / key / "lib" / "libllama.so").write_bytes(b"\x7fELF old")
    library.BuildRecord(key=key, llama_cpp_python=VERSION, backend="cuda", cuda_architecture=90,
                        machine=platform.machine(), cuda_version="13.0", nvcc="nvcc").write(engines / key)
    eb.switch_current(engines, key)


def test_a_build_installs_atomically_and_forged_uses_it_next(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    plan = make_plan(tmp_path, machine=platform.machine())
    engines = plan.engines
    engines.mkdir()
    installed_engine(engines, "llama.cpp-0.3.36-cuda13.0-sm90-old0000000")
    installed_engine(engines, "llama.cpp-0.3.36-cuda12.8-sm90-older00000")  # replaced long ago
    eb.switch_current(engines, "llama.cpp-0.3.36-cuda13.0-sm90-old0000000")
    out = io.StringIO()
    target = eb.build(plan, out=out, run=fake_compiler())
    assert target == engines / plan.key
    assert os.readlink(engines / "current") == plan.key
    assert sorted(p.name for p in engines.iterdir()) == sorted(
        ["current", plan.key, "llama.cpp-0.3.36-cuda13.0-sm90-old0000000", "last-build.log"])
    assert os.readlink(target / "lib" / "libllama.so") == "libllama.so.0"
    record = library.BuildRecord.read(target)
    assert (record.key, record.cuda_architecture, record.cuda_version, record.llama_cpp_python) == \
        (plan.key, 90, "13.0", VERSION)
    text = out.getvalue()
    assert "configuring (cmake)" in text and "building: 100.0% (40/40 steps" in text
    shown = [float(line.split()[1].rstrip("%")) for line in text.splitlines() if line.startswith("building:")]
    assert shown[0] == 2.5 and shown[-1] == 100.0 and len(shown) == 21  # every 5%, not each of the 40 steps
    assert all(b - a >= 5 for a, b in itertools.pairwise(shown[:-1]))
    assert "built in " in text

    # forged's next start: the engine fits this H200, so LLAMA_CPP_LIB_PATH points at it.
    monkeypatch.setattr(library, "binding_version", lambda: VERSION)
    env: dict[str, str] = {}
    choice = library.choose(tmp_path, "9.0", env=env)
    assert choice.directory == target / "lib" and env[library.LIB_ENV] == str(target / "lib")
    assert choice.record is not None and choice.record.key == plan.key

    # Built again with the same inputs: nothing to do but point current at it.
    again = io.StringIO()
    assert eb.build(plan, out=again, run=fake_compiler(fail_with=RuntimeError("must not compile"))) == target
    assert "already built" in again.getvalue()


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), 1])
def test_an_interrupted_or_failed_build_leaves_the_old_engine(tmp_path: Path, failure: object) -> None:
    plan = make_plan(tmp_path)
    engines = plan.engines
    engines.mkdir()
    old = "llama.cpp-0.3.36-cuda13.0-sm90-old0000000"
    installed_engine(engines, old)
    if isinstance(failure, BaseException):
        with pytest.raises(KeyboardInterrupt):
            eb.build(plan, out=io.StringIO(), run=fake_compiler(failure))
    else:
        with pytest.raises(eb.BuildRefused, match=r"the build failed \(exit status 1\); the last lines of .*"
                           r"last-build.log:\n(.|\n)*Unsupported gpu architecture"):
            eb.build(plan, out=io.StringIO(), run=fake_compiler(failure))  # type: ignore[arg-type]
    assert os.readlink(engines / "current") == old
    assert (engines / old / "lib" / "libllama.so").read_bytes() == b"\x7fELF old"
    assert sorted(p.name for p in engines.iterdir()) == ["current", "last-build.log", old]  # no half-built files


def test_a_source_for_another_binding_is_refused_after_unpacking(tmp_path: Path) -> None:
    elsewhere = tmp_path / "mislabelled"
    elsewhere.mkdir()
    plan = make_plan(tmp_path, source=source_tarball(elsewhere, VERSION, manifest_version="0.3.30"))
    with pytest.raises(eb.BuildRefused, match=r"holds the llama\.cpp of llama-cpp-python 0\.3\.30"):
        eb.build(plan, out=io.StringIO(), run=fake_compiler())
    assert not (plan.engines / "current").exists()


# ---------------------------------------------------------------- forged's choice at start

@pytest.mark.parametrize(("cc", "binding", "why"), [
    ("8.9", VERSION, "built for sm_90, but this GPU has compute capability 8.9 (sm_89)"),
    ("9.0", "0.3.40", "built for llama-cpp-python 0.3.36, but forged binds 0.3.40"),
    (None, VERSION, "the probe found no NVIDIA GPU"),
])
def test_an_engine_that_does_not_fit_is_passed_over_and_said_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 cc: str | None, binding: str, why: str) -> None:
    engines = library.engines_dir(tmp_path)
    engines.mkdir()
    installed_engine(engines, "llama.cpp-0.3.36-cuda13.0-sm90-old0000000")
    monkeypatch.setattr(library, "binding_version", lambda: binding)
    env: dict[str, str] = {}
    choice = library.choose(tmp_path, cc, env=env)
    assert choice.directory is None and library.LIB_ENV not in env
    assert len(choice.notes) == 1 and why in choice.notes[0]


def test_an_explicit_library_path_wins(tmp_path: Path) -> None:
    choice = library.choose(tmp_path, "9.0", env={library.LIB_ENV: "/opt/llama/lib"})
    assert choice.directory == Path("/opt/llama/lib") and choice.source == "LLAMA_CPP_LIB_PATH=/opt/llama/lib"
    assert library.choose(tmp_path, "9.0", env={}).source == "vendored with forged (CPU)"
