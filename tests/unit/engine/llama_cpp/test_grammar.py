"""JSON Schema -> GBNF for the embedded engine (engine/llama_cpp/grammar.py): what is refused, and
that every grammar it makes is one libllama parses, against the real default model's vocabulary."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp as ll
import pytest

from forged.engine.base import OutputConstraint, RequestRejected
from forged.engine.llama_cpp.grammar import to_gbnf, unsupported_features
from forged.engine.llama_cpp.model import init_backend

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "description": "full name", "maxLength": 40},
                         "age": {"type": "integer"}, "born": {"type": "string", "format": "date"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                         "spouse": {"anyOf": [{"$ref": "#/$defs/Ref"}, {"type": "null"}]}},
          "$defs": {"Ref": {"title": "Ref", "type": "object", "properties": {"id": {"type": "string",
                                                                                    "pattern": "^[a-z]+$"}}}}}


@pytest.fixture(scope="module")
def vocab(model_path: Path) -> Iterator[Any]:
    init_backend()
    params = ll.llama_model_default_params()
    params.vocab_only = True
    model = ll.llama_model_load_from_file(str(model_path).encode(), params)
    yield ll.llama_model_get_vocab(model)
    ll.llama_model_free(model)


def parses(vocab: Any, gbnf: str) -> bool:
    sampler = ll.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    if not sampler:
        return False
    ll.llama_sampler_free(sampler)
    return True


def test_what_pydantic_and_openai_strict_schemas_use_is_supported(vocab: Any) -> None:
    assert unsupported_features(PERSON) == []
    assert parses(vocab, to_gbnf(OutputConstraint(schema=PERSON)))
    assert parses(vocab, to_gbnf(OutputConstraint()))  # json_object: any object
    assert parses(vocab, to_gbnf(OutputConstraint(schema={"title": "anything"})))  # annotations only


@pytest.mark.parametrize(("schema", "named"), [
    ({"type": "integer", "minimum": 0}, "$.minimum"),
    ({"type": "object", "properties": {"a": {"type": "number", "multipleOf": 2}}}, "$.properties.a.multipleOf"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "$.uniqueItems"),
    ({"type": "string", "format": "email"}, "$.format"),
    ({"type": "string", "pattern": "[a-z]+"}, "$.pattern"),
    ({"type": "object", "required": ["a"]}, "$.required"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "$.required"),
    ({"type": ["string", "null"], "maxLength": 3}, "$.maxLength"),
    ({"anyOf": [{"type": "string"}], "properties": {"a": {}}}, "$.properties"),
    ({"allOf": [{"type": "object"}]}, "$.allOf"),
    ({"not": {"type": "null"}}, "$.not"),
    ({"$ref": "https://example.com/s.json"}, "$.$ref"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "$.patternProperties"),
    ({"$defs": {"X": {"type": "integer", "maximum": 3}}, "$ref": "#/$defs/X"}, "$.$defs.X.maximum"),
])
def test_what_the_grammar_would_not_enforce_is_named(schema: dict[str, Any], named: str) -> None:
    problems = unsupported_features(schema)
    assert any(p.startswith(named) for p in problems), problems
    with pytest.raises(RequestRejected, match="cannot enforce"):
        to_gbnf(OutputConstraint(schema=schema))


def test_neutral_values_of_unsupported_keywords_pass() -> None:
    assert unsupported_features({"type": "array", "items": {"type": "string"}, "uniqueItems": False,
                                 "minItems": 0}) == []


def test_wrapped_and_repeated_documents(vocab: Any) -> None:
    call = {"type": "object", "properties": {"name": {"const": "f"}, "arguments": {"type": "object"}},
            "required": ["name", "arguments"]}
    gbnf = to_gbnf(OutputConstraint(schema=call, before="<tool_call>\n", after="\n</tool_call>\n", max_items=None))
    assert gbnf.startswith('root ::= ("<tool_call>\\n" json-doc "\\n</tool_call>\\n")+\n')
    assert parses(vocab, gbnf)
    assert "{1,3}" in to_gbnf(OutputConstraint(schema=call, before="<a>", max_items=3))
