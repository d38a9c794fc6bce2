"""The end-to-end benchmark DAG: submit -> deferred wait -> collect, for one JSONL file of requests.

Run by ``bench.e2e`` with ``dag.test()`` against an instant emulator; the requests file and the output
folder come in through ``params`` (set from the environment by the benchmark).
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG, Param

from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
from airflow_openai_batch.sensors.batch import OpenAIBatchSensor

with DAG(
    dag_id="bench_e2e",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["benchmark"],
    params={
        "requests": Param(os.environ.get("AOB_BENCH_REQUESTS", ""), type="string"),
        "output": Param(os.environ.get("AOB_BENCH_OUTPUT", ""), type="string"),
    },
):
    submit = OpenAIBatchSubmitOperator(
        task_id="submit", requests="{{ params.requests }}", model="gpt-4o-mini"
    )
    wait = OpenAIBatchSensor(
        task_id="wait", batch_ids=submit.output, poll_interval=0.2, max_poll_interval=1.0, timeout=600
    )
    OpenAIBatchCollectOperator(
        task_id="collect",
        batch_ids=wait.output,
        output_uri="{{ params.output }}",
        output_format=os.environ.get("AOB_BENCH_FORMAT", "parquet"),
    )
