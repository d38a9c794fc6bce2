"""Azure OpenAI clients work against the emulator's ``/openai`` routes."""

from __future__ import annotations

import io

import httpx2
import openai

from airflow_openai_batch.emulator import EmulatorServer

from .helpers import SchemaChecker, jsonl, read_lines


def test_azure_client_uploads_creates_retrieves_lists(
    emulator: EmulatorServer, schema_checker: SchemaChecker
) -> None:
    client = openai.AzureOpenAI(
        api_key="k",
        api_version="2024-10-21",
        azure_endpoint=emulator.url,
        max_retries=0,
        _strict_response_validation=True,
        http_client=httpx2.Client(event_hooks={"response": [schema_checker]}),
    )
    # Older Azure API versions name the endpoint without /v1, and every line's model is the
    # Global-Batch deployment name.
    records = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/chat/completions",
            "body": {"model": "my-gpt4o-batch", "messages": [{"role": "user", "content": f"hi {i}"}]},
        }
        for i in range(3)
    ]
    file = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(records))), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id,
        endpoint="/chat/completions",  # type: ignore[arg-type]
        completion_window="24h",
    )
    emulator.advance(1)
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.model == "my-gpt4o-batch"
    assert [b.id for b in client.batches.list()] == [batch.id]
    assert [f.id for f in client.files.list(purpose="batch")] == [file.id]
    assert sorted(line["custom_id"] for line in read_lines(client, done.output_file_id)) == ["r0", "r1", "r2"]

    stats = emulator.stats()
    assert stats["last_api_version"] == "2024-10-21"
    assert stats["last_auth"] == "api-key"
    assert stats["auth"] == {"api-key": stats["azure_calls"]}
    assert stats["calls"]["batches.create"] == 1
    assert schema_checker.checked  # the Azure responses were validated too
    client.close()


def test_azure_v1_endpoint_names_also_work(emulator: EmulatorServer) -> None:
    client = openai.AzureOpenAI(api_key="k", api_version="2025-04-01-preview", azure_endpoint=emulator.url)
    records = [
        {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "emb", "input": "x"}}
    ]
    file = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(records))), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h")
    emulator.advance(1)
    assert client.batches.retrieve(batch.id).status == "completed"
    assert emulator.stats()["last_api_version"] == "2025-04-01-preview"
    client.close()
