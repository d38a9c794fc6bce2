"""``input_expires_after``: the submit's input files are uploaded with an expiry the emulator sees."""

from __future__ import annotations

import io
import json

import openai
import pytest

from airflow_openai_batch.exceptions import OpenAIBatchInputError
from airflow_openai_batch.hooks.batch import OpenAIBatchHook
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator

CHAT = "/v1/chat/completions"


def _requests(n: int) -> list[dict]:
    return [
        {
            "custom_id": f"r{i}",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("given", [7200, "7200"])  # a rendered template arrives as a string
def test_input_files_carry_the_expiry_to_the_api(emulator, make_context, given) -> None:
    op = OpenAIBatchSubmitOperator(
        task_id="submit", requests=_requests(3), endpoint=CHAT, input_expires_after=given
    )
    assert "input_expires_after" in op.template_fields
    [batch_id] = op.execute(make_context())
    client = emulator.client()
    file = client.files.retrieve(client.batches.retrieve(batch_id).input_file_id)
    assert file.expires_at == file.created_at + 7200


def test_without_it_openai_keeps_batch_input_for_30_days(emulator, make_context) -> None:
    op = OpenAIBatchSubmitOperator(task_id="submit", requests=_requests(2), endpoint=CHAT)
    [batch_id] = op.execute(make_context())
    client = emulator.client()
    file = client.files.retrieve(client.batches.retrieve(batch_id).input_file_id)
    assert file.expires_at == file.created_at + 30 * 86400


@pytest.mark.parametrize("bad", [3599, 2_592_001, "soon", True, -1])
def test_out_of_range_is_an_input_error_before_anything_is_uploaded(emulator, make_context, bad) -> None:
    op = OpenAIBatchSubmitOperator(
        task_id="submit", requests=_requests(2), endpoint=CHAT, input_expires_after=bad
    )
    with pytest.raises(OpenAIBatchInputError, match="input_expires_after") as caught:
        op.execute(make_context())
    assert "3,600 (1 hour) to 2,592,000 (30 days)" in str(caught.value)
    assert emulator.stats()["calls"]["files.create"] == 0


def test_hook_upload_sends_expires_after_and_the_emulator_enforces_the_range(emulator) -> None:
    hook = OpenAIBatchHook()
    line = json.dumps({"custom_id": "a", "method": "POST", "url": CHAT, "body": {"model": "m"}}).encode()
    file = hook.upload_file(io.BytesIO(line + b"\n"), expires_after=3600)
    assert file.expires_at == file.created_at + 3600
    with pytest.raises(openai.BadRequestError, match=r"expires_after\.seconds"):
        hook.upload_file(io.BytesIO(line + b"\n"), expires_after=60)
