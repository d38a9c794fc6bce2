"""The job state: one typed, versioned, JSON-safe structure, and the one reader of what upstream passes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from airflow_openai_batch.core.job import JOB_VERSION, Attempt, Chunk, CreateSpec, Job, read_job
from tests.support.summaries import summary


def chained_job() -> Job:
    """Chunk 1: b1 failed on the capacity limit, re-created as b2, whose failures b3 retries.
    Chunk 2: b4. Chunk 3: never created (its create was refused)."""
    job = Job(
        chunks=[
            Chunk(
                key="k1",
                attempts=[
                    Attempt(batch_id="b1", input_file_id="f1"),
                    Attempt(batch_id="b2", input_file_id="f1", reason="capacity"),
                    Attempt(number=2, reason="retry", batch_id="b3", input_file_id="f3", retry_of="b2"),
                ],
            ),
            Chunk(key="k2", attempts=[Attempt(batch_id="b4", input_file_id="f4")]),
            Chunk(
                key="k3",
                attempts=[Attempt(input_file_id="f5")],
                create=CreateSpec(
                    input_file_id="f5", endpoint="/v1/chat/completions", metadata={"aob_key": "k3"}
                ),
            ),
        ],
        deadline=1_000.0,
        started_at=10.0,
    )
    job.find("b1")[1].see({**summary("failed", total=0), "errors": [{"code": "token_limit_exceeded"}]})
    job.find("b2")[1].see(summary("completed", 8, 2))
    job.find("b2")[1].retried = 2
    job.find("b3")[1].see(summary("completed", 2, total=2))
    job.find("b4")[1].see(summary("in_progress", 3))
    return job


def test_the_wire_form_is_json_safe_versioned_and_reads_back_equal() -> None:
    job = chained_job()
    data = job.to_dict()
    assert data["version"] == JOB_VERSION
    assert json.loads(json.dumps(data)) == data
    assert Job.from_dict(json.loads(json.dumps(data))) == job
    # Defaults are left out: a chunk at its first attempt is small.
    assert Job.of_batches(["b9"]).to_dict() == {"version": 1, "chunks": [{"attempts": [{"batch_id": "b9"}]}]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"version": 2, "chunks": []}, "version 2"),
        ({"chunks": [{"attempts": [{"batch_id": "b"}]}]}, "version None"),
        ({"version": 1, "chunks": []}, "needs chunks"),
        ({"version": 1, "chunks": [{"attempts": []}]}, "every chunk an attempt"),
        ({"version": 1, "chunks": [{"attempts": [{"number": "two"}]}]}, "malformed"),
        ({"version": 1, "chunks": [{"attempts": [{"reason": "whim"}]}]}, "malformed"),
    ],
)
def test_a_job_from_elsewhere_is_refused_clearly(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Job.from_dict(data)


def test_views_of_the_chains() -> None:
    job = chained_job()
    assert job.first_batch_ids() == ["b1", "b4"]
    assert job.live_batch_ids() == ["b4"]
    first = job.chunks[0]
    assert [a.batch_id for a in first.outcome_attempts()] == ["b2", "b3"]
    assert first.replaced_by(first.attempts[1]) == ["b1"] and first.recreations == 1
    assert first.last_batch_id == "b3" and job.chunks[2].last_batch_id is None


def test_the_outcome_is_keyed_by_final_batch_ids_in_chunk_order_with_the_chains() -> None:
    job = chained_job()
    assert list(job.outcome()) == ["b2", "b3"]  # b4 is not final, chunk 3 was never created
    job.find("b4")[1].see(summary("completed", 10))
    outcome = job.outcome()
    assert list(outcome) == ["b2", "b3", "b4"]
    assert {b: (s["attempt"], s["retry_of"], s["replaces"]) for b, s in outcome.items()} == {
        "b2": (1, None, ["b1"]),
        "b3": (2, "b2", []),
        "b4": (1, None, []),
    }
    assert outcome["b2"]["request_counts"] == {"total": 10, "completed": 8, "failed": 2}


def test_read_job_from_ids() -> None:
    assert read_job("batch_1").first_batch_ids() == ["batch_1"]
    assert read_job(["b1", "b2", "b1", " b3 "]).first_batch_ids() == ["b1", "b2", "b3"]
    assert read_job(("b1",)).first_batch_ids() == ["b1"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "empty"),
        ({}, "empty"),
        ("", "non-empty strings"),
        (["ok", None], "non-empty strings"),
        ([1], "non-empty strings"),
        (42, "got int"),
        (b"b1", "got bytes"),
        ('["b1", "b2"]', "not batch ids: pass the upstream task's output"),
        ("['b1', 'b2']", "render_template_as_native_obj"),
    ],
)
def test_read_job_refuses_what_is_not_a_job(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_job(value)


def test_read_job_of_a_sensor_result_rebuilds_the_chains_in_any_order() -> None:
    outcome = chained_job().outcome()
    shuffled = {b: outcome[b] for b in ("b3", "b2")}
    for result in (outcome, shuffled):
        job = read_job(result)
        assert len(job.chunks) == 1
        attempts = job.chunks[0].attempts
        assert [(a.batch_id, a.number, a.reason, a.retry_of) for a in attempts] == [
            ("b1", 1, "submitted", None),
            ("b2", 1, "capacity", None),
            ("b3", 2, "retry", "b2"),
        ]
        assert [a.batch_id for a in job.chunks[0].outcome_attempts()] == ["b2", "b3"]
    # A result from before retries (no attempt / retry_of keys) is one chunk per batch.
    plain = read_job({"b1": {"status": "completed", "replaces": ["b0"]}, "b2": {}})
    assert [[a.batch_id for a in c.attempts] for c in plain.chunks] == [["b0", "b1"], ["b2"]]


def test_read_job_takes_the_upstream_job_that_made_exactly_those_batches() -> None:
    submitted = chained_job()
    submitted.chunks[0].attempts = submitted.chunks[0].attempts[:1]
    upstream = [None, {"unrelated": 1}, Job.of_batches(["x"]).to_dict(), submitted.to_dict()]
    job = read_job(["b1", "b4"], upstream=upstream)
    assert len(job.chunks) == 3 and job.chunks[2].create is not None  # the never-created chunk is known
    assert read_job(["b1"], upstream=upstream).first_batch_ids() == ["b1"]  # no match: just the ids
    assert read_job(submitted.to_dict()) == submitted
