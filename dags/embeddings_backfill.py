"""Embeddings backfill: documents -> /v1/embeddings batches -> Parquet of (id, vector).

The requests are built in a task and handed to the submit operator as a list (XCom), one document per
request; the vectors land in a run-scoped folder, ready for a vector store load.
"""

from __future__ import annotations

import csv
import itertools
import os
from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param, task

from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
from airflow_openai_batch.sensors.batch import OpenAIBatchSensor

DOCUMENTS_CSV = Path(__file__).parent / "data" / "support_tickets.csv"

with DAG(
    dag_id="embeddings_backfill",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["openai-batch", "example"],
    params={
        "output_root": Param(os.environ.get("OPENAI_BATCH_OUTPUT_ROOT", "/tmp/openai-batch"), type="string"),
        "documents": Param(500, type="integer"),
    },
) as dag:

    @task
    def documents_to_requests(params: dict) -> list[dict]:
        """``{custom_id, body}`` items: the operator fills in method and url from the endpoint."""
        with DOCUMENTS_CSV.open(newline="") as documents:
            rows = list(itertools.islice(csv.DictReader(documents), params["documents"]))
        return [
            {"custom_id": row["ticket_id"], "body": {"input": row["text"], "dimensions": 256}} for row in rows
        ]

    submit = OpenAIBatchSubmitOperator(
        task_id="submit",
        requests=documents_to_requests(),
        endpoint="/v1/embeddings",
        model="text-embedding-3-small",
    )
    wait = OpenAIBatchSensor(
        task_id="wait",
        batch_ids=submit.output,
        poll_interval=float(os.environ.get("OPENAI_BATCH_POLL_INTERVAL", "60")),
    )
    collect = OpenAIBatchCollectOperator(
        task_id="collect",
        batch_ids=wait.output,
        output_uri="{{ params.output_root }}/embeddings/{{ run_id }}",
        output_format="parquet",
    )

    @task
    def write_vectors(summary: dict) -> str:
        """Keep only (id, vector): the shape a vector store loader wants."""
        import pyarrow.parquet as pq
        from airflow.sdk import ObjectStoragePath

        folder = ObjectStoragePath(summary["output_uri"])
        with (folder / "successes.parquet").open("rb") as source:
            table = pq.read_table(source, columns=["custom_id", "embedding"])
        table = table.rename_columns(["id", "vector"])
        target = folder / "vectors.parquet"
        with target.open("wb") as out:
            pq.write_table(table, out)
        print(f"{table.num_rows} vectors of {len(table.column('vector')[0])} dims -> {target}")
        return str(target)

    write_vectors(collect.output)
