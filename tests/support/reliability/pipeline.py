"""Drive submit -> deferrable sensor (trigger run directly, as the triggerer would) -> collect in-process.

The trigger is rebuilt from ``serialize()`` after a JSON round trip before it runs, exactly as a real
triggerer does, and the sensor is resumed with the event through the deferral's ``method_name`` (again
and again when it re-defers). ``stage_knobs`` lets a test change the emulator's knobs between stages.
The emulator's clock is frozen from the submit until the trigger starts, so the batches are still
validating at the sensor's first look (however slow the machine) and the deferred path always runs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from airflow_openai_batch.core.writers import read_records
from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
from airflow_openai_batch.sensors.batch import OpenAIBatchSensor
from tests.support.reliability.helpers import outcome_of, reseed
from tests.support.reliability.worker import make_context


async def first_event(trigger: Any) -> dict[str, Any]:
    gen = trigger.run()
    try:
        event = await gen.__anext__()
    finally:
        await gen.aclose()
    return event.payload


def rebuild(trigger: Any) -> Any:
    """The trigger as a triggerer gets it: class path + JSON-safe kwargs."""
    from airflow.providers.common.compat.module_loading import import_string

    classpath, kwargs = trigger.serialize()
    return import_string(classpath)(**json.loads(json.dumps(kwargs)))


def run_sensor(op: OpenAIBatchSensor, context: dict[str, Any], on_trigger: Callable | None = None) -> Any:
    """``execute``, then every deferral's trigger to its event and back; returns (result, deferrals)."""
    from airflow_openai_batch.compat import TaskDeferred

    deferrals = 0
    try:
        return op.execute(context), deferrals
    except TaskDeferred as exc:
        deferred = exc
    while True:
        deferrals += 1
        trigger = rebuild(deferred.trigger)
        if on_trigger is not None:
            on_trigger(trigger)
        payload = asyncio.run(first_event(trigger))
        try:
            return getattr(op, deferred.method_name)(context, event=payload), deferrals
        except TaskDeferred as exc:
            deferred = exc


def run_pipeline(
    emulator: Any,
    rows: list[dict[str, Any]],
    out_dir: Path,
    run_id: str,
    *,
    per_batch: int = 20,
    stage_knobs: Mapping[str, Mapping[str, Any]] | None = None,
    stage_seed: int | None = None,
) -> dict[str, Any]:
    """Run the three tasks; return the outcome (ids per outcome, codes) and figures.

    :param stage_knobs: emulator knobs applied before the ``submit``, ``wait`` and ``collect`` stage.
    :param stage_seed: restart the fault stream at ``stage_seed + n`` before stage n, so the faults of
        the sequential stages (submit, collect) do not depend on how many polls the wait made.
    """
    stage_knobs = stage_knobs or {}

    def enter(n: int, stage: str) -> None:
        # Not before the wait: the seed also decides the failing lines of the batches made then (the
        # sensor's retry rounds), which must be those of the fault-free run.
        if stage_seed is not None and stage != "wait":
            reseed(emulator, stage_seed + n)
        emulator.configure(**stage_knobs.get(stage, {}))

    spec = {"dag_id": "reliability_faults", "run_id": run_id, "run_after": time.time() - 300}
    started = time.monotonic()

    emulator.configure(time_scale=0.0)
    enter(0, "submit")
    ids = OpenAIBatchSubmitOperator(
        task_id="submit", requests=rows, max_requests_per_batch=per_batch
    ).execute(make_context({**spec, "task_id": "submit"}))

    enter(1, "wait")
    sensor = OpenAIBatchSensor(
        task_id="wait", batch_ids=ids, poll_interval=0.05, max_poll_interval=0.2, timeout=300
    )
    result, deferrals = run_sensor(
        sensor,
        make_context({**spec, "task_id": "wait"}),
        on_trigger=lambda _: emulator.configure(time_scale=1.0),
    )

    enter(2, "collect")
    folder = out_dir / run_id
    summary = OpenAIBatchCollectOperator(task_id="collect", batch_ids=result, output_uri=str(folder)).execute(
        make_context({**spec, "task_id": "collect"})
    )
    successes = list(read_records(folder / "successes.jsonl"))
    failures = list(read_records(folder / "failures.jsonl"))
    return {
        "batch_ids": ids,
        "sensor_result": result,
        "deferrals": deferrals,
        "summary": summary,
        "outcome": outcome_of(successes, failures),
        "records": len(successes) + len(failures),
        "seconds": time.monotonic() - started,
    }
