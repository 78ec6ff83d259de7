"""Typed YAML loading: dataclasses as schemas, errors that name file:line and the key path.

Every config file forged reads goes through `load_yaml` + `build`, so that an unknown key, a wrong
type or an out-of-range value is reported the same way everywhere, as one line an operator can act
on: ``/etc/forged/forged.yaml:12: listen.http.port: expected an integer in 0..65535, got 70000``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(Exception):
    """A config problem, already phrased as the one line the operator will read."""


# The exit status of every command stopped by a ConfigError (EX_CONFIG from sysexits.h); the unit's
# RestartPreventExitStatus= stops a restart loop on it.
EXIT_CONFIG = 78


@dataclasses.dataclass(frozen=True)
class Located:
    """Parsed YAML plus where each key path came from, so that later checks can cite file:line."""

    data: Any
    source: str
    lines: dict[str, int]

    def where(self, key_path: str) -> str:
        # Fall back to the nearest parent that has a line: a missing key is reported at its mapping.
        path = key_path
        while path:
            if path in self.lines:
                return f"{self.source}:{self.lines[path]}"
            path = path.rpartition(".")[0]
        return self.source


def field(default: Any = dataclasses.MISSING, *, lo: float | None = None, hi: float | None = None,
          default_factory: Any = dataclasses.MISSING, doc: str = "") -> Any:
    """A dataclass field with an optional inclusive numeric range, checked by `build`."""
    meta = {"lo": lo, "hi": hi, "doc": doc}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def load_yaml(path: Path) -> Located:
    """Read a YAML file into plain Python data and a key-path -> line map."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    return parse_yaml(text, source)


def parse_yaml(text: str, source: str) -> Located:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    lines: dict[str, int] = {}
    data = {} if node is None else _node_to_python(node, "", lines, source)
    return Located(data, source, lines)


def _node_to_python(node: yaml.Node, path: str, lines: dict[str, int], source: str) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = f"{path}.{key}" if path else key
            if key in out:
                raise ConfigError(f"{source}:{key_node.start_mark.line + 1}: {child}: duplicate key")
            lines[child] = key_node.start_mark.line + 1
            out[key] = _node_to_python(value_node, child, lines, source)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_node_to_python(item, f"{path}[{i}]", lines, source) for i, item in enumerate(node.value)]
    try:
        return yaml.SafeLoader("").construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}:{node.start_mark.line + 1}: {path}: {exc}") from None


def build(cls: type, located: Located, data: Any = None, path: str = "") -> Any:
    """Construct dataclass `cls` from mapping data, validating keys, types and ranges."""
    data = located.data if data is None and path == "" else data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{located.where(path)}: {path or '(top level)'}: expected a mapping, "
                          f"got {describe_value(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"{located.where(key)}: {key}: unknown key; expected one of: "
                          f"{', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{located.where(path)}: {key}: required key is missing")
            continue
        kwargs[name] = _convert(hints[name], data[name], located, key, f.metadata)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, located: Located, key: str, meta: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, located, key, meta)
        raise TypeError(f"unsupported union in schema at {key}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{located.where(key)}: {key}: expected one of "
                              f"{', '.join(map(str, args))}, got {describe_value(value)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{located.where(key)}: {key}: expected a mapping, got {describe_value(value)}")
        return {k: _convert(args[1], v, located, f"{key}.{k}", meta) for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{located.where(key)}: {key}: expected a list, got {describe_value(value)}")
        items = [_convert(args[0], v, located, f"{key}[{i}]", meta) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        return build(tp, located, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{located.where(key)}: {key}: expected true or false, got {describe_value(value)}")
        return value
    if tp in (int, float):
        # bool is an int in Python, but `port: yes` is a mistake, not 1.
        ok = isinstance(value, int) if tp is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            what = "an integer" if tp is int else "a number"
            raise ConfigError(f"{located.where(key)}: {key}: expected {what}{_range_text(meta)}, "
                              f"got {describe_value(value)}")
        lo, hi = meta.get("lo"), meta.get("hi")
        # YAML's .nan compares false with everything, so it would pass any range; .inf passes an
        # open one. Neither is a setting.
        finite = not isinstance(value, float) or math.isfinite(value)
        if not finite or (lo is not None and value < lo) or (hi is not None and value > hi):
            what = "an integer" if tp is int else "a finite number"
            raise ConfigError(f"{located.where(key)}: {key}: expected {what}{_range_text(meta)}, "
                              f"got {value}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{located.where(key)}: {key}: expected a string, got {describe_value(value)}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {key}")


def _range_text(meta: Any) -> str:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and hi is not None:
        return f" in {lo}..{hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def describe_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__}"
    return f"{type(value).__name__} {value!r}"


def to_plain(obj: Any) -> Any:
    """Dataclass tree -> JSON-able values (for /v1/status, `show-profile` and the arguments of the
    TensorRT-LLM call): enums by their value, paths as strings."""
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
