"""Every example DAG imports cleanly and runs end to end in dag.test() against the emulator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, TEST_API_KEY

EXAMPLE_DAGS = REPO_ROOT / "dags"


@pytest.fixture
def example_env(emulator, monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("OPENAI_BATCH_POLL_INTERVAL", "0.05")
    monkeypatch.setenv("OPENAI_BATCH_OUTPUT_ROOT", str(tmp_path))
    return tmp_path


def load_dag(dag_id: str):
    from tests.support.airflow_versions import DagBag

    bag = DagBag(dag_folder=str(EXAMPLE_DAGS))
    assert bag.import_errors == {}
    return bag.get_dag(dag_id)


def run(dag, **conf):
    from airflow.utils.state import DagRunState

    dag_run = dag.test(run_conf=conf or None)
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert dag_run.state == DagRunState.SUCCESS, states
    return dag_run


def xcom(dag_run, task_id: str):
    return dag_run.get_task_instance(task_id).xcom_pull(task_ids=task_id)


def test_every_example_dag_imports_cleanly() -> None:
    from tests.support.airflow_versions import DagBag

    bag = DagBag(dag_folder=str(EXAMPLE_DAGS))
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"nightly_classification", "embeddings_backfill", "retry_failed_requests"}


def test_nightly_classification_end_to_end(airflow_db, example_env, emulator) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    emulator.configure(failure_rate=0.05)
    dag_run = run(load_dag("nightly_classification"), max_requests_per_batch=1200)
    summary = xcom(dag_run, "collect")
    assert summary["total"] == 3000 == summary["succeeded"] + summary["failed"]
    assert len(summary["batch_ids"]) >= 3
    results = Path(summary["output_uri"].removeprefix("file://"))
    assert results.is_relative_to(example_env) and dag_run.run_id in str(results)
    assert {p.name for p in results.iterdir()} >= {
        "successes.parquet",
        "failures.parquet",
        "retry_requests.jsonl",
        "answers.parquet",
        "manifest.json",
    }
    answers = pq.read_table(results / "answers.parquet")
    tickets = pq.read_table(results / "answers.parquet", columns=["ticket_id"]).column(0).to_pylist()
    assert answers.num_rows == 3000 and tickets[:2] == ["T100000", "T100001"]
    assert answers.schema.field("parsed").type.get_field_index("category") >= 0
    assert answers.schema.field("parsed").type.field("urgent").type == pa.bool_()
    report = xcom(dag_run, "report")
    assert report["labelled"] == summary["succeeded"] and report["tickets"] == 3000
    assert set(report["by_category"]) <= {"billing", "account", "bug", "delivery", "feature_request", "other"}
    assert TEST_API_KEY not in json.dumps(summary)


def test_embeddings_backfill_end_to_end(airflow_db, example_env) -> None:
    import pyarrow.parquet as pq

    dag_run = run(load_dag("embeddings_backfill"), documents=120)
    summary = xcom(dag_run, "collect")
    vectors = pq.read_table(
        summary["answers_uri"].removeprefix("file://"), columns=["ticket_id", "embedding"]
    )
    assert vectors.num_rows == 120 and vectors.column("ticket_id")[0].as_py() == "T100000"
    assert len(vectors.column("embedding")[0]) == 256


def test_retry_loop_resubmits_only_the_failures(airflow_db, example_env, emulator) -> None:
    from tests.support.request_lines import chat_line, write_jsonl

    requests = write_jsonl(example_env / "in.jsonl", [chat_line(i) for i in range(50)])
    emulator.configure(failure_rate=0.3)
    dag_run = run(load_dag("retry_failed_requests"), requests=str(requests))
    first, second = xcom(dag_run, "collect"), xcom(dag_run, "collect_retries")
    assert first["failed"] > 0 and second["total"] == first["failed"]
