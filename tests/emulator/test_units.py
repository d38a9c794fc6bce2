"""Unit tests of the emulator's building blocks (no server)."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest

from airflow_openai_batch.emulator import EmulatorConfig, EmulatorServer
from airflow_openai_batch.emulator.responses import (
    estimate_prompt_tokens,
    instance_for_schema,
    line_outcome,
    line_usage,
)
from airflow_openai_batch.emulator.state import VirtualClock


class FakeMonotonic:
    def __init__(self) -> None:
        self.value = 100.0

    def __call__(self) -> float:
        return self.value


def test_virtual_clock_scales_advances_and_never_jumps() -> None:
    real = FakeMonotonic()
    clock = VirtualClock(time_scale=2.0, monotonic=real)
    start = clock.now()
    real.value += 1.5
    assert clock.now() - start == pytest.approx(3.0)
    clock.advance(10)
    assert clock.now() - start == pytest.approx(13.0)
    before = clock.now()
    clock.set_scale(0.0)  # freezing does not move the clock...
    assert clock.now() == pytest.approx(before)
    real.value += 50
    assert clock.now() == pytest.approx(before)  # ...and it stays frozen
    assert clock.unix(before) == clock.epoch + math.floor(before)
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_config_rejects_bad_knobs() -> None:
    for bad in (
        {"failure_rate": 1.5},
        {"fault_rate": -0.1},
        {"fault_kinds": ("404",)},
        {"fault_routes": ("files.upload",)},
        {"token_limit_mode": "maybe"},
        {"expire_after": 0},
        {"rate": -1},
    ):
        with pytest.raises(ValueError):
            EmulatorConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        EmulatorConfig().replace(nope=1)
    assert EmulatorConfig(fault_kinds=["429"]).fault_kinds == ("429",)  # type: ignore[arg-type]


def test_prompt_token_estimate_per_endpoint() -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "abc"},
            {"role": "user", "content": [{"type": "text", "text": "defgh"}]},
        ]
    }
    # ceil(text / 4) + 3 per message + 3 to prime the reply.
    assert estimate_prompt_tokens("/v1/chat/completions", chat) == math.ceil(8 / 4) + 2 * 3 + 3
    responses = {"instructions": "12345", "input": [{"role": "user", "content": "6789"}]}
    assert estimate_prompt_tokens("/v1/responses", responses) == math.ceil(9 / 4)
    assert estimate_prompt_tokens("/v1/embeddings", {"input": ["aaaa", "bbbbb"]}) == math.ceil(9 / 4)
    assert estimate_prompt_tokens("/v1/embeddings", {"input": [1, 2, 3]}) == 3  # token ids
    assert estimate_prompt_tokens("/v1/completions", {"prompt": "x" * 13}) == 4
    assert estimate_prompt_tokens("/chat/completions", chat) == 11  # Azure's endpoint spelling


def test_usage_is_deterministic_and_capped() -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    first = line_usage("/v1/chat/completions", body, "id-1", seed=0)
    assert first == line_usage("/v1/chat/completions", body, "id-1", seed=0)
    assert 8 <= first.output_tokens < 40 and first.reasoning_tokens == 0
    capped = line_usage("/v1/chat/completions", {**body, "max_completion_tokens": 2}, "id-1", seed=0)
    assert capped.output_tokens == 2 and capped.truncated
    reasoning = line_usage("/v1/chat/completions", {**body, "model": "o3-mini"}, "id-1", seed=0)
    assert reasoning.reasoning_tokens > 0 and reasoning.output_tokens > reasoning.reasoning_tokens


def test_cached_prompt_tokens_follow_openais_cache_rules() -> None:
    long = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 6000}]}
    short = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 4000}]}
    usages = [
        line_usage("/v1/chat/completions", long, f"id-{i}", 0, cached_prompt_rate=0.5) for i in range(400)
    ]
    cached = [u for u in usages if u.cached_tokens]
    assert 150 < len(cached) < 250  # about half
    # the prompt (1,500 + 6 framing tokens) up to its last whole 128-token step
    assert {u.cached_tokens for u in cached} == {1408} and usages[0].input_tokens == 1506
    # under 1,024 tokens nothing is cached; the knob off, nothing either
    assert line_usage("/v1/chat/completions", short, "id-1", 0, cached_prompt_rate=1.0).cached_tokens == 0
    assert all(line_usage("/v1/chat/completions", long, f"id-{i}", 0).cached_tokens == 0 for i in range(50))


def test_line_outcomes_follow_the_failure_rate() -> None:
    outcomes = [line_outcome(0, f"id-{i}", 0.2) for i in range(5000)]
    failed = sum(1 for o in outcomes if o)
    assert 850 < failed < 1150
    assert {o for o in outcomes if o} == {1, 2, 3}  # 400, 500 and non-HTTP failures
    assert all(line_outcome(0, f"id-{i}", 0.0) == 0 for i in range(100))


def test_schema_instances_fit_their_schema() -> None:
    schema = {
        "$defs": {
            "Item": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 5}}}
        },
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 2},
            "kind": {"anyOf": [{"type": "null"}, {"type": "string", "enum": ["a", "b"]}]},
            "name": {"type": ["string", "null"], "minLength": 20, "maxLength": 25},
            "flag": {"type": "boolean"},
            "when": {"type": "string", "format": "date-time"},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["items", "kind", "name", "flag", "when", "ratio"],
        "additionalProperties": False,
    }
    value = instance_for_schema(schema, "salt")
    jsonschema.validate(value, schema)
    assert len(value["items"]) == 2 and value["kind"] in ("a", "b")
    assert value == instance_for_schema(schema, "salt")
    json.dumps(value)


def test_runtime_knob_changes_apply_from_now() -> None:
    with EmulatorServer(time_scale=0, rate=1, validation_seconds=100) as server:
        client = server.client(max_retries=0)
        line = {
            "custom_id": "",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "m", "input": "x"},
        }
        data = "".join(json.dumps({**line, "custom_id": f"r{i}"}) + "\n" for i in range(10)).encode()
        file = client.files.create(file=("in.jsonl", data), purpose="batch")
        batch = client.batches.create(
            input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h"
        )
        server.advance(10)
        server.configure(validation_seconds=0)  # validation ends now, not 10 s in the past
        running = client.batches.retrieve(batch.id)
        assert running.status == "in_progress" and running.in_progress_at == batch.created_at + 10
        server.advance(4)
        assert running.request_counts is not None
        assert client.batches.retrieve(batch.id).request_counts.completed == 4  # type: ignore[union-attr]
        server.configure(rate=100)  # the remaining 6 lines now take 0.06 s
        assert client.batches.retrieve(batch.id).request_counts.completed == 4  # type: ignore[union-attr]
        server.advance(0.06)
        done = client.batches.retrieve(batch.id)
        assert done.status == "completed" and done.completed_at == batch.created_at + 14
        assert server.stats()["batches"] == 1
        client.close()
