"""Output constraints as llama.cpp grammars (GBNF), and the JSON Schema features they cannot enforce.

JSON Schema becomes GBNF through the converter llama-cpp-python ships (`llama_cpp.llama_grammar`,
llama.cpp's json-schema-to-grammar). That converter silently ignores what it does not know, so a
schema is first checked here: every validation keyword it would not enforce is named, and the
request is refused (400) instead of answered with JSON that may not validate. The converter walks
a schema in a fixed order (`$ref`, `anyOf`/`oneOf`, a list of types, `const`, `enum`, objects,
arrays, `pattern`, `format`, string lengths, plain types) and each branch honours only its own
keywords; `_honoured` mirrors that order.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

from llama_cpp.llama_grammar import SchemaConverter

from forged.engine.base import OutputConstraint, RequestRejected

# Keywords that never restrict which instances are valid: dropped before conversion.
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
    "writeOnly", "contentEncoding", "contentMediaType", "discriminator", "strict",
})
# Validation keywords of JSON Schema 2020-12 (and draft 7's `definitions`/`dependencies`). A keyword
# outside both sets is an unknown annotation, which validators ignore too.
VALIDATION = frozenset({
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "format", "items", "prefixItems", "contains", "maxContains",
    "minContains", "maxItems", "minItems", "uniqueItems", "maxProperties", "minProperties", "required",
    "properties", "patternProperties", "additionalProperties", "propertyNames", "dependentRequired",
    "dependentSchemas", "dependencies", "unevaluatedItems", "unevaluatedProperties", "allOf", "anyOf",
    "oneOf", "not", "if", "then", "else", "$ref", "$defs", "definitions", "$anchor", "$dynamicRef",
    "$dynamicAnchor",
})
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})
TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
# What a keyword does not change when it is at its neutral value.
NEUTRAL = {"uniqueItems": False, "unevaluatedProperties": False, "minItems": 0, "minLength": 0}


def unsupported_features(schema: Any) -> list[str]:
    """The parts of `schema` that the grammar would not enforce, each with its JSON path."""
    problems: list[str] = []
    _check(schema, "$", problems, root=schema)
    return problems


def _check(node: Any, path: str, problems: list[str], root: Any) -> None:
    if isinstance(node, bool):
        if node is False:
            problems.append(f"{path}: the schema false (nothing validates)")
        return
    if not isinstance(node, dict):
        problems.append(f"{path}: a schema must be an object")
        return
    honoured = _honoured(node)
    for key, value in node.items():
        if key in VALIDATION and key not in honoured and key not in ("$defs", "definitions"):
            if NEUTRAL.get(key, ...) == value:
                continue
            problems.append(f"{path}.{key}" + (" (use it on its own, not beside anyOf/oneOf/$ref/enum/const)"
                                                if key in ("type", "properties", "items") else ""))
    types = node.get("type")
    for t in types if isinstance(types, list) else [types] if types is not None else []:
        if t not in TYPES:
            problems.append(f"{path}.type: unknown type {t!r}")
    if "anyOf" in honoured and "oneOf" in node and "anyOf" in node:
        problems.append(f"{path}: anyOf and oneOf together")
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#/"):
        problems.append(f"{path}.$ref: only local references (#/...) are supported, not {ref!r}")
    fmt = node.get("format")
    if "format" in honoured and fmt not in FORMATS:
        problems.append(f"{path}.format: {fmt!r} (supported: {', '.join(sorted(FORMATS))})")
    pattern = node.get("pattern")
    if "pattern" in honoured and isinstance(pattern, str) and not (pattern.startswith("^") and pattern.endswith("$")):
        problems.append(f"{path}.pattern: must start with ^ and end with $")
    if "properties" in honoured:
        props = node.get("properties") or {}
        missing = [name for name in node.get("required", []) if name not in props]
        if missing:
            problems.append(f"{path}.required: names properties that properties does not define: "
                            f"{', '.join(map(str, missing))}")
        for name, sub in props.items() if isinstance(props, dict) else ():
            _check(sub, f"{path}.properties.{name}", problems, root)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            _check(extra, f"{path}.additionalProperties", problems, root)
    if "items" in honoured:
        items = node.get("items")
        if isinstance(items, list):
            for i, sub in enumerate(items):
                _check(sub, f"{path}.items[{i}]", problems, root)
        elif items is not None:
            _check(items, f"{path}.items", problems, root)
    if "prefixItems" in honoured:
        for i, sub in enumerate(node.get("prefixItems") or []):
            _check(sub, f"{path}.prefixItems[{i}]", problems, root)
    for key in ("anyOf", "oneOf"):
        if key in honoured and key in node:
            for i, sub in enumerate(node[key] or []):
                _check(sub, f"{path}.{key}[{i}]", problems, root)
    for key in ("$defs", "definitions"):
        for name, sub in (node.get(key) or {}).items():
            _check(sub, f"{path}.{key}.{name}", problems, root)


def _honoured(node: dict[str, Any]) -> frozenset[str]:
    """The validation keywords the converter enforces for this node: the branch it takes decides."""
    t = node.get("type")
    if "$ref" in node:
        return frozenset({"$ref"})
    if "oneOf" in node or "anyOf" in node:
        return frozenset({"anyOf", "oneOf"})
    if isinstance(t, list):
        return frozenset({"type"})
    if "const" in node:
        return frozenset({"const", "type"})
    if "enum" in node:
        return frozenset({"enum", "type"})
    if t in (None, "object") and ("properties" in node or
                                  ("additionalProperties" in node and node["additionalProperties"] is not True)):
        return frozenset({"type", "properties", "required", "additionalProperties"})
    if t in (None, "array") and ("items" in node or "prefixItems" in node):
        if isinstance(node.get("items"), list) or "items" not in node:
            return frozenset({"type", "items", "prefixItems"})  # a tuple: exactly its items
        return frozenset({"type", "items", "minItems", "maxItems"})
    if t in (None, "string") and "pattern" in node:
        return frozenset({"type", "pattern"})
    if t in (None, "string") and "format" in node:
        return frozenset({"type", "format"})
    if t == "string" and ("minLength" in node or "maxLength" in node):
        return frozenset({"type", "minLength", "maxLength"})
    return frozenset({"type"})


def _strip_annotations(node: Any) -> Any:
    """The schema without annotations: `{"title": "x"}` must mean "anything", as `{}` does (the
    converter would refuse it), and descriptions need not travel into the grammar."""
    if isinstance(node, list):
        return [_strip_annotations(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ANNOTATIONS:
            continue
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: _strip_annotations(sub) for name, sub in value.items()}
        elif key in ("const", "enum"):
            out[key] = copy.deepcopy(value)  # values, not schemas
        else:
            out[key] = _strip_annotations(value)
    return out


def to_gbnf(constraint: OutputConstraint) -> str:
    """The GBNF grammar (root rule `root`) for a constraint. RequestRejected names what cannot be
    enforced."""
    key = json.dumps([constraint.schema, constraint.before, constraint.after, constraint.max_items],
                     sort_keys=True, ensure_ascii=False)
    return _compile(key)


@functools.lru_cache(maxsize=64)
def _compile(key: str) -> str:
    schema, before, after, max_items = json.loads(key)
    if schema is None:
        schema = {"type": "object"}
    problems = unsupported_features(schema)
    if problems:
        raise RequestRejected("the JSON schema uses features that constrained decoding cannot enforce: "
                              + "; ".join(problems[:8]))
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    plain = not before and not after and max_items == 1
    try:
        resolved = converter.resolve_refs(_strip_annotations(schema), "input")
        top = converter.visit(resolved, "" if plain else "json-doc")
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise RequestRejected(f"the JSON schema cannot be turned into a grammar: {exc}") from None
    grammar = converter.format_grammar()
    if plain:
        return grammar
    item = " ".join(part for part in (_literal(before), top, _literal(after)) if part)
    repeat = "" if max_items == 1 else "+" if max_items is None else f"{{1,{max_items}}}"
    return f"root ::= ({item}){repeat}\n{grammar}"


def _literal(text: str) -> str:
    if not text:
        return ""
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
               .replace("\t", "\\t"))
    return f'"{escaped}"'
