"""Structured answers from the emulator: valid against the request's schema by default, and spoiled
(invalid JSON, schema miss, refusal, truncated, content filter) in the shares its knobs set."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from airflow_openai_batch.emulator import EmulatorConfig, EmulatorServer
from airflow_openai_batch.emulator.__main__ import build_parser
from airflow_openai_batch.emulator.answers import REFUSAL_TEXT, AnswerFaults
from airflow_openai_batch.emulator.patterns import sample_pattern

from .helpers import assert_schema, read_lines, upload

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["pos", "neg"]},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "when": {"type": "string", "format": "date-time"},
        "id": {"type": "string", "format": "uuid"},
        "score": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        "count": {"type": "integer", "minimum": 3, "maximum": 30, "multipleOf": 3},
        "note": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
    },
    "required": ["label", "code", "when", "id", "score", "count", "note", "tags"],
    "additionalProperties": False,
}
FUNCTION = {"name": "classify", "parameters": SCHEMA}
N = 40


def chat_body(kind: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "rate it"}]}
    if kind == "schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "rating", "strict": True, "schema": SCHEMA},
        }
    elif kind == "tool":
        body["tools"] = [{"type": "function", "function": FUNCTION}]
        body["tool_choice"] = "required"
    return body


def responses_body(kind: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "input": "rate it"}
    if kind == "schema":
        body["text"] = {"format": {"type": "json_schema", "name": "rating", "strict": True, "schema": SCHEMA}}
    elif kind == "tool":
        body["tools"] = [{"type": "function", **FUNCTION}]
        body["tool_choice"] = {"type": "function", "name": "classify"}
    return body


ENDPOINTS = {
    "/v1/chat/completions": (chat_body, ChatCompletion),
    "/v1/responses": (responses_body, Response),
}


def run_batch(
    client: openai.OpenAI, emulator: EmulatorServer, endpoint: str, kind: str, count: int = N
) -> dict[str, dict[str, Any]]:
    """Submit ``count`` lines of one kind (schema / tool / plain); the parsed bodies by custom_id."""
    make, model = ENDPOINTS[endpoint]
    records = [
        {"custom_id": f"{kind}-{i}", "method": "POST", "url": endpoint, "body": make(kind)}
        for i in range(count)
    ]
    batch = client.batches.create(
        input_file_id=upload(client, records),
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
    )
    emulator.advance(5)
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    bodies = {}
    for line in read_lines(client, batch.output_file_id):
        assert_schema("BatchRequestOutput", line)
        body = line["response"]["body"]
        model.model_validate(body)  # still a body the SDK reads
        bodies[line["custom_id"]] = body
    assert len(bodies) == count
    return bodies


def answer_of(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """The parts of an answer the knobs change, read straight from the body."""
    if endpoint == "/v1/chat/completions":
        choice = body["choices"][0]
        message = choice["message"]
        calls = message.get("tool_calls") or []
        return {
            "text": calls[0]["function"]["arguments"] if calls else message["content"],
            "refusal": message["refusal"],
            "finish": choice["finish_reason"],
        }
    text, refusal, calls = None, None, []
    for item in body["output"]:
        if item["type"] == "function_call":
            calls.append(item["arguments"])
        elif item["type"] == "message":
            for part in item["content"]:
                if part["type"] == "refusal":
                    refusal = part["refusal"]
                else:
                    text = part["text"]
    finish = body["status"]
    if body["status"] == "incomplete":
        finish = body["incomplete_details"]["reason"]
    return {"text": calls[0] if calls else text, "refusal": refusal, "finish": finish}


def is_valid(text: str | None) -> bool:
    try:
        jsonschema.validate(json.loads(text or ""), SCHEMA, format_checker=jsonschema.FormatChecker())
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@pytest.mark.parametrize("kind", ["schema", "tool"])
def test_structured_answers_are_valid_by_default(
    client: openai.OpenAI, emulator: EmulatorServer, endpoint: str, kind: str
) -> None:
    bodies = run_batch(client, emulator, endpoint, kind)
    answers = [answer_of(endpoint, body) for body in bodies.values()]
    assert all(is_valid(a["text"]) and a["refusal"] is None for a in answers)
    # Deterministic per custom_id, and not one answer for all.
    assert len({a["text"] for a in answers}) > 1
    again = run_batch(client, emulator, endpoint, kind)
    assert [answer_of(endpoint, again[cid])["text"] for cid in bodies] == [a["text"] for a in answers]


# knob -> what every spoiled answer looks like: (text valid?, text is JSON?, refusal?, finish)
SPOILED = {
    "answer_invalid_json_rate": (False, False, False, {"stop", "tool_calls", "completed"}),
    "answer_schema_miss_rate": (False, True, False, {"stop", "tool_calls", "completed"}),
    "answer_refusal_rate": (None, None, True, {"stop", "completed"}),
    "answer_truncated_rate": (False, False, False, {"length", "max_output_tokens"}),
    "answer_content_filter_rate": (None, None, False, {"content_filter"}),
}


def _is_json(text: str | None) -> bool:
    try:
        json.loads(text or "")
    except json.JSONDecodeError:
        return False
    return True


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@pytest.mark.parametrize("kind", ["schema", "tool"])
@pytest.mark.parametrize("knob", sorted(SPOILED))
def test_each_knob_spoils_structured_answers_as_its_kind(
    client: openai.OpenAI, emulator: EmulatorServer, endpoint: str, kind: str, knob: str
) -> None:
    emulator.configure(**{knob: 1.0})
    valid, json_text, refused, finishes = SPOILED[knob]
    for body in run_batch(client, emulator, endpoint, kind, count=6).values():
        answer = answer_of(endpoint, body)
        assert answer["finish"] in finishes, answer
        assert (answer["refusal"] == REFUSAL_TEXT) is refused
        if valid is None:  # refused / filtered: no answer text
            assert answer["text"] is None
        else:
            assert is_valid(answer["text"]) is valid
            assert _is_json(answer["text"]) is json_text


def test_plain_answers_ignore_the_knobs(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    emulator.configure(answer_refusal_rate=0.5, answer_truncated_rate=0.5)
    for endpoint in ENDPOINTS:
        for body in run_batch(client, emulator, endpoint, "plain", count=8).values():
            answer = answer_of(endpoint, body)
            assert answer["refusal"] is None and answer["finish"] in ("stop", "completed")
            assert answer["text"].startswith("Emulated reply")


def test_shares_split_one_seeded_draw(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    emulator.configure(
        answer_invalid_json_rate=0.25, answer_refusal_rate=0.25, answer_content_filter_rate=0.25
    )
    answers = [
        answer_of("/v1/chat/completions", b)
        for b in run_batch(client, emulator, "/v1/chat/completions", "schema", 200).values()
    ]
    kinds = {
        "valid": sum(is_valid(a["text"]) for a in answers),
        "invalid": sum(a["text"] is not None and not _is_json(a["text"]) for a in answers),
        "refused": sum(a["refusal"] is not None for a in answers),
        "filtered": sum(a["finish"] == "content_filter" for a in answers),
    }
    assert sum(kinds.values()) == 200
    # Each kind is drawn (a quarter each on average, from one seeded draw per custom_id).
    assert all(20 <= count <= 80 for count in kinds.values()), kinds
    # The draw is the same as the pure function's.
    faults = AnswerFaults(invalid_json=0.25, refusal=0.25, content_filter=0.25)
    assert kinds["refused"] == sum(
        faults.pick(emulator.state.config.seed, f"schema-{i}") == "refusal" for i in range(200)
    )


def test_knobs_are_validated_and_read_from_env_and_flags() -> None:
    with pytest.raises(ValueError, match="answer_refusal_rate must be within"):
        EmulatorConfig(answer_refusal_rate=1.5)
    with pytest.raises(ValueError, match="add up to more than 1"):
        EmulatorConfig(answer_truncated_rate=0.6, answer_schema_miss_rate=0.6)
    config = EmulatorConfig.from_env(
        {
            "OPENAI_BATCH_EMULATOR_ANSWER_INVALID_JSON_RATE": "0.2",
            "OPENAI_BATCH_EMULATOR_ANSWER_REFUSAL_RATE": "0.1",
        }
    )
    assert (config.answer_invalid_json_rate, config.answer_refusal_rate) == (0.2, 0.1)
    assert AnswerFaults.from_config(config) == AnswerFaults(invalid_json=0.2, refusal=0.1)
    args = build_parser().parse_args(
        ["--answer-content-filter-rate", "0.3", "--answer-schema-miss-rate", "0.05"]
    )
    assert (args.answer_content_filter_rate, args.answer_schema_miss_rate) == ("0.3", "0.05")


@pytest.mark.parametrize(
    "pattern",
    [r"^[A-Z]{3}-\d{4}$", r"^(foo|bar)+baz$", r"[^abc]x", r"^(a)\1$", r"^.{2,5}$", r"^\S+\s\D$"],
)
def test_pattern_samples_match(pattern: str) -> None:
    picks = iter(range(1000))
    sample = sample_pattern(pattern, lambda n: next(picks) % n)
    assert sample is not None
    assert re.search(pattern, sample)


def test_pattern_that_cannot_be_sampled_says_so() -> None:
    assert sample_pattern(r"(?=x)y", lambda n: 0) is None
    assert sample_pattern(r"(unclosed", lambda n: 0) is None
