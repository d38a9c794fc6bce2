"""One table of waiting scenarios, each run through the deferred, poke and reschedule modes.

Everything is real except time: the submit operator, the sensor, its trigger (rebuilt from its
serialized form, as the triggerer does), the collect operator and the openai SDK over HTTP to the
emulator. The emulator's clock is frozen and moves with the test's clock, so a wait of minutes runs in
a second and nothing sleeps to synchronise.

A worker that dies is a :class:`WorkerCrash` (a ``BaseException``) raised at the chosen point of a retry
round: nothing after it runs in that try, as with a SIGKILL; the next try is a fresh sensor instance
whose ``try_number`` is one more, with the same task state store (which survives retries in Airflow).

Every scenario must end with each request reported exactly once by collect, and no batch made twice:
no two batches follow the same batch (a re-creation or a retry round is made at most once).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pendulum
import pytest

from airflow_openai_batch.compat import TaskDeferred
from airflow_openai_batch.core.resubmit import METADATA_ATTEMPT, METADATA_FOLLOWS
from airflow_openai_batch.hooks.batch import OpenAIBatchHook
from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
from airflow_openai_batch.sensors.batch import OpenAIBatchSensor
from tests.conftest import InMemoryTaskStateStore

MODES = ("deferred", "poke", "reschedule")
REQUESTS = 120
PER_CHUNK = 40
#: Prompt tokens of one request as the emulator counts them (40 characters of content + chat framing).
TOKENS_PER_REQUEST = 16


class WorkerCrash(BaseException):
    """The worker process dies here: no handler, no ``finally`` of ours gets to record anything."""


@dataclass
class Scenario:
    """One row of the table.

    :param knobs: emulator knobs for the run.
    :param interfere: ``"crash_after_upload"``, ``"crash_after_create"`` (of the first retry round) or
        ``"deadline_at_upload"`` (the clock passes the deadline while the retry file uploads).
    :param retry_batches: whether retry batches are expected.
    :param replaced: whether capacity re-creations are expected.
    :param final_codes: the error codes left in collect's failures (empty: every request succeeded).
    :param timeout: the sensor's timeout, simulated seconds.
    """

    name: str
    knobs: dict[str, Any] = field(default_factory=dict)
    interfere: str | None = None
    retry_batches: bool = False
    replaced: bool = False
    final_codes: frozenset[str] = frozenset()
    timeout: float = 3600.0


SCENARIOS = [
    Scenario(
        "capacity_failure",
        knobs={"enqueued_token_limit": int(PER_CHUNK * TOKENS_PER_REQUEST * 1.5)},
        replaced=True,
    ),
    Scenario(
        "refused_create",
        knobs={
            "enqueued_token_limit": int(PER_CHUNK * TOKENS_PER_REQUEST * 1.5),
            "token_limit_mode": "reject",
        },
    ),
    Scenario("expired_batch", knobs={"expire_next_batches": 1}, retry_batches=True),
    Scenario(
        "five_percent_5xx", knobs={"failure_rate": 0.05, "failure_kinds": ("500", "503")}, retry_batches=True
    ),
    Scenario(
        "rate_limited_lines", knobs={"failure_rate": 0.1, "failure_kinds": ("429",)}, retry_batches=True
    ),
    Scenario(
        "invalid_lines_not_retried",
        knobs={"failure_rate": 0.1, "failure_kinds": ("400",)},
        final_codes=frozenset({"emulated_invalid_request"}),
    ),
    Scenario(
        "deadline_mid_round",
        knobs={"failure_rate": 0.1, "failure_kinds": ("500",)},
        interfere="deadline_at_upload",
        final_codes=frozenset({"server_error"}),
    ),
    Scenario(
        "killed_mid_round",
        knobs={"failure_rate": 0.1, "failure_kinds": ("500",)},
        interfere="crash_after_create",
        retry_batches=True,
    ),
    Scenario(
        "crash_between_upload_and_create",
        knobs={"failure_rate": 0.1, "failure_kinds": ("500",)},
        interfere="crash_after_upload",
        retry_batches=True,
    ),
]


# -- the harness -----------------------------------------------------------------------------------


class SimClock:
    """The test's clock: the sensor's and the trigger's, moving the emulator's frozen clock with it."""

    def __init__(self, emulator: Any) -> None:
        self.emulator = emulator
        self.now = float(emulator.stats()["now"])

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.now += seconds
        self.emulator.advance(seconds)

    async def sleep(self, seconds: float) -> None:
        self.advance(seconds)
        await asyncio.sleep(0)


@dataclass
class Interference:
    """What happens once, at one point of the first retry round (shared by every try)."""

    kind: str | None
    clock: SimClock
    fired: bool = False
    deadline: float | None = None

    def at(self, point: str) -> None:
        if self.fired or self.kind is None or not self.kind.endswith(point):
            return
        self.fired = True
        if self.kind.startswith("crash"):
            raise WorkerCrash(point)
        assert self.deadline is not None
        self.clock.now = self.deadline + 1.0  # the upload took us past the deadline


class ScenarioHook(OpenAIBatchHook):
    """The sensor's hook, with the scenario's interference around a retry round's upload and create."""

    def __init__(self, interference: Interference, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.interference = interference

    def upload_file(self, *args: Any, **kwargs: Any) -> Any:
        uploaded = super().upload_file(*args, **kwargs)
        self.interference.at("upload")
        return uploaded

    def create_batch_reconciled(self, **kwargs: Any) -> Any:
        batch = super().create_batch_reconciled(**kwargs)
        if kwargs["metadata"].get(METADATA_ATTEMPT, "1") != "1":
            self.interference.at("create")
        return batch


class TaskInstance:
    """What the sensor touches on a task instance: identity, try number, and XCom pulls from upstream."""

    def __init__(self, xcoms: dict[tuple[str, str], Any]) -> None:
        self.dag_id, self.task_id, self.run_id, self.map_index = "scenarios", "wait", "manual__1", -1
        self.try_number = 1
        self.xcoms = xcoms

    def xcom_pull(self, task_ids: list[str], key: str) -> list[Any]:
        return [self.xcoms.get((task_id, key)) for task_id in task_ids]


def sensor_factory(scenario: Scenario, clock: SimClock, interference: Interference, ids: list[str]):
    class ScenarioSensor(OpenAIBatchSensor):
        @cached_property
        def hook(self) -> OpenAIBatchHook:
            return ScenarioHook(interference, conn_id=self.conn_id, client_overrides={"max_retries": 0})

    ScenarioSensor.clock = staticmethod(clock.time)

    def make(mode: str) -> OpenAIBatchSensor:
        from airflow.sdk import DAG

        with DAG(dag_id="scenarios", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
            submit = OpenAIBatchSubmitOperator(task_id="submit", requests=[])
            wait = ScenarioSensor(
                task_id="wait",
                batch_ids=ids,
                deferrable=mode == "deferred",
                mode="reschedule" if mode == "reschedule" else "poke",
                poll_interval=1.0,
                max_poll_interval=4.0,
                timeout=scenario.timeout,
            )
            submit >> wait
        return wait

    return make


def run_trigger(deferred: TaskDeferred, clock: SimClock) -> dict[str, Any]:
    from airflow.providers.common.compat.module_loading import import_string

    classpath, kwargs = deferred.trigger.serialize()
    trigger = import_string(classpath)(**json.loads(json.dumps(kwargs)), clock=clock)

    async def first_event() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(first_event())


def wait_deferred(make: Callable[[str], OpenAIBatchSensor], context: dict[str, Any], clock: SimClock) -> Any:
    call = lambda: make("deferred").execute(context)  # noqa: E731
    for _ in range(300):
        try:
            return call()
        except TaskDeferred as deferred:
            payload = run_trigger(deferred, clock)
            method = deferred.method_name
            call = lambda m=method, p=payload: getattr(make("deferred"), m)(context, event=p)  # noqa: E731
        except WorkerCrash:
            context["ti"].try_number += 1  # Airflow retries the task: a fresh execute()
            call = lambda: make("deferred").execute(context)  # noqa: E731
    raise AssertionError("the sensor kept deferring")


def wait_poking(
    make: Callable[[str], OpenAIBatchSensor], context: dict[str, Any], clock: SimClock, mode: str
) -> Any:
    sensor = make(mode)
    for _ in range(1000):
        try:
            result = sensor.poke(context)
        except WorkerCrash:
            context["ti"].try_number += 1
            sensor = make(mode)
            continue
        if result.is_done:
            return result.xcom_value
        # What Airflow waits before the next poke (poke: sleeps; reschedule: the next try's start).
        clock.advance(sensor.poke_interval)
        if mode == "reschedule":
            sensor = make(mode)  # every poke runs in a fresh process
    raise AssertionError("the sensor never finished")


def request(i: int) -> dict[str, Any]:
    return {
        "custom_id": f"r{i:04d}",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"{i:04d}" + "x" * 36}]},
    }


# -- the table -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(scenario: Scenario, mode: str, emulator: Any, make_context: Any) -> None:
    emulator.configure(time_scale=0.0, rate=10.0, seed=3, **scenario.knobs)
    clock = SimClock(emulator)
    submit_context = make_context(task_id="submit")
    ids = OpenAIBatchSubmitOperator(
        task_id="submit", requests=[request(i) for i in range(REQUESTS)], max_requests_per_batch=PER_CHUNK
    ).execute(submit_context)
    job = submit_context["ti"].xcoms["job"]
    assert len(job["chunks"]) == REQUESTS // PER_CHUNK
    if scenario.name == "refused_create":
        assert len(ids) < len(job["chunks"])  # some chunks wait for capacity, known only to the job

    interference = Interference(scenario.interfere, clock, deadline=clock.now + scenario.timeout)
    make = sensor_factory(scenario, clock, interference, ids)
    context = {
        "ti": TaskInstance({("submit", "job"): job}),
        "dag_run": None,
        "run_id": "manual__1",
        "task_state_store": InMemoryTaskStateStore(),
    }
    if mode == "deferred":
        result = wait_deferred(make, context, clock)
    else:
        result = wait_poking(make, context, clock, mode)
    assert scenario.interfere is None or interference.fired

    # The outcome: every chunk's last batch completed, and the chains as the contract says.
    assert {s["status"] for s in result.values()} <= {"completed", "expired"}
    for batch_id, summary in result.items():
        if summary["attempt"] > 1:
            assert result[summary["retry_of"]]["attempt"] == summary["attempt"] - 1, batch_id
        else:
            assert summary["retry_of"] is None
    assert any(s["attempt"] > 1 for s in result.values()) == scenario.retry_batches
    assert any(s["replaces"] for s in result.values()) == scenario.replaced

    # Nothing made twice: at most one batch follows any batch.
    batches = list(emulator.client().batches.list(limit=100))
    follows = Counter((b.metadata or {}).get(METADATA_FOLLOWS) for b in batches)
    follows.pop(None, None)
    assert set(follows.values()) <= {1}, follows

    # Every request once, from its last attempt.
    summary = OpenAIBatchCollectOperator(
        task_id="collect", batch_ids=result, max_xcom_records=10_000
    ).execute(make_context(task_id="collect"))
    records = summary["successes"] + summary["failures"]
    assert Counter(r["custom_id"] for r in records) == Counter(
        request(i)["custom_id"] for i in range(REQUESTS)
    )
    assert summary["total"] == REQUESTS == summary["succeeded"] + summary["failed"]
    assert set(summary["failed_by_code"]) == scenario.final_codes
    retried = [r for r in summary["successes"] if r["attempts"] > 1]
    assert summary["retried"] == len(retried)
    assert (summary["retried"] > 0) == scenario.retry_batches
    print(
        f"\n[{scenario.name}/{mode}] batches {len(batches)}, succeeded {summary['succeeded']}, "
        f"failed {summary['failed_by_code']}, retried {summary['retried']}"
    )
