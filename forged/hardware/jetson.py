"""Jetson identity from the files the board itself publishes, and jtop when its service runs.

Without jtop (the default, no AGPL code, no root service), forged reads what jtop itself reads:
the devicetree `model` and `compatible` strings, `/etc/nv_tegra_release` (L4T; JetPack from the
table below), and falls back to dpkg's record of `nvidia-l4t-core` for L4T. Memory is unified and
comes from /proc/meminfo; the GPU's name and load come from NVML in `machine.py`.

jtop (`jetson-stats`, AGPL-3.0, optional extra `forged[jetson]`) adds what only its root service
can read (the module name from the EEPROM P-Number). It is used only when its socket
`/run/jtop.sock` exists and `import jtop` works, and its client must match the service's X.Y; any
failure is logged with jtop's own message and ignored.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Both paths name the same node: /proc/device-tree links to /sys/firmware/devicetree/base.
DEVICETREE_DIRS = ("sys/firmware/devicetree/base", "proc/device-tree")
TEGRA_RELEASE = "etc/nv_tegra_release"
DPKG_STATUS = "var/lib/dpkg/status"
JTOP_SOCKET = "run/jtop.sock"
JTOP_TIMEOUT_S = 5.0

# L4T -> JetPack. 38.x/39.x: jetson-stats 7.2.2's table (reference/platform.md §1); 36.x/35.x:
# jetson-stats' NVIDIA_JETPACK table (jtop/core/jetson_variables.py). Exact releases only: an
# unknown release gets no JetPack rather than a guess (35.1 was 5.0.2 but 35.2.1 was 5.1).
JETPACK_FOR_L4T = {
    "39.2.2": "7.2.2", "39.2.1": "7.2.1", "39.2.0": "7.2 GA", "39.0.0": "7.2 EA",
    "38.4.0": "7.1", "38.2.2": "7.0", "38.2.1": "7.0", "38.2.0": "7.0",
    "36.4.3": "6.2", "36.4.2": "6.1 (rev1)", "36.4.0": "6.1", "36.3.0": "6.0", "36.2.0": "6.0 DP",
    "35.6.0": "5.1.4", "35.5.0": "5.1.3", "35.4.1": "5.1.2", "35.3.1": "5.1.1", "35.2.1": "5.1",
    "35.1.0": "5.0.2 GA",
}

# SoC (last `compatible` entry) -> CUDA compute capability, used when NVML cannot say.
# tegra264 (Thor) 11.0: jetson-stats 7.2.2; tegra234 (Orin) 8.7 and tegra194 (Xavier) 7.2: NVIDIA's
# CUDA GPU list.
COMPUTE_CAPABILITY_FOR_SOC = {"tegra264": "11.0", "tegra234": "8.7", "tegra194": "7.2"}

_L4T_LINE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")


@dataclass(frozen=True)
class JetsonInfo:
    model: str
    compatible: tuple[str, ...]
    soc: str | None
    l4t: str | None
    l4t_source: str | None
    jetpack: str | None
    module: str | None = None
    # "not used: <why>" or "used: jetson-stats <version>"
    jtop: str = "not used"


def read_devicetree(root: Path, name: str) -> bytes | None:
    for base in DEVICETREE_DIRS:
        try:
            return (root / base / name).read_bytes()
        except OSError:
            continue
    return None


def _strings(raw: bytes | None) -> tuple[str, ...]:
    """A devicetree string list: NUL-separated, NUL-terminated."""
    if not raw:
        return ()
    return tuple(s.decode("utf-8", "replace").strip() for s in raw.split(b"\0") if s.strip())


def detect(root: Path) -> tuple[str, tuple[str, ...]] | None:
    """(model, compatible) when this is a Jetson (an `nvidia,tegra*` SoC or a Tegra release file)."""
    model = _strings(read_devicetree(root, "model"))
    compatible = _strings(read_devicetree(root, "compatible"))
    tegra = any(c.startswith("nvidia,tegra") for c in compatible)
    if not tegra and not (root / TEGRA_RELEASE).is_file():
        return None
    return (model[0] if model else "NVIDIA Jetson (devicetree model missing)"), compatible


def parse_tegra_release(text: str) -> str | None:
    """`# R38 (release), REVISION: 2.0, GCID: ...` -> '38.2.0'."""
    match = _L4T_LINE.search(text)
    if not match:
        return None
    major, revision = match.groups()
    parts = revision.split(".")
    while len(parts) < 2:
        parts.append("0")
    return ".".join([major, *parts])


def l4t_from_dpkg(root: Path) -> str | None:
    """The `nvidia-l4t-core` package version from dpkg's status file: '36.4.3-20250107...' -> '36.4.3'."""
    try:
        text = (root / DPKG_STATUS).read_text(errors="replace")
    except OSError:
        return None
    for block in text.split("\n\n"):
        if re.search(r"^Package: nvidia-l4t-core$", block, re.M):
            version = re.search(r"^Version: (\d+(?:\.\d+)+)", block, re.M)
            if version:
                return version.group(1)
    return None


def read_l4t(root: Path) -> tuple[str | None, str | None]:
    try:
        l4t = parse_tegra_release((root / TEGRA_RELEASE).read_text(errors="replace"))
        if l4t:
            return l4t, "/" + TEGRA_RELEASE
    except OSError:
        pass
    l4t = l4t_from_dpkg(root)
    return (l4t, "dpkg nvidia-l4t-core") if l4t else (None, None)


def probe(root: Path, jtop_module: Any = None, use_jtop: bool = True) -> JetsonInfo | None:
    found = detect(root)
    if found is None:
        return None
    model, compatible = found
    soc = compatible[-1].split(",", 1)[-1] if compatible else None
    l4t, l4t_source = read_l4t(root)
    info = JetsonInfo(model=model, compatible=compatible, soc=soc, l4t=l4t, l4t_source=l4t_source,
                      jetpack=JETPACK_FOR_L4T.get(l4t or ""))
    if not use_jtop:
        return _with(info, jtop="not used: disabled")
    return _with_jtop(info, root, jtop_module)


def _with(info: JetsonInfo, **changes: Any) -> JetsonInfo:
    from dataclasses import replace
    return replace(info, **changes)


def _with_jtop(info: JetsonInfo, root: Path, jtop_module: Any) -> JetsonInfo:
    """Fill what only jtop's service knows; any failure leaves `info` as it is, with the reason."""
    if not (root / JTOP_SOCKET).exists():
        reason = f"not used: its service socket /{JTOP_SOCKET} does not exist (jtop.service not running)"
        return _with(info, jtop=reason)
    if jtop_module is None:
        try:
            import jtop as jtop_module  # jetson-stats, AGPL-3.0: optional extra forged[jetson]
        except ImportError as exc:
            reason = f"not used: the optional jetson-stats package is not installed ({exc})"
            return _with(info, jtop=reason)
    result: dict[str, Any] = {}

    def query() -> None:
        try:
            with jtop_module.jtop(interval=1.0) as jetson:
                result["hardware"] = dict(jetson.board["hardware"])
        except Exception as exc:  # jtop.JtopException with jtop's own message, or anything else
            result["error"] = " ".join(str(exc).split())

    worker = threading.Thread(target=query, name="forged-jtop", daemon=True)
    worker.start()
    worker.join(JTOP_TIMEOUT_S)
    if worker.is_alive():
        reason = f"not used: jtop did not answer within {JTOP_TIMEOUT_S:.0f} s"
    elif "error" in result:
        reason = f"not used: {result['error']}"
    else:
        hw = result.get("hardware", {})
        version = getattr(jtop_module, "__version__", "?")
        l4t = info.l4t or (hw.get("L4T") or None)
        return _with(info, module=hw.get("Module") or None, l4t=l4t,
                     l4t_source=info.l4t_source or ("jtop" if l4t else None),
                     jetpack=info.jetpack or hw.get("Jetpack") or JETPACK_FOR_L4T.get(l4t or ""),
                     jtop=f"used: jetson-stats {version}")
    return _with(info, jtop=reason)
