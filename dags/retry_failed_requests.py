"""Retry loop: the failures of a first pass are resubmitted once, from collect's retry file.

``retry_requests.jsonl`` holds the failed request lines exactly as submitted, so it is a valid input
for another submit. The second pass runs only when the first one had failures.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG, Param, task

from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
from airflow_openai_batch.sensors.batch import OpenAIBatchSensor

POLL_INTERVAL = float(os.environ.get("OPENAI_BATCH_POLL_INTERVAL", "60"))

with DAG(
    dag_id="retry_failed_requests",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["openai-batch", "example"],
    params={
        "requests": Param(type="string", description="JSONL of chat requests (path or URI)"),
        "output_root": Param(os.environ.get("OPENAI_BATCH_OUTPUT_ROOT", "/tmp/openai-batch"), type="string"),
    },
) as dag:
    first_submit = OpenAIBatchSubmitOperator(task_id="submit", requests="{{ params.requests }}")
    first_wait = OpenAIBatchSensor(task_id="wait", batch_ids=first_submit.output, poll_interval=POLL_INTERVAL)
    first_collect = OpenAIBatchCollectOperator(
        task_id="collect",
        batch_ids=first_wait.output,
        output_uri="{{ params.output_root }}/retry-loop/{{ run_id }}/pass-1",
    )

    @task.short_circuit
    def has_failures(summary: dict) -> bool:
        print(f"pass 1: {summary['failed']} of {summary['total']} failed {summary['failed_by_code']}")
        return summary["failed"] > 0

    retry_submit = OpenAIBatchSubmitOperator(
        task_id="resubmit_failures",
        requests="{{ ti.xcom_pull(task_ids='collect')['retry_requests_uri'] }}",
    )
    retry_wait = OpenAIBatchSensor(
        task_id="wait_for_retries", batch_ids=retry_submit.output, poll_interval=POLL_INTERVAL
    )
    retry_collect = OpenAIBatchCollectOperator(
        task_id="collect_retries",
        batch_ids=retry_wait.output,
        output_uri="{{ params.output_root }}/retry-loop/{{ run_id }}/pass-2",
    )

    has_failures(first_collect.output) >> retry_submit >> retry_wait >> retry_collect
