"""A submit worker SIGKILLed around upload and create, then retried: exactly one batch per chunk.

The operator's ``execute`` runs in a subprocess against the emulator (in this process, over loopback)
and blocks at the chosen point of the second chunk; the test SIGKILLs it there and runs the operator
again with the same dag_id/task_id/run_id, as Airflow does on a task retry. Two set-ups: without a
``task_state_store`` (Airflow < 3.3: the batches.list lookup by metadata is the only guard) and with a
durable one that survives the kill (Airflow 3.3's store lives in the metadata DB).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
from tests.support.reliability.helpers import Worker, chat_request, report, write_jsonl
from tests.support.reliability.worker import make_context

REQUESTS = 30
PER_BATCH = 10
CHUNKS = REQUESTS // PER_BATCH
#: The kill happens at this chunk's upload/create (1-based): one batch already exists by then.
KILL_AT_CHUNK = 2
KILL_POINTS = ("before_upload", "after_upload", "after_create", "after_execute")


def spec_for(tmp_path: Path, kill_point: str, run_id: str, requests: Path, store: str | None) -> dict:
    return {
        "mode": "submit",
        "kill_point": kill_point,
        "kill_at_call": KILL_AT_CHUNK,
        "marker": str(tmp_path / f"{kill_point}.marker"),
        "result": str(tmp_path / f"{kill_point}.result.json"),
        "dag_id": "reliability_crash",
        "task_id": "submit",
        "run_id": run_id,
        "run_after": time.time() - 300,
        "requests": str(requests),
        "max_requests_per_batch": PER_BATCH,
        "state_store": store,
    }


def run_in_process(spec: dict[str, Any]) -> list[str]:
    op = OpenAIBatchSubmitOperator(
        task_id=spec["task_id"], requests=spec["requests"], max_requests_per_batch=PER_BATCH
    )
    return op.execute(make_context(spec))


def batches_of_run(emulator, run_id: str) -> list[Any]:
    batches = emulator.client().batches.list(limit=100)
    return [b for b in batches if (b.metadata or {}).get("airflow_run_id") == run_id]


def input_bytes(emulator, batch_id: str) -> bytes:
    client = emulator.client()
    return client.files.content(client.batches.retrieve(batch_id).input_file_id).content


@pytest.mark.parametrize("store", ["list_lookup", "durable_store"])
@pytest.mark.parametrize("kill_point", KILL_POINTS)
def test_submit_killed_around_create_then_retried_has_one_batch_per_chunk(
    emulator, tmp_path, kill_point, store
) -> None:
    requests = write_jsonl(tmp_path / "requests.jsonl", [chat_request(i) for i in range(REQUESTS)])
    # The kill-free reference: the same input under another run id, to compare chunk contents with.
    reference = spec_for(tmp_path, "none", "reference", requests, None)
    reference_ids = run_in_process(reference)
    assert len(reference_ids) == CHUNKS
    reference_chunks = [input_bytes(emulator, b) for b in reference_ids]

    store_path = str(tmp_path / "task_state_store.json") if store == "durable_store" else None
    spec = spec_for(tmp_path, kill_point, "crashed-run", requests, store_path)
    started = time.monotonic()
    with Worker(spec, tmp_path) as worker:
        reached = worker.wait_for_marker()
        before_kill = {b.id for b in batches_of_run(emulator, "crashed-run")}
        calls_before = emulator.stats()["calls"]
        assert worker.kill() == -9, "the worker must die by SIGKILL"
    assert not Path(spec["result"]).exists(), "the killed worker must not have finished"

    retry_ids = run_in_process(spec)
    second_retry_ids = run_in_process(spec)  # a further kill-free retry changes nothing
    elapsed = time.monotonic() - started

    batches = batches_of_run(emulator, "crashed-run")
    per_chunk = Counter((b.metadata or {}).get("aob_chunk") for b in batches)
    assert per_chunk == {f"{i}/{CHUNKS}": 1 for i in range(1, CHUNKS + 1)}, (
        f"expected exactly one batch per chunk after a kill at {kill_point}, got {dict(per_chunk)}"
    )
    by_chunk = {int(b.metadata["aob_chunk"].split("/")[0]): b.id for b in batches}
    assert retry_ids == [by_chunk[i] for i in range(1, CHUNKS + 1)]
    assert second_retry_ids == retry_ids
    assert before_kill <= set(retry_ids), "batches created before the kill must be reused, not replaced"
    assert [input_bytes(emulator, b) for b in retry_ids] == reference_chunks
    if kill_point == "after_create":
        assert reached["batch_id"] in retry_ids  # created, never recorded, found again by metadata
    if kill_point == "after_execute":
        assert reached["batch_ids"] == retry_ids
    expected_before = {"before_upload": 1, "after_upload": 1, "after_create": 2, "after_execute": 3}
    assert len(before_kill) == expected_before[kill_point]

    stats = emulator.stats()
    created_after_kill = stats["calls"]["batches.create"] - calls_before["batches.create"]
    assert created_after_kill == CHUNKS - len(before_kill)
    referenced = {b.input_file_id for b in emulator.client().batches.list(limit=100)}
    orphans = [
        f.id for f in emulator.client().files.list() if f.purpose == "batch" and f.id not in referenced
    ]
    # Only a file uploaded right before the kill can be left without a batch (it costs no money).
    assert len(orphans) == (1 if kill_point == "after_upload" else 0)
    report(
        f"submit SIGKILL {kill_point} ({store})",
        batches_before_kill=len(before_kill),
        created_by_retry=created_after_kill,
        batches_per_chunk=json.dumps(sorted(per_chunk.values())),
        orphan_uploads=len(orphans),
        seconds=elapsed,
    )
