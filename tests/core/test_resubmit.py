"""What the sensor resubmits: the retry policy, the retryable request lines picked out of a batch's results
by the Reconciler, the metadata of follow-up batches, and follow-ups found again after a crash."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airflow_openai_batch.core.job import Attempt, Chunk, Job
from airflow_openai_batch.core.reconcile import BatchResultFiles, Reconciler
from airflow_openai_batch.core.records import FailureColumns
from airflow_openai_batch.core.resubmit import (
    METADATA_ATTEMPT,
    METADATA_FOLLOWS,
    METADATA_KEY,
    FoundBatch,
    RetryLines,
    RetryPolicy,
    adopt_follow_ups,
    follow_up_metadata,
    may_have_follow_up,
)


def test_the_default_policy_retries_what_the_provider_failed_and_never_a_refused_request() -> None:
    policy = RetryPolicy.of(None)
    for status, code in (
        (None, "batch_expired"),
        (500, "server_error"),
        (429, "rate_limit_exceeded"),
        (503, "x"),
    ):
        assert policy.retryable(status, code), (status, code)
    for status, code in (
        (400, "invalid_request_error"),
        (None, "batch_cancelled"),
        (None, "missing"),
        (404, "x"),
    ):
        assert not policy.retryable(status, code), (status, code)
    # A 4xx line is never retried, whatever its code says.
    assert not RetryPolicy.of(["server_error"]).retryable(400, "server_error")
    assert RetryPolicy.of(["500", 408]) == RetryPolicy(frozenset(), frozenset({500, 408}))


@pytest.mark.parametrize("codes", [[400], [404, 500], [True], [1.5], [""]])
def test_a_policy_that_would_retry_refused_requests_is_refused(codes: list[Any]) -> None:
    with pytest.raises(ValueError, match="retry_error_codes"):
        RetryPolicy.of(codes)


def _request(custom_id: str) -> bytes:
    # Key order and spacing as a user's file may have them: the retry file must keep the bytes.
    return json.dumps(
        {
            "method": "POST",
            "custom_id": custom_id,
            "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": []},
        },
        separators=(", ", ": "),
    ).encode()


def _answer(custom_id: str, status: int, code: str | None = None) -> bytes:
    body: dict[str, Any] = {"error": {"code": code, "message": "no"}} if code else {"choices": []}
    response = {"status_code": status, "request_id": "r", "body": body}
    return json.dumps({"id": "x", "custom_id": custom_id, "response": response, "error": None}).encode()


def test_retry_lines_keep_the_retryable_request_lines_byte_for_byte(tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(7)]
    inputs = [_request(i) for i in ids]
    output = [_answer("c0", 200), _answer("c1", 200)]
    errors = [
        _answer("c2", 500, "server_error"),
        _answer("c3", 400, "invalid_value"),
        _answer("c4", 429, "rate_limit_exceeded"),
        json.dumps(
            {"id": "y", "custom_id": "c5", "response": None, "error": {"code": "batch_expired"}}
        ).encode(),
    ]  # c6 is answered nowhere: in an expired batch, that is batch_expired too
    lines = RetryLines(tmp_path / "retry.jsonl", RetryPolicy.of(None))
    files = BatchResultFiles(
        batch_id="b1", status="expired", input_lines=inputs, output_lines=output, error_lines=errors
    )
    Reconciler(lines, tmp_path / "work").add_batch(files)
    lines.close()
    assert (tmp_path / "retry.jsonl").read_bytes() == b"".join(inputs[i] + b"\n" for i in (2, 4, 5, 6))
    assert dict(lines.retried_by_code) == {"server_error": 1, "rate_limit_exceeded": 1, "batch_expired": 2}
    assert lines.retried == 4 and dict(lines.kept_by_code) == {"invalid_value": 1}


def test_follow_up_metadata() -> None:
    base = {"team": "x", METADATA_KEY: "k", METADATA_FOLLOWS: "old", METADATA_ATTEMPT: "1"}
    retry, dropped = follow_up_metadata(base, follows="b1", number=2, retry=True)
    assert retry == {"team": "x", METADATA_FOLLOWS: "b1", METADATA_ATTEMPT: "2"} and dropped == []
    again, _ = follow_up_metadata(base, follows="b1", number=1, retry=False)
    assert again[METADATA_KEY] == "k"  # a re-creation holds the whole chunk: a retried submit may reuse it
    full = {f"k{i}": "v" for i in range(16)}
    fitted, dropped = follow_up_metadata(full, follows="b1", number=2, retry=True)
    assert len(fitted) == 16 and dropped == ["k15", "k14"]


def found(batch_id: str, created_at: int, total: int | None = None, **metadata: str) -> FoundBatch:
    return FoundBatch(batch_id, f"file-{batch_id}", metadata, created_at, total)


def test_follow_ups_an_earlier_try_made_are_adopted_once() -> None:
    job = Job(
        chunks=[
            Chunk(key="k1", attempts=[Attempt(batch_id="b1")]),
            Chunk(key="k2", attempts=[Attempt(input_file_id="f2")]),  # its create was refused
            Chunk(key="k3", attempts=[Attempt(batch_id="b3")]),
        ]
    )
    job.find("b1")[1].see({"status": "failed", "request_counts": {"total": 0, "completed": 0, "failed": 0}})
    job.find("b3")[1].see(
        {"status": "in_progress", "request_counts": {"total": 5, "completed": 1, "failed": 0}}
    )
    assert [may_have_follow_up(c) for c in job.chunks] == [True, True, False]
    batches = [
        found("b1r", 10, **{METADATA_FOLLOWS: "b1", METADATA_ATTEMPT: "1"}),  # b1 re-created
        found("b1x", 20, 3, **{METADATA_FOLLOWS: "b1r", METADATA_ATTEMPT: "2"}),  # a retry round of b1r
        found("k2b", 15, **{METADATA_KEY: "k2", METADATA_ATTEMPT: "1"}),  # the refused chunk, created
        found("b3r", 16, **{METADATA_FOLLOWS: "b3", METADATA_ATTEMPT: "2"}),  # b3 is live: not followed
        found("other", 17, team="x"),
    ]
    notes = adopt_follow_ups(job, batches)
    assert [a.batch_id for a in job.chunks[0].attempts] == ["b1", "b1r"]  # b1r not seen final yet
    assert [a.batch_id for a in job.chunks[1].attempts] == [None, "k2b"]
    assert len(notes) == 2 and not adopt_follow_ups(job, batches)
    job.find("b1r")[1].see(
        {"status": "completed", "request_counts": {"total": 5, "completed": 2, "failed": 3}}
    )
    assert adopt_follow_ups(job, batches) == [
        "following batch b1x (retry round of b1r, attempt 2) made by an earlier try"
    ]
    retry = job.chunks[0].current
    assert (retry.batch_id, retry.number, retry.reason, retry.retry_of) == ("b1x", 2, "retry", "b1r")
    assert job.find("b1r")[1].retried == 3
    assert job.chunks[2].attempts == [job.find("b3")[1]]


def test_failures_given_as_columns_are_sorted_as_one_by_one(tmp_path: Path) -> None:
    codes = ["server_error", "invalid_value", "batch_expired", "rate_limit_exceeded"]
    statuses = [500, 400, None, 429]
    lines = [_request(f"c{i}") for i in range(4)]
    failures = FailureColumns(
        {"custom_id": [f"c{i}" for i in range(4)], "status_code": statuses, "error_code": codes}, lines
    )
    one = RetryLines(tmp_path / "one.jsonl", RetryPolicy.of(None))
    for record, line in zip(failures.records(), lines, strict=True):
        one.write_failure(record, line)
    one.close()
    many = RetryLines(tmp_path / "many.jsonl", RetryPolicy.of(None))
    many.write_failures(failures)
    many.close()
    assert (tmp_path / "many.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert (tmp_path / "many.jsonl").read_bytes() == b"".join(lines[i] + b"\n" for i in (0, 2, 3))
    assert many.retried_by_code == one.retried_by_code and many.kept_by_code == one.kept_by_code
