"""Test DAG: submit -> deferred wait with automatic retry rounds -> collect into a folder.

The emulator (configured by the test) expires a batch part-way and fails some lines with HTTP 500; the
sensor resubmits those requests by itself, and collect reports each from its last attempt.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param

from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
from airflow_openai_batch.sensors.batch import OpenAIBatchSensor

with DAG(
    dag_id="openai_batch_retry_rounds_test",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    params={
        "requests": Param(type="string"),
        "max_requests_per_batch": Param(50_000, type="integer"),
        "output_uri": Param(type="string"),
    },
    tags=["test"],
):
    submit = OpenAIBatchSubmitOperator(
        task_id="submit",
        requests="{{ params.requests }}",
        max_requests_per_batch="{{ params.max_requests_per_batch }}",
    )
    wait = OpenAIBatchSensor(
        task_id="wait",
        batch_ids=submit.output,
        poll_interval=0.05,
        max_poll_interval=0.2,
        timeout=600,
        retry_failed_requests=2,
    )
    OpenAIBatchCollectOperator(task_id="collect", batch_ids=wait.output, output_uri="{{ params.output_uri }}")
