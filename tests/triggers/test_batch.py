"""OpenAIBatchTrigger: serialization, every status path, faults, deadline, kill, adaptive polling cost.

Unit tests script the hook; the rest run against the emulator over loopback. Nothing sleeps to
synchronise: time is a fake clock whose sleep advances the emulator's virtual clock.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx2
import openai
import pytest

from airflow_openai_batch.core.job import Job
from airflow_openai_batch.core.progress import (
    AdaptivePollSchedule,
    backoff_delay,
    batch_summary,
    check_outcome,
    classify_api_error,
    progress_line,
    retry_after_seconds,
)
from airflow_openai_batch.emulator.simulated_time import SimulatedTime
from airflow_openai_batch.exceptions import (
    OpenAIBatchCancelledError,
    OpenAIBatchFailedError,
    OpenAIBatchOutcomeError,
)
from airflow_openai_batch.triggers.batch import OpenAIBatchTrigger, polling_hook
from tests.conftest import TEST_API_KEY, connection_uri_json
from tests.support.triggers import (
    T0,
    FakeTime,
    ScriptedHook,
    StopsAtFirstWait,
    api_error,
    cancel_at_first_wait,
    create_sized_batches,
    first_event,
    first_event_async,
    make_batch,
    make_trigger,
    virtual_time,
)

# -- helpers -------------------------------------------------------------------------------------


# -- serialization -------------------------------------------------------------------------------


def test_serialize_is_json_safe_and_rebuilds_an_equal_trigger():
    trigger = OpenAIBatchTrigger(
        batch_ids=["batch_1", "batch_2"],
        conn_id="my_conn",
        poll_interval=5,
        max_poll_interval=50,
        deadline=T0 + 3600,
        fail_on_statuses=("failed",),
        cancel_on_kill=False,
        fault_budget=3,
        started_at=T0,
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_openai_batch.triggers.batch.OpenAIBatchTrigger"
    assert json.loads(json.dumps(kwargs)) == kwargs
    from airflow.providers.common.compat.module_loading import import_string

    rebuilt = import_string(classpath)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert kwargs == {
        "conn_id": "my_conn",
        "poll_interval": 5.0,
        "max_poll_interval": 50.0,
        "fail_on_statuses": ["failed"],
        "cancel_on_kill": False,
        "fault_budget": 3,
        "max_resubmits": 10,
        "retry_failed_requests": 2,
        "job": {
            "version": 1,
            "chunks": [{"attempts": [{"batch_id": "batch_1"}]}, {"attempts": [{"batch_id": "batch_2"}]}],
            "deadline": T0 + 3600,
            "started_at": T0,
        },
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_ids": []},
        {"batch_ids": ["ok", ""]},
        {"batch_ids": ["b"], "poll_interval": 0},
        {"batch_ids": ["b"], "poll_interval": 10, "max_poll_interval": 5},
        {"batch_ids": ["b"], "fault_budget": -1},
        {"batch_ids": ["b"], "retry_failed_requests": -1},
        {},
        {"job": {"version": 99, "chunks": []}},
    ],
)
def test_trigger_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        OpenAIBatchTrigger(**kwargs)


# -- status paths (scripted hook) ----------------------------------------------------------------


def test_completed_batch_after_progress_gives_success_with_summary():
    hook = ScriptedHook(
        {
            "batch_a": [
                make_batch("batch_a", "validating", total=0),
                make_batch("batch_a", "in_progress", completed=4),
                make_batch("batch_a", "finalizing", completed=9, failed=1),
                make_batch(
                    "batch_a",
                    "completed",
                    completed=9,
                    failed=1,
                    output_file_id="file-out",
                    error_file_id="file-err",
                ),
            ]
        }
    )
    fake = FakeTime()
    trigger = make_trigger(fake, hook, deadline=T0 + 3600)
    payload = first_event(trigger)
    assert payload["status"] == "success"
    assert payload["batches"] == {
        "batch_a": {
            "status": "completed",
            "request_counts": {"total": 10, "completed": 9, "failed": 1},
            "output_file_id": "file-out",
            "error_file_id": "file-err",
            "replaces": [],
            "model": "gpt-4o-mini",
            "attempt": 1,
            "retry_of": None,
        }
    }
    assert [c for c in hook.calls if c[0] == "retrieve"] == [("retrieve", "batch_a")] * 4
    assert hook.closed, "run() must close the client before yielding its event"
    assert len(fake.sleeps) == 3


def test_failed_batch_is_final_success_event_carrying_its_errors():
    errors = {"object": "list", "data": [{"code": "invalid_json_line", "message": "bad", "line": 3}]}
    hook = ScriptedHook({"batch_a": [make_batch("batch_a", "failed", total=0, errors=errors)]})
    payload = first_event(make_trigger(FakeTime(), hook))
    assert payload["status"] == "success"  # final; the sensor decides that `failed` fails the task
    assert payload["batches"]["batch_a"]["status"] == "failed"
    assert payload["batches"]["batch_a"]["errors"] == [
        {"code": "invalid_json_line", "message": "bad", "line": 3}
    ]


def test_cancelling_is_not_final_but_cancelled_is():
    hook = ScriptedHook(
        {
            "batch_a": [
                make_batch("batch_a", "cancelling", completed=3),
                make_batch("batch_a", "cancelled", completed=3),
            ]
        }
    )
    payload = first_event(make_trigger(FakeTime(), hook))
    assert payload["batches"]["batch_a"]["status"] == "cancelled"
    assert len(hook.calls) == 2


def test_expired_batch_carries_a_warning():
    hook = ScriptedHook(
        {"batch_a": [make_batch("batch_a", "expired", completed=6, output_file_id="file-out")]}
    )
    payload = first_event(make_trigger(FakeTime(), hook))
    summary = payload["batches"]["batch_a"]
    assert summary["status"] == "expired"
    assert "expired after 6 of 10" in summary["warnings"][0]
    assert "batch_a: expired" in payload["message"] and "Warnings" in payload["message"]


def test_completed_with_zero_successes_is_reported():
    hook = ScriptedHook(
        {"batch_a": [make_batch("batch_a", "completed", completed=0, failed=10, error_file_id="file-err")]}
    )
    payload = first_event(make_trigger(FakeTime(), hook))
    summary = payload["batches"]["batch_a"]
    assert summary["warnings"] == [
        "completed with 0 successful requests (10 of 10 failed); see error file file-err"
    ]
    assert "0 successful requests" in payload["message"]


def test_mixed_batches_each_polled_until_final_and_no_more():
    hook = ScriptedHook(
        {
            "b_done": [make_batch("b_done", "completed", completed=10, output_file_id="f1")],
            "b_slow": [
                make_batch("b_slow", "in_progress", completed=2),
                make_batch("b_slow", "in_progress", completed=5),
                make_batch("b_slow", "expired", completed=7),
            ],
            "b_fail": [make_batch("b_fail", "validating", total=0), make_batch("b_fail", "failed", total=0)],
        }
    )
    payload = first_event(make_trigger(FakeTime(), hook, batch_ids=["b_done", "b_slow", "b_fail"]))
    assert payload["status"] == "success"
    assert {b: s["status"] for b, s in payload["batches"].items()} == {
        "b_done": "completed",
        "b_slow": "expired",
        "b_fail": "failed",
    }
    retrieves = [bid for kind, bid in hook.calls if kind == "retrieve"]
    # A final batch is never polled again.
    assert retrieves.count("b_done") == 1
    assert retrieves.count("b_fail") == 2
    assert retrieves.count("b_slow") == 3
    assert "1 completed, 1 expired, 1 failed" in payload["message"]


def test_failed_requests_end_the_wait_with_a_resubmit_event_for_the_worker():
    hook = ScriptedHook(
        {
            "batch_a": [
                make_batch("batch_a", "in_progress", completed=4),
                make_batch("batch_a", "completed", completed=8, failed=2, error_file_id="file-err"),
            ],
            "batch_b": [make_batch("batch_b", "in_progress", completed=1)],
        }
    )
    trigger = make_trigger(FakeTime(), hook, batch_ids=["batch_a", "batch_b"], retry_failed_requests=2)
    payload = first_event(trigger)
    # The round (download, filter, upload, create) is the worker's: the trigger hands the job back.
    assert payload["status"] == "resubmit"
    assert payload["message"] == "retry round for the failed requests of batch_a"
    job = Job.from_dict(payload["job"])
    assert job.find("batch_a")[1].summary["request_counts"]["failed"] == 2
    assert job.live_batch_ids() == ["batch_b"]
    assert [c for c in hook.calls if c[0] == "retrieve"].count(("retrieve", "batch_a")) == 2


def test_capacity_freed_by_a_finished_batch_ends_the_wait_with_a_resubmit_event():
    capacity = {
        "object": "list",
        "data": [{"code": "token_limit_exceeded", "message": "Enqueued token limit"}],
    }
    hook = ScriptedHook(
        {
            "b1": [make_batch("b1", "in_progress", completed=1), make_batch("b1", "completed", completed=10)],
            "b2": [make_batch("b2", "failed", total=0, errors=capacity)],
        }
    )
    payload = first_event(make_trigger(FakeTime(), hook, batch_ids=["b1", "b2"]))
    assert payload["status"] == "resubmit" and "re-creating 1 chunk(s)" in payload["message"]
    assert Job.from_dict(payload["job"]).capacity_credits == 1


# -- faults (scripted hook) ----------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 404])
def test_non_transient_4xx_is_an_error_event_at_once(status):
    hook = ScriptedHook({"batch_a": [api_error(status), make_batch("batch_a", "completed")]})
    payload = first_event(make_trigger(FakeTime(), hook))
    assert payload["status"] == "error"
    assert f"HTTP {status}" in payload["message"] and "batch_a" in payload["message"]
    assert len(hook.calls) == 1


def test_transient_faults_are_retried_with_backoff_then_succeed():
    request = httpx2.Request("GET", "http://127.0.0.1/v1/batches/b")
    faults = [
        api_error(500),
        openai.APIConnectionError(request=request),
        openai.APITimeoutError(request=request),
        api_error(503),
    ]
    hook = ScriptedHook({"batch_a": [*faults, make_batch("batch_a", "completed", completed=10)]})
    fake = FakeTime()
    trigger = make_trigger(fake, hook, poll_interval=1.0, max_poll_interval=100.0, fault_budget=4)
    payload = first_event(trigger)
    assert payload["status"] == "success"
    # Exponential backoff: each consecutive fault waits twice as long.
    assert fake.sleeps == [1.0, 2.0, 4.0, 8.0]
    assert [reason for _, reason in trigger._waits] == ["backoff"] * 4


def test_fault_budget_exhausted_gives_error_event():
    hook = ScriptedHook({"batch_a": [api_error(500)]})
    fake = FakeTime()
    payload = first_event(make_trigger(fake, hook, fault_budget=3))
    assert payload["status"] == "error"
    assert "after 4 consecutive transient faults (fault_budget=3)" in payload["message"]
    assert len(hook.calls) == 4


def test_retry_after_header_is_honoured():
    hook = ScriptedHook(
        {"batch_a": [api_error(429, {"retry-after": "30"}), make_batch("batch_a", "completed", completed=10)]}
    )
    fake = FakeTime()
    trigger = make_trigger(fake, hook, poll_interval=1.0, max_poll_interval=10.0)
    assert first_event(trigger)["status"] == "success"
    # Honoured even beyond max_poll_interval: the server asked for it.
    assert trigger._waits == [(30.0, "retry-after")]


def test_unexpected_exception_becomes_error_event():
    hook = ScriptedHook({"batch_a": [RuntimeError("boom")]})
    payload = first_event(make_trigger(FakeTime(), hook))
    assert payload["status"] == "error"
    assert "boom" in payload["message"]


# -- deadline and kill (scripted hook) -----------------------------------------------------------


def test_deadline_passed_gives_timeout_and_cancels_live_batches():
    hook = ScriptedHook(
        {
            "b1": [make_batch("b1", "in_progress", completed=1)],
            "b2": [make_batch("b2", "completed", completed=10)],
        }
    )
    fake = FakeTime()
    trigger = make_trigger(
        fake, hook, batch_ids=["b1", "b2"], deadline=T0 + 1.0, poll_interval=0.3, max_poll_interval=0.3
    )
    payload = first_event(trigger)
    assert payload["status"] == "timeout"
    assert ("cancel", "b1") in hook.calls and ("cancel", "b2") not in hook.calls
    assert payload["batches"]["b1"]["status"] == "cancelling"
    assert "b1 (in_progress)" in payload["message"]
    # Never sleeps past the deadline: waits of at most 0.3 s (aligned on the 0.3 s grid, so the first one
    # may be shorter), the last one cut to end exactly at the deadline.
    assert fake.now == pytest.approx(T0 + 1.0)
    assert all(0 < s <= 0.3 + 1e-9 for s in fake.sleeps), fake.sleeps
    assert trigger._waits[-1][1] == "deadline"
    assert fake.sleeps[-1] < 0.3


def test_deadline_without_cancel_on_kill_leaves_batches_running():
    hook = ScriptedHook({"b1": [make_batch("b1", "in_progress", completed=1)]})
    payload = first_event(
        make_trigger(FakeTime(), hook, batch_ids=["b1"], deadline=T0 - 5, cancel_on_kill=False)
    )
    assert payload["status"] == "timeout"
    assert [c for c in hook.calls if c[0] == "cancel"] == []
    assert "left running" in payload["message"]


def test_deadline_already_passed_still_reports_final_batches_as_success():
    # A triggerer restarting after the deadline must not cancel or fail batches that did finish.
    hook = ScriptedHook({"b1": [make_batch("b1", "completed", completed=10)]})
    payload = first_event(make_trigger(FakeTime(), hook, batch_ids=["b1"], deadline=T0 - 60))
    assert payload["status"] == "success"
    assert [c for c in hook.calls if c[0] == "cancel"] == []


def test_on_kill_cancels_only_non_final_batches_and_respects_the_flag():
    async def scenario(cancel_on_kill: bool) -> ScriptedHook:
        hook = ScriptedHook(
            {
                "b1": [make_batch("b1", "in_progress", completed=1)],
                "b2": [make_batch("b2", "completed", completed=10)],
            }
        )
        trigger = make_trigger(
            StopsAtFirstWait(),
            hook,
            batch_ids=["b1", "b2"],
            poll_interval=30,
            max_poll_interval=30,
            cancel_on_kill=cancel_on_kill,
        )
        await cancel_at_first_wait(trigger)  # what the triggerer does on a user action, then on_kill()
        await trigger.on_kill()
        await trigger.cleanup()
        assert hook.closed
        return hook

    hook = asyncio.run(scenario(True))
    assert [c for c in hook.calls if c[0] == "cancel"] == [("cancel", "b1")]
    hook = asyncio.run(scenario(False))
    assert [c for c in hook.calls if c[0] == "cancel"] == []


# -- core helpers --------------------------------------------------------------------------------


def test_progress_line_formats():
    running = batch_summary(make_batch("b", "in_progress", total=50_000, completed=12_333, failed=12))
    assert progress_line("batch_abc", running) == "batch_abc: in_progress 12,345/50,000 (24.7%), 12 failed"
    finalizing = batch_summary(make_batch("b", "finalizing", total=50_000, completed=50_000))
    line = progress_line("batch_abc", finalizing)
    assert line.startswith("batch_abc: finalizing 50,000/50,000 (100.0%)")
    assert "results are being written" in line
    assert progress_line("b", batch_summary(make_batch("b", "validating", total=0))) == "b: validating"
    assert "about 1h 00m left" in progress_line("b", running, eta_seconds=3600)
    zero = batch_summary(make_batch("b", "completed", total=5, failed=5))
    assert "WARNING: completed with 0 successful requests" in progress_line("b", zero)


def test_summary_and_progress_line_carry_the_batchs_own_usage():
    usage = {
        "input_tokens": 1_000_000,
        "input_tokens_details": {"cached_tokens": 200_000},
        "output_tokens": 234_567,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 1_234_567,
    }
    running = batch_summary(make_batch("b", "in_progress", total=50, completed=20, usage=usage))
    assert running["model"] == "gpt-4o-mini"
    assert running["usage"] == {
        "input_tokens": 1_000_000,
        "cached_input_tokens": 200_000,
        "output_tokens": 234_567,
        "reasoning_tokens": 0,
        "total_tokens": 1_234_567,
    }
    assert progress_line("b", running).endswith(
        "; 1,234,567 tokens so far (1,000,000 in, 200,000 cached; 234,567 out)"
    )
    done = batch_summary(make_batch("b", "completed", total=50, completed=50, usage=usage))
    assert "tokens so far" not in progress_line("b", done)
    unreported = batch_summary(make_batch("b", "in_progress", total=50, completed=20))
    assert "usage" not in unreported and "tokens" not in progress_line("b", unreported)


def test_summary_tolerates_azure_quirks():
    summary = batch_summary(
        {
            "status": "in_progress",
            "request_counts": {"total": None, "completed": None, "failed": None},
            "output_file_id": "",
            "error_file_id": "",
        }
    )
    assert summary["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert summary["output_file_id"] is None and summary["error_file_id"] is None


def test_summary_caps_errors():
    errors = {"data": [{"code": "invalid_json_line", "line": i, "message": "x"} for i in range(1, 101)]}
    summary = batch_summary(make_batch("b", "failed", total=0, errors=errors))
    assert len(summary["errors"]) == 20 and summary["errors_total"] == 100


def test_check_outcome_picks_the_distinct_error_class():
    done = batch_summary(make_batch("ok", "completed", completed=10))
    failed = batch_summary(make_batch("bad", "failed", total=0, errors={"data": [{"code": "empty_file"}]}))
    cancelled = batch_summary(make_batch("gone", "cancelled", completed=3))
    expired = batch_summary(make_batch("late", "expired", completed=3))
    fail_on = ("failed", "cancelled")
    with pytest.raises(OpenAIBatchFailedError, match=r"bad \(empty_file\)") as err:
        check_outcome({"ok": done, "bad": failed, "gone": cancelled}, fail_on)
    assert set(err.value.batches) == {"bad", "gone"}
    with pytest.raises(OpenAIBatchCancelledError, match="gone"):
        check_outcome({"ok": done, "gone": cancelled}, fail_on)
    warnings = check_outcome({"ok": done, "late": expired}, fail_on)
    assert len(warnings) == 1 and warnings[0].startswith("late: expired")
    with pytest.raises(OpenAIBatchOutcomeError, match="late"):
        check_outcome({"late": expired}, ("expired",))
    with pytest.raises(ValueError, match="not final"):
        check_outcome({"x": batch_summary(make_batch("x", "cancelling"))}, fail_on)


def test_error_classification_and_retry_after():
    request = httpx2.Request("GET", "http://127.0.0.1/")
    assert classify_api_error(api_error(429)) == "transient"
    assert classify_api_error(api_error(500)) == "transient"
    assert classify_api_error(openai.APIConnectionError(request=request)) == "transient"
    assert classify_api_error(openai.APITimeoutError(request=request)) == "transient"
    assert classify_api_error(api_error(401)) == "fatal"
    assert classify_api_error(api_error(404)) == "fatal"
    assert classify_api_error(ValueError("x")) == "fatal"
    assert retry_after_seconds(api_error(429, {"retry-after-ms": "1500"})) == 1.5
    assert retry_after_seconds(api_error(429, {"retry-after": "7"})) == 7.0
    assert retry_after_seconds(api_error(429)) is None
    assert [backoff_delay(n, 1.0, 10.0) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 10.0]


def test_schedule_stretches_while_idle_and_tightens_near_the_end():
    schedule = AdaptivePollSchedule(poll_interval=10, max_poll_interval=100)

    def step(now: float, **counts: Any) -> float:
        status = counts.pop("status", "in_progress")
        schedule.observe({"b": batch_summary(make_batch("b", status, **counts))}, now)
        return schedule.next_interval()

    assert step(0, status="validating", total=0) == 10  # first sight counts as a change
    assert step(10, status="validating", total=0) == 20
    assert step(30, status="validating", total=0) == 40
    assert step(70, status="validating", total=0) == 80
    assert step(150, status="validating", total=0) == 100
    assert step(250, status="validating", total=0) == 100
    # Processing at 1 request/s from t=350: the wait is half the projected time left.
    assert step(350, total=1000, completed=0) == 100
    assert step(450, total=1000, completed=100) == 100  # 900 s left -> capped at max
    assert step(1250, total=1000, completed=900) == 50  # 100 s left -> 50 s
    assert step(1300, total=1000, completed=950) == 25
    assert step(1325, status="finalizing", total=1000, completed=1000) == 10
    # Never past the deadline.
    assert schedule.next_interval(now=1000, deadline=1003) == 3


def test_schedule_near_done_without_rate_polls_at_base():
    schedule = AdaptivePollSchedule(poll_interval=5, max_poll_interval=500)
    schedule.interval = 500
    schedule.observe({"b": batch_summary(make_batch("b", "in_progress", total=100, completed=95))}, 0)
    assert schedule.next_interval() == 5


# -- against the emulator ------------------------------------------------------------------------


def create_batches(server: Any, count: int, lines: int = 3) -> list[str]:
    return create_sized_batches(server, [lines] * count)


def test_rebuilt_trigger_runs_to_its_event_and_never_serializes_the_key(emulator):
    ids = create_batches(emulator, 2)
    original = OpenAIBatchTrigger(
        batch_ids=ids,
        poll_interval=0.01,
        max_poll_interval=0.05,
        deadline=time.time() + 60,
        started_at=time.time(),
    )
    from airflow.providers.common.compat.module_loading import import_string

    classpath, kwargs = original.serialize()
    rebuilt = import_string(classpath)(**json.loads(json.dumps(kwargs)))
    payload = first_event(rebuilt)
    assert payload["status"] == "success"
    assert set(payload["batches"]) == set(ids)
    assert all(s["status"] == "completed" for s in payload["batches"].values())
    # The key is used (the hook fetched the connection) but appears in no serialized form.
    for text in (json.dumps(rebuilt.serialize()), repr(rebuilt), json.dumps(payload)):
        assert TEST_API_KEY not in text
        assert "sk-" not in text


def test_twenty_batches_complete_in_one_trigger(emulator):
    emulator.configure(rate=200.0, validation_seconds=0.5, finalizing_seconds=0.5)
    ids = create_batches(emulator, 20, lines=50)
    fake = virtual_time(emulator)
    trigger = make_trigger(
        fake, batch_ids=ids, poll_interval=0.05, max_poll_interval=0.5, deadline=fake.now + 3600
    )
    payload = first_event(trigger)
    assert payload["status"] == "success", payload["message"]
    assert len(payload["batches"]) == 20
    for summary in payload["batches"].values():
        assert summary["status"] == "completed"
        assert summary["request_counts"] == {"total": 50, "completed": 50, "failed": 0}
        assert summary["output_file_id"]
    # One trigger, and final batches drop out of the polling.
    assert emulator.stats()["batches.retrieve"] < 20 * trigger.polls


def test_survives_a_thirty_percent_fault_storm(emulator, monkeypatch):
    emulator.configure(
        rate=100.0,
        validation_seconds=1.0,
        finalizing_seconds=1.0,
        fault_rate=0.3,
        fault_routes=("batches.retrieve", "batches.list"),
        fault_kinds=("429", "500", "drop"),
        retry_after=0.01,
    )
    many = create_batches(emulator, 10, lines=50)
    few = create_batches(emulator, 2, lines=50)
    emulator.configure(time_scale=0.0)
    clock = SimulatedTime(emulator.stats()["now"], emulator.advance)
    # Two triggers in one loop: ten batches are polled by list walks (one page for all), two by
    # retrieves (on a second connection, so a poll board of their own). The default fault budget: a 30%
    # storm must not need a special setting.
    monkeypatch.setenv("AIRFLOW_CONN_OPENAI_OTHER", connection_uri_json(emulator.base_url))
    triggers = [
        make_trigger(
            clock,
            batch_ids=ids,
            conn_id=conn_id,
            poll_interval=0.05,
            max_poll_interval=0.5,
            deadline=clock.now + 3600,
        )
        for ids, conn_id in ((many, "openai_default"), (few, "openai_other"))
    ]

    async def scenario() -> list[dict[str, Any]]:
        return await clock.run(*(first_event_async(t) for t in triggers))

    for payload in asyncio.run(scenario()):
        assert payload["status"] == "success", payload["message"]
        assert all(s["status"] == "completed" for s in payload["batches"].values())
    stats = emulator.stats()
    # Every kind of fault was injected and survived on both kinds of call, with the SDK's retries off.
    assert all(stats["faults_by_kind"].get(kind, 0) > 0 for kind in ("429", "500", "drop")), stats
    polls = ("batches.retrieve", "batches.list")
    assert all(stats["faults"][route] > 0 for route in polls), stats
    assert sum(stats["faults"][r] for r in polls) > 0.2 * sum(stats[r] for r in polls)
    for trigger in triggers:
        assert any(reason in ("backoff", "retry-after") for _, reason in trigger._waits)


def test_retry_after_from_the_emulator_is_honoured(emulator):
    emulator.configure(
        rate=1_000_000.0,
        fault_rate=1.0,
        fault_routes=("batches.retrieve",),
        fault_kinds=("429",),
        retry_after=0.2,
    )
    ids = create_batches(emulator, 1)
    waits: list[float] = []
    call_times: list[float] = []

    async def scenario() -> dict[str, Any]:
        # The polls go through the poll board's hook: time the calls there.
        poll_hook = polling_hook("openai_default")
        real_get = poll_hook.aget_batch

        async def timed_get(batch_id: str) -> Any:
            call_times.append(time.monotonic())
            if len(call_times) == 3:
                emulator.configure(fault_rate=0.0)  # the storm ends before the third call
            return await real_get(batch_id)

        poll_hook.aget_batch = timed_get  # type: ignore[method-assign]
        trigger = make_trigger(
            None, poll_hook, batch_ids=ids, poll_interval=0.01, max_poll_interval=0.02, fault_budget=2
        )
        payload = await first_event_async(trigger)
        waits.extend(w for w, _ in trigger._waits)
        return payload

    payload = asyncio.run(scenario())
    assert payload["status"] == "success", payload["message"]
    assert len(call_times) == 3
    assert waits[:2] == [pytest.approx(0.2), pytest.approx(0.2)]
    # Real elapsed time between the calls, measured on a monotonic clock.
    assert call_times[1] - call_times[0] >= 0.2
    assert call_times[2] - call_times[1] >= 0.2


def test_triggerer_restart_resumes_against_the_same_deadline_without_cancelling(emulator):
    emulator.configure(rate=1.0, time_scale=0.0)
    ids = create_batches(emulator, 2, lines=100)
    deadline = time.time() + 3600

    async def until_first_wait(trigger: OpenAIBatchTrigger) -> None:
        await cancel_at_first_wait(trigger)  # a triggerer shutting down: no on_kill(), only cleanup()
        await trigger.cleanup()

    first = make_trigger(
        StopsAtFirstWait(), batch_ids=ids, poll_interval=1, max_poll_interval=10, deadline=deadline
    )
    asyncio.run(until_first_wait(first))
    emulator.advance(200)  # the batches finish while no triggerer runs

    classpath, kwargs = first.serialize()
    from airflow.providers.common.compat.module_loading import import_string

    second = import_string(classpath)(**json.loads(json.dumps(kwargs)))
    assert second.deadline == deadline
    payload = first_event(second)
    assert payload["status"] == "success"
    assert {s["status"] for s in payload["batches"].values()} == {"completed"}
    assert emulator.stats()["batches.cancel"] == 0


def test_on_kill_cancels_live_batches_in_the_emulator(emulator):
    emulator.configure(rate=0.0, cancel_seconds=5.0, time_scale=0.0)  # nothing finishes on its own
    ids = create_batches(emulator, 3)

    async def scenario() -> None:
        trigger = make_trigger(StopsAtFirstWait(), batch_ids=ids, poll_interval=60, max_poll_interval=60)
        await cancel_at_first_wait(trigger)
        await trigger.on_kill()
        await trigger.cleanup()

    asyncio.run(scenario())
    assert emulator.stats()["batches.cancel"] == 3
    client = emulator.client()
    assert {client.batches.retrieve(b).status for b in ids} == {"cancelling"}
    emulator.advance(10)
    assert {client.batches.retrieve(b).status for b in ids} == {"cancelled"}


def test_deadline_fires_timeout_and_cancels_in_the_emulator(emulator):
    emulator.configure(rate=0.0)  # never finishes on its own
    ids = create_batches(emulator, 2)
    fake = virtual_time(emulator)
    trigger = make_trigger(
        fake, batch_ids=ids, poll_interval=10, max_poll_interval=600, deadline=fake.now + 3600
    )
    payload = first_event(trigger)
    assert payload["status"] == "timeout"
    assert fake.now == pytest.approx(trigger.deadline)
    assert emulator.stats()["batches.cancel"] == 2
    assert {s["status"] for s in payload["batches"].values()} <= {"cancelling", "cancelled"}
    assert all(b in payload["message"] for b in ids)
    client = emulator.client()
    assert {client.batches.retrieve(b).status for b in ids} <= {"cancelling", "cancelled"}


def _poll_cost(server: Any, poll_interval: float, max_poll_interval: float) -> tuple[int, float]:
    """Retrieve calls and detection delay for one batch that takes about 100 poll intervals to finish."""
    server.reset()
    server.configure(rate=1.0, validation_seconds=600.0, finalizing_seconds=120.0, time_scale=0.0)
    (batch_id,) = create_batches(server, 1, lines=5_400)  # 600 s validating + 5,400 s + 120 s ~ 102 min
    before = server.stats()["batches.retrieve"]
    fake = virtual_time(server)
    start = fake.now
    trigger = make_trigger(
        fake,
        batch_ids=[batch_id],
        poll_interval=poll_interval,
        max_poll_interval=max_poll_interval,
        deadline=fake.now + 48 * 3600,
    )
    payload = first_event(trigger)
    assert payload["status"] == "success"
    assert payload["batches"][batch_id]["request_counts"]["completed"] == 5_400
    calls = server.stats()["batches.retrieve"] - before
    finished_after = 600.0 + 5_400.0 + 120.0
    return calls, (fake.now - start) - finished_after


def test_adaptive_polling_costs_fewer_calls_than_a_fixed_interval(emulator):
    fixed_calls, fixed_delay = _poll_cost(emulator, 60.0, 60.0)
    adaptive_calls, adaptive_delay = _poll_cost(emulator, 60.0, 600.0)
    print(
        f"\nretrieve calls for a ~102 min batch: fixed 60 s = {fixed_calls}, adaptive 60-600 s = "
        f"{adaptive_calls}; completion seen {fixed_delay:.0f} s vs {adaptive_delay:.0f} s after it finished"
    )
    assert fixed_calls >= 100
    assert adaptive_calls < fixed_calls / 3
    # Completion is still seen within one max_poll_interval of the batch finishing.
    assert 0 <= adaptive_delay <= 600.0
    assert 0 <= fixed_delay <= 60.0
