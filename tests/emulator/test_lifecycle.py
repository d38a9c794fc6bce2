"""The batch lifecycle through the real SDK over loopback: progress, results, validation failures,
expiry, cancellation, paging. The clock is frozen (time_scale=0): time moves only via advance()."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import httpx2
import openai
import orjson
import pytest

from airflow_openai_batch.emulator import EmulatorServer

from .helpers import assert_schema, chat_line, jsonl, read_lines, upload


def _line(endpoint: str, custom_id: str, i: int) -> dict[str, Any]:
    text = f"request number {i} " + "x" * (i % 7)
    bodies: dict[str, dict[str, Any]] = {
        "/v1/chat/completions": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]},
        "/v1/responses": {"model": "gpt-4o-mini", "input": text},
        "/v1/completions": {"model": "gpt-3.5-turbo-instruct", "prompt": text},
        "/v1/embeddings": {"model": "text-embedding-3-small", "input": [text, text + "!"], "dimensions": 4},
        "/v1/moderations": {"model": "omni-moderation-latest", "input": text},
    }
    return {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": bodies[endpoint]}


def _body_usage(endpoint: str, body: dict[str, Any]) -> tuple[int, int]:
    usage = body.get("usage") or {}
    if endpoint == "/v1/responses":
        return usage["input_tokens"], usage["output_tokens"]
    if endpoint == "/v1/moderations":
        return 0, 0
    return usage["prompt_tokens"], usage.get("completion_tokens", 0)


@pytest.mark.parametrize(
    "endpoint",
    ["/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/embeddings", "/v1/moderations"],
)
def test_end_to_end_every_custom_id_exactly_once(
    client: openai.OpenAI, emulator: EmulatorServer, endpoint: str
) -> None:
    emulator.configure(rate=10, failure_rate=0.3, seed=7)
    ids = [f"{endpoint.rsplit('/', 1)[-1]}-{i}" for i in range(40)]
    file_id = upload(client, [_line(endpoint, cid, i) for i, cid in enumerate(ids)])
    batch = client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    assert batch.status == "validating"

    # Progress moves with the virtual clock: 10 lines per second.
    emulator.advance(1)
    partial = client.batches.retrieve(batch.id)
    assert partial.status == "in_progress"
    assert partial.request_counts is not None
    assert partial.request_counts.total == 40
    assert partial.request_counts.completed + partial.request_counts.failed == 10
    assert partial.output_file_id is None

    emulator.advance(3)
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed"
    counts = done.request_counts
    assert counts is not None and counts.completed + counts.failed == 40
    assert 0 < counts.failed < 40  # failure_rate=0.3 over 40 lines, seeded

    successes = read_lines(client, done.output_file_id)
    failures = read_lines(client, done.error_file_id)
    for line in successes + failures:
        assert_schema("BatchRequestOutput", line)
        assert line["id"].startswith("batch_req_")
    seen = [line["custom_id"] for line in successes + failures]
    assert sorted(seen) == sorted(ids), "every custom_id exactly once across output + error"
    assert len(successes) == counts.completed and len(failures) == counts.failed
    # Output order does not follow input order (seeded shuffle).
    assert [line["custom_id"] for line in successes] != [
        cid for cid in ids if cid in set(seen[: len(successes)])
    ]

    for line in successes:
        assert line["error"] is None and line["response"]["status_code"] == 200
    for line in failures:
        if line["response"] is None:
            assert line["error"]["code"] and line["error"]["message"]
        else:
            assert line["error"] is None and line["response"]["status_code"] in (400, 500)
            assert_schema("ErrorResponse", line["response"]["body"])
    # HTTP and non-HTTP failures both occur.
    assert {line["response"] is None for line in failures} == {True, False}

    # The batch's usage is the sum of its successful lines' usage.
    inputs = sum(_body_usage(endpoint, line["response"]["body"])[0] for line in successes)
    outputs = sum(_body_usage(endpoint, line["response"]["body"])[1] for line in successes)
    assert done.usage is not None
    if endpoint != "/v1/moderations":
        assert done.usage.input_tokens == inputs > 0
        assert done.usage.output_tokens == outputs
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens

    output_file = client.files.retrieve(done.output_file_id)  # type: ignore[arg-type]
    assert output_file.purpose == "batch_output"


def test_progress_and_timestamps_follow_the_knobs(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    emulator.configure(rate=10, validation_seconds=5, finalizing_seconds=3)
    file_id = upload(client, [chat_line(f"r{i}") for i in range(30)])
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.expires_at == batch.created_at + 24 * 3600

    emulator.advance(4.9)
    assert client.batches.retrieve(batch.id).status == "validating"
    emulator.advance(0.1)
    running = client.batches.retrieve(batch.id)
    assert running.status == "in_progress" and running.in_progress_at == batch.created_at + 5
    assert running.request_counts is not None and running.request_counts.completed == 0
    assert running.model == "gpt-4o-mini"

    emulator.advance(1.5)
    assert client.batches.retrieve(batch.id).request_counts.completed == 15  # type: ignore[union-attr]
    emulator.advance(1.5)
    finalizing = client.batches.retrieve(batch.id)
    assert finalizing.status == "finalizing" and finalizing.finalizing_at == batch.created_at + 8
    assert finalizing.output_file_id is None
    emulator.advance(3)
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.completed_at == batch.created_at + 11
    assert done.error_file_id is None  # no failed line, no error file
    assert len(read_lines(client, done.output_file_id)) == 30


def _fail(
    client: openai.OpenAI,
    emulator: EmulatorServer,
    records: list[Any],
    endpoint: str = "/v1/chat/completions",
):
    file_id = upload(client, records)
    batch = client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    emulator.advance(1)
    failed = client.batches.retrieve(batch.id)
    assert failed.status == "failed"
    assert failed.failed_at is not None and failed.in_progress_at is None
    assert failed.output_file_id is None and failed.error_file_id is None
    assert failed.request_counts is not None and failed.request_counts.total == 0
    assert failed.errors is not None and failed.errors.data
    return [(e.code, e.line) for e in failed.errors.data]


ok = chat_line


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (["{not json", ok("b")], [("invalid_json_line", 1)]),
        ([ok("a"), "[1, 2]"], [("invalid_json_line", 2)]),
        (
            [ok("a"), {k: v for k, v in ok("b").items() if k != "custom_id"}],
            [("missing_required_parameter", 2)],
        ),
        ([ok("a"), ok("b"), ok("a")], [("duplicate_custom_id", 3)]),
        ([ok("a"), {**ok("b"), "method": "GET"}], [("invalid_method", 2)]),
        ([ok("a"), {**ok("b"), "url": "/v1/embeddings"}], [("url_mismatch", 2)]),
        ([{**ok("a"), "url": "/v1/nope"}], [("invalid_url", 1)]),
        ([ok("a"), ok("b", model="gpt-4o")], [("model_mismatch", 2)]),
        (
            [
                ok("a"),
                {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}},
            ],
            [("missing_required_parameter", 2)],
        ),
        ([], [("empty_file", None)]),
        (["", "  "], [("empty_file", None)]),
    ],
)
def test_validation_failures_name_their_lines(
    client: openai.OpenAI,
    emulator: EmulatorServer,
    records: list[Any],
    expected: list[tuple[str, int | None]],
) -> None:
    assert _fail(client, emulator, records) == expected


def test_validation_reports_every_bad_line(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    records = [
        ok("a"),
        "oops",
        ok("a"),
        {**ok("c"), "url": "/v1/completions"},
        ok("d"),
        ok("e", model="other"),
    ]
    assert _fail(client, emulator, records) == [
        ("invalid_json_line", 2),
        ("duplicate_custom_id", 3),
        ("url_mismatch", 4),
        ("model_mismatch", 6),
    ]


def test_size_and_count_limits(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    emulator.configure(max_requests_per_batch=3)
    assert _fail(client, emulator, [ok(f"r{i}") for i in range(4)]) == [("too_many_tasks", None)]
    emulator.configure(max_requests_per_batch=50_000, max_bytes=100)
    assert _fail(client, emulator, [ok("a"), ok("b")]) == [("file_too_large", None)]
    emulator.configure(max_bytes=200_000_000, max_embedding_inputs=3)
    embed = [
        {
            "custom_id": "e",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "m", "input": ["a"] * 4},
        }
    ]
    assert _fail(client, emulator, embed, "/v1/embeddings") == [("too_many_tasks", None)]


def test_expiry_keeps_partial_results(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    emulator.configure(rate=10, expire_after=2)
    ids = [f"r{i}" for i in range(50)]
    file_id = upload(client, [ok(cid) for cid in ids])
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    emulator.advance(10)
    expired = client.batches.retrieve(batch.id)
    assert expired.status == "expired"
    assert expired.expired_at == expired.in_progress_at + 2  # type: ignore[operator]
    assert expired.completed_at is None
    assert expired.request_counts is not None and expired.request_counts.completed == 20

    done = read_lines(client, expired.output_file_id)
    late = read_lines(client, expired.error_file_id)
    assert len(done) == 20 and len(late) == 30
    assert sorted(line["custom_id"] for line in done + late) == sorted(ids)
    for line in late:
        assert line["response"] is None and line["error"]["code"] == "batch_expired"
    # The processed lines are the first 20 of the input.
    assert {line["custom_id"] for line in done} == set(ids[:20])


def test_default_window_is_24_hours(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    emulator.configure(rate=0)  # stalled: nothing is ever processed
    batch = client.batches.create(
        input_file_id=upload(client, [ok("a"), ok("b")]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    emulator.advance(24 * 3600 - 1)
    assert client.batches.retrieve(batch.id).status == "in_progress"
    emulator.advance(1)
    expired = client.batches.retrieve(batch.id)
    assert expired.status == "expired" and expired.expired_at == batch.expires_at
    assert expired.output_file_id is None
    assert [line["error"]["code"] for line in read_lines(client, expired.error_file_id)] == [
        "batch_expired"
    ] * 2


def test_cancel_goes_through_cancelling_with_partial_output(
    client: openai.OpenAI, emulator: EmulatorServer
) -> None:
    emulator.configure(rate=10, cancel_seconds=30)
    ids = [f"r{i}" for i in range(50)]
    batch = client.batches.create(
        input_file_id=upload(client, [ok(cid) for cid in ids]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    emulator.advance(2)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    assert cancelling.request_counts is not None and cancelling.request_counts.completed == 20

    emulator.advance(29)
    still = client.batches.retrieve(batch.id)
    assert still.status == "cancelling"  # not final yet
    assert still.request_counts is not None and still.request_counts.completed == 20  # nothing more runs
    assert still.output_file_id is None

    emulator.advance(1)
    cancelled = client.batches.retrieve(batch.id)
    assert cancelled.status == "cancelled"
    assert cancelled.cancelled_at == cancelling.cancelling_at + 30
    output = read_lines(client, cancelled.output_file_id)
    assert {line["custom_id"] for line in output} == set(ids[:20])
    assert cancelled.error_file_id is None  # unprocessed lines are in neither file

    # Cancelling again is harmless; a finished batch cannot be cancelled.
    assert client.batches.cancel(batch.id).status == "cancelled"
    other = client.batches.create(
        input_file_id=upload(client, [ok("x")]), endpoint="/v1/chat/completions", completion_window="24h"
    )
    emulator.advance(1)
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(other.id)


def test_cancel_while_validating(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    emulator.configure(validation_seconds=60)
    batch = client.batches.create(
        input_file_id=upload(client, [ok("a")]), endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert client.batches.cancel(batch.id).status == "cancelling"
    emulator.advance(1)
    cancelled = client.batches.retrieve(batch.id)
    assert cancelled.status == "cancelled" and cancelled.in_progress_at is None
    assert cancelled.output_file_id is None and cancelled.error_file_id is None


def test_list_pages_newest_first(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    file_id = upload(client, [ok("a")])
    created = [
        client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(105)
    ]
    newest_first = created[::-1]

    first = client.batches.list(limit=100)
    assert [b.id for b in first.data] == newest_first[:100]
    assert first.has_more is True
    second = client.batches.list(limit=100, after=first.data[-1].id)
    assert [b.id for b in second.data] == newest_first[100:]
    assert second.has_more is False

    assert len(client.batches.list().data) == 20  # default limit
    assert [b.id for b in client.batches.list(limit=100)] == newest_first  # auto-pagination
    with pytest.raises(openai.BadRequestError):
        client.batches.list(limit=0)


def test_metadata_limits(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    file_id = upload(client, [ok("a")])

    def create(metadata: Any) -> openai.types.Batch:
        return client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", metadata=metadata
        )

    fine = {f"k{i:02d}" + "x" * 61: "v" * 512 for i in range(16)}
    assert create(fine).metadata == fine
    for bad in (
        {f"k{i}": "v" for i in range(17)},
        {"k" * 65: "v"},
        {"k": "v" * 513},
        {"k": 1},
    ):
        with pytest.raises(openai.BadRequestError) as info:
            create(bad)
        assert info.value.param is not None and info.value.param.startswith("metadata")
    assert len(client.batches.list().data) == 1  # the rejected creates made nothing


def test_create_rejects_bad_parameters(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    file_id = upload(client, [ok("a")])
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=file_id, endpoint="/v1/nope", completion_window="24h")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="48h")  # type: ignore[arg-type]
    other = client.files.create(file=("x.jsonl", io.BytesIO(jsonl([ok("a")]))), purpose="user_data")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id=other.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}")), purpose="nonsense")  # type: ignore[arg-type]
    assert client.batches.list().data == []


def test_files_list_delete_and_expiry(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    ids = [upload(client, [ok(f"r{i}")], name=f"in{i}.jsonl") for i in range(5)]
    user = client.files.create(
        file=("notes.txt", io.BytesIO(b"hello")),
        purpose="user_data",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert user.expires_at == user.created_at + 3600
    assert [f.id for f in client.files.list(purpose="batch")] == ids[::-1]
    assert [f.id for f in client.files.list(purpose="batch", order="asc")] == ids
    page = client.files.list(purpose="batch", limit=2, order="asc")
    assert [f.id for f in page.data] == ids[:2] and page.has_more
    assert [f.id for f in client.files.list(purpose="batch", order="asc", limit=2, after=ids[1]).data] == ids[
        2:4
    ]

    assert client.files.delete(ids[0]).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(ids[0])
    assert client.files.content(ids[1]).content == jsonl([ok("r1")])

    emulator.advance(3600)  # the user_data file's expires_after has passed
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(user.id)


def test_output_expires_after_and_deleted_input(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    emulator.configure(rate=1)
    file_id = upload(client, [ok("a"), ok("b")])
    batch = client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    emulator.advance(1)
    client.files.delete(file_id)  # the running batch keeps its own copy, as at OpenAI
    emulator.advance(5)
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed"
    output = client.files.retrieve(done.output_file_id)  # type: ignore[arg-type]
    assert output.expires_at == output.created_at + 7200
    assert len(read_lines(client, output.id)) == 2


def test_first_attempt_failures_are_deterministic_per_seed_and_custom_id(
    client: openai.OpenAI, emulator: EmulatorServer
) -> None:
    records = [ok(f"r{i}") for i in range(200)]

    def failed_ids() -> set[str]:
        batch = client.batches.create(
            input_file_id=upload(client, records), endpoint="/v1/chat/completions", completion_window="24h"
        )
        emulator.advance(5)
        done = client.batches.retrieve(batch.id)
        return {line["custom_id"] for line in read_lines(client, done.error_file_id)}

    emulator.configure(failure_rate=0.25, seed=1)
    first = failed_ids()
    assert 20 < len(first) < 80
    emulator.reset()  # every custom_id at its first attempt again
    assert failed_ids() == first
    emulator.reset()
    emulator.configure(seed=2)
    assert failed_ids() != first


def test_prompt_token_estimate_and_structured_outputs(
    client: openai.OpenAI, emulator: EmulatorServer
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["pos", "neg"]},
            "score": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["label", "score", "tags"],
        "additionalProperties": False,
    }
    messages = [
        {"role": "system", "content": "y" * 7},
        {"role": "user", "content": [{"type": "text", "text": "x" * 10}]},
    ]
    records = [
        {
            "custom_id": "json",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o-mini",
                "messages": messages,
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
                "max_tokens": 3,
            },
        },
        {
            "custom_id": "tool",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o-mini",
                "messages": messages,
                "tools": [{"type": "function", "function": {"name": "classify", "parameters": schema}}],
                "tool_choice": "required",
            },
        },
    ]
    batch = client.batches.create(
        input_file_id=upload(client, records), endpoint="/v1/chat/completions", completion_window="24h"
    )
    emulator.advance(1)
    lines = {
        line["custom_id"]: line
        for line in read_lines(client, client.batches.retrieve(batch.id).output_file_id)
    }

    structured = lines["json"]["response"]["body"]
    # ceil(len(all message text) / 4) + 3 per message (here 2) + 3 to prime the reply, and the format's
    # (or the tools') JSON text, ceil(len / 4): OpenAI bills the schema the model reads as input.
    fmt = records[0]["body"]["response_format"]
    tools = records[1]["body"]["tools"]
    framing = math.ceil(17 / 4) + 2 * 3 + 3
    assert structured["usage"]["prompt_tokens"] == framing + math.ceil(len(orjson.dumps(fmt)) / 4)
    tool_usage = lines["tool"]["response"]["body"]["usage"]
    assert tool_usage["prompt_tokens"] == framing + math.ceil(len(orjson.dumps(tools)) / 4)
    assert structured["usage"]["completion_tokens"] == 3  # capped by max_tokens
    assert structured["choices"][0]["finish_reason"] == "length"
    # Cut by the cap, the JSON answer is cut too: a prefix of an object, not JSON.
    content = structured["choices"][0]["message"]["content"]
    assert content.startswith("{") and len(content) > 1
    with pytest.raises(json.JSONDecodeError):
        json.loads(content)

    call = lines["tool"]["response"]["body"]["choices"][0]
    assert call["finish_reason"] == "tool_calls"
    assert call["message"]["tool_calls"][0]["function"]["name"] == "classify"
    assert set(json.loads(call["message"]["tool_calls"][0]["function"]["arguments"])) == {
        "label",
        "score",
        "tags",
    }


def test_embeddings_shape(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    records = [
        {
            "custom_id": "one",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "m", "input": "abc"},
        },
        {
            "custom_id": "many",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "m", "input": ["a", "b", "c"], "dimensions": 16},
        },
    ]
    batch = client.batches.create(
        input_file_id=upload(client, records), endpoint="/v1/embeddings", completion_window="24h"
    )
    emulator.advance(1)
    lines = {
        line["custom_id"]: line
        for line in read_lines(client, client.batches.retrieve(batch.id).output_file_id)
    }
    one = lines["one"]["response"]["body"]["data"]
    many = lines["many"]["response"]["body"]["data"]
    assert len(one) == 1 and len(one[0]["embedding"]) == 8
    assert [d["index"] for d in many] == [0, 1, 2] and all(len(d["embedding"]) == 16 for d in many)
    assert abs(sum(x * x for x in many[0]["embedding"]) - 1.0) < 1e-3  # unit vectors


def test_token_limit_fail_mode(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    # Each line has 40 characters of text in one message = 10 + 3 + 3 = 16 estimated prompt tokens.
    emulator.configure(rate=1, enqueued_token_limit=250)
    ten = [ok(f"a{i}", text="t" * 40) for i in range(10)]  # 160 tokens
    first = client.batches.create(
        input_file_id=upload(client, ten), endpoint="/v1/chat/completions", completion_window="24h"
    )
    emulator.advance(0.5)
    second = client.batches.create(
        input_file_id=upload(client, [ok(f"b{i}", text="t" * 40) for i in range(10)]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    other_model = client.batches.create(
        input_file_id=upload(client, [ok(f"c{i}", text="t" * 40, model="gpt-4o") for i in range(10)]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    emulator.advance(0.5)
    assert client.batches.retrieve(first.id).status == "in_progress"
    failed = client.batches.retrieve(second.id)
    assert failed.status == "failed"
    assert [e.code for e in failed.errors.data] == ["token_limit_exceeded"]  # type: ignore[union-attr]
    assert client.batches.retrieve(other_model.id).status == "in_progress"  # the limit is per model

    emulator.advance(20)  # the first batch finishes and frees its tokens
    assert client.batches.retrieve(first.id).status == "completed"
    again = client.batches.create(
        input_file_id=upload(client, [ok(f"d{i}", text="t" * 40) for i in range(10)]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    emulator.advance(0.5)
    assert client.batches.retrieve(again.id).status == "in_progress"


def test_token_limit_reject_mode(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    emulator.configure(rate=1, enqueued_token_limit=250, token_limit_mode="reject")
    first = client.batches.create(
        input_file_id=upload(client, [ok(f"a{i}", text="t" * 40) for i in range(10)]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(
            input_file_id=upload(client, [ok(f"b{i}", text="t" * 40) for i in range(10)]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
    assert info.value.code == "token_limit_exceeded"
    assert [b.id for b in client.batches.list()] == [first.id]


def test_admin_routes(emulator: EmulatorServer) -> None:
    with httpx2.Client(base_url=emulator.url) as http:
        config = http.post("/_emulator/config", json={"rate": 5, "fault_routes": ["files.list"]}).json()
        assert config["rate"] == 5 and config["fault_routes"] == ["files.list"]
        assert emulator.state.config.rate == 5
        assert http.post("/_emulator/config", json={"nope": 1}).status_code == 400
        assert http.post("/_emulator/config", json={"failure_rate": 2}).status_code == 400
        before = http.get("/_emulator/stats").json()["now"]
        after = http.post("/_emulator/advance", json={"seconds": 100}).json()["now"]
        assert after - before == pytest.approx(100)
        http.get("/v1/files", headers={"Authorization": "Bearer x"})
        assert http.get("/_emulator/stats").json()["calls"]["files.list"] == 1
        http.post("/_emulator/reset")
        assert http.get("/_emulator/stats").json()["calls"]["files.list"] == 0
        assert http.get("/_emulator/config").json()["rate"] == 5  # reset keeps knobs unless asked
        http.post("/_emulator/reset", json={"restore_config": True})
        assert http.get("/_emulator/config").json()["rate"] == 1000.0


def test_routes_without_v1_prefix(emulator: EmulatorServer) -> None:
    bare = openai.OpenAI(api_key="k", base_url=emulator.url, max_retries=0, _strict_response_validation=True)
    file_id = upload(bare, [ok("a")])
    batch = bare.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert bare.batches.retrieve(batch.id).id == batch.id
    bare.close()
