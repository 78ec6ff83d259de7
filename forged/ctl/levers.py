"""The profile levers forgectl doctor and diagnose point at, and how a change to each is applied."""

from __future__ import annotations

from typing import Any

# What SIGHUP applies live (forged/daemon.py Daemon.reload); everything else waits for a restart.
LIVE_SECTIONS = ("thresholds.", "targets.", "admission.")


def apply_with(key: str, old: Any = None, new: Any = None) -> str:
    """'reload' when `systemctl reload forged` applies the change, else 'restart'."""
    if key.startswith(LIVE_SECTIONS):
        return "reload"
    if key == "inference.max_concurrent_sessions" and isinstance(old, int) and isinstance(new, int) and new <= old:
        return "reload"
    return "restart"


def lever(key: str, old: Any, new: Any, why: str) -> dict[str, Any]:
    return {"key": key, "from": old, "to": new, "apply": apply_with(key, old, new), "why": why}


def describe(change: dict[str, Any] | None) -> str:
    if change is None:
        return "none"
    return (f"{change['key']}: {change['from']} -> {change['to']} in sku_profiles.yaml, then "
            f"`systemctl {change['apply']} forged`")


def fewer_sessions(n: int) -> int:
    """A step down that is noticeable but not drastic: 4 -> 3, 8 -> 6, 20 -> 15."""
    return max(1, n - max(1, n // 4))


def more_sessions(n: int) -> int:
    return n + max(1, n // 4)


def fp8_capable(hardware: dict[str, Any]) -> tuple[bool, str]:
    """FP8 KV needs compute capability 8.9 or later (Ada, Hopper, Blackwell; Jetson Thor is 11.0)."""
    kind = hardware.get("kind")
    cc = hardware.get("compute_capability")
    if kind == "cpu":
        return False, "no GPU (the CPU runs the engine)"
    if not cc:
        return False, f"{kind} of unknown compute capability"
    try:
        value = float(cc)
    except ValueError:
        return False, f"{kind} of unreadable compute capability {cc!r}"
    if value >= 8.9:
        return True, f"{kind} with compute capability {cc} (>= 8.9)"
    return False, f"{kind} with compute capability {cc} (< 8.9)"
