"""core.batch_usage: the Batch object's own usage, read from real emulator batches."""

from __future__ import annotations

import io
import json

from airflow_openai_batch.core.batch_usage import batch_usage, describe_tokens


def _batch(emulator, model: str, n: int, advance: float):
    client = emulator.client()
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"question {i} " * 20}]},
        }
        for i in range(n)
    ]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    file_id = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch").id
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    emulator.advance(advance)
    return client, client.batches.retrieve(batch.id)


def test_usage_of_a_finished_batch_matches_its_lines(emulator) -> None:
    client, batch = _batch(emulator, "o4-mini", 5, 3600)
    usage = batch_usage(batch.model_dump())
    lines = [
        json.loads(raw)["response"]["body"]["usage"]
        for raw in client.files.content(batch.output_file_id).text.splitlines()
    ]
    assert usage == {
        "input_tokens": sum(u["prompt_tokens"] for u in lines),
        "cached_input_tokens": 0,
        "output_tokens": sum(u["completion_tokens"] for u in lines),
        "reasoning_tokens": sum(u["completion_tokens_details"]["reasoning_tokens"] for u in lines),
        "total_tokens": sum(u["total_tokens"] for u in lines),
    }
    assert usage["reasoning_tokens"] > 0
    text = describe_tokens(usage)
    assert text.startswith(f"{usage['total_tokens']:,} tokens so far ({usage['input_tokens']:,} in;")
    assert f"{usage['reasoning_tokens']:,} reasoning" in text


def test_tokens_so_far_of_a_running_batch(emulator) -> None:
    # A frozen clock, one request a second, one second to validate: 10 of 20 done after 11 s.
    emulator.configure(rate=1.0, time_scale=0, validation_seconds=1.0)
    _, batch = _batch(emulator, "gpt-4o-mini", 20, 11)
    assert batch.status == "in_progress"
    usage = batch_usage(batch.model_dump())
    assert usage is not None and usage["total_tokens"] > 0
    assert batch.request_counts is not None and batch.request_counts.completed == 10
    assert usage["output_tokens"] and not usage["reasoning_tokens"]
    assert "reasoning" not in describe_tokens(usage) and "cached" not in describe_tokens(usage)


def test_nothing_reported_means_no_usage_and_no_text(emulator) -> None:
    emulator.configure(time_scale=0, validation_seconds=1.0)
    _, batch = _batch(emulator, "gpt-4o-mini", 2, 0)
    assert batch.status == "validating"
    assert describe_tokens(batch_usage(batch.model_dump())) == ""
    assert batch_usage({"id": "batch_azure", "status": "completed", "usage": None}) is None
    assert describe_tokens(None) == ""
    cached = {
        "input_tokens": 10,
        "cached_input_tokens": 4,
        "output_tokens": 2,
        "reasoning_tokens": 0,
        "total_tokens": 12,
    }
    assert describe_tokens(cached) == "12 tokens so far (10 in, 4 cached; 2 out)"
