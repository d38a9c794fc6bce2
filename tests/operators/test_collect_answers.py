"""Collect reads answers: structured answers (chat and responses, formats and tool calls) parsed, typed
and failed by what is wrong with them; images written as files. Through submit, the emulator over HTTP
and collect, in JSONL and Parquet."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import duckdb
import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_openai_batch.core.resubmit import RetryPolicy
from airflow_openai_batch.core.writers import read_records
from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
from tests.support.images import assert_valid_image, png_size
from tests.support.outlets import NoOutletEvents

pytestmark = pytest.mark.usefixtures("emulator")

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
GENERATIONS = "/v1/images/generations"

TICKET: dict[str, Any] = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["billing", "technical", "general"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string"}},
        "note": {"type": ["string", "null"]},
    },
    "required": ["category", "score", "tags", "note"],
    "additionalProperties": False,
}
FAULTS = {
    "answer_invalid_json_rate": 0.12,
    "answer_schema_miss_rate": 0.12,
    "answer_refusal_rate": 0.12,
    "answer_truncated_rate": 0.12,
    "answer_content_filter_rate": 0.12,
}
ANSWER_CODES = {"invalid_output", "refusal", "truncated", "content_filter"}
N = 120


def rows(endpoint: str, kind: str, n: int = N) -> list[dict[str, Any]]:
    """``n`` request lines: ``plain``, ``format`` (the schema comes from submit's response_schema) or
    ``tool`` (a function with the schema as parameters, its call forced)."""
    out = []
    for i in range(n):
        if endpoint == CHAT:
            body: dict[str, Any] = {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": f"ticket {i}"}],
            }
            if kind == "tool":
                body["tools"] = [{"type": "function", "function": {"name": "classify", "parameters": TICKET}}]
                body["tool_choice"] = "required"
        else:
            body = {"model": "gpt-4o-mini", "input": f"ticket {i}"}
            if kind == "tool":
                body["tools"] = [{"type": "function", "name": "classify", "parameters": TICKET}]
                body["tool_choice"] = {"type": "function", "name": "classify"}
        out.append({"custom_id": f"{kind}-{i}", "method": "POST", "url": endpoint, "body": body})
    return out


def run(
    emulator, make_context, tmp_path: Path, endpoint: str, kind: str, output_format: str, **collect_kwargs
):
    """Submit, let the emulator answer, collect: the summary, the output folder and the answer bodies."""
    submit_kwargs: dict[str, Any] = {"endpoint": endpoint}
    if kind == "format":
        submit_kwargs["response_schema"] = {"name": "ticket", "schema": TICKET}
    ids = OpenAIBatchSubmitOperator(task_id="submit", requests=rows(endpoint, kind), **submit_kwargs).execute(
        make_context(run_id=f"{endpoint}-{kind}-{output_format}")
    )
    emulator.advance(3600)
    out = tmp_path / "out"
    context = make_context(task_id="collect")
    context["outlet_events"] = NoOutletEvents()
    op = OpenAIBatchCollectOperator(
        task_id="collect", batch_ids=ids, output_uri=str(out), output_format=output_format, **collect_kwargs
    )
    summary = op.execute(context)
    return summary, out, answer_bodies(emulator, ids)


def answer_bodies(emulator, batch_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The success bodies as the emulator wrote them, read over HTTP with the SDK."""
    client = emulator.client()
    bodies = {}
    for bid in batch_ids:
        batch = client.batches.retrieve(bid)
        assert batch.status == "completed"
        for line in client.files.content(batch.output_file_id).text.splitlines():
            row = json.loads(line)
            bodies[row["custom_id"]] = row["response"]["body"]
    return bodies


def expected_outcome(endpoint: str, body: dict[str, Any]) -> tuple[str | None, str | None, Any]:
    """``(error_code, answer text, parsed value)`` of a structured answer, judged here on its own (the
    order of the checks is the contract's: refusal, content filter, truncation, then the text)."""
    calls: list[tuple[str, str]] = []
    if endpoint == CHAT:
        choice = body["choices"][0]
        message = choice["message"]
        finish = choice["finish_reason"]
        refusal = message.get("refusal")
        calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
        text = calls[0][1] if calls else message.get("content")
        filtered, truncated = finish == "content_filter", finish == "length"
    else:
        refusal, texts = None, []
        for item in body["output"]:
            if item["type"] == "function_call":
                calls.append((item["name"], item["arguments"]))
            elif item["type"] == "message":
                for part in item["content"]:
                    if part["type"] == "refusal":
                        refusal = part["refusal"]
                    elif part["type"] == "output_text":
                        texts.append(part["text"])
        text = calls[0][1] if calls else ("".join(texts) or None)
        reason = (body.get("incomplete_details") or {}).get("reason")
        filtered = body["status"] == "incomplete" and reason == "content_filter"
        truncated = body["status"] == "incomplete" and not filtered
    if refusal:
        return "refusal", refusal, None
    if filtered:
        return "content_filter", text, None
    if truncated:
        return "truncated", text, None
    try:
        value = json.loads(text)
        jsonschema.validate(value, TICKET)
    except (TypeError, ValueError, jsonschema.ValidationError):
        return "invalid_output", text, None
    return None, text, value


@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
@pytest.mark.parametrize("kind", ["format", "tool"])
@pytest.mark.parametrize("endpoint", [CHAT, RESPONSES])
def test_structured_answers_are_parsed_or_failed_by_what_is_wrong(
    emulator, make_context, tmp_path, endpoint, kind, output_format
) -> None:
    emulator.configure(**FAULTS)
    summary, out, bodies = run(emulator, make_context, tmp_path, endpoint, kind, output_format)

    expected = {cid: expected_outcome(endpoint, body) for cid, body in bodies.items()}
    want_codes: dict[str, int] = {}
    for code, _, _ in expected.values():
        if code is not None:
            want_codes[code] = want_codes.get(code, 0) + 1
    assert set(want_codes) == ANSWER_CODES  # every kind of bad answer is in the batch
    assert summary["total"] == N == summary["succeeded"] + summary["failed"]
    assert summary["failed_by_code"] == want_codes
    assert summary["succeeded"] == sum(1 for code, _, _ in expected.values() if code is None) > 0

    successes = list(read_records(out / f"successes.{output_format}"))
    failures = list(read_records(out / f"failures.{output_format}"))
    for record in failures:
        code, text, _ = expected[record["custom_id"]]
        assert record["error_code"] == code and record["status_code"] == 200
        assert record["output"] == text  # the raw answer (refusal text for a refusal)
        assert record["error_message"]
    retry = [
        json.loads(line)["custom_id"] for line in (out / "retry_requests.jsonl").read_text().splitlines()
    ]
    assert retry == [r["custom_id"] for r in failures]

    finish = "tool_calls" if kind == "tool" else "stop"
    for record in successes:
        code, text, value = expected[record["custom_id"]]
        assert code is None
        assert record["finish_reason"] == finish
        if output_format == "jsonl" or kind == "format":
            assert record["parsed"] == value
        else:  # tool calls have no single answer schema: parsed is JSON text
            assert json.loads(record["parsed"]) == value
        if kind == "tool":
            arguments = record["tool_calls"][0]["arguments"]
            assert record["tool_calls"][0]["name"] == "classify"
            assert (arguments if output_format == "jsonl" else json.loads(arguments)) == value
            assert record["content"] is None
        else:
            assert record["tool_calls"] is None and record["content"] == text

    if output_format == "parquet":
        successes_path = out / "successes.parquet"
        schema = pq.read_schema(successes_path)
        assert schema.field("finish_reason").type == pa.string()
        assert schema.field("tool_calls").type == pa.list_(
            pa.struct([("name", pa.string()), ("arguments", pa.string())])
        )
        assert pq.read_schema(out / "failures.parquet").field("output").type == pa.string()
        if kind == "format":
            assert schema.field("parsed").type == pa.struct(
                [
                    ("category", pa.string()),
                    ("score", pa.float64()),
                    ("tags", pa.list_(pa.string())),
                    ("note", pa.string()),
                ]
            )
            rows_ = duckdb.sql(
                f"SELECT custom_id, parsed.category, parsed.score FROM read_parquet('{successes_path}')"
            ).fetchall()
            assert len(rows_) == summary["succeeded"]
            for cid, category, score in rows_:
                value = expected[cid][2]
                assert (category, score) == (value["category"], value["score"])
        else:
            assert schema.field("parsed").type == pa.string()
            got = duckdb.sql(
                f"SELECT custom_id, tool_calls[1].name FROM read_parquet('{successes_path}')"
            ).fetchall()
            assert {name for _, name in got} == {"classify"}


@pytest.mark.parametrize("endpoint", [CHAT, RESPONSES])
def test_plain_answers_never_fail_whatever_the_answer_knobs(
    emulator, make_context, tmp_path, endpoint
) -> None:
    emulator.configure(answer_refusal_rate=0.5, answer_truncated_rate=0.5)  # structured answers only
    summary, out, _ = run(emulator, make_context, tmp_path, endpoint, "plain", "parquet")
    assert summary["succeeded"] == N and summary["failed"] == 0
    table = pq.read_table(out / "successes.parquet")
    assert set(table.column("finish_reason").to_pylist()) == {"stop"}
    assert table.column("parsed").null_count == N and table.column("tool_calls").null_count == N
    assert all(table.column("content").to_pylist())
    jsonl = list(read_records(_collect_again(make_context, tmp_path, summary, "jsonl") / "successes.jsonl"))
    assert all("parsed" not in r and r["finish_reason"] == "stop" for r in jsonl)


def _collect_again(make_context, tmp_path: Path, summary: dict[str, Any], output_format: str) -> Path:
    out = tmp_path / f"again-{output_format}"
    context = make_context(task_id="collect")
    context["outlet_events"] = NoOutletEvents()
    OpenAIBatchCollectOperator(
        task_id="collect", batch_ids=summary["batch_ids"], output_uri=str(out), output_format=output_format
    ).execute(context)
    return out


@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
def test_collect_response_schema_overrides_the_requests_and_fixes_the_column(
    emulator, make_context, tmp_path, output_format
) -> None:
    # Plain requests, answered in plain text: held to collect's schema, none of them fits.
    summary, out, bodies = run(
        emulator,
        make_context,
        tmp_path,
        CHAT,
        "plain",
        output_format,
        response_schema={"name": "t", "schema": TICKET},
    )
    assert summary["failed_by_code"] == {"invalid_output": N} and summary["succeeded"] == 0
    for record in read_records(out / f"failures.{output_format}"):
        assert record["output"] == bodies[record["custom_id"]]["choices"][0]["message"]["content"]
    if output_format == "parquet":
        assert pa.types.is_struct(pq.read_schema(out / "successes.parquet").field("parsed").type)


def test_truncated_answers_are_retried_only_when_asked() -> None:
    assert not RetryPolicy.of(None).retryable(200, "truncated")
    assert RetryPolicy.of(["truncated"]).retryable(200, "truncated")


# -- images -----------------------------------------------------------------------------------------------


def image_rows() -> list[dict[str, Any]]:
    line = {"method": "POST", "url": GENERATIONS}
    return [
        {
            **line,
            "custom_id": "fox",
            "body": {"model": "gpt-image-1", "prompt": "a fox", "n": 2, "output_format": "png"},
        },
        {
            **line,
            "custom_id": "bird/1",
            "body": {"model": "gpt-image-1", "prompt": "a bird", "output_format": "png"},
        },
        {
            **line,
            "custom_id": "cat",
            "body": {"model": "dall-e-3", "prompt": "a cat", "response_format": "url"},
        },
    ]


def collect_images(emulator, make_context, output_uri: str, output_format: str) -> dict[str, Any]:
    ids = OpenAIBatchSubmitOperator(task_id="submit", requests=image_rows(), endpoint=GENERATIONS).execute(
        make_context(run_id=f"images-{output_format}-{output_uri[:2]}")
    )
    emulator.advance(3600)
    context = make_context(task_id="collect")
    context["outlet_events"] = NoOutletEvents()
    return OpenAIBatchCollectOperator(
        task_id="collect", batch_ids=ids, output_uri=output_uri, output_format=output_format
    ).execute(context)


def check_image_records(records: list[dict[str, Any]], read: Any) -> None:
    by_id = {r["custom_id"]: r for r in records}
    assert sorted(by_id) == ["bird/1", "cat", "fox"]
    for cid, count in (("fox", 2), ("bird/1", 1)):
        images = by_id[cid]["images"]
        assert len(images) == count
        for uri in images:
            assert "/images/" in uri and uri.endswith(".png")
            png_size(read(uri))
        assert "fox-0.png" in by_id["fox"]["images"][0] or cid != "fox"
        body = by_id[cid]["body"]
        body = json.loads(body) if isinstance(body, str) else body
        assert all("b64_json" not in item for item in body["data"]) and body["usage"]["total_tokens"] > 0
    cat = by_id["cat"]
    assert cat["images"] == [
        item["url"]
        for item in (cat["body"] if isinstance(cat["body"], dict) else json.loads(cat["body"]))["data"]
    ]
    assert cat["images"][0].startswith("https://")


@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
def test_images_are_files_on_local_disk(emulator, make_context, tmp_path, output_format) -> None:
    out = tmp_path / "out"
    summary = collect_images(emulator, make_context, str(out), output_format)
    assert summary["succeeded"] == 3 and summary["failed"] == 0
    records = list(read_records(out / f"successes.{output_format}"))
    check_image_records(records, lambda uri: Path(uri.removeprefix("file://")).read_bytes())
    files = sorted(p.name for p in (out / "images").iterdir())
    assert len(files) == 3 and not any(name.endswith(".partial") or name.startswith(".") for name in files)
    for path in (out / "images").iterdir():
        assert_valid_image(path.read_bytes(), "png")
    if output_format == "parquet":
        assert pq.read_schema(out / "successes.parquet").field("images").type == pa.list_(pa.string())
    # no base64 anywhere in the results
    first = base64.b64encode(
        Path(records[0]["images"][0].removeprefix("file://")).read_bytes()[:30]
    ).decode()[:20]
    assert first not in (out / f"successes.{output_format}").read_bytes().decode("latin-1")


@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
def test_images_are_files_on_s3(
    emulator, make_context, s3_bucket, s3_server, tmp_path, output_format
) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    summary = collect_images(emulator, make_context, f"s3://aws_default@{s3_bucket}/run", output_format)
    assert summary["succeeded"] == 3
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"])
    image_keys = [k for k in keys if k.startswith("run/images/")]
    assert len(image_keys) == 3 and "run/manifest.json" in keys

    def read(uri: str) -> bytes:
        key = uri.split(f"{s3_bucket}/", 1)[1]
        return s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()

    local = Path(summary["successes_uri"].split(f"{s3_bucket}/", 1)[1]).name
    data = s3.get_object(Bucket=s3_bucket, Key=f"run/{local}")["Body"].read()
    (tmp_path / local).write_bytes(data)
    check_image_records(list(read_records(tmp_path / local)), read)
