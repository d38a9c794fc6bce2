"""Submit with a response schema and a cost estimate, against the emulator over HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel

from airflow_openai_batch.exceptions import OpenAIBatchBudgetError, OpenAIBatchInputError
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"


class Ticket(BaseModel):
    category: Literal["billing", "bug", "other"]
    urgent: bool
    summary: str | None


def chat_line(i: int, **body: object) -> dict:
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": CHAT,
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Ticket {i}"}], **body},
    }


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_submit(context: dict, **kwargs: object) -> list[str]:
    return OpenAIBatchSubmitOperator(task_id="submit", **kwargs).execute(context)


def results(emulator, batch_id: str) -> tuple[list[dict], list[dict]]:
    """The batch's input lines and result lines, once the emulator has finished it."""
    client = emulator.client()
    emulator.advance(3600)
    batch = client.batches.retrieve(batch_id)
    assert batch.status == "completed", batch.status
    inputs = [json.loads(x) for x in client.files.content(batch.input_file_id).text.splitlines()]
    outputs = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    return inputs, outputs


def test_a_pydantic_schema_reaches_every_chat_line_and_the_answers_fit_it(
    emulator, make_context, tmp_path, capfd
) -> None:
    own = {"type": "json_object"}
    rows = [chat_line(i) for i in range(5)] + [chat_line(5, response_format=own)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    (batch_id,) = run_submit(make_context(), requests=str(path), response_schema=Ticket)
    assert "response_schema put into 5 requests; 1 kept a format of their own" in capfd.readouterr().out
    inputs, outputs = results(emulator, batch_id)
    formats = {x["custom_id"]: x["body"]["response_format"] for x in inputs}
    assert formats.pop("req-5") == own
    assert {f["json_schema"]["name"] for f in formats.values()} == {"Ticket"}
    assert all(f["json_schema"]["strict"] is True for f in formats.values())
    answers = {x["custom_id"]: x["response"]["body"]["choices"][0]["message"]["content"] for x in outputs}
    for cid in formats:
        Ticket.model_validate_json(answers[cid])  # raises if the answer does not fit


def test_a_json_schema_reaches_responses_lines_as_text_format(emulator, make_context) -> None:
    schema = {"name": "label", "schema": {"type": "object", "properties": {"label": {"type": "string"}}}}
    rows = [{"custom_id": f"r{i}", "body": {"model": "gpt-4o-mini", "input": f"text {i}"}} for i in range(3)]
    (batch_id,) = run_submit(make_context(), requests=rows, endpoint=RESPONSES, response_schema=schema)
    inputs, outputs = results(emulator, batch_id)
    assert all(x["body"]["text"]["format"]["name"] == "label" for x in inputs)
    for out in outputs:
        texts = [
            part["text"]
            for item in out["response"]["body"]["output"]
            if item.get("type") == "message"
            for part in item["content"]
        ]
        assert isinstance(json.loads(texts[0])["label"], (str, type(None)))


@pytest.mark.parametrize("endpoint", ["/v1/embeddings", "/v1/completions"])
def test_a_schema_for_another_endpoint_is_refused_before_upload(emulator, make_context, endpoint) -> None:
    rows = [{"custom_id": "e0", "body": {"model": "text-embedding-3-small", "input": "x", "prompt": "x"}}]
    with pytest.raises(OpenAIBatchInputError) as info:
        run_submit(make_context(), requests=rows, endpoint=endpoint, response_schema=Ticket)
    assert "response_schema" in str(info.value) and endpoint in str(info.value)
    assert emulator.stats()["files"] == 0 and emulator.stats()["batches"] == 0


def test_the_estimate_is_logged_pushed_and_in_the_chunk_lines(
    emulator, make_context, tmp_path, capfd
) -> None:
    rows = [chat_line(i, max_completion_tokens=50) for i in range(6)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    context = make_context()
    run_submit(context, requests=str(path), max_requests_per_batch=3)
    logged = capfd.readouterr().out
    estimate = context["ti"].xcoms["cost_estimate"]
    assert estimate["requests"] == 6 and estimate["output_tokens_max"] == 300
    assert [c["requests"] for c in estimate["chunks"]] == [3, 3]
    assert estimate["cost_usd"]["min"] > 0 and estimate["cost_usd"]["max"] > estimate["cost_usd"]["min"]
    assert "Cost estimate at batch prices" in logged and "total" in logged
    for chunk in estimate["chunks"]:
        assert chunk["input_tokens"] > 0
        assert f"Chunk {chunk['chunk'] + 1}/2: 3 requests" in logged
        assert f"~{chunk['input_tokens']:,} prompt tokens" in logged
    assert "~0 prompt tokens" not in logged


def test_a_budget_cap_stops_the_submit_before_any_upload(emulator, make_context, tmp_path) -> None:
    rows = [chat_line(i, max_completion_tokens=50) for i in range(4)]
    rows[2] = chat_line(2)  # no output cap: bounded by the model's limit
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    context = make_context()
    with pytest.raises(OpenAIBatchBudgetError) as info:
        run_submit(context, requests=str(path), max_cost_usd=0.001)
    message = str(info.value)
    assert "above max_cost_usd=" in message and "nothing was uploaded" in message
    assert "lines 3" in message  # the unbounded line, by its number
    assert info.value.estimate["unbounded_requests"] == 1
    assert context["ti"].xcoms["cost_estimate"]["prompt_tokens_counted_by"] == "o200k_base"
    stats = emulator.stats()
    assert stats["files"] == 0 and stats["batches"] == 0
    assert stats["calls"].get("files.create", 0) == 0


def test_the_expected_cost_cap_and_a_cap_that_holds(emulator, make_context, tmp_path) -> None:
    rows = [chat_line(i) for i in range(4)]  # all unbounded
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(OpenAIBatchBudgetError) as info:
        run_submit(make_context(), requests=str(path), max_cost_usd_expected="0.000001")  # templated
    assert "max_cost_usd_expected" in str(info.value)
    assert emulator.stats()["files"] == 0
    ids = run_submit(make_context(), requests=str(path), max_cost_usd_expected=1.0)
    assert len(ids) == 1


def test_a_cap_that_is_not_a_number_is_an_input_error(emulator, make_context) -> None:
    with pytest.raises(OpenAIBatchInputError) as info:
        run_submit(make_context(), requests=[chat_line(0)], max_cost_usd="lots")
    assert "max_cost_usd" in str(info.value) and emulator.stats()["files"] == 0
