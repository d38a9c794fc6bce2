"""Test DAG: create two small batches in the emulator, then wait for them with the deferrable sensor."""

from __future__ import annotations

import json

import pendulum
from airflow.sdk import DAG, task

from airflow_openai_batch.sensors.batch import OpenAIBatchSensor

with DAG(
    dag_id="openai_batch_sensor_test",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["test"],
):

    @task
    def create_batches() -> list[str]:
        from airflow_openai_batch.hooks.batch import OpenAIBatchHook

        client = OpenAIBatchHook().client  # the openai SDK client built from openai_default
        ids = []
        for n in range(2):
            lines = [
                {
                    "custom_id": f"row-{n}-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"row {i}"}]},
                }
                for i in range(3)
            ]
            data = "".join(json.dumps(line) + "\n" for line in lines).encode()
            upload = client.files.create(file=(f"in-{n}.jsonl", data), purpose="batch")
            batch = client.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            ids.append(batch.id)
        return ids

    OpenAIBatchSensor(
        task_id="wait",
        batch_ids=create_batches(),
        poll_interval=0.05,
        max_poll_interval=0.2,
        timeout=300,
    )
