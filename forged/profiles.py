"""Choosing the SKU profile: a `profile:` pin in forged.yaml wins; otherwise by hardware.

This slice knows one rule: a machine with no GPU gets the `cpu` profile. Probe-driven matching of
Jetson and discrete GPUs is a later step.
"""

from __future__ import annotations

from dataclasses import dataclass

from forged.config import LoadedConfig, Profile
from forged.hardware import HardwareInfo
from forged.schema import ConfigError


@dataclass(frozen=True)
class Selection:
    name: str
    profile: Profile
    reason: str


def select(config: LoadedConfig, hardware: HardwareInfo) -> Selection:
    pinned = config.settings.profile
    if pinned != "auto":
        return Selection(pinned, config.profiles[pinned], f"pinned by profile: {pinned} in forged.yaml")
    wanted = {"cpu": "cpu"}.get(hardware.kind)
    if wanted is None or wanted not in config.profiles:
        raise ConfigError(f"{config.profiles_source.where('profiles')}: profiles: no profile matches this "
                          f"{hardware.kind} machine ({hardware.name}); add a '{hardware.kind}' profile or pin one "
                          f"with profile: in forged.yaml")
    return Selection(wanted, config.profiles[wanted], f"hardware kind {hardware.kind}")
