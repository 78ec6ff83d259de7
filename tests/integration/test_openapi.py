"""The OpenAPI document: it covers exactly the routes the app registers, its request schemas accept
exactly what api/requests.py accepts, and schemathesis fuzzing a live daemon over TCP from it finds
no 5xx, no error that is not an OpenAI error object, and leaves the daemon healthy."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from aiohttp import web
from conftest import Daemon
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from forged import config as config_mod
from forged import hardware as hardware_mod
from forged import profiles
from forged.api.app import ROUTES, TEST_ROUTES, build_app
from forged.api.openapi import ROUTES_KEY, document
from forged.api.requests import CHAT_FIELDS, COMPLETION_FIELDS, NEUTRAL, BadRequest, parse_chat, parse_completion
from forged.engine import create_engine
from forged.metrics import Metrics
from forged.state import ServiceState

# Every generated example stays cheap: a 64-token context bounds prompt + max_tokens.
FUZZ_CONTEXT = 64
FUZZ_EXAMPLES = 40
REQUESTS = [("/v1/completions", parse_completion, COMPLETION_FIELDS),
            ("/v1/chat/completions", parse_chat, CHAT_FIELDS)]
# Rules that tie a value to another field's contents, which JSON Schema cannot state (api/openapi.py
# says so): a schema-valid body may break them, and then its refusal is right. (param, message end)
CROSS_REFERENCES = [("tool_choice", "which is not in tools")]


def _operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


def _real_app(tmp_path: Path, model_path: Path, test_hooks: bool) -> web.Application:
    """The app build_app builds, on the same config, hardware, profile and engine objects
    `forged run` builds (the engine is created, not loaded: routing does not need the model)."""
    daemon = Daemon(tmp_path, model_path)
    loaded = config_mod.load(daemon.config_dir)
    hardware = hardware_mod.probe()
    selection = profiles.select(loaded, hardware)
    choice = create_engine(loaded, selection.name, selection.profile, hardware, tmp_path / "state")
    state = ServiceState(config=loaded, profile_name=selection.name, profile=selection.profile, hardware=hardware,
                         engine=choice.engine, metrics=Metrics(lambda: None), placement=choice.placement,
                         test_hooks=test_hooks)
    return build_app(state)


@pytest.mark.parametrize("test_hooks", [False, True])
def test_document_covers_exactly_the_registered_routes(tmp_path: Path, model_path: Path, test_hooks: bool) -> None:
    app = _real_app(tmp_path, model_path, test_hooks)
    registered = {(route.method, route.resource.canonical) for route in app.router.routes()
                  if route.resource is not None}
    test_only = {(method, path) for method, path, _ in TEST_ROUTES}
    assert (test_only <= registered) == test_hooks
    # The routes the app hands the document (the ones /openapi.json documents) are the ones it serves.
    assert _operations(document(app[ROUTES_KEY])) == registered - test_only


@pytest.mark.parametrize(("path", "parse", "fields"), REQUESTS)
def test_request_schema_properties_are_the_accepted_fields(path: str, parse: Any, fields: frozenset[str]) -> None:
    ref = document(ROUTES)["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = document(ROUTES)["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert set(schema["properties"]) == fields | set(NEUTRAL)
    assert schema["additionalProperties"] is False
    required = schema["required"][0]
    minimal = {"prompt": "x"} if required == "prompt" else {"messages": [{"role": "user", "content": "x"}]}
    parse(minimal)
    # Every property the document offers is one the parser knows: asked with a value of the wrong
    # type it may refuse the value, never the field's existence.
    for name in schema["properties"]:
        try:
            parse({**minimal, name: {"not": "a valid value"}})
        except BadRequest as exc:
            assert not str(exc).startswith("unknown field"), (name, str(exc))
    with pytest.raises(BadRequest) as refused:
        parse({**minimal, "max_token": 5})  # a typo of a real field
    assert refused.value.param == "max_token"


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize(("path", "parse", "fields"), REQUESTS)
def test_validation_accepts_exactly_what_the_schema_allows(path: str, parse: Any, fields: frozenset[str],
                                                           mode: GenerationMode) -> None:
    """Bodies generated from the schema are accepted by api/requests.py; bodies generated to violate
    it are refused. Either failing means the document and the validation have drifted apart."""
    operation = schemathesis.openapi.from_dict(document(ROUTES))[path]["POST"]
    disagreements: list[tuple[Any, str | None]] = []

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        try:
            parse(case.body)
        except BadRequest as exc:
            crossed = any(exc.param == param and exc.message.endswith(end) for param, end in CROSS_REFERENCES)
            if mode is GenerationMode.POSITIVE and not crossed:
                disagreements.append((case.body, exc.message))
        else:
            if mode is GenerationMode.NEGATIVE:
                disagreements.append((case.body, None))

    check()
    assert not disagreements, f"schema and validation disagree ({mode.value}): {disagreements[:3]!r}"


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Any:
    root = tmp_path_factory.mktemp("fuzz")
    # One engine thread: on 2 cores shared with other test daemons, libllama's spinning thread pool
    # made an 8-token answer take seconds instead of a third of one.
    daemon = Daemon(root, model_path, settings={"server": {"default_max_tokens": 8}},
                    profile={"inference": {"max_seq_len": FUZZ_CONTEXT}, "llama_cpp": {"n_threads": 1}}).start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def live_schema(fuzz_daemon: Daemon) -> Any:
    # The document names no server: requests go where it was fetched from.
    return schemathesis.openapi.from_url(f"{fuzz_daemon.url}/openapi.json")


def test_served_document_is_the_one_built_here_bounded_by_the_context(fuzz_daemon: Daemon) -> None:
    served = httpx.get(f"{fuzz_daemon.url}/openapi.json", timeout=10).json()
    context = fuzz_daemon.status()["model"]["context_length"]
    assert context == FUZZ_CONTEXT
    assert served == json.loads(json.dumps(document(ROUTES, context)))
    max_tokens = served["components"]["schemas"]["CompletionRequest"]["properties"]["max_tokens"]
    assert max_tokens["maximum"] == context


def openai_error_object(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx/5xx of every route is {"error": {message, type, param, code}} with a message."""
    if response.status_code < 400:
        return None
    body = json.loads(response.content)
    error = body["error"]
    assert set(body) == {"error"} and set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"], body
    return None


FUZZ_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
               negative_data_rejection, openai_error_object]


# schemathesis' own pytest plugin does not run on pytest 9 yet: hypothesis drives its strategies here.
@pytest.mark.parametrize(("method", "path"), sorted(_operations(document(ROUTES))))
def test_fuzzed_requests_get_no_5xx_and_only_openai_errors(live_schema: Any, method: str, path: str) -> None:
    operation = live_schema[path][method]
    # A route without parameters or body has no invalid input to generate.
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if method == "POST" else [GenerationMode.POSITIVE]
    for mode in modes:
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(operation.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            response = case.call(timeout=60)
            case.validate_response(response, checks=FUZZ_CHECKS)

        fuzz()


def test_daemon_is_healthy_after_fuzzing(fuzz_daemon: Daemon) -> None:
    """Runs after the fuzzing above (pytest keeps file order): nothing it sent left a trace."""
    assert httpx.get(f"{fuzz_daemon.url}/readyz", timeout=10).status_code == 200
    r = httpx.post(f"{fuzz_daemon.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    deadline = time.monotonic() + 30
    while True:
        status = fuzz_daemon.status()
        if status["sessions"]["active"] == 0 and status["queue"]["depth"] == 0:
            break
        assert time.monotonic() < deadline, f"sessions or queue not back to 0: {status['sessions']}, {status['queue']}"
        time.sleep(0.2)
    assert status["kv_cache"]["blocks_used"] == 0
    assert "Traceback" not in fuzz_daemon.log()
