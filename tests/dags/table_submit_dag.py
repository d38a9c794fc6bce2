"""Test DAG: a table input submitted with a prompt template that mixes Jinja (``{{ run_id }}``, rendered by
Airflow) and a Python format field (``{text}``, filled per row)."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param

from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator

with DAG(
    dag_id="openai_batch_table_submit_test",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    params={"table": Param(type="string")},
) as dag:
    OpenAIBatchSubmitOperator(
        task_id="submit",
        requests="{{ params.table }}",
        id_column="ticket_id",
        prompt="Run {{ run_id }}. Label this ticket: {text}",
        # A literal brace for Python's format, written so that Jinja leaves it: {{ '{{' }} renders "{{".
        system_prompt="You label tickets for {{ dag.dag_id }}. Answer {{ '{{' }}\"label\": ...{{ '}}' }}",
        body={"temperature": 0},
        model="gpt-4o-mini",
    )
