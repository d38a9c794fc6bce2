"""Odd result files and Azure-style batch objects: reported under ``anomalies``, never a crash, never a
lost request.

A private emulator sits behind ``QuirksMiddleware``, which can point a finished batch at a crafted
result file (uploaded to the emulator), serve a zero-byte error file, and rewrite batch objects the way
Azure OpenAI sends them (``""`` file ids, ``null`` request_counts, ``null`` endpoint). The sensor and
the collect operator run against it unchanged.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_openai_batch.core.writers import read_records
from airflow_openai_batch.emulator import EmulatorConfig, EmulatorServer
from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
from airflow_openai_batch.sensors.batch import OpenAIBatchSensor
from tests.conftest import connection_uri_json
from tests.support.reliability.helpers import chat_request, count_ids, report
from tests.support.reliability.pipeline import first_event, rebuild
from tests.support.reliability.quirks import QuirksMiddleware
from tests.support.reliability.worker import make_context

REQUESTS = 40


@pytest.fixture(scope="module")
def quirky_server() -> Iterator[tuple[EmulatorServer, QuirksMiddleware]]:
    server = EmulatorServer(EmulatorConfig(rate=1_000_000.0, seed=5, time_scale=0.0))
    quirks = QuirksMiddleware(server.app)
    server.app = quirks  # served instead of the bare emulator app
    with server:
        yield server, quirks


@pytest.fixture
def quirky(quirky_server, monkeypatch) -> tuple[EmulatorServer, QuirksMiddleware]:
    server, quirks = quirky_server
    server.reset(restore_config=True)
    quirks.reset()
    monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_uri_json(server.base_url))
    return server, quirks


def spec(task_id: str) -> dict[str, Any]:
    return {
        "dag_id": "reliability_oddities",
        "task_id": task_id,
        "run_id": "odd",
        "run_after": time.time() - 60,
    }


def submit(rows: list[dict[str, Any]], per_batch: int = REQUESTS) -> list[str]:
    op = OpenAIBatchSubmitOperator(task_id="submit", requests=rows, max_requests_per_batch=per_batch)
    return op.execute(make_context(spec("submit")))


def file_lines(server: EmulatorServer, file_id: str | None) -> list[bytes]:
    return server.client().files.content(file_id).content.splitlines() if file_id else []


def upload(server: EmulatorServer, lines: list[bytes], *, final_newline: bool = True) -> str:
    data = b"\n".join(lines) + (b"\n" if final_newline else b"")
    return server.client().files.create(file=("crafted.jsonl", data), purpose="batch").id


def finished_batch(server: EmulatorServer, failure_rate: float) -> tuple[str, Any]:
    server.configure(failure_rate=failure_rate)
    [batch_id] = submit([chat_request(i, "odd") for i in range(REQUESTS)])
    server.advance(3600)
    batch = server.client().batches.retrieve(batch_id)
    assert batch.status == "completed"
    return batch_id, batch


def ghost(custom_id: str) -> bytes:
    body = {"id": "chatcmpl-ghost", "object": "chat.completion", "choices": [], "model": "gpt-4o-mini"}
    line = {"id": "batch_req_ghost", "custom_id": custom_id, "response": {"status_code": 200, "body": body}}
    return json.dumps(line).encode()


SCENARIOS = (
    "truncated_last_line",
    "duplicate_custom_ids",
    "unknown_custom_ids",
    "empty_error_file",
    "azure_style",
)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_odd_result_files_are_reported_and_every_request_lands_once(quirky, tmp_path, scenario) -> None:
    server, quirks = quirky
    expected_anomalies: dict[str, int] = {}
    if scenario == "truncated_last_line":
        batch_id, batch = finished_batch(server, 0.2)
        lines = file_lines(server, batch.output_file_id)
        cut = lines[-1][: len(lines[-1]) // 2]
        crafted = upload(server, [*lines[:-1], cut], final_newline=False)
        quirks.overrides[batch_id] = {"output_file_id": crafted}
        expected_anomalies = {"unparseable_result_line": 1}
        ids = [batch_id]
    elif scenario == "duplicate_custom_ids":
        batch_id, batch = finished_batch(server, 0.2)
        out, err = file_lines(server, batch.output_file_id), file_lines(server, batch.error_file_id)
        # One success reported twice in the output, far apart; one failure in both files.
        crafted = upload(server, [*out, out[0], err[0]])
        quirks.overrides[batch_id] = {"output_file_id": crafted}
        expected_anomalies = {"duplicate_result": 2}
        ids = [batch_id]
    elif scenario == "unknown_custom_ids":
        batch_id, batch = finished_batch(server, 0.2)
        out, err = file_lines(server, batch.output_file_id), file_lines(server, batch.error_file_id)
        quirks.overrides[batch_id] = {
            "output_file_id": upload(server, [ghost("ghost-1"), *out, ghost("ghost-2"), ghost("odd-99999")]),
            "error_file_id": upload(server, [*err, ghost("ghost-3")]),
        }
        expected_anomalies = {"unknown_custom_id": 4}
        ids = [batch_id]
    elif scenario == "empty_error_file":
        batch_id, batch = finished_batch(server, 0.0)
        assert batch.error_file_id is None
        quirks.files["file-zero-bytes"] = b""
        quirks.overrides[batch_id] = {"error_file_id": "file-zero-bytes"}
        ids = [batch_id]
    else:  # azure_style: "" for missing files, null request_counts and endpoint; one batch all failed
        server.configure(failure_rate=0.0)
        ok = submit([chat_request(i, "az-ok") for i in range(REQUESTS // 2)])
        server.configure(failure_rate=1.0)
        bad = submit([chat_request(i, "az-bad") for i in range(REQUESTS // 2)])
        server.advance(3600)
        quirks.azure = True
        quirks.files["file-zero-bytes"] = b""
        quirks.overrides[ok[0]] = {"error_file_id": "file-zero-bytes"}  # Azure's zero-byte error file
        ids = ok + bad
        raw = server.client().batches.retrieve(bad[0])
        assert raw.output_file_id == "" and raw.request_counts.total is None and raw.endpoint is None

    # No retry rounds: the failed lines are part of the oddity (and the emulator's clock is frozen).
    sensor = OpenAIBatchSensor(
        task_id="wait", batch_ids=ids, deferrable=False, poll_interval=0.05, retry_failed_requests=0
    )
    waited = sensor.execute(make_context(spec("wait")))
    assert set(waited) == set(ids) and {s["status"] for s in waited.values()} == {"completed"}

    out_dir = tmp_path / "results"
    summary = OpenAIBatchCollectOperator(
        task_id="collect", batch_ids=waited, output_uri=str(out_dir)
    ).execute(make_context(spec("collect")))
    successes = list(read_records(out_dir / "successes.jsonl"))
    failures = list(read_records(out_dir / "failures.jsonl"))
    counts = count_ids(successes, failures)
    inputs = {r["custom_id"] for bid in ids for r in map(json.loads, input_lines(server, bid))}
    assert set(counts) == inputs and set(counts.values()) == {1}, "a request was lost or duplicated"
    assert summary["total"] == len(inputs) == summary["succeeded"] + summary["failed"]
    anomalies = summary["anomalies"]
    assert anomalies["counts"] == expected_anomalies
    assert len(anomalies["examples"]) == sum(expected_anomalies.values())
    for example in anomalies["examples"]:
        assert (
            example["batch_id"] in ids and example["line"] >= 1 and example["source"] in ("output", "error")
        )
    assert json.loads((out_dir / "manifest.json").read_text())["anomalies"]["counts"] == expected_anomalies
    assert not any(r["custom_id"].startswith("ghost") for r in successes + failures)
    if scenario == "truncated_last_line":
        assert summary["failed_by_code"].get("missing", 0) >= 1
    if scenario == "azure_style":
        assert summary["succeeded"] == REQUESTS // 2 and summary["failed"] == REQUESTS // 2
        assert "missing" not in summary["failed_by_code"] and quirks.rewritten > 0
    report(
        f"result oddity {scenario}",
        requests=len(inputs),
        records=len(successes) + len(failures),
        anomalies=anomalies["counts"],
        failed_by_code=summary["failed_by_code"],
    )


def input_lines(server: EmulatorServer, batch_id: str) -> list[bytes]:
    client = server.client()
    return [line for line in file_lines(server, client.batches.retrieve(batch_id).input_file_id) if line]


def test_the_deferred_sensor_waits_through_azure_style_batch_objects(quirky) -> None:
    from airflow_openai_batch.compat import TaskDeferred

    server, quirks = quirky
    server.configure(validation_seconds=30.0)  # still validating at the sensor's first look
    ids = submit([chat_request(i, "az") for i in range(REQUESTS)], per_batch=REQUESTS // 2)
    quirks.azure = True
    sensor = OpenAIBatchSensor(task_id="wait", batch_ids=ids, poll_interval=0.05, max_poll_interval=0.1)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(make_context(spec("wait")))
    trigger = rebuild(deferred.value.trigger)
    server.advance(3600)
    payload = asyncio.run(first_event(trigger))
    assert payload["status"] == "success", payload
    result = getattr(sensor, deferred.value.method_name)(make_context(spec("wait")), event=payload)
    assert list(result) == ids and {s["status"] for s in result.values()} == {"completed"}
    summary = OpenAIBatchCollectOperator(task_id="collect", batch_ids=result).execute(
        make_context(spec("collect"))
    )
    assert summary["total"] == REQUESTS == summary["succeeded"]
    report("azure-style objects through the trigger", batches=len(ids), collected=summary["total"])
