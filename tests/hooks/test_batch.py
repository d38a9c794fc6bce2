"""OpenAIBatchHook against the emulator over loopback, with the real openai SDK."""

from __future__ import annotations

import asyncio
import io
import json

import openai
import pytest

from airflow_openai_batch.hooks.batch import OpenAIBatchHook, build_client_kwargs
from tests.conftest import TEST_API_KEY, connection_uri_json


def _lines(n: int, model: str = "gpt-4o-mini") -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": f"hello {i}"}]},
            }
        ).encode()
        + b"\n"
        for i in range(n)
    )


def _completed_batch(hook: OpenAIBatchHook, emulator, n: int = 5):
    file_id = hook.upload_file(io.BytesIO(_lines(n)), filename="in.jsonl").id
    batch = hook.create_batch(input_file_id=file_id, endpoint="/v1/chat/completions", metadata={"k": "v"})
    emulator.advance(3600)
    return hook.get_batch(batch.id)


def test_connection_fields_map_to_client_kwargs(monkeypatch) -> None:
    from airflow.sdk import Connection

    conn = Connection(
        conn_id="x",
        conn_type="openai_batch",
        password="sk-abc",
        host="http://127.0.0.1:9/v1",
        extra=json.dumps(
            {
                "organization": "org-1",
                "project": "proj-1",
                "timeout": "30",
                "max_retries": 4,
                "default_headers": {"X-A": "1"},
                "openai_client_kwargs": {"max_retries": 7},
            }
        ),
    )
    is_azure, kwargs = build_client_kwargs(conn)
    assert not is_azure
    assert kwargs == {
        "api_key": "sk-abc",
        "base_url": "http://127.0.0.1:9/v1",
        "organization": "org-1",
        "project": "proj-1",
        "default_headers": {"X-A": "1"},
        "timeout": 30.0,
        "max_retries": 7,  # openai_client_kwargs wins: connections made for the official provider work
    }
    azure = Connection(
        conn_id="a",
        conn_type="openai_batch",
        password="k",
        host="https://r.openai.azure.com",
        extra=json.dumps({"api_version": "2024-10-21"}),
    )
    is_azure, kwargs = build_client_kwargs(azure)
    assert is_azure and kwargs["azure_endpoint"] == "https://r.openai.azure.com"
    assert kwargs["api_version"] == "2024-10-21" and "base_url" not in kwargs


def test_upload_create_get_list_cancel_stream_delete(emulator) -> None:
    hook = OpenAIBatchHook()
    batch = _completed_batch(hook, emulator, n=7)
    assert batch.status == "completed" and batch.request_counts.total == 7
    lines = list(hook.iter_file_lines(batch.output_file_id))
    assert sorted(json.loads(line)["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(7))
    assert [b.id for b in hook.find_batch("k", "v")] == [batch.id]
    assert hook.delete_file(batch.output_file_id) is True
    with pytest.raises(openai.NotFoundError):
        hook.get_file(batch.output_file_id)

    emulator.configure(rate=0.001)  # keep the next batch in progress so it can be cancelled
    file_id = hook.upload_file(io.BytesIO(_lines(3))).id
    live = hook.create_batch(input_file_id=file_id, endpoint="/v1/chat/completions")
    assert hook.cancel_batch(live.id).status in ("cancelling", "cancelled")


def test_file_lines_download_only_when_read_and_offer_raw_blocks(emulator) -> None:
    hook = OpenAIBatchHook()
    batch = _completed_batch(hook, emulator, n=6)
    before = emulator.stats()["calls"].get("files.content", 0)
    lines = hook.iter_file_lines(batch.output_file_id)
    assert emulator.stats()["calls"].get("files.content", 0) == before  # nothing fetched yet
    # The collect path reads whole blocks (no per-line objects): same bytes as the lines, newline-ended.
    raw = lines.take_raw_blocks()
    assert raw is not None
    data = b"".join(raw)
    assert emulator.stats()["calls"].get("files.content", 0) == before + 1
    assert data.endswith(b"\n")
    assert sorted(json.loads(line)["custom_id"] for line in data.splitlines()) == [
        f"req-{i}" for i in range(6)
    ]
    # Once lines were taken, the blocks are no longer on offer (the two views cannot be mixed).
    again = hook.iter_file_lines(batch.output_file_id)
    assert next(again)
    assert again.take_raw_blocks() is None


def test_upload_streams_from_a_path_without_reading_it_whole(emulator, tmp_path, monkeypatch) -> None:
    path = tmp_path / "big.jsonl"
    path.write_bytes(_lines(20_000))
    # The SDK reads a bare path fully into memory; the hook must hand it an open file instead.
    monkeypatch.setattr("pathlib.Path.read_bytes", lambda self: pytest.fail("read whole file"))
    uploaded = OpenAIBatchHook().upload_file(path)
    assert uploaded.bytes == path.stat().st_size and uploaded.filename == "big.jsonl"


def test_list_batches_walks_every_page_newest_first_and_stops_at_the_cutoff(emulator) -> None:
    hook = OpenAIBatchHook()
    file_id = hook.upload_file(io.BytesIO(_lines(1))).id
    created = []
    for i in range(130):
        created.append(hook.create_batch(input_file_id=file_id, endpoint="/v1/chat/completions").id)
        if i == 99:
            emulator.advance(10)
    listed = [b.id for b in hook.list_batches()]
    assert listed == list(reversed(created))
    cutoff = hook.get_batch(created[100]).created_at
    recent = [b.id for b in hook.list_batches(created_after=cutoff)]
    assert recent == list(reversed(created[100:]))


def test_create_is_never_retried_by_the_sdk(emulator) -> None:
    hook = OpenAIBatchHook()
    file_id = hook.upload_file(io.BytesIO(_lines(2))).id
    emulator.configure(fault_rate=1.0, fault_routes=("batches.create",), fault_kinds=("500",))
    before = emulator.stats()
    with pytest.raises(openai.InternalServerError):
        hook.create_batch(input_file_id=file_id, endpoint="/v1/chat/completions")
    after = emulator.stats()
    assert after["calls"]["batches.create"] - before["calls"].get("batches.create", 0) == 1


def test_gets_recover_from_injected_faults_through_sdk_retries(emulator, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_uri_json(emulator.base_url, max_retries=8))
    hook = OpenAIBatchHook()
    batch = _completed_batch(hook, emulator)
    emulator.configure(fault_rate=0.5, fault_routes=("batches.retrieve",), retry_after=0.01)
    for _ in range(10):
        assert hook.get_batch(batch.id).status == "completed"
    assert emulator.stats()["faults"].get("batches.retrieve", 0) > 0


def test_async_methods_for_the_trigger(emulator) -> None:
    hook = OpenAIBatchHook()
    batch = _completed_batch(hook, emulator)

    async def run():
        ahook = OpenAIBatchHook()
        got = await ahook.aget_batch(batch.id)
        listed = [b.id async for b in ahook.alist_batches()]
        await ahook.aclose()
        return got, listed

    got, listed = asyncio.run(run())
    assert got.status == "completed" and listed == [batch.id]


def test_batch_pages_are_fetched_one_call_at_a_time_newest_first(emulator) -> None:
    hook = OpenAIBatchHook()
    file_id = hook.upload_file(io.BytesIO(_lines(1))).id
    created = [hook.create_batch(input_file_id=file_id, endpoint="/v1/chat/completions").id for _ in range(5)]

    async def run():
        ahook = OpenAIBatchHook()
        calls = []
        pages = []
        async for page in ahook.alist_batch_pages(page_size=2):
            calls.append(emulator.stats()["calls"].get("batches.list", 0))
            pages.append([b.id for b in page])
            if len(pages) == 2:
                break  # the caller stops between pages: no further call is made
        await ahook.aclose()
        return pages, calls

    before = emulator.stats()["calls"].get("batches.list", 0)
    pages, calls = asyncio.run(run())
    assert pages == [created[::-1][0:2], created[::-1][2:4]]
    assert calls == [before + 1, before + 2]
    assert emulator.stats()["calls"]["batches.list"] == before + 2


def test_test_connection_reports_success_and_failure(emulator, monkeypatch) -> None:
    assert OpenAIBatchHook().test_connection() == (True, "Connection to the OpenAI Batch API works.")
    monkeypatch.setenv(
        "AIRFLOW_CONN_OPENAI_DEFAULT", connection_uri_json("http://127.0.0.1:9/v1", max_retries=0)
    )
    ok, message = OpenAIBatchHook().test_connection()
    assert not ok and "APIConnectionError" in message and TEST_API_KEY not in message


def test_api_key_is_registered_with_the_task_log_masker() -> None:
    from airflow.providers.common.compat.sdk import redact
    from airflow.sdk import Connection

    from airflow_openai_batch.hooks.batch import make_client

    key = "sk-unique-never-seen-before-4242"
    line = f"a careless line that prints the key: {key}"
    assert key in str(redact(line))
    make_client(Connection(conn_id="x", conn_type="openai_batch", password=key))
    redacted = str(redact(line))
    assert key not in redacted and "a careless line" in redacted


def test_azure_mode_sends_api_version_and_api_key_header(emulator, monkeypatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_OPENAI_DEFAULT",
        json.dumps(
            {
                "conn_type": "openai_batch",
                "password": TEST_API_KEY,
                "host": emulator.url,
                "extra": {"api_version": "2024-10-21"},
            }
        ),
    )
    hook = OpenAIBatchHook()
    assert isinstance(hook.client, openai.AzureOpenAI)
    batch = _completed_batch(hook, emulator, n=3)
    assert batch.status == "completed"
    stats = emulator.stats()
    assert stats["last_api_version"] == "2024-10-21"
    assert stats["last_auth"] == "api-key"
