"""OpenAIBatchSensor: event handling, poke mode, deferral round trip, kill, and a real dag.test() run."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest

from airflow_openai_batch.core.job import Job
from airflow_openai_batch.exceptions import (
    OpenAIBatchCancelledError,
    OpenAIBatchFailedError,
    OpenAIBatchOutcomeError,
    OpenAIBatchPollingError,
    OpenAIBatchTimeoutError,
)
from airflow_openai_batch.sensors.batch import OpenAIBatchEventError, OpenAIBatchSensor
from airflow_openai_batch.triggers.batch import OpenAIBatchTrigger
from tests.conftest import TEST_API_KEY, TEST_DAGS_FOLDER
from tests.support.summaries import summary


def sensor(**kwargs: Any) -> OpenAIBatchSensor:
    kwargs.setdefault("task_id", "wait")
    kwargs.setdefault("batch_ids", ["b1", "b2"])
    kwargs.setdefault("poll_interval", 0.01)
    kwargs.setdefault("max_poll_interval", 0.05)
    kwargs.setdefault("retry_failed_requests", 0)  # retry rounds have tests of their own
    return OpenAIBatchSensor(**kwargs)


def event(
    status: str, batches: dict[str, Any], message: str = "msg", ids: list[str] | None = None
) -> dict[str, Any]:
    """A trigger event whose job holds the batches ``ids`` (default: those of ``batches``), each at its
    summary in ``batches``."""
    job = Job.of_batches(ids or list(batches))
    for batch_id, seen in batches.items():
        found = job.find(batch_id)
        if found is not None and isinstance(seen, dict) and "status" in seen:
            found[1].see(seen)
    return {"status": status, "batches": batches, "message": message, "job": job.to_dict()}


def create_batches(server: Any, count: int, lines: int = 3, bad: bool = False) -> list[str]:
    client = server.client()
    ids = []
    for n in range(count):
        rows = [
            {
                "custom_id": f"req-{n}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hi {i}"}]},
            }
            for i in range(lines)
        ]
        data = "".join(json.dumps(row) + "\n" for row in rows)
        if bad:
            data += "this is not json\n"
        upload = client.files.create(file=("in.jsonl", data.encode()), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        ids.append(batch.id)
    return ids


# -- construction --------------------------------------------------------------------------------


def test_defaults_and_stored_arguments():
    op = OpenAIBatchSensor(task_id="wait", batch_ids="b1")
    assert op.deferrable is True
    assert (op.poll_interval, op.max_poll_interval, op.poke_interval) == (60.0, 600.0, 60.0)
    assert op.fail_on_statuses == ("failed", "cancelled")
    assert op.cancel_on_kill is True and op.max_resubmits == 10
    assert op.retry_failed_requests == 2 and op.retry_error_codes is None
    assert op.request_retry_policy.codes == {
        "batch_expired",
        "rate_limit_exceeded",
        "server_error",
        "timeout",
    }
    assert op.request_retry_policy.statuses == {429, 500, 502, 503, 504}
    assert op.timeout == 25 * 3600
    assert op.template_fields == ("batch_ids",)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fail_on_statuses": ("cancelling",)},
        {"fail_on_statuses": "in_progress"},
        {"poll_interval": 10, "max_poll_interval": 1},
        {"max_resubmits": -1},
        {"retry_failed_requests": -1},
        {"retry_error_codes": [400]},
        {"retry_error_codes": ["server_error", 422]},
    ],
)
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        sensor(**kwargs)


# -- execute_complete ----------------------------------------------------------------------------


def _without(key: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k != key}


@pytest.mark.parametrize(
    ("bad_event", "reason"),
    [
        (None, "expected a dict"),
        ("success", "expected a dict"),
        (_without("status", event("success", {})), "missing key"),
        (_without("batches", event("success", {})), "missing key"),
        (_without("message", event("success", {})), "missing key"),
        (_without("job", event("success", {"b1": summary("completed")})), "missing key"),
        (event("done", {}, ids=["b1"]), "unknown status 'done'"),
        (event("success", {"b1": summary("completed")}, ids=["b1", "b2"]), "not final"),
        (event("success", {"b1": summary("completed"), "b2": summary("in_progress")}), "not final"),
        (event("success", {"b1": summary("completed"), "b2": summary("cancelling")}), "not final"),
        (
            {**event("success", {"b1": summary("completed")}), "batches": {"bx": summary("completed")}},
            "not in the job",
        ),
        (event("success", {"b1": summary("completed"), "b2": summary("exploded")}), "known status"),
        (event("success", {"b1": summary("completed"), "b2": "completed"}), "known status"),
        ({**event("success", {"b1": summary("completed")}), "batches": []}, "'batches' is not a dict"),
        ({**event("error", {}, ids=["b1"]), "message": 3}, "'message' is not a string"),
        ({**event("success", {"b1": summary("completed")}), "job": {"version": 7}}, "version 7"),
        ({**event("success", {"b1": summary("completed")}), "job": "b1"}, "'job' is not a dict"),
    ],
)
def test_execute_complete_rejects_malformed_and_unknown_events(bad_event, reason):
    with pytest.raises(OpenAIBatchEventError, match="Malformed event from OpenAIBatchTrigger") as err:
        sensor().execute_complete({}, event=bad_event)
    assert reason in str(err.value)


def test_execute_complete_success_returns_summaries_in_chunk_order_with_chains():
    job = Job.from_dict(
        {
            "version": 1,
            "chunks": [
                {
                    "attempts": [
                        {"batch_id": "b0", "status": "failed"},
                        {"batch_id": "b2", "reason": "capacity"},
                        {"batch_id": "b3", "number": 2, "reason": "retry", "retry_of": "b2"},
                    ]
                },
                {"attempts": [{"batch_id": "b1"}]},
            ],
        }
    )
    for batch_id, state in (("b1", summary("completed", 10)), ("b2", summary("completed", 9, 1))):
        job.find(batch_id)[1].see(state)
    job.find("b2")[1].retried = 1
    job.find("b3")[1].see(summary("completed", 1, total=1))
    payload = {"status": "success", "batches": {}, "message": "done", "job": job.to_dict()}
    result = sensor(batch_ids=["b0", "b1"]).execute_complete({}, event=payload)
    assert list(result) == ["b2", "b3", "b1"]
    assert result["b2"]["replaces"] == ["b0"] and result["b1"]["replaces"] == []
    assert (result["b2"]["attempt"], result["b2"]["retry_of"]) == (1, None)
    assert (result["b3"]["attempt"], result["b3"]["retry_of"], result["b3"]["replaces"]) == (2, "b2", [])
    assert result["b2"]["request_counts"] == {"total": 10, "completed": 9, "failed": 1}


def test_failed_batch_raises_failed_error_naming_id_and_errors():
    errors = [{"code": "invalid_json_line", "message": "line is not JSON", "line": 7}]
    payload = event(
        "success", {"b1": summary("completed", 10), "b2": summary("failed", total=0, errors=errors)}
    )
    with pytest.raises(OpenAIBatchFailedError) as err:
        sensor().execute_complete({}, event=payload)
    assert "b2 (invalid_json_line (line 7): line is not JSON)" in str(err.value)
    assert "b1" not in err.value.batches and set(err.value.batches) == {"b2"}


def test_cancelled_batch_raises_cancelled_error():
    payload = event("success", {"b1": summary("completed", 10), "b2": summary("cancelled", 4)})
    with pytest.raises(OpenAIBatchCancelledError, match="cancelled: b2"):
        sensor().execute_complete({}, event=payload)


def test_cancelled_passes_when_not_in_fail_on_statuses():
    payload = event("success", {"b1": summary("completed", 10), "b2": summary("cancelled", 4)})
    result = sensor(fail_on_statuses=("failed",)).execute_complete({}, event=payload)
    assert result["b2"]["status"] == "cancelled"


def test_expired_passes_with_a_warning_by_default(monkeypatch):
    logger = mock.MagicMock()
    monkeypatch.setattr(OpenAIBatchSensor, "log", property(lambda self: logger))
    expired = summary("expired", 6, warnings=["expired after 6 of 10 requests succeeded; ..."])
    result = sensor().execute_complete(
        {}, event=event("success", {"b1": summary("completed", 10), "b2": expired})
    )
    assert result["b2"]["status"] == "expired"
    warnings = [call.args[1] for call in logger.warning.call_args_list]
    assert any(w.startswith("b2: expired after 6 of 10") for w in warnings)


def test_expired_fails_when_listed():
    payload = event("success", {"b1": summary("completed", 10), "b2": summary("expired", 6)})
    with pytest.raises(OpenAIBatchOutcomeError, match="expired: b2"):
        sensor(fail_on_statuses=("failed", "expired")).execute_complete({}, event=payload)


def test_completed_with_zero_successes_is_reported(monkeypatch):
    logger = mock.MagicMock()
    monkeypatch.setattr(OpenAIBatchSensor, "log", property(lambda self: logger))
    zero = summary("completed", 0, 10, warnings=["completed with 0 successful requests (10 of 10 failed)"])
    result = sensor().execute_complete(
        {}, event=event("success", {"b1": summary("completed", 10), "b2": zero})
    )
    assert result["b2"]["warnings"] == ["completed with 0 successful requests (10 of 10 failed)"]
    assert any("b2: completed with 0 successful" in c.args[1] for c in logger.warning.call_args_list)


def test_error_event_raises_polling_error_naming_batches():
    payload = event("error", {"b1": summary("in_progress", 3)}, "Gave up polling batch b2 after 11 faults")
    with pytest.raises(OpenAIBatchPollingError) as err:
        sensor().execute_complete({}, event=payload)
    assert "b2" in str(err.value) and "b1: in_progress" in str(err.value)
    assert not isinstance(err.value, OpenAIBatchTimeoutError)


def test_timeout_event_raises_timeout_error_naming_batches():
    payload = event(
        "timeout",
        {"b1": summary("completed", 10), "b2": summary("cancelling", 2)},
        "Deadline passed with 1 batch(es) not final: b2 (in_progress)",
    )
    with pytest.raises(OpenAIBatchTimeoutError) as err:
        sensor().execute_complete({}, event=payload)
    assert "b2: cancelling" in str(err.value)
    assert set(err.value.batches) == {"b1", "b2"}


def test_the_distinct_classes_are_distinct():
    classes = [
        OpenAIBatchFailedError,
        OpenAIBatchCancelledError,
        OpenAIBatchTimeoutError,
        OpenAIBatchPollingError,
    ]
    for cls in classes:
        assert [other for other in classes if issubclass(cls, other)] == [cls]


# -- deferred path -------------------------------------------------------------------------------


def run_trigger(trigger: OpenAIBatchTrigger) -> dict[str, Any]:
    async def first() -> dict[str, Any]:
        gen = trigger.run()
        ev = await gen.__anext__()
        await gen.aclose()
        return ev.payload

    return asyncio.run(first())


def test_deferred_round_trip(emulator, make_context):
    from airflow.providers.common.compat.module_loading import import_string

    from airflow_openai_batch.compat import TaskDeferred

    emulator.configure(validation_seconds=30.0, time_scale=0.0)  # still validating at the first look
    ids = create_batches(emulator, 3)
    op = sensor(batch_ids=ids, timeout=3600)
    context = make_context(task_id="wait")
    before = time.time()
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    assert deferred.value.method_name == "execute_complete"
    classpath, kwargs = deferred.value.trigger.serialize()
    # The backstop is the time left to the deadline plus a grace period.
    backstop = deferred.value.timeout - timedelta(minutes=5)
    spent = time.time() - before  # the first look, however slow the machine
    assert timedelta(seconds=3600 - spent - 1) <= backstop <= timedelta(seconds=3600)
    deadline = kwargs["job"]["deadline"]
    assert deadline - time.time() <= backstop.total_seconds() + 1
    assert before + 3600 <= deadline <= time.time() + 3600
    assert [c["attempts"][0]["batch_id"] for c in kwargs["job"]["chunks"]] == ids
    assert kwargs["conn_id"] == "openai_default"
    assert TEST_API_KEY not in json.dumps(kwargs)

    class AdvancingClock:
        """Real time, but each wait moves the emulator's clock on by 10 s instead of sleeping."""

        def time(self) -> float:
            return time.time()

        async def sleep(self, seconds: float) -> None:
            emulator.advance(10.0)  # validation ends after the third wait
            await asyncio.sleep(0)

    trigger = import_string(classpath)(**json.loads(json.dumps(kwargs)), clock=AdvancingClock())
    payload = run_trigger(trigger)
    assert payload["status"] == "success"
    result = getattr(op, deferred.value.method_name)(context, event=payload)
    assert list(result) == ids
    for batch_id in ids:
        assert result[batch_id]["status"] == "completed"
        assert result[batch_id]["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
        assert result[batch_id]["output_file_id"]


def test_already_final_batches_do_not_defer(emulator, make_context):
    ids = create_batches(emulator, 2)
    emulator.advance(5)
    result = sensor(batch_ids=ids).execute(make_context(task_id="wait"))
    assert {s["status"] for s in result.values()} == {"completed"}
    assert emulator.stats()["batches.retrieve"] == 2


def test_unknown_batch_fails_fast_without_deferring(emulator, make_context):
    with pytest.raises(OpenAIBatchPollingError, match=r"batch_does_not_exist.*HTTP 404"):
        sensor(batch_ids=["batch_does_not_exist"]).execute(make_context(task_id="wait"))


# -- poke mode -----------------------------------------------------------------------------------


def test_poke_mode_against_the_emulator(emulator):
    emulator.configure(rate=1.0, time_scale=0.0)
    ids = create_batches(emulator, 2, lines=4)
    op = sensor(batch_ids=ids, deferrable=False)
    first = op.poke({})
    assert first.is_done is False and first.xcom_value is None
    emulator.advance(2)
    assert op.poke({}).is_done is False
    emulator.advance(10)
    done = op.poke({})
    assert done.is_done is True
    assert set(done.xcom_value) == set(ids)
    assert all(s["status"] == "completed" for s in done.xcom_value.values())
    # Final batches are not polled again: 2 + 2 + 2 calls, no more.
    assert emulator.stats()["batches.retrieve"] == 6


def test_poke_mode_logs_tokens_so_far_and_returns_the_batchs_model_and_usage(emulator, capfd):
    emulator.configure(rate=1.0, time_scale=0.0)
    [batch_id] = create_batches(emulator, 1, lines=4)
    op = sensor(batch_ids=[batch_id], deferrable=False)
    emulator.advance(3)  # validated, then some lines answered
    assert op.poke({}).is_done is False
    running = [line for line in capfd.readouterr().out.splitlines() if f"{batch_id}: in_progress" in line]
    assert running and "tokens so far (" in running[-1], running
    emulator.advance(60)
    summary = op.poke({}).xcom_value[batch_id]
    assert summary["model"] == emulator.client().batches.retrieve(batch_id).model == "gpt-4o-mini"
    usage = summary["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_poke_mode_execute_returns_the_summaries(emulator):
    ids = create_batches(emulator, 2)
    emulator.advance(5)
    result = sensor(batch_ids=ids, deferrable=False).execute({})
    assert {s["status"] for s in result.values()} == {"completed"}


def test_poke_mode_raises_the_same_distinct_errors(emulator):
    ids = create_batches(emulator, 1, bad=True)
    emulator.advance(5)
    with pytest.raises(OpenAIBatchFailedError) as err:
        sensor(batch_ids=ids, deferrable=False).execute({})
    assert ids[0] in str(err.value) and "line" in str(err.value)


def test_poke_mode_tolerates_transient_faults_within_budget(emulator):
    emulator.configure(fault_rate=1.0, fault_routes=("batches.retrieve",), fault_kinds=("500",))
    ids = create_batches(emulator, 1)
    op = sensor(batch_ids=ids, deferrable=False, fault_budget=1)
    assert op.poke({}).is_done is False
    with pytest.raises(OpenAIBatchPollingError, match="2 consecutive transient faults"):
        op.poke({})


def test_poke_mode_on_kill_cancels_non_final_batches(emulator):
    emulator.configure(rate=0.0, cancel_seconds=60.0, time_scale=0.0)
    done = create_batches(emulator, 1)
    emulator.configure(rate=1_000_000.0)
    emulator.advance(1)
    emulator.configure(rate=0.0)
    live = create_batches(emulator, 2)
    op = sensor(batch_ids=done + live, deferrable=False)
    assert op.poke({}).is_done is False
    op.on_kill()
    assert emulator.stats()["batches.cancel"] == 2  # the completed batch is not touched
    client = emulator.client()
    assert [client.batches.retrieve(b).status for b in live] == ["cancelling", "cancelling"]
    assert client.batches.retrieve(done[0]).status == "completed"


def test_poke_mode_on_kill_respects_cancel_on_kill_false(emulator):
    emulator.configure(rate=0.0, time_scale=0.0)
    ids = create_batches(emulator, 1)
    op = sensor(batch_ids=ids, deferrable=False, cancel_on_kill=False)
    op.poke({})
    op.on_kill()
    assert emulator.stats()["batches.cancel"] == 0


def test_poke_mode_timeout_cancels_and_raises_timeout_error(emulator):
    emulator.configure(rate=0.0, time_scale=0.0)
    ids = create_batches(emulator, 2)
    with pytest.raises(OpenAIBatchTimeoutError) as err:
        sensor(batch_ids=ids, deferrable=False, timeout=0).execute({})
    assert all(b in str(err.value) for b in ids)
    assert emulator.stats()["batches.cancel"] == 2
    assert {s["status"] for s in err.value.batches.values()} == {"cancelling"}


# -- dag.test() ----------------------------------------------------------------------------------


def test_dag_test_runs_the_deferred_sensor_to_success(airflow_db, emulator, monkeypatch):
    from airflow.utils.state import DagRunState, TaskInstanceState

    from tests.support.airflow_versions import DagBag

    # The emulator's clock stands still, so the sensor's first look finds the batches validating and the
    # task defers; once the trigger has polled, a watcher moves the clock and the batches complete.
    emulator.configure(validation_seconds=1.0, time_scale=0.0)
    bag = DagBag(dag_folder=str(TEST_DAGS_FOLDER / "sensor_dag.py"))
    assert bag.import_errors == {}
    dag = bag.get_dag("openai_batch_sensor_test")

    def finish_once_the_trigger_polls() -> None:
        for _ in range(6000):  # bounded: at most ~60 s
            if emulator.stats()["batches.retrieve"] > 2:
                emulator.advance(3600)
                return
            threading.Event().wait(0.01)

    watcher = threading.Thread(target=finish_once_the_trigger_polls, daemon=True)
    watcher.start()
    dag_run = dag.test()
    watcher.join(timeout=5)

    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert dag_run.state == DagRunState.SUCCESS, states
    assert states == {"create_batches": TaskInstanceState.SUCCESS, "wait": TaskInstanceState.SUCCESS}
    result = dag_run.get_task_instance("wait").xcom_pull(task_ids="wait")
    ids = dag_run.get_task_instance("create_batches").xcom_pull(task_ids="create_batches")
    assert len(ids) == 2 and list(result) == ids
    assert all(s["status"] == "completed" for s in result.values())
    # More retrieves than the sensor's first look (2): the trigger ran and polled.
    assert emulator.stats()["batches.retrieve"] > 2
    assert TEST_API_KEY not in json.dumps(result)
