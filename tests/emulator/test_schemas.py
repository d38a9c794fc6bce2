"""Every kind of emulator response validates against OpenAI's published schemas and parses with the
openai SDK's own models under strict validation."""

from __future__ import annotations

import io
from typing import Any

import httpx2
import openai
import pytest
from openai.types import (
    Batch,
    Completion,
    CreateEmbeddingResponse,
    FileDeleted,
    FileObject,
    ModerationCreateResponse,
)
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from airflow_openai_batch.emulator import EmulatorServer

from .helpers import SchemaChecker, assert_schema, chat_line, jsonl, read_lines, upload


def _raw_json(raw: Any) -> Any:
    return raw.http_response.json()


def test_every_api_response_validates_and_parses(
    client: openai.OpenAI, emulator: EmulatorServer, schema_checker: SchemaChecker
) -> None:
    created = client.files.with_raw_response.create(
        file=("in.jsonl", io.BytesIO(jsonl([chat_line("a"), chat_line("b")]))), purpose="batch"
    )
    assert_schema("OpenAIFile", _raw_json(created))
    file = created.parse()
    assert isinstance(file, FileObject)
    assert file.purpose == "batch" and file.bytes == len(jsonl([chat_line("a"), chat_line("b")]))

    retrieved = client.files.with_raw_response.retrieve(file.id)
    assert_schema("OpenAIFile", _raw_json(retrieved))
    assert retrieved.parse().id == file.id

    listed = client.files.with_raw_response.list()
    assert_schema("ListFilesResponse", _raw_json(listed))
    assert [f.id for f in listed.parse().data] == [file.id]

    batch_raw = client.batches.with_raw_response.create(
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"team": "data"},
    )
    assert_schema("Batch", _raw_json(batch_raw))
    batch = batch_raw.parse()
    assert isinstance(batch, Batch) and batch.status == "validating"

    emulator.advance(10)
    done_raw = client.batches.with_raw_response.retrieve(batch.id)
    assert_schema("Batch", _raw_json(done_raw))
    done = done_raw.parse()
    assert done.status == "completed" and done.usage is not None and done.usage.total_tokens > 0

    batches_raw = client.batches.with_raw_response.list()
    assert_schema("ListBatchesResponse", _raw_json(batches_raw))
    assert [b.id for b in batches_raw.parse().data] == [batch.id]

    # The result file's lines follow BatchRequestOutput, and bodies parse as ChatCompletion.
    for line in read_lines(client, done.output_file_id):
        assert_schema("BatchRequestOutput", line)
        ChatCompletion.model_validate(line["response"]["body"])

    deleted_raw = client.files.with_raw_response.delete(file.id)
    assert_schema("DeleteFileResponse", _raw_json(deleted_raw))
    deleted = deleted_raw.parse()
    assert isinstance(deleted, FileDeleted) and deleted.deleted and deleted.id == file.id

    # The hook saw (and validated) every JSON operation.
    seen = {name for _, _, name in schema_checker.checked}
    assert seen >= {"OpenAIFile", "ListFilesResponse", "Batch", "ListBatchesResponse", "DeleteFileResponse"}


def test_cancel_and_failed_batches_validate(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    emulator.configure(rate=1)
    file_id = upload(client, [chat_line(f"r{i}") for i in range(5)])
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    emulator.advance(2.5)
    cancel_raw = client.batches.with_raw_response.cancel(batch.id)
    assert_schema("Batch", _raw_json(cancel_raw))
    assert cancel_raw.parse().status == "cancelling"

    bad = upload(client, ["{not json", chat_line("x")])
    failed = client.batches.create(
        input_file_id=bad, endpoint="/v1/chat/completions", completion_window="24h"
    )
    emulator.advance(1)
    raw = client.batches.with_raw_response.retrieve(failed.id)
    assert_schema("Batch", _raw_json(raw))
    assert raw.parse().status == "failed"


@pytest.mark.parametrize(
    ("call", "status", "error"),
    [
        (lambda c: c.files.retrieve("file-missing"), 404, openai.NotFoundError),
        (lambda c: c.batches.retrieve("batch_missing"), 404, openai.NotFoundError),
        (lambda c: c.files.content("file-missing"), 404, openai.NotFoundError),
        (lambda c: c.files.delete("file-missing"), 404, openai.NotFoundError),
        (lambda c: c.batches.cancel("batch_missing"), 404, openai.NotFoundError),
        (
            lambda c: c.batches.create(
                input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h"
            ),
            404,
            openai.NotFoundError,
        ),
        (lambda c: c.batches.list(limit=101), 400, openai.BadRequestError),
    ],
)
def test_errors_have_openais_error_shape(client: openai.OpenAI, call: Any, status: int, error: type) -> None:
    with pytest.raises(error) as info:
        call(client)
    assert info.value.status_code == status
    body = info.value.response.json()
    assert_schema("ErrorResponse", body)
    assert body["error"]["type"] == "invalid_request_error"


def test_missing_key_is_401(emulator: EmulatorServer) -> None:
    with httpx2.Client(base_url=emulator.base_url) as http:
        response = http.get("/batches")
        assert response.status_code == 401
        assert_schema("ErrorResponse", response.json())
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/batches", headers={"Authorization": "Bearer"}).status_code == 401
        assert http.get("/batches", headers={"Authorization": "Bearer x"}).status_code == 200
        assert http.get("/batches", headers={"api-key": "x"}).status_code == 200
        # /health needs no key; an unknown route is a 404 in OpenAI's shape.
        assert http.get(emulator.url + "/health").status_code == 200
        unknown = http.get("/nothing-here", headers={"Authorization": "Bearer x"})
        assert unknown.status_code == 404
        assert_schema("ErrorResponse", unknown.json())


ENDPOINT_BODIES: dict[str, tuple[dict[str, Any], Any]] = {
    "/v1/chat/completions": (
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        ChatCompletion,
    ),
    "/v1/responses": ({"model": "gpt-4o-mini", "input": "hi"}, Response),
    "/v1/completions": ({"model": "gpt-3.5-turbo-instruct", "prompt": "hi"}, Completion),
    "/v1/embeddings": ({"model": "text-embedding-3-small", "input": ["a", "b"]}, CreateEmbeddingResponse),
    "/v1/moderations": ({"input": "hi"}, ModerationCreateResponse),
}


@pytest.mark.parametrize("endpoint", sorted(ENDPOINT_BODIES))
def test_line_bodies_parse_with_sdk_models(
    client: openai.OpenAI, emulator: EmulatorServer, endpoint: str
) -> None:
    body, model = ENDPOINT_BODIES[endpoint]
    file_id = upload(client, [{"custom_id": "only", "method": "POST", "url": endpoint, "body": body}])
    batch = client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    emulator.advance(1)
    batch = client.batches.retrieve(batch.id)
    [line] = read_lines(client, batch.output_file_id)
    assert_schema("BatchRequestOutput", line)
    parsed = model.model_validate(line["response"]["body"])
    assert parsed is not None
