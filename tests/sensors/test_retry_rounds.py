"""Failed requests come back by themselves: a whole DAG run (dag.test(), real metadata DB) against the
emulator, which expires a batch part-way and fails 5% of the lines with HTTP 500."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tests.conftest import TEST_DAGS_FOLDER
from tests.support.request_lines import write_jsonl

REQUESTS = 600
PER_CHUNK = 200


def request(i: int) -> dict:
    return {
        "custom_id": f"row-{i:04d}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Summarise ticket {i}"}]},
    }


def test_an_expired_batch_and_5xx_lines_end_with_every_request_succeeded(
    airflow_db, emulator, tmp_path: Path
) -> None:
    from airflow.utils.state import DagRunState

    from tests.support.airflow_versions import DagBag

    emulator.configure(expire_next_batches=1, failure_rate=0.05, failure_kinds=("500",), seed=11)
    requests = write_jsonl(tmp_path / "in.jsonl", [request(i) for i in range(REQUESTS)])
    out = tmp_path / "out"
    dag = DagBag(dag_folder=str(TEST_DAGS_FOLDER / "retry_rounds_dag.py")).get_dag(
        "openai_batch_retry_rounds_test"
    )
    dag_run = dag.test(
        run_conf={"requests": str(requests), "max_requests_per_batch": PER_CHUNK, "output_uri": str(out)}
    )
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert dag_run.state == DagRunState.SUCCESS, states

    waited = dag_run.get_task_instance("wait").xcom_pull(task_ids="wait")
    statuses = Counter(s["status"] for s in waited.values())
    assert statuses["expired"] == 1, statuses  # the first batch expired half-way...
    retries = {b: s for b, s in waited.items() if s["attempt"] > 1}
    assert retries and all(waited[s["retry_of"]]["attempt"] == s["attempt"] - 1 for s in retries.values())

    summary = json.loads((out / "manifest.json").read_text())
    assert summary["total"] == REQUESTS == summary["succeeded"]  # ...and every request succeeded
    assert summary["failed"] == 0 and summary["failed_by_code"] == {}
    assert summary["retried"] > PER_CHUNK // 2 - 1  # at least the expired half, plus the 5xx lines
    assert (out / "retry_requests.jsonl").read_bytes() == b""
    successes = [json.loads(line) for line in (out / "successes.jsonl").read_text().splitlines()]
    assert Counter(r["custom_id"] for r in successes) == Counter(
        request(i)["custom_id"] for i in range(REQUESTS)
    )
    assert sum(r["attempts"] > 1 for r in successes) == summary["retried"]
