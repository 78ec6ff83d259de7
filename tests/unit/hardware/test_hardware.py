"""The hardware probe against fixture machines: a Thor, an RTX 4000 Ada, an H200 (its real probe
output), a 4 x H200 box and a CPU box, each a filesystem root plus an NVML description.

NVML and jtop cannot exist on the test machines, so these tests use strict stand-ins
(tests/fixtures/fake_nvml.py, fake_jtop.py) that reject what the real modules reject; their
docstrings list how. Where the real `pynvml` is installed, the double is checked against it for
the two errors it can show without a driver.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures"))

import fake_jtop
from fake_nvml import FakeNvml, NVMLError
from machine import FIXTURES, machine, writable_root

from forged import hardware
from forged.hardware import jetson
from forged.hardware.nvml import NvmlSession
from forged.schema import to_plain


def probe(name: str, env: dict[str, str] | None = None, root: Path | None = None,
          **kw: object) -> hardware.HardwareInfo:
    fixture_root, nvml = machine(name)
    return hardware.probe(root or fixture_root, nvml=NvmlSession(nvml), env=env or {}, **kw)


# ---------------------------------------------------------------- one test per fixture machine

def test_thor_is_a_jetson_with_unified_memory_and_nvml_name() -> None:
    hw = probe("thor")
    assert (hw.kind, hw.name, hw.unified_memory) == ("jetson", "NVIDIA Jetson AGX Thor Developer Kit", True)
    assert hw.memory_total_bytes == 127529328 * 1024  # MemTotal: NVML answers NOT_SUPPORTED for memory
    assert hw.compute_capability == "11.0"
    assert hw.jetson is not None
    assert hw.jetson.compatible == ("nvidia,p4071-0000+p3834-0008", "nvidia,p3834-0008", "nvidia,tegra264")
    assert (hw.jetson.soc, hw.jetson.l4t, hw.jetson.jetpack) == ("tegra264", "38.2.0", "7.0")
    assert hw.jetson.l4t_source == "/etc/nv_tegra_release"
    [gpu] = hw.gpus
    assert (gpu.name, gpu.utilization_percent, gpu.memory_total_bytes) == ("NVIDIA Thor", 0, None)
    assert gpu.memory_source is not None and "Not Supported (NVML error 3)" in gpu.memory_source
    assert any("jtop not used: its service socket /run/jtop.sock does not exist" in n for n in hw.notes)
    reading = hardware.device_memory(hw, root=machine("thor")[0])
    assert (reading.total_bytes, reading.available_bytes) == (127529328 * 1024, 121845120 * 1024)


def test_rtx_4000_ada() -> None:
    hw = probe("rtx4000ada")
    assert (hw.kind, hw.name, hw.unified_memory) == ("gpu", "NVIDIA RTX 4000 Ada Generation", False)
    assert hw.memory_total_bytes == 21_469_593_600  # 20475 MiB: just under 20 GiB
    assert hw.memory_gib < 20
    assert (hw.compute_capability, hw.device_index, hw.cpu_model) == ("8.9", 0, "Intel(R) Xeon(R) w5-2455X")
    assert hw.notes == ()


def test_h200_matches_the_real_probe_output() -> None:
    """tests/fixtures/h200_probe.json is `forged probe --json` run on a real H200 (driver 580.159.04);
    the fixture machine made from that run's /proc and NVML answers must probe to the same thing."""
    real = json.loads((FIXTURES / "h200_probe.json").read_text())["hardware"]
    hw = to_plain(probe("h200"))
    hw.pop("cores"), real.pop("cores")  # this machine's, not the fixture's
    assert hw.pop("cuda_gpus") == [0]  # a field added after that run: the one GPU CUDA shows
    assert hw == real
    assert real["gpus"][0]["memory_used_bytes"] == 0  # v2: used excludes the driver's 615 MiB reserve
    assert real["gpus"][0]["memory_reserved_bytes"] == 644_939_776


def test_h200_device_memory_is_nvml_v2_of_the_engine_device() -> None:
    root, nvml = machine("h200")
    session = NvmlSession(nvml)
    hw = hardware.probe(root, nvml=session, env={})
    reading = hardware.device_memory(hw, root=root, nvml=session)
    assert (reading.used_bytes, reading.total_bytes, reading.reserved_bytes) == (0, 150_754_820_096, 644_939_776)
    assert reading.available_bytes == 150_109_880_320  # NVML's own `free`
    assert "nvmlDeviceGetMemoryInfo_v2" in nvml.calls


def test_multi_gpu_box_lists_every_device_and_uses_device_0() -> None:
    hw = probe("h200_x4")
    assert [g.index for g in hw.gpus] == [0, 1, 2, 3]
    assert len({g.uuid for g in hw.gpus}) == 4
    assert (hw.kind, hw.device_index, hw.name) == ("gpu", 0, "NVIDIA H200")


def test_cuda_visible_devices_picks_the_engine_device() -> None:
    assert probe("h200_x4", env={"CUDA_VISIBLE_DEVICES": "2,3"}).device_index == 2
    uuid = probe("h200_x4").gpus[3].uuid
    assert uuid is not None
    assert probe("h200_x4", env={"CUDA_VISIBLE_DEVICES": uuid}).device_index == 3
    ambiguous = probe("h200_x4", env={"CUDA_VISIBLE_DEVICES": uuid[:12]})  # a prefix of all four
    assert ambiguous.kind == "cpu"
    hidden = probe("h200_x4", env={"CUDA_VISIBLE_DEVICES": ""})
    assert hidden.kind == "cpu"
    assert any("hides every GPU" in n for n in hidden.notes)


def test_cpu_box_without_the_nvml_library() -> None:
    hw = probe("cpu")
    assert (hw.kind, hw.unified_memory, hw.gpus, hw.device_index) == ("cpu", True, (), None)
    assert hw.name == hw.cpu_model == "Intel(R) Xeon(R) Processor"
    assert hw.notes == ("NVML not used: nvmlInit: NVML Shared Library Not Found (NVML error 12)",)
    meminfo = hardware.read_meminfo(machine("cpu")[0])
    assert hw.memory_total_bytes == meminfo["MemTotal"]


# ---------------------------------------------------------------- degrading, never crashing

def test_driver_not_loaded_degrades_to_cpu() -> None:
    root, _ = machine("rtx4000ada")
    nvml = FakeNvml.load(FIXTURES / "machines/rtx4000ada/nvml.json")
    nvml.description["driver_loaded"] = False
    hw = hardware.probe(root, nvml=NvmlSession(nvml), env={})
    assert hw.kind == "cpu"
    assert "Driver Not Loaded (NVML error 9)" in hw.notes[0]


def test_nvidia_ml_py_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    hw = hardware.probe(machine("cpu")[0], nvml=NvmlSession(), env={})
    assert hw.kind == "cpu"
    assert "nvidia-ml-py is not installed" in hw.notes[0]


def test_thor_without_nvml_takes_compute_capability_from_the_soc() -> None:
    root, _ = machine("thor")
    hw = hardware.probe(root, nvml=NvmlSession(FakeNvml({"library": False})), env={})
    assert (hw.kind, hw.compute_capability, hw.gpus) == ("jetson", "11.0", ())


def test_old_driver_without_memory_v2_falls_back_to_v1() -> None:
    root, nvml = machine("h200")
    nvml.description["devices"][0]["memory_v2"] = {"error": "Function Not Found", "code": 13}
    gpu = hardware.probe(root, nvml=NvmlSession(nvml), env={}).gpus[0]
    assert (gpu.memory_source, gpu.memory_used_bytes, gpu.memory_reserved_bytes) == ("nvml v1", 644_939_776, 0)


def test_gpu_without_memory_answers_is_treated_as_unified() -> None:
    """GB10 (DGX Spark) answers NOT_SUPPORTED for memory like a Thor but has no devicetree."""
    root, _ = machine("cpu")
    hw = hardware.probe(root, nvml=NvmlSession(machine("thor")[1]), env={})
    assert (hw.kind, hw.name, hw.unified_memory) == ("gpu", "NVIDIA Thor", True)
    assert hw.memory_total_bytes == hardware.read_meminfo(root)["MemTotal"]


def test_nvml_failing_later_reports_the_probe_reading() -> None:
    root, nvml = machine("h200")
    session = NvmlSession(nvml)
    hw = hardware.probe(root, nvml=session, env={})
    nvml.description["devices"][0]["memory_v2"] = {"error": "GPU is lost", "code": 15}
    reading = hardware.device_memory(hw, root=root, nvml=session)
    assert (reading.used_bytes, reading.total_bytes) == (0, 150_754_820_096)


def test_an_empty_root_still_probes(tmp_path: Path) -> None:
    hw = hardware.probe(tmp_path, nvml=NvmlSession(FakeNvml({"library": False})), env={})
    assert (hw.kind, hw.name, hw.memory_total_bytes) == ("cpu", "unknown CPU", 0)
    assert any("no MemTotal" in n for n in hw.notes)


# ---------------------------------------------------------------- Jetson details

def test_l4t_from_dpkg_when_the_release_file_is_missing(tmp_path: Path) -> None:
    root = writable_root("thor", tmp_path)
    (root / "etc/nv_tegra_release").unlink()
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(
        "Package: bash\nVersion: 5.2.21\n\nPackage: nvidia-l4t-core\nStatus: install ok installed\n"
        "Version: 38.4.0-20251230160601\n\n")
    info = jetson.probe(root, use_jtop=False)
    assert info is not None
    assert (info.l4t, info.l4t_source, info.jetpack) == ("38.4.0", "dpkg nvidia-l4t-core", "7.1")


def test_tegra_release_parsing_and_unknown_releases() -> None:
    assert jetson.parse_tegra_release("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic") == "36.4.3"
    assert jetson.parse_tegra_release("# R38 (release), REVISION: 2.0, GCID: 41844464") == "38.2.0"
    assert jetson.parse_tegra_release("garbage") is None
    assert jetson.JETPACK_FOR_L4T.get("38.3.0") is None  # never a guess


def test_a_pc_is_not_a_jetson() -> None:
    assert jetson.probe(machine("h200")[0]) is None


def test_jtop_used_when_its_service_runs(tmp_path: Path) -> None:
    root = writable_root("thor", tmp_path)
    (root / "run").mkdir()
    (root / "run/jtop.sock").touch()
    module = fake_jtop.FakeJtopModule(hardware=fake_jtop.THOR_HARDWARE)
    hw = probe("thor", root=root, jtop_module=module)
    assert hw.jetson is not None
    assert (hw.jetson.jtop, hw.jetson.module) == ("used: jetson-stats 7.2.2", "NVIDIA Jetson AGX Thor (Developer kit)")
    assert module.started == 1
    assert not any(n.startswith("jtop") for n in hw.notes)


@pytest.mark.parametrize("error", [fake_jtop.SERVICE_NOT_ACTIVE, fake_jtop.NO_PERMISSION,
                                   fake_jtop.version_mismatch("7.2", "4.3")])
def test_jtop_failures_are_ignored_with_jtops_reason(tmp_path: Path, error: str) -> None:
    root = writable_root("thor", tmp_path)
    (root / "run").mkdir()
    (root / "run/jtop.sock").touch()
    hw = probe("thor", root=root, jtop_module=fake_jtop.FakeJtopModule(error=error))
    assert hw.kind == "jetson"
    assert hw.jetson is not None and hw.jetson.module is None
    assert hw.jetson.jtop == "not used: " + " ".join(error.split())
    assert f"jtop {hw.jetson.jtop}" in hw.notes


def test_jtop_socket_without_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = writable_root("thor", tmp_path)
    (root / "run").mkdir()
    (root / "run/jtop.sock").touch()
    monkeypatch.setitem(sys.modules, "jtop", None)
    hw = probe("thor", root=root)
    assert hw.jetson is not None
    assert hw.jetson.jtop.startswith("not used: the optional jetson-stats package is not installed")


# ---------------------------------------------------------------- the NVML double is strict

def test_fake_nvml_rejects_what_nvml_rejects() -> None:
    _, nvml = machine("h200")
    observed = json.loads((FIXTURES / "machines/h200/nvml_errors_observed.json").read_text())
    with pytest.raises(nvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()
    nvml.nvmlInit()
    with pytest.raises(NVMLError) as bad_index:
        nvml.nvmlDeviceGetHandleByIndex(1)
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(NVMLError) as bad_version:
        nvml.nvmlDeviceGetMemoryInfo(handle, version=0x01000028)
    with pytest.raises(TypeError):
        nvml.nvmlDeviceGetMemoryInfo(handle, flavour=2)  # type: ignore[call-arg]
    with pytest.raises(nvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetName(object())
    with pytest.raises(AttributeError):
        nvml.nvmlDeviceGetPowerUsage  # noqa: B018 (not part of the double)
    nvml.nvmlShutdown()
    with pytest.raises(NVMLError) as after_shutdown:
        nvml.nvmlDeviceGetCount()
    for exc, key in ((bad_index, "bad index"), (bad_version, "bad version"), (after_shutdown, "after shutdown")):
        assert (type(exc.value).__name__, str(exc.value), exc.value.value) == \
            (observed[key]["class"], observed[key]["error"], observed[key]["code"])


def test_fake_nvml_agrees_with_the_real_binding_without_a_driver() -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        real_init = (type(exc).__name__, str(exc), exc.value)
    else:  # pragma: no cover - a machine with a driver
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    with pytest.raises(pynvml.NVMLError) as real_uninit:
        pynvml.nvmlDeviceGetCount()
    fake = FakeNvml({"library": False})
    with pytest.raises(NVMLError) as fake_init:
        fake.nvmlInit()
    with pytest.raises(NVMLError) as fake_uninit:
        fake.nvmlDeviceGetCount()
    assert real_init == (type(fake_init.value).__name__, str(fake_init.value), fake_init.value.value)
    assert (type(real_uninit.value).__name__, real_uninit.value.value) == \
        (type(fake_uninit.value).__name__, fake_uninit.value.value)
    assert pynvml.nvmlMemory_v2 == FakeNvml.nvmlMemory_v2


def test_memory_reading_available() -> None:
    assert hardware.MemoryReading(used_bytes=10, total_bytes=100, reserved_bytes=5).available_bytes == 85
    assert replace(hardware.MemoryReading(10, 100), used_bytes=200).available_bytes == 0
