"""Structured answers (core/schema.py): strict-mode schemas, injection, answer classification and
validation, and the typed Arrow column, checked against the emulator over HTTP with the real SDK."""

from __future__ import annotations

import datetime
import enum
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import duckdb
import jsonschema
import msgspec
import openai
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel, Field

from airflow_openai_batch.core.schema import (
    AnswerSchema,
    CompiledSchema,
    ParsedColumn,
    RequestSchemas,
    ResponseSchema,
    ResponseSchemaError,
    SchemaInjector,
    answer_schema_of_request,
    arrow_type,
    compile_schema,
    read_answer,
    response_schema,
    strict_json_schema,
    struct_array,
    tool_calls_array,
    tool_calls_arrow_type,
)
from airflow_openai_batch.emulator import EmulatorServer
from airflow_openai_batch.exceptions import OpenAIBatchInputError

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
KIND = {CHAT: "chat", RESPONSES: "responses"}


# -- the models ---------------------------------------------------------------------------------------------


class Category(str, enum.Enum):
    billing = "billing"
    technical = "technical"
    general = "general"


class Ticket(BaseModel):
    """Optional fields, an enum, a list."""

    category: Category
    urgency: Literal["low", "medium", "high"]
    summary: str
    confidence: float = Field(ge=0, le=1)
    tags: list[str]
    assignee: str | None = None
    priority: int = 3


class Address(BaseModel):
    city: str
    postcode: str | None = None


class Person(BaseModel):
    """Nested models, a list of them, an optional one, a date-time."""

    name: str
    home: Address
    previous: list[Address]
    work: Address | None = None
    born: datetime.date
    seen: datetime.datetime


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool


class Pets(BaseModel):
    """Unions: a discriminated one, a plain one of models, one of scalars."""

    pet: Cat | Dog = Field(discriminator="kind")
    other: Cat | Dog
    label: int | str
    scores: list[float]


MODELS = [Ticket, Person, Pets]


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    """Every object schema in ``node``, at any depth."""
    if isinstance(node, dict):
        if "properties" in node:
            yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)


def _keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_pydantic_models_become_strict_schemas(model: type[BaseModel]) -> None:
    spec = response_schema(model)
    assert spec.name == model.__name__
    schema = spec.schema
    assert schema["type"] == "object"
    for obj in _objects(schema):
        assert obj["additionalProperties"] is False
        assert obj["required"] == list(obj["properties"])
    # What strict mode refuses is gone; the schema still validates instances the model accepts.
    assert not _keys(schema) & {"oneOf", "discriminator", "default", "allOf"}
    jsonschema.Draft202012Validator.check_schema(schema)


def test_optional_pydantic_fields_are_nullable_and_defaults_required() -> None:
    props = response_schema(Ticket).schema["properties"]
    assert {"type": "null"} in props["assignee"]["anyOf"]
    # A field with a non-None default is required and not nullable: the model gives a value.
    assert props["priority"] == {"type": "integer"}


class Titled(BaseModel):
    plain_name: str
    custom: str = Field(title="Shown to the model")


def test_generated_titles_are_dropped_written_ones_kept() -> None:
    schema = response_schema(Titled).schema
    assert "title" not in schema and "title" not in schema["properties"]["plain_name"]
    assert schema["properties"]["custom"]["title"] == "Shown to the model"
    assert all("title" not in sub for sub in response_schema(Person).schema["$defs"].values())


def test_bare_schema_optional_properties_become_nullable() -> None:
    schema = {
        "type": "object",
        "properties": {
            "label": {"type": "string"},
            "score": {"type": "number"},
            "kind": {"enum": ["a", "b"]},
            "typed_kind": {"type": "string", "enum": ["a", "b"]},
            "inner": {"$ref": "#/$defs/Inner"},
        },
        "required": ["label"],
        "$defs": {"Inner": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
    }
    strict = strict_json_schema(schema)
    props = strict["properties"]
    assert strict["required"] == ["label", "score", "kind", "typed_kind", "inner"]
    assert props["label"] == {"type": "string"}
    assert props["score"] == {"type": ["number", "null"]}
    assert props["kind"] == {"anyOf": [{"enum": ["a", "b"]}, {"type": "null"}]}
    assert props["typed_kind"] == {"type": ["string", "null"], "enum": ["a", "b", None]}
    assert props["inner"] == {"anyOf": [{"$ref": "#/$defs/Inner"}, {"type": "null"}]}
    assert strict["$defs"]["Inner"]["additionalProperties"] is False
    assert schema["properties"]["score"] == {"type": "number"}  # the input is not modified
    validate = jsonschema.Draft202012Validator(strict).is_valid
    assert validate({"label": "x", "score": None, "kind": None, "typed_kind": None, "inner": None})
    assert not validate({"label": "x", "score": None, "kind": None, "typed_kind": "c", "inner": None})


@pytest.mark.parametrize(
    ("given", "form"),
    [
        ({"name": "rating", "schema": {"type": "object", "properties": {}}}, "named"),
        (
            {"type": "json_schema", "json_schema": {"name": "rating", "schema": {"type": "object"}}},
            "chat",
        ),
        ({"type": "json_schema", "name": "rating", "schema": {"type": "object"}}, "responses"),
        ({"title": "rating", "type": "object", "properties": {}}, "bare"),
    ],
)
def test_every_dict_form_is_accepted(given: dict[str, Any], form: str) -> None:
    spec = response_schema(given)
    assert spec.name == "rating", form
    assert spec.schema["additionalProperties"] is False


def test_name_and_description() -> None:
    assert response_schema({"type": "object"}).name == "response"
    assert response_schema(Ticket, name="ticket_v2").name == "ticket_v2"
    spec = response_schema({"name": "x", "description": "What it is.", "schema": {"type": "object"}})
    assert spec.chat_format()["json_schema"]["description"] == "What it is."
    assert spec.responses_format()["description"] == "What it is."
    assert response_schema(spec) is spec


@pytest.mark.parametrize(
    ("schema", "path", "words"),
    [
        (
            {"type": "array", "items": {"type": "string"}},
            "$",
            "root of a strict-mode schema must be an object",
        ),
        (
            {
                "type": "object",
                "properties": {"m": {"type": "object", "additionalProperties": {"type": "string"}}},
            },
            "$.properties.m.additionalProperties",
            "free-form map",
        ),
        (
            {"type": "object", "properties": {"s": {"type": "string", "maxLength": 5}}},
            "$.properties.s.maxLength",
            "maxLength is not supported",
        ),
        (
            {"type": "object", "properties": {"u": {"type": "string", "format": "uri"}}},
            "$.properties.u.format",
            "format 'uri' is not supported",
        ),
        (
            {"type": "object", "properties": {"a": {"allOf": [{"type": "string"}, {"type": "string"}]}}},
            "$.properties.a.allOf",
            "allOf",
        ),
        ({"type": "object", "properties": {"x": {}}}, "$.properties.x", "needs a type"),
        (
            {
                "type": "object",
                "properties": {"l": {"type": "array", "items": {"type": "object", "patternProperties": {}}}},
            },
            "$.properties.l.items.patternProperties",
            "patternProperties",
        ),
        (
            {"type": "object", "properties": {"r": {"$ref": "#/$defs/Missing"}}},
            "$.properties.r.$ref",
            "points at nothing",
        ),
        (
            {"type": "object", "$defs": {"D": {"type": "object", "properties": {"t": {"type": "array"}}}}},
            "$.$defs.D.properties.t",
            "needs an items schema",
        ),
        ({"type": "object", "required": ["nope"], "properties": {}}, "$.required", "not defined"),
    ],
)
def test_what_strict_mode_cannot_express_is_an_error_naming_the_path(
    schema: dict[str, Any], path: str, words: str
) -> None:
    with pytest.raises(ResponseSchemaError) as info:
        response_schema(schema)
    assert info.value.path == path
    assert words in info.value.reason
    # An input error like any other: raised before anything is uploaded, naming the field.
    assert isinstance(info.value, OpenAIBatchInputError)
    assert f"response_schema at {path}" in str(info.value)


def test_nesting_limit_and_bad_names() -> None:
    deep: dict[str, Any] = {"type": "object", "properties": {"v": {"type": "string"}}}
    for _ in range(11):
        deep = {"type": "object", "properties": {"n": deep}}
    with pytest.raises(ResponseSchemaError, match="nest more than 10"):
        response_schema(deep)
    with pytest.raises(ResponseSchemaError, match="1-64 letters"):
        response_schema({"name": "has space", "schema": {"type": "object"}})
    with pytest.raises(ResponseSchemaError, match="Pydantic model class or a JSON Schema dict"):
        response_schema("not a schema")
    with pytest.raises(ResponseSchemaError, match="strict: true"):
        response_schema({"name": "x", "strict": False, "schema": {"type": "object"}})


# -- injection ----------------------------------------------------------------------------------------------

SPEC = response_schema(Ticket)


def _line(endpoint: str, **body: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": "gpt-4o-mini"}
    base.update({"messages": [{"role": "user", "content": "hi"}]} if endpoint == CHAT else {"input": "hi"})
    base.update(body)
    return {"custom_id": "r1", "method": "POST", "url": endpoint, "body": base}


def schema_of_line(requests: RequestSchemas, raw: bytes) -> AnswerSchema | None:
    """What one request line asks its answer to be, read as collect reads a block of them."""
    [request] = requests.decode_lines(raw)
    return requests.of_asks(request.body)


def _format_of(endpoint: str, line: dict[str, Any]) -> Any:
    body = line["body"]
    return body.get("response_format") if endpoint == CHAT else body.get("text", {}).get("format")


@pytest.mark.parametrize("endpoint", [CHAT, RESPONSES])
@pytest.mark.parametrize("encode", ["orjson", "json-spaced", "body-first"])
def test_injected_line_carries_the_format(endpoint: str, encode: str) -> None:
    injector = SchemaInjector(SPEC, endpoint)
    line = _line(endpoint)
    if encode == "body-first":
        line = {"body": line["body"], **{k: v for k, v in line.items() if k != "body"}}
    raw = json.dumps(line).encode() if encode == "json-spaced" else orjson.dumps(line)
    out = injector.inject_line(raw, json.loads(raw))
    assert out is not None and b"\n" not in out
    injected = json.loads(out)
    expected = SPEC.chat_format() if endpoint == CHAT else SPEC.responses_format()
    assert _format_of(endpoint, injected) == expected
    assert expected["type"] == "json_schema" and (expected.get("json_schema") or expected)["strict"] is True
    # Nothing else changed.
    injected_body = dict(injected["body"])
    injected_body.pop("response_format" if endpoint == CHAT else "text")
    assert injected_body == line["body"] and injected["custom_id"] == "r1"


def test_responses_text_object_keeps_its_other_settings() -> None:
    injector = SchemaInjector(SPEC, RESPONSES)
    line = _line(RESPONSES, text={"verbosity": "low"})
    out = json.loads(injector.inject_line(orjson.dumps(line), json.loads(orjson.dumps(line))))
    assert out["body"]["text"] == {"verbosity": "low", "format": SPEC.responses_format()}


def test_responses_text_null_is_replaced_not_doubled() -> None:
    injector = SchemaInjector(SPEC, RESPONSES)
    raw = orjson.dumps(_line(RESPONSES, text=None))
    out = injector.inject_line(raw, json.loads(raw))
    assert out is not None and out.count(b'"text":') == 1
    assert json.loads(out)["body"]["text"] == {"format": SPEC.responses_format()}


@pytest.mark.parametrize(
    ("endpoint", "own"),
    [
        (CHAT, {"response_format": {"type": "json_object"}}),
        (CHAT, {"response_format": {"type": "text"}}),
        (RESPONSES, {"text": {"format": {"type": "text"}}}),
    ],
)
def test_a_line_with_its_own_format_keeps_it(endpoint: str, own: dict[str, Any]) -> None:
    injector = SchemaInjector(SPEC, endpoint)
    line = _line(endpoint, **own)
    assert injector.inject_line(orjson.dumps(line), line) is None
    assert injector.has_own_format(line["body"])
    body = dict(line["body"])
    assert injector.inject_body(body) is False and body == line["body"]


def test_inject_body_gives_a_fragment_orjson_writes_as_is() -> None:
    injector = SchemaInjector(SPEC, CHAT)
    body = _line(CHAT)["body"]
    assert injector.inject_body(body) is True
    assert json.loads(orjson.dumps(body))["response_format"] == SPEC.chat_format()


@pytest.mark.parametrize("endpoint", ["/v1/embeddings", "/v1/completions", "/v1/moderations"])
def test_other_endpoints_refuse_a_schema(endpoint: str) -> None:
    with pytest.raises(ResponseSchemaError, match="chat/completions and /v1/responses only"):
        SchemaInjector(SPEC, endpoint)
    # Azure's spelling of the two that take one works.
    assert SchemaInjector(SPEC, "/chat/completions").kind == "chat"


# -- round trip through the emulator ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[EmulatorServer]:
    with EmulatorServer(time_scale=0, seed=3) as srv:
        yield srv


@pytest.fixture
def emulator(server: EmulatorServer) -> Iterator[EmulatorServer]:
    server.reset(restore_config=True)
    yield server
    server.reset(restore_config=True)


@pytest.fixture
def client(emulator: EmulatorServer) -> Iterator[openai.OpenAI]:
    with emulator.client(max_retries=0) as sdk_client:
        yield sdk_client


def run_batch(
    client: openai.OpenAI, emulator: EmulatorServer, endpoint: str, lines: list[bytes]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Upload ``lines`` with the SDK, run the batch, return (output lines, error lines)."""
    data = b"".join(line + b"\n" for line in lines)
    file = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    emulator.advance(5)
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"

    def read(file_id: str | None) -> list[dict[str, Any]]:
        return (
            []
            if file_id is None
            else [json.loads(x) for x in client.files.content(file_id).text.splitlines()]
        )

    return read(batch.output_file_id), read(batch.error_file_id)


def injected_lines(endpoint: str, spec: ResponseSchema, count: int, **body: Any) -> list[bytes]:
    injector = SchemaInjector(spec, endpoint)
    out = []
    for i in range(count):
        line = _line(endpoint, **body)
        line["custom_id"] = f"r{i}"
        raw = orjson.dumps(line)
        injected = injector.inject_line(raw, line)
        out.append(raw if injected is None else injected)
    return out


@pytest.mark.parametrize("endpoint", [CHAT, RESPONSES])
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_strict_schemas_round_trip_through_the_emulator(
    client: openai.OpenAI, emulator: EmulatorServer, endpoint: str, model: type[BaseModel]
) -> None:
    spec = response_schema(model)
    lines = injected_lines(endpoint, spec, 12)
    outputs, errors = run_batch(client, emulator, endpoint, lines)
    assert not errors and len(outputs) == 12
    requests = RequestSchemas(KIND[endpoint])
    for raw in lines:
        learned = schema_of_line(requests, raw)
        assert learned is not None and learned.name == model.__name__
    for output in outputs:
        answer = read_answer(KIND[endpoint], output["response"]["body"], learned)
        assert answer.error_code is None and answer.valid, answer.error_message
        assert answer.finish_reason == "stop"
        # The model class itself accepts what the validator let through.
        assert isinstance(model.model_validate_json(answer.text), model)
        assert answer.parsed == json.loads(answer.text)


# knob -> (error code on chat, finish reason)
FAULTS = {
    "answer_invalid_json_rate": ("invalid_output", "stop"),
    "answer_schema_miss_rate": ("invalid_output", "stop"),
    "answer_refusal_rate": ("refusal", "stop"),
    "answer_truncated_rate": ("truncated", "length"),
    "answer_content_filter_rate": ("content_filter", "content_filter"),
}
TOOL = {
    "name": "classify_intent",
    "description": "Classify customer query intent",
    "parameters": {
        "type": "object",
        "properties": {
            "intent": {"type": "string", "enum": ["billing", "technical", "general"]},
            "urgency": {"type": "string", "enum": ["low", "medium", "high"]},
        },
        "required": ["intent", "urgency"],
    },
}


def tool_lines(endpoint: str, count: int) -> list[bytes]:
    """The OpenAI Batch guide's function-calling request (a tool the model must call)."""
    if endpoint == CHAT:
        body = {"tools": [{"type": "function", "function": TOOL}], "tool_choice": "required"}
    else:
        body = {"tools": [{"type": "function", **TOOL}], "tool_choice": "required"}
    lines = []
    for i in range(count):
        line = _line(endpoint, **body)
        line["custom_id"] = f"t{i}"
        lines.append(orjson.dumps(line))
    return lines


@pytest.mark.parametrize("endpoint", [CHAT, RESPONSES])
@pytest.mark.parametrize("kind", ["schema", "tool"])
@pytest.mark.parametrize("knob", [None, *FAULTS])
def test_answers_are_classified_on_both_endpoints(
    client: openai.OpenAI, emulator: EmulatorServer, endpoint: str, kind: str, knob: str | None
) -> None:
    if knob is not None:
        emulator.configure(**{knob: 1.0})
    lines = injected_lines(endpoint, SPEC, 4) if kind == "schema" else tool_lines(endpoint, 4)
    outputs, _ = run_batch(client, emulator, endpoint, lines)
    requests = RequestSchemas(KIND[endpoint])
    expected_code, expected_finish = (
        (None, "tool_calls" if kind == "tool" else "stop") if knob is None else FAULTS[knob]
    )
    if kind == "tool" and knob in ("answer_invalid_json_rate", "answer_schema_miss_rate"):
        expected_finish = "tool_calls"
    for output, raw in zip(sorted(outputs, key=lambda o: o["custom_id"]), sorted(lines), strict=True):
        schema = schema_of_line(requests, raw)
        assert schema is not None and schema.structured
        answer = read_answer(KIND[endpoint], output["response"]["body"], schema)
        assert answer.error_code == expected_code, answer
        assert answer.finish_reason == expected_finish
        assert answer.valid is (knob is None)
        if kind == "tool" and knob not in ("answer_refusal_rate", "answer_content_filter_rate"):
            [call] = answer.tool_calls
            assert call["name"] == "classify_intent"
            if knob is None:
                assert call["arguments"]["intent"] in ("billing", "technical", "general")
                assert answer.parsed == call["arguments"]
        if expected_code in ("invalid_output", "truncated"):
            assert answer.text  # the raw text is kept for the failure record
        if expected_code == "refusal":
            assert "can't help" in answer.text


def test_plain_answers_are_never_failures(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    emulator.configure(answer_refusal_rate=1.0)
    for endpoint in (CHAT, RESPONSES):
        line = _line(endpoint, max_tokens=2) if endpoint == CHAT else _line(endpoint, max_output_tokens=2)
        outputs, _ = run_batch(client, emulator, endpoint, [orjson.dumps(line)])
        schema = schema_of_line(RequestSchemas(KIND[endpoint]), orjson.dumps(line))
        assert schema is None
        answer = read_answer(KIND[endpoint], outputs[0]["response"]["body"], schema)
        assert answer.error_code is None and answer.finish_reason == "length"
        assert answer.text.startswith("Emulated reply") and answer.parsed is None


def test_collect_override_holds_answers_to_another_schema(
    client: openai.OpenAI, emulator: EmulatorServer
) -> None:
    outputs, _ = run_batch(client, emulator, CHAT, injected_lines(CHAT, SPEC, 2))
    override = AnswerSchema.of(response_schema(Person))
    answer = read_answer("chat", outputs[0]["response"]["body"], override)
    assert answer.error_code == "invalid_output" and "does not match the schema" in answer.error_message


# -- hand-made bodies: the shapes the emulator does not make -----------------------------------------------


def test_chat_shapes() -> None:
    schema = AnswerSchema.of(SPEC)
    parts = {"choices": [{"finish_reason": "stop", "message": {"content": [{"type": "text", "text": "{"}]}}]}
    assert read_answer("chat", parts, schema).error_code == "invalid_output"
    assert read_answer("chat", {"choices": []}, schema).error_code == "invalid_output"
    assert read_answer("chat", "not a body", None).text is None
    json_mode = answer_schema_of_request("chat", {"response_format": {"type": "json_object"}})
    assert json_mode is not None and json_mode.json_mode
    ok = {"choices": [{"finish_reason": "stop", "message": {"content": '{"a": 1}'}}]}
    assert read_answer("chat", ok, json_mode).valid
    array = {"choices": [{"finish_reason": "stop", "message": {"content": "[1]"}}]}
    assert read_answer("chat", array, json_mode).error_message == "the answer is not a JSON object"
    assert read_answer("completions", ok, json_mode).text is None


def test_responses_shapes() -> None:
    schema = AnswerSchema.of(response_schema({"type": "object", "properties": {"a": {"type": "integer"}}}))
    body = {
        "status": "completed",
        "output": [
            {"type": "reasoning", "summary": []},
            {
                "type": "message",
                "content": [{"type": "output_text", "text": '{"a":'}, {"type": "output_text", "text": " 1}"}],
            },
        ],
    }
    answer = read_answer("responses", body, schema)
    assert answer.valid and answer.parsed == {"a": 1} and answer.finish_reason == "stop"
    failed = {"status": "failed", "output": []}
    assert read_answer("responses", failed, schema).finish_reason == "failed"


# -- validation ---------------------------------------------------------------------------------------------


def test_typed_decode_covers_strict_schemas_without_the_exact_validator() -> None:
    for model in MODELS:
        assert compile_schema(response_schema(model).schema).exact is False, model


@pytest.mark.parametrize(
    ("schema", "good", "bad", "why"),
    [
        (
            {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
            "[1, 2]",
            "[1, 1]",
            "non-unique",
        ),
        ({"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 0}]}, "-1", "2", "valid under each"),
        ({"type": "string", "format": "ipv4"}, '"192.0.2.1"', '"999.1.1.1"', "is not a 'ipv4'"),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "object", "additionalProperties": {"type": "integer"}}},
            },
            '{"a": {"x": 1}}',
            '{"a": {"x": "y"}}',
            "Expected `int`, got `str` - at `$.a[...]`",
        ),
        (
            {
                "$defs": {
                    "N": {
                        "type": "object",
                        "properties": {"c": {"type": "array", "items": {"$ref": "#/$defs/N"}}},
                    }
                },
                "$ref": "#/$defs/N",
            },
            '{"c": [{"c": []}]}',
            '{"c": [{"c": [1]}]}',
            "is not of type 'object'",
        ),
    ],
)
def test_schemas_beyond_strict_mode_are_validated(
    schema: dict[str, Any], good: str, bad: str, why: str
) -> None:
    compiled = CompiledSchema(schema)
    # A map of typed values is a typed decode too (dict[str, int]); the others need the exact validator.
    assert compiled.exact is ("additionalProperties" not in json.dumps(schema))
    assert compiled.check(good) is None
    problem = compiled.check(bad)
    assert problem is not None and why in problem


def test_typed_decode_errors_name_the_path() -> None:
    compiled = compile_schema(SPEC.schema)
    good = {
        "category": "billing",
        "urgency": "low",
        "summary": "s",
        "confidence": 0.5,
        "tags": [],
        "assignee": None,
        "priority": 1,
    }
    assert compiled.check(json.dumps(good)) is None
    assert "at `$.confidence`" in compiled.check(json.dumps({**good, "confidence": 2}))
    assert "Invalid enum value 'x' - at `$.category`" in compiled.check(json.dumps({**good, "category": "x"}))
    assert "unknown field `extra`" in compiled.check(json.dumps({**good, "extra": 1}))
    assert "missing required field `tags`" in compiled.check(
        json.dumps({k: v for k, v in good.items() if k != "tags"})
    )
    assert compiled.check("{").startswith("the answer is not valid JSON")
    # Deliberate: an integer is written as one.
    assert compiled.check(json.dumps({**good, "priority": 1.0})) is not None


def test_request_schemas_remember_each_distinct_request() -> None:
    requests = RequestSchemas("chat")
    lines = injected_lines(CHAT, SPEC, 3)
    first = schema_of_line(requests, lines[0])
    assert first is not None and first.output is not None
    assert schema_of_line(requests, lines[1]) is first
    spaced = json.dumps(json.loads(lines[2])).encode()
    assert schema_of_line(requests, spaced) is first  # other bytes, the same format: the same schema
    assert schema_of_line(requests, orjson.dumps(_line(CHAT))) is None
    text_only = {**_line(CHAT), "body": {**_line(CHAT)["body"], "response_format": {"type": "text"}}}
    assert schema_of_line(requests, orjson.dumps(text_only)) is None
    other = injected_lines(CHAT, response_schema(Person), 1)[0]
    assert schema_of_line(requests, other).name == "Person"
    tools = schema_of_line(RequestSchemas("responses"), tool_lines(RESPONSES, 1)[0])
    assert tools is not None and set(tools.tools) == {"classify_intent"} and tools.output is None
    # Lines that do not fit the view are for the caller's careful path (see core/reconcile.py).
    for odd in (b"{broken", b'{"custom_id": "x", "body": "not an object"}', b'{"body": {}}'):
        with pytest.raises(msgspec.DecodeError):
            requests.decode_lines(odd)


@pytest.mark.parametrize("endpoint", [CHAT, RESPONSES])
def test_request_schemas_of_a_whole_block(endpoint: str) -> None:
    requests = RequestSchemas(KIND[endpoint])

    def asks(lines: list[bytes]) -> list[Any]:
        bodies = [orjson.loads(line)["body"] for line in lines]
        return msgspec.json.Decoder(list[requests.asks_type]).decode(orjson.dumps(bodies))

    plain = [orjson.dumps(_line(endpoint)) for _ in range(3)]
    assert requests.of_block(asks(plain)) == (True, None)
    lines = injected_lines(endpoint, SPEC, 4)
    same, schema = requests.of_block(asks(lines))
    assert same and schema is schema_of_line(requests, lines[0]) and schema.output is not None
    mixed = asks([*lines[:2], plain[0]])
    assert requests.of_block(mixed) == (False, None)
    assert [requests.of_asks(one) for one in mixed] == [schema, schema, None]
    with_tools = asks([*tool_lines(endpoint, 1), *lines[:1]])
    assert requests.of_block(with_tools) == (False, None)
    assert requests.of_asks(with_tools[0]).tools and requests.of_asks(with_tools[1]) is schema
    assert requests.of_block(asks(tool_lines(endpoint, 2)))[0]  # the same tools, twice


def test_parsed_json_is_written_into_a_record_as_it_is() -> None:
    compact = (
        '{"category":"general","urgency":"low","summary":"s","confidence":1,"tags":[],"assignee":null,'
        '"priority":2}'
    )
    schema = AnswerSchema.of(SPEC)
    for text in (compact, json.dumps(json.loads(compact), indent=2)):
        body = {"choices": [{"finish_reason": "stop", "message": {"content": text}}]}
        answer = read_answer("chat", body, schema)
        line = orjson.dumps({"custom_id": "a", "parsed": answer.parsed_json()})
        assert b"\n" not in line and json.loads(line)["parsed"] == json.loads(compact)
    failed = read_answer(
        "chat", {"choices": [{"finish_reason": "length", "message": {"content": "{"}}]}, schema
    )
    assert failed.parsed_json() is None and failed.parsed is None


def test_tool_calls_column() -> None:
    rows = [[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": "not json"}], None]
    array = tool_calls_array(rows)
    assert array.type == tool_calls_arrow_type()
    assert array.to_pylist() == [
        [{"name": "f", "arguments": '{"a":1}'}, {"name": "g", "arguments": '"not json"'}],
        None,
    ]


# -- Arrow --------------------------------------------------------------------------------------------------


def test_arrow_types_of_the_models() -> None:
    assert arrow_type(response_schema(Ticket).schema) == pa.struct(
        [
            ("category", pa.string()),
            ("urgency", pa.string()),
            ("summary", pa.string()),
            ("confidence", pa.float64()),
            ("tags", pa.list_(pa.string())),
            ("assignee", pa.string()),
            ("priority", pa.int64()),
        ]
    )
    address = pa.struct([("city", pa.string()), ("postcode", pa.string())])
    assert arrow_type(response_schema(Person).schema) == pa.struct(
        [
            ("name", pa.string()),
            ("home", address),
            ("previous", pa.list_(address)),
            ("work", address),
            ("born", pa.string()),
            ("seen", pa.string()),
        ]
    )
    pet = pa.struct([("kind", pa.string()), ("lives", pa.int64()), ("good", pa.bool_())])
    assert arrow_type(response_schema(Pets).schema) == pa.struct(
        [("pet", pet), ("other", pet), ("label", pa.string()), ("scores", pa.list_(pa.float64()))]
    )
    dictionary = arrow_type(response_schema(Ticket).schema, enums="dictionary")
    assert dictionary.field("category").type == pa.dictionary(pa.int32(), pa.string())
    assert dictionary.field("summary").type == pa.string()


def test_json_text_where_no_single_type_fits() -> None:
    schema = {
        "type": "object",
        "properties": {
            "free": {"type": "object"},
            "mixed": {
                "anyOf": [{"type": "string"}, {"type": "object", "properties": {"a": {"type": "integer"}}}]
            },
            "nums": {"type": ["integer", "number"]},
        },
    }
    assert arrow_type(schema) == pa.struct(
        [("free", pa.string()), ("mixed", pa.string()), ("nums", pa.float64())]
    )
    values = [
        {"free": {"k": [1]}, "mixed": {"a": 1}, "nums": 2},
        {"free": None, "mixed": "s", "nums": 1.5},
        None,
    ]
    array = struct_array(values, schema)
    assert array.to_pylist() == [
        {"free": '{"k":[1]}', "mixed": '{"a":1}', "nums": 2.0},
        {"free": None, "mixed": '"s"', "nums": 1.5},
        None,
    ]
    # With no single schema, the whole value is JSON text.
    assert struct_array([{"a": 1}, None], None).to_pylist() == ['{"a":1}', None]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_parsed_column_equals_the_python_way(
    client: openai.OpenAI, emulator: EmulatorServer, model: type[BaseModel]
) -> None:
    spec = response_schema(model)
    emulator.configure(answer_schema_miss_rate=0.3)
    outputs, _ = run_batch(client, emulator, CHAT, injected_lines(CHAT, spec, 20))
    schema = AnswerSchema.of(spec)
    answers = [read_answer("chat", o["response"]["body"], schema) for o in outputs]
    assert any(not a.valid for a in answers) and any(a.valid for a in answers)
    column = ParsedColumn(spec.schema)
    for answer in answers:
        column.add(answer)
    assert len(column) == 20
    built = column.finish()
    assert len(column) == 0
    expected = struct_array([a.parsed for a in answers], spec.schema)
    assert built.type == expected.type == arrow_type(spec.schema)
    assert built.to_pylist() == expected.to_pylist()
    assert built.null_count == sum(not a.valid for a in answers)


def test_parsed_column_slow_ways() -> None:
    schema = response_schema(Ticket).schema
    text = json.dumps(
        {
            "category": "general",
            "urgency": "high",
            "summary": "s",
            "confidence": 1,
            "tags": ["a"],
            "assignee": None,
            "priority": 2,
        }
    )
    for column in (ParsedColumn(schema, enums="dictionary"), ParsedColumn(None)):
        column.add_text(text)
        column.add_null()
        built = column.finish()
        assert built[1].as_py() is None
        first = built[0].as_py()
        assert (json.loads(first) if column.schema is None else first)["category"] == "general"
    empty = ParsedColumn(schema)
    empty.add_null()
    assert empty.finish().to_pylist() == [None]
    multiline = ParsedColumn(schema)
    multiline.add_text(json.dumps(json.loads(text), indent=2))
    assert multiline.finish()[0].as_py()["summary"] == "s"
    # An answer longer than the reader's usual block still fits in one.
    long = ParsedColumn(schema)
    for size in (10, 3_000_000, 10):
        long.add_text(json.dumps({**json.loads(text), "summary": "x" * size}))
    assert [len(row["summary"]) for row in long.finish().to_pylist()] == [10, 3_000_000, 10]


def test_parquet_parsed_column_queried_with_duckdb(
    client: openai.OpenAI, emulator: EmulatorServer, tmp_path: Path
) -> None:
    spec = response_schema(Ticket)
    emulator.configure(answer_refusal_rate=0.25)
    outputs, _ = run_batch(client, emulator, CHAT, injected_lines(CHAT, spec, 24))
    schema = AnswerSchema.of(spec)
    answers = {o["custom_id"]: read_answer("chat", o["response"]["body"], schema) for o in outputs}
    column = ParsedColumn(spec.schema)
    ids = sorted(answers)
    for cid in ids:
        column.add(answers[cid])
    table = pa.table({"custom_id": ids, "parsed": column.finish()})
    path = tmp_path / "successes.parquet"
    pq.write_table(table, path)

    read_back = pq.read_table(path)
    assert read_back.schema.field("parsed").type == arrow_type(spec.schema)
    rows = duckdb.sql(
        f"SELECT custom_id, parsed.category, parsed.confidence, parsed.tags, parsed.assignee FROM '{path}' "
        "WHERE parsed IS NOT NULL ORDER BY custom_id"
    ).fetchall()
    valid = [cid for cid in ids if answers[cid].valid]
    assert 0 < len(valid) < len(ids)  # some were refused
    assert [row[0] for row in rows] == valid
    for cid, category, confidence, tags, assignee in rows:
        parsed = answers[cid].parsed
        assert (category, confidence, tags, assignee) == (
            parsed["category"],
            parsed["confidence"],
            parsed["tags"],
            parsed["assignee"],
        )
    counts = duckdb.sql(
        f"SELECT parsed.urgency AS u, count(*) FROM '{path}' WHERE parsed IS NOT NULL GROUP BY u"
    ).fetchall()
    assert sum(n for _, n in counts) == len(valid) and {u for u, _ in counts} <= {"low", "medium", "high"}
