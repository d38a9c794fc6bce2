"""Nightly ETL: classify support tickets with the OpenAI Batch API at half price.

read tickets -> build chat requests (JSON-schema answers) -> submit -> wait (deferred, no worker
slot) -> collect to Parquet in a run-scoped folder -> load the labels and report.

Templated with ``run_id`` (not ``ds``): manual runs in Airflow 3 have no logical date.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param, task

from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
from airflow_openai_batch.sensors.batch import OpenAIBatchSensor

TICKETS_CSV = Path(__file__).parent / "data" / "support_tickets.csv"
CATEGORIES = ["billing", "account", "bug", "delivery", "feature_request", "other"]
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "ticket_label",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "category": {"type": "string", "enum": CATEGORIES},
                "urgent": {"type": "boolean"},
            },
            "required": ["category", "urgent"],
            "additionalProperties": False,
        },
    },
}

with DAG(
    dag_id="nightly_classification",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["openai-batch", "example"],
    params={
        "output_root": Param(os.environ.get("OPENAI_BATCH_OUTPUT_ROOT", "/tmp/openai-batch"), type="string"),
        "model": Param(os.environ.get("OPENAI_BATCH_MODEL", "gpt-4o-mini"), type="string"),
        "sample_size": Param(0, type="integer", description="0 = every ticket"),
        "max_requests_per_batch": Param(50_000, type="integer"),
    },
) as dag:

    @task
    def build_requests(params: dict, run_id: str) -> str:
        """One chat request per ticket, written as JSONL into the run's folder."""
        folder = Path(params["output_root"]) / "classification" / run_id
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "requests.jsonl"
        with TICKETS_CSV.open(newline="") as tickets, path.open("w") as out:
            for n, row in enumerate(csv.DictReader(tickets)):
                if params["sample_size"] and n >= params["sample_size"]:
                    break
                request = {
                    "custom_id": row["ticket_id"],
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "messages": [
                            {"role": "system", "content": "Label the support ticket."},
                            {"role": "user", "content": row["text"]},
                        ],
                        "response_format": RESPONSE_FORMAT,
                        "max_completion_tokens": 50,
                    },
                }
                out.write(json.dumps(request) + "\n")
        return str(path)

    submit = OpenAIBatchSubmitOperator(
        task_id="submit",
        requests=build_requests(),
        model="{{ params.model }}",
        metadata={"pipeline": "ticket-classification"},
        max_requests_per_batch="{{ params.max_requests_per_batch }}",
    )
    wait = OpenAIBatchSensor(
        task_id="wait",
        batch_ids=submit.output,
        # The demo polls its emulator every few seconds; against OpenAI a minute is plenty.
        poll_interval=float(os.environ.get("OPENAI_BATCH_POLL_INTERVAL", "60")),
    )
    collect = OpenAIBatchCollectOperator(
        task_id="collect",
        batch_ids=wait.output,
        output_uri="{{ params.output_root }}/classification/{{ run_id }}/results",
        output_format="parquet",
        fail_on_failure_ratio=0.5,
    )

    @task
    def report(summary: dict) -> dict:
        """Load the labelled tickets and print a small report."""
        import pyarrow.parquet as pq
        from airflow.sdk import ObjectStoragePath

        labels: dict[str, int] = {}
        urgent = 0
        with ObjectStoragePath(summary["successes_uri"]).open("rb") as parquet:
            contents = pq.read_table(parquet, columns=["content"]).column("content").to_pylist()
        for content in contents:
            answer = json.loads(content or "{}")
            labels[answer.get("category", "unparsed")] = labels.get(answer.get("category", "unparsed"), 0) + 1
            urgent += bool(answer.get("urgent"))
        report = {
            "labelled": sum(labels.values()),
            "urgent": urgent,
            "by_category": labels,
            "failed": summary["failed"],
            "failed_by_code": summary["failed_by_code"],
        }
        print(json.dumps(report, indent=2))
        return report

    report(collect.output)
