"""Nightly ETL: classify support tickets with the OpenAI Batch API at half price.

tickets table (CSV) + prompt template + Pydantic answer model -> submit -> wait (deferred, no worker
slot; failed requests retried by themselves) -> collect: the tickets table with typed answer columns
(``answers.parquet``) in a run-scoped folder -> report.

Templated with ``run_id`` (not ``ds``): manual runs in Airflow 3 have no logical date.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import pendulum
from airflow.sdk import DAG, Param, task
from pydantic import BaseModel

from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
from airflow_openai_batch.sensors.batch import OpenAIBatchSensor

TICKETS_CSV = Path(__file__).parent / "data" / "support_tickets.csv"


class TicketLabel(BaseModel):
    """The answer each ticket gets: a typed struct column ``parsed`` in the output."""

    category: Literal["billing", "account", "bug", "delivery", "feature_request", "other"]
    urgent: bool


with DAG(
    dag_id="nightly_classification",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["openai-batch", "example"],
    params={
        "tickets": Param(str(TICKETS_CSV), type="string", description="the tickets table (CSV or Parquet)"),
        "output_root": Param(os.environ.get("OPENAI_BATCH_OUTPUT_ROOT", "/tmp/openai-batch"), type="string"),
        "model": Param(os.environ.get("OPENAI_BATCH_MODEL", "gpt-4o-mini"), type="string"),
        "max_requests_per_batch": Param(50_000, type="integer"),
    },
) as dag:
    submit = OpenAIBatchSubmitOperator(
        task_id="submit",
        requests="{{ params.tickets }}",
        id_column="ticket_id",
        system_prompt="Label the support ticket.",
        prompt="{text}",
        response_schema=TicketLabel,
        body={"max_completion_tokens": 50},
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
        join_input=True,
        fail_on_failure_ratio=0.5,
    )

    @task
    def report(summary: dict) -> dict:
        """Count the labels straight from the typed ``parsed`` column of the joined table."""
        import pyarrow.parquet as pq
        from airflow.sdk import ObjectStoragePath

        with ObjectStoragePath(summary["answers_uri"]).open("rb") as parquet:
            answers = pq.read_table(parquet, columns=["ticket_id", "status", "parsed"])
        parsed = answers.column("parsed").combine_chunks()
        categories = [c for c in parsed.field("category").to_pylist() if c is not None]
        report = {
            "tickets": answers.num_rows,
            "labelled": len(categories),
            "urgent": sum(bool(u) for u in parsed.field("urgent").to_pylist()),
            "by_category": {c: categories.count(c) for c in sorted(set(categories))},
            "failed": summary["failed"],
            "failed_by_code": summary["failed_by_code"],
        }
        print(json.dumps(report, indent=2))
        return report

    report(collect.output)
