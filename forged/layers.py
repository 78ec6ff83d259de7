"""Profile files in layers, the way tuned layers /usr/lib/tuned under /etc/tuned.

1. Packaged defaults: every `*.yaml` in the profiles directory (`/usr/share/forged/profiles`, or
   `$FORGED_PROFILES_DIR`), in sorted order.
2. `<config dir>/sku_profiles.yaml`: overrides by profile name.
3. `<config dir>/conf.d/*.yaml` drop-ins, in sorted order.

Each file has one top-level key, `profiles:`, a mapping of profile name to profile. A name that an
earlier layer already has is merged key by key: mappings merge, anything else (a number, a string,
the `match:` list) replaces. A new name adds a profile. The merged tree remembers, for every key,
the file and line its value came from, so a bad value is reported where it was written.

Order in which `auto` selection tries profiles: those first defined in the config dir (in the
order they appear, sku_profiles.yaml before conf.d), then the packaged ones in packaged order. An
override does not move a profile; a profile the operator adds is tried before the packaged ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from forged.schema import ConfigError, Located, describe_value, load_yaml


@dataclasses.dataclass(frozen=True)
class LayeredSource(Located):
    """Merged profile data; `where(key)` names the file:line that set the key (or its parent)."""

    origins: dict[str, str] = dataclasses.field(default_factory=dict)
    # profile name -> every file:line that defined or changed it, lowest layer first.
    layers: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    files: tuple[str, ...] = ()

    def where(self, key_path: str) -> str:
        path = key_path
        while path:
            if path in self.origins:
                return self.origins[path]
            path = _parent(path)
        return self.source


def _parent(path: str) -> str:
    if path.endswith("]"):
        return path[:path.rindex("[")]
    return path.rpartition(".")[0]


def _profiles_of(src: Located) -> dict[str, Any]:
    data = src.data
    if not isinstance(data, dict):
        raise ConfigError(f"{src.source}: (top level): expected a mapping with the key profiles, "
                          f"got {describe_value(data)}")
    unknown = sorted(set(data) - {"profiles"})
    if unknown:
        raise ConfigError(f"{src.where(unknown[0])}: {unknown[0]}: unknown key; expected one of: profiles")
    profiles = data.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{src.where('profiles')}: profiles: expected a mapping, got {describe_value(profiles)}")
    for name, body in profiles.items():
        if body is not None and not isinstance(body, dict):
            raise ConfigError(f"{src.where(f'profiles.{name}')}: profiles.{name}: expected a mapping, "
                              f"got {describe_value(body)}")
    return profiles


def _merge(base: dict[str, Any], patch: dict[str, Any], path: str, origins: dict[str, str]) -> None:
    for key, value in patch.items():
        child = f"{path}.{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, child, origins)
        else:
            # Replaced whole: forget where the old value's insides came from.
            for stale in [p for p in origins if p.startswith(child + ".") or p.startswith(child + "[")]:
                del origins[stale]
            base[key] = _copy(value)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def profile_files(profiles_dir: Path | None, config_file: Path, dropin_dir: Path) -> list[tuple[str, Path]]:
    """Every profile file in layer order, as (layer, path): layer is 'packaged' or 'config'."""
    files: list[tuple[str, Path]] = []
    if profiles_dir is not None and profiles_dir.is_dir():
        files += [("packaged", p) for p in sorted(profiles_dir.glob("*.yaml")) if p.is_file()]
    if config_file.is_file() or not files:
        files.append(("config", config_file))  # missing with no packaged layer: "file not found"
    if dropin_dir.is_dir():
        files += [("config", p) for p in sorted(dropin_dir.glob("*.yaml")) if p.is_file()]
    return files


def load_profile_layers(files: list[tuple[str, Path]]) -> tuple[LayeredSource, list[str]]:
    """Merge the files in order. Returns the merged source and the order to try profiles in."""
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    layers: dict[str, list[str]] = {}
    first_layer: dict[str, str] = {}
    for layer, path in files:
        src = load_yaml(path)
        profiles = _profiles_of(src)
        if "profiles" in src.lines and "profiles" not in origins:
            origins["profiles"] = f"{src.source}:{src.lines['profiles']}"
        for name, body in profiles.items():
            key = f"profiles.{name}"
            body = body or {}
            if name in merged:
                _merge(merged[name], body, key, origins)
            else:
                merged[name] = _copy(body)
                first_layer[name] = layer
            where = f"{src.source}:{src.lines[key]}"
            origins[key] = where
            layers.setdefault(name, []).append(where)
            for sub, line in src.lines.items():
                if sub.startswith(key + ".") or sub.startswith(key + "["):
                    origins[sub] = f"{src.source}:{line}"
    order = [n for n in merged if first_layer[n] == "config"] + [n for n in merged if first_layer[n] == "packaged"]
    sources = tuple(str(path) for _, path in files)
    source = str(files[-1][1]) if files else "profiles"
    located = LayeredSource({"profiles": {n: merged[n] for n in order}}, source, {}, origins=origins,
                            layers={n: tuple(v) for n, v in layers.items()}, files=sources)
    return located, order
