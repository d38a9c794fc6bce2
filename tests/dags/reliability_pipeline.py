"""Reliability-suite DAG (tests/reliability): build requests -> submit -> deferred wait -> collect.

Used by dag.test() runs under injected API faults and by the real scheduler + triggerer runs (triggerer
killed and restarted, sensor marked failed while deferred). Knobs come from ``params`` (override them
with the run's conf) and, for the sensor's intervals (not templated), from environment variables read
at parse time.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG, task

from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
from airflow_openai_batch.sensors.batch import OpenAIBatchSensor

POLL_INTERVAL = float(os.environ.get("AOB_RELIABILITY_POLL_INTERVAL", "0.05"))
MAX_POLL_INTERVAL = float(os.environ.get("AOB_RELIABILITY_MAX_POLL_INTERVAL", str(POLL_INTERVAL * 4)))
SENSOR_TIMEOUT = float(os.environ.get("AOB_RELIABILITY_SENSOR_TIMEOUT", "900"))

with DAG(
    dag_id="reliability_pipeline",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    default_args={"retries": 0},
    params={"requests": 60, "per_batch": 20, "output_root": "/tmp/aob-reliability-results"},
    tags=["test", "reliability"],
):

    @task
    def build_requests(params=None) -> list[dict]:
        count = int(params["requests"])
        return [
            {
                "custom_id": f"rel-{i:05d}",
                "body": {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": f"Classify ticket {i}: é, 漢字, emoji 🚀"}],
                },
            }
            for i in range(count)
        ]

    submit = OpenAIBatchSubmitOperator(
        task_id="submit",
        requests=build_requests(),
        max_requests_per_batch="{{ params.per_batch }}",
        metadata={"suite": "reliability"},
    )
    wait = OpenAIBatchSensor(
        task_id="wait",
        batch_ids=submit.output,
        poll_interval=POLL_INTERVAL,
        max_poll_interval=MAX_POLL_INTERVAL,
        timeout=SENSOR_TIMEOUT,
    )
    OpenAIBatchCollectOperator(
        task_id="collect",
        batch_ids=wait.output,
        output_uri="{{ params.output_root }}/{{ run_id }}",
    )
