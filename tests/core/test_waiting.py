"""The decision object: given the job, the latest results and the clock, what to do next (no I/O)."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_openai_batch.core.job import Attempt, Chunk, CreateSpec, Job
from airflow_openai_batch.core.waiting import (
    PROGRESS_LOG_EVERY,
    Fault,
    Finish,
    GiveUp,
    Timeout,
    Wait,
    Waiting,
    Work,
)
from airflow_openai_batch.exceptions import (
    OpenAIBatchFailedError,
    OpenAIBatchOutcomeError,
    OpenAIBatchPollingError,
)
from tests.support.summaries import summary

T0 = 1_750_000_000.0
CAPACITY = [{"code": "token_limit_exceeded", "message": "Enqueued token limit reached"}]


def waiting(**kwargs: Any) -> Waiting:
    kwargs.setdefault("poll_interval", 10.0)
    kwargs.setdefault("max_poll_interval", 80.0)
    return Waiting(**kwargs)


def job_of(*ids: str, deadline: float | None = T0 + 3600) -> Job:
    job = Job.of_batches(ids)
    job.deadline = deadline
    return job


def test_live_batches_are_polled_and_final_ones_are_not() -> None:
    job = job_of("b1", "b2")
    decision = waiting().step(job, {"b1": summary("in_progress", 3), "b2": summary("completed", 10)}, T0)
    assert isinstance(decision, Wait)
    assert decision.poll == ("b1",) and decision.reason == "adaptive" and 0 < decision.after <= 10
    assert ("info", "b1: in_progress 3/10 (30.0%)") in decision.notes
    assert job.find("b2")[1].final and not job.find("b1")[1].final


def test_an_unchanged_batch_gets_a_progress_line_at_most_once_a_minute() -> None:
    job, wait = job_of("b1"), waiting()

    def progress(counts: int, status: str, at: float) -> list[str]:
        notes = wait.step(job, {"b1": summary(status, counts)}, at).notes
        return [text for level, text in notes if text.startswith("b1: ")]

    assert progress(3, "in_progress", T0) == ["b1: in_progress 3/10 (30.0%)"]
    assert progress(4, "in_progress", T0 + 2) == []  # same status, 2 s later
    assert progress(5, "in_progress", T0 + PROGRESS_LOG_EVERY - 1) == []
    assert progress(6, "in_progress", T0 + PROGRESS_LOG_EVERY)[0].startswith("b1: in_progress 6/10")
    assert progress(10, "finalizing", T0 + PROGRESS_LOG_EVERY + 1)[0].startswith("b1: finalizing")


def test_everything_final_finishes_with_the_outcome() -> None:
    job = job_of("b1", "b2")
    decision = waiting(retry_failed_requests=0).step(
        job, {"b1": summary("completed", 10), "b2": summary("expired", 6)}, T0
    )
    assert isinstance(decision, Finish) and decision.error is None
    assert list(decision.result) == ["b1", "b2"]
    assert decision.result["b1"]["attempt"] == 1 and decision.result["b1"]["retry_of"] is None
    assert "All 2 batch(es) are final: 1 completed, 1 expired" in decision.message


def test_fail_on_statuses_is_judged_on_each_chunks_last_batch() -> None:
    job = job_of("b1")
    decision = waiting(fail_on_statuses=("failed", "expired")).step(job, {"b1": summary("expired", 6)}, T0)
    assert isinstance(decision, Work) and decision.retry == (0,)  # the expired requests get a round first
    job.chunks[0].current.retried = 4
    job.chunks[0].attempts.append(Attempt(number=2, reason="retry", batch_id="b2", retry_of="b1"))
    decision = waiting(fail_on_statuses=("failed", "expired")).step(
        job, {"b2": summary("completed", 4, total=4)}, T0
    )
    assert isinstance(decision, Finish) and decision.error is None  # the expired batch was rescued
    assert "4 failed request(s) resubmitted in 1 retry batch(es), 4 of them rescued" in decision.message
    failed = job_of("b3")
    decision = waiting().step(
        failed, {"b3": summary("failed", total=0, errors=[{"code": "invalid_json_line"}])}, T0
    )
    assert isinstance(decision, Finish) and isinstance(decision.error, OpenAIBatchFailedError)


def test_transient_faults_back_off_within_the_budget_then_give_up() -> None:
    decide = waiting(fault_budget=2)
    job = job_of("b1")
    fault = Fault("InternalServerError (HTTP 500): boom", transient=True)
    first = decide.step(job, {"b1": fault}, T0)
    assert isinstance(first, Wait) and (first.reason, first.after) == ("backoff", 10.0)
    second = decide.step(job, {"b1": fault}, T0 + 10)
    assert isinstance(second, Wait) and second.after == 20.0
    assert (
        "warning",
        "b1: poll failed (InternalServerError (HTTP 500): boom); transient fault 2 of 2 allowed in a row",
    ) in second.notes
    gave_up = decide.step(job, {"b1": fault}, T0 + 30)
    assert isinstance(gave_up, GiveUp) and isinstance(gave_up.error, OpenAIBatchPollingError)
    assert "after 3 consecutive transient faults (fault_budget=2)" in str(gave_up.error)
    # A success in between resets the count; a Retry-After longer than the backoff is honoured.
    decide = waiting(fault_budget=2)
    decide.step(job, {"b1": fault}, T0)
    decide.step(job, {"b1": summary("in_progress", 1)}, T0 + 10)
    asked = decide.step(job, {"b1": Fault("RateLimitError (HTTP 429)", True, retry_after=300.0)}, T0 + 20)
    assert isinstance(asked, Wait) and (asked.reason, asked.after) == ("retry-after", 300.0)


def test_an_error_waiting_will_not_fix_gives_up_at_once() -> None:
    decision = waiting().step(
        job_of("b1"), {"b1": Fault("NotFoundError (HTTP 404): no such batch", False)}, T0
    )
    assert isinstance(decision, GiveUp) and "waiting will not fix" in str(decision.error)


def test_a_capacity_failure_waits_for_a_batch_of_the_job_to_finish() -> None:
    decide = waiting()
    job = job_of("b1", "b2")
    decide.step(job, {"b1": summary("in_progress", 1), "b2": summary("validating", total=0)}, T0)
    held = decide.step(
        job, {"b1": summary("in_progress", 5), "b2": summary("failed", total=0, errors=CAPACITY)}, T0 + 10
    )
    assert isinstance(held, Wait) and held.poll == ("b1",) and job.capacity_credits == 0
    freed = decide.step(job, {"b1": summary("completed", 10)}, T0 + 20)
    assert isinstance(freed, Work) and freed.recreate == (1,) and not freed.idle
    assert job.capacity_credits == 1
    decide.done(job, freed)
    assert job.capacity_credits == 0
    # The same decision from the job alone (what the worker does after a trigger's event).
    assert waiting().decide(Job.from_dict(job.to_dict()), T0 + 20) == waiting().decide(job, T0 + 20)


def test_a_capacity_failure_with_nothing_of_the_job_running_backs_off_then_recreates() -> None:
    decide = waiting(poll_interval=10, max_poll_interval=80)
    job = job_of("b1")
    held = decide.step(job, {"b1": summary("failed", total=0, errors=CAPACITY)}, T0)
    assert isinstance(held, Wait) and held.poll == () and (held.reason, held.after) == ("capacity", 10.0)
    assert isinstance(decide.step(job, {}, T0 + 5), Wait)
    work = decide.step(job, {}, T0 + 10)
    assert isinstance(work, Work) and work.recreate == (0,) and work.idle
    decide.done(job, work)
    job.chunks[0].attempts.append(Attempt(reason="capacity", batch_id="b2"))
    again = decide.step(job, {"b2": summary("failed", total=0, errors=CAPACITY)}, T0 + 11)
    assert isinstance(again, Wait) and again.after == 20.0  # twice as long after an idle round


def test_max_resubmits_bounds_the_recreations_and_a_never_created_chunk_fails_the_task() -> None:
    job = Job(
        chunks=[
            Chunk(
                key="k1",
                attempts=[Attempt(input_file_id="f1"), Attempt(reason="capacity", input_file_id="f1")],
                create=CreateSpec(input_file_id="f1", endpoint="/v1/chat/completions"),
            )
        ],
        deadline=T0 + 3600,
    )
    decision = waiting(max_resubmits=1).step(job, {}, T0)
    assert isinstance(decision, Finish) and isinstance(decision.error, OpenAIBatchFailedError)
    assert "could not be created within max_resubmits=1" in str(decision.error) and "k1 (file f1)" in str(
        decision.error
    )
    assert isinstance(waiting(max_resubmits=2).step(job, {}, T0), Wait)


@pytest.mark.parametrize(
    ("status", "completed", "failed", "retried", "number", "retry"),
    [
        ("completed", 8, 2, None, 1, True),
        ("expired", 6, 0, None, 1, True),
        ("completed", 10, 0, None, 1, False),  # nothing failed
        ("completed", 8, 2, 0, 1, False),  # a round found nothing retryable
        ("completed", 8, 2, None, 3, False),  # attempt 3 of 1 + 2 rounds: no round left
        ("cancelled", 4, 0, None, 1, False),  # cancelled on purpose
    ],
)
def test_retry_rounds(
    status: str, completed: int, failed: int, retried: int | None, number: int, retry: bool
) -> None:
    job = job_of("b1")
    job.chunks[0].attempts[0].number = number
    job.chunks[0].attempts[0].retried = retried
    decision = waiting(retry_failed_requests=2, fail_on_statuses=()).step(
        job, {"b1": summary(status, completed, failed)}, T0
    )
    assert isinstance(decision, Work if retry else Finish)
    if retry:
        assert decision.retry == (0,) and decision.recreate == ()


def test_the_deadline_cancels_what_runs_and_skips_rounds_not_started() -> None:
    job = job_of("b1", "b2", deadline=T0)
    decision = waiting().step(job, {"b1": summary("in_progress", 3), "b2": summary("completed", 8, 2)}, T0)
    assert isinstance(decision, Timeout) and decision.cancel == ("b1",)
    assert "Deadline passed with 1 batch(es) not final: b1 (in_progress)" in decision.message
    assert waiting(cancel_on_kill=False).decide(job, T0).cancel == ()  # type: ignore[union-attr]
    job.find("b1")[1].see(summary("completed", 10))
    finished = waiting().decide(job, T0)
    assert isinstance(finished, Finish) and finished.error is None
    assert finished.warnings == ("b2: the deadline passed before its failed requests could be retried",)
    # Before the deadline a wait never sleeps past it.
    early = job_of("b1", deadline=T0 + 3)
    assert waiting().step(early, {"b1": summary("in_progress", 3)}, T0).after == 3.0


def test_the_same_results_give_the_same_decisions_whether_or_not_the_job_travels_between_steps() -> None:
    """What makes deferred, poke and reschedule modes behave the same: every decision depends on the
    job (which travels in trigger kwargs, events and the task state), the results and the clock."""
    script = [
        {"b1": summary("in_progress", 1), "b2": summary("validating", total=0)},
        {"b1": summary("in_progress", 5), "b2": summary("failed", total=0, errors=CAPACITY)},
        {"b1": summary("completed", 8, 2)},
    ]
    kept, travelled = job_of("b1", "b2"), job_of("b1", "b2")
    decide = waiting()
    for step, results in enumerate(script):
        now = T0 + 10 * step
        here = decide.step(kept, results, now)
        travelled = Job.from_dict(travelled.to_dict())
        there = waiting().step(travelled, results, now)
        assert type(here) is type(there) and kept == travelled
        if isinstance(here, Work):
            assert (here.recreate, here.retry) == (there.recreate, there.retry) == ((1,), (0,))


def test_settings_are_validated() -> None:
    for kwargs in (
        {"fail_on_statuses": ("cancelling",)},
        {"max_resubmits": -1},
        {"retry_failed_requests": -1},
        {"fault_budget": -1},
        {"poll_interval": 0},
    ):
        with pytest.raises(ValueError):
            waiting(**kwargs)
    assert issubclass(OpenAIBatchFailedError, OpenAIBatchOutcomeError)
