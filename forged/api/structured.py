"""`response_format`: text, `json_object`, or `json_schema` (OpenAI's structured outputs).

Both JSON forms become an `OutputConstraint` that the engine enforces while sampling, on both
endpoints, streamed or not: `json_object` is any JSON object, `json_schema` its `schema` (any JSON
object when it has none). `strict` is accepted either way: forged always holds the output to the
schema, and refuses a schema with features it cannot enforce (400 naming them) rather than loosen
it.
"""

from __future__ import annotations

import re
from typing import Any

from forged.api.errors import BadRequest
from forged.engine.base import OutputConstraint

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
JSON_SCHEMA_FIELDS = frozenset({"name", "description", "schema", "strict"})


def parse_response_format(value: Any) -> OutputConstraint | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text" and set(value) == {"type"}:
        return None
    if kind == "json_object" and set(value) == {"type"}:
        return OutputConstraint()
    if kind != "json_schema" or set(value) != {"type", "json_schema"}:
        raise BadRequest('response_format must be {"type": "text"}, {"type": "json_object"} or {"type": '
                         '"json_schema", "json_schema": {"name", "schema", "strict"}}', "response_format")
    spec = value["json_schema"]
    if not isinstance(spec, dict) or set(spec) - JSON_SCHEMA_FIELDS:
        raise BadRequest("response_format.json_schema may hold name, description, schema and strict",
                         "response_format.json_schema")
    if not isinstance(spec.get("name"), str) or not NAME.match(spec["name"]):
        raise BadRequest("response_format.json_schema.name is required: 1-64 letters, digits, _ or -",
                         "response_format.json_schema.name")
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise BadRequest("response_format.json_schema.description must be a string",
                         "response_format.json_schema.description")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise BadRequest("response_format.json_schema.strict must be true or false",
                         "response_format.json_schema.strict")
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise BadRequest("response_format.json_schema.schema must be a JSON Schema object",
                         "response_format.json_schema.schema")
    return OutputConstraint(schema=schema)
