"""Embeddings backfill: a Parquet of documents -> /v1/embeddings batches -> a Parquet of vectors by id.

The first task stands for the warehouse export that lands a documents table on object storage; the
rest reads that table directly: one request per row, and the answers joined back to the rows' ids.
"""

from __future__ import annotations

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
    def export_documents(params: dict, run_id: str) -> str:
        """The documents table as Parquet (in production: the warehouse's export)."""
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        folder = Path(params["output_root"]) / "embeddings" / run_id
        folder.mkdir(parents=True, exist_ok=True)
        documents = pacsv.read_csv(DOCUMENTS_CSV).select(["ticket_id", "text"]).slice(0, params["documents"])
        pq.write_table(documents, folder / "documents.parquet")
        return str(folder / "documents.parquet")

    submit = OpenAIBatchSubmitOperator(
        task_id="submit",
        requests=export_documents(),
        endpoint="/v1/embeddings",
        model="text-embedding-3-small",
        id_column="ticket_id",
        prompt="{text}",
        body={"dimensions": 256},
    )
    wait = OpenAIBatchSensor(
        task_id="wait",
        batch_ids=submit.output,
        poll_interval=float(os.environ.get("OPENAI_BATCH_POLL_INTERVAL", "60")),
    )
    # answers.parquet: ticket_id beside its embedding, in the documents' order, ready for a vector store.
    OpenAIBatchCollectOperator(
        task_id="collect",
        batch_ids=wait.output,
        output_uri="{{ params.output_root }}/embeddings/{{ run_id }}/vectors",
        output_format="parquet",
        keep_columns=["ticket_id"],
    )
