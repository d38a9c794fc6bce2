"""A real scheduler + triggerer (LocalExecutor, SQLite): triggerer crash and restart, kill while deferred.

The emulator runs in the test process (reached over loopback by the Airflow processes); its ``rate``
knob holds the batches in progress for as long as a test needs, then lets them finish. The DAG is
``tests/dags/reliability_pipeline.py`` (build requests -> submit -> deferrable sensor -> collect).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_API_KEY, TEST_DAGS_FOLDER, connection_uri_json
from tests.support.cluster import AirflowCluster
from tests.support.reliability.helpers import report, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DAG_ID = "reliability_pipeline"
REQUESTS, PER_BATCH = 30, 10
CHUNKS = REQUESTS // PER_BATCH
#: What must never be found; the distinctive tail too, in case a prefix were cut or masked partially.
SECRETS = (TEST_API_KEY.encode(), TEST_API_KEY.removeprefix("sk-test-").encode())


@pytest.fixture(scope="module")
def cluster(emulator_server, tmp_path_factory) -> Iterator[AirflowCluster]:
    home = tmp_path_factory.mktemp("airflow-cluster")
    extra = {
        "AIRFLOW_CONN_OPENAI_DEFAULT": connection_uri_json(emulator_server.base_url, max_retries=3),
        "AOB_RELIABILITY_POLL_INTERVAL": "0.5",
        "AOB_RELIABILITY_MAX_POLL_INTERVAL": "1",
        "AOB_RELIABILITY_SENSOR_TIMEOUT": "900",
    }
    cluster = AirflowCluster(home, TEST_DAGS_FOLDER, extra)
    started = time.monotonic()
    try:
        cluster.start()
        cluster.wait_for_dag(DAG_ID)
        report("real cluster start", seconds=time.monotonic() - started, port=cluster.port)
        yield cluster
    finally:
        cluster.stop()
        assert cluster.own_pids() == [], "an Airflow process of the test cluster survived the stop"


def start_run(cluster: AirflowCluster, emulator, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """Trigger a run and wait until its sensor is deferred and a triggerer is polling its batches."""
    conf = {"requests": REQUESTS, "per_batch": PER_BATCH, "output_root": str(tmp_path / "results")}
    run_id = cluster.trigger(DAG_ID, conf)

    def polling() -> dict[str, Any] | None:
        states = cluster.ti_states(DAG_ID, run_id)
        if states.get("submit") == "failed":
            raise AssertionError(f"submit failed: {states}\n{cluster.tail()}")
        rows = [t for t in cluster.triggers() if t["kwargs"].get("job")]
        # Beyond the sensor's first look (one retrieve per batch): the trigger itself is polling.
        polled = emulator.stats()["batches.retrieve"] >= 3 * CHUNKS
        if states.get("wait") == "deferred" and rows and rows[0]["triggerer_id"] and polled:
            return rows[0]
        return None

    trigger = wait_until(
        polling,
        timeout=120,
        interval=0.25,
        what="the sensor to defer and its trigger to poll",
        details=cluster.tail,
    )
    return run_id, trigger


def assert_no_secret(cluster: AirflowCluster, trigger_texts: list[str]) -> dict[str, int]:
    """Search everything the cluster produced: every file under its home (task and trigger logs, the
    component logs, the metadata DB file itself), XCom values, rendered fields and trigger kwargs."""
    files = [p for p in cluster.home.rglob("*") if p.is_file()]
    leaks = [str(p) for p in files if any(s in p.read_bytes() for s in SECRETS)]
    xcoms = cluster.query("SELECT task_id, value FROM xcom")
    rendered = cluster.query("SELECT task_id, rendered_fields FROM rendered_task_instance_fields")
    texts = [str(v) for _, v in xcoms] + [str(v) for _, v in rendered] + trigger_texts
    leaks += [t[:200] for t in texts if any(s.decode() in t for s in SECRETS)]
    assert leaks == [], f"the API key leaked into: {leaks}"
    task_logs = [p for p in files if "dag_id=" in str(p)]
    assert task_logs and xcoms and rendered, "nothing was searched"
    return {
        "files_searched": len(files),
        "task_log_files": len(task_logs),
        "mb_searched": sum(p.stat().st_size for p in files) // 2**20,
        "xcom_rows": len(xcoms),
        "rendered_rows": len(rendered),
        "trigger_kwargs": len(trigger_texts),
    }


def test_triggerer_killed_while_deferred_resumes_with_the_same_deadline(cluster, emulator, tmp_path) -> None:
    emulator.configure(rate=0.0)  # the batches stay in progress until the triggerer is back
    started = time.monotonic()
    run_id, before = start_run(cluster, emulator, tmp_path)
    old_triggerer = before["triggerer_id"]
    assert before["kwargs"]["job"]["deadline"] > time.time() + 600

    cluster.kill("triggerer")  # SIGKILL of the whole triggerer (supervisor and runner)
    killed_at = time.monotonic()
    polls_at_kill = emulator.stats()["batches.retrieve"]
    assert cluster.ti_states(DAG_ID, run_id)["wait"] == "deferred", "a triggerer crash must not end the task"
    cluster.spawn("triggerer")

    def resumed() -> dict[str, Any] | None:
        rows = [t for t in cluster.triggers() if t["id"] == before["id"]]
        polled = emulator.stats()["batches.retrieve"] > polls_at_kill + CHUNKS
        if rows and rows[0]["triggerer_id"] not in (None, old_triggerer) and polled:
            return rows[0]
        return None

    after = wait_until(
        resumed, timeout=90, interval=0.25, what="the new triggerer to poll", details=cluster.tail
    )
    downtime = time.monotonic() - killed_at
    # The trigger's kwargs hold the job (its batches, deadline and start) and the connection id.
    for key in ("job", "conn_id"):
        assert after["kwargs"][key] == before["kwargs"][key], f"{key} changed across the restart"
    assert cluster.ti_states(DAG_ID, run_id)["wait"] == "deferred"

    emulator.configure(rate=1_000_000.0)  # let the batches finish
    final = wait_until(
        lambda: (
            cluster.run_state(DAG_ID, run_id) in ("success", "failed") and cluster.run_state(DAG_ID, run_id)
        ),
        timeout=120,
        interval=0.5,
        what="the DAG run to finish",
        details=cluster.tail,
    )
    states = cluster.ti_states(DAG_ID, run_id)
    assert final == "success", f"{states}\n{cluster.tail()}"
    assert set(states.values()) == {"success"}
    summary = cluster.xcom(DAG_ID, run_id, "collect")
    assert summary["total"] == REQUESTS == summary["succeeded"] + summary["failed"]
    stats = emulator.stats()
    assert stats["batches"] == CHUNKS, "one batch per chunk, created once"
    assert stats["batches.cancel"] == 0, "a triggerer restart is not a kill: nothing may be cancelled"
    figures = assert_no_secret(cluster, [before["text"], after["text"]])
    report(
        "triggerer SIGKILL + restart",
        trigger_id=before["id"],
        triggerer=f"{old_triggerer}->{after['triggerer_id']}",
        downtime_s=downtime,
        polls_before_kill=polls_at_kill,
        polls_total=stats["batches.retrieve"],
        deadline_kept=after["kwargs"]["job"]["deadline"] == before["kwargs"]["job"]["deadline"],
        batches=stats["batches"],
        collected=summary["total"],
        seconds=time.monotonic() - started,
        **figures,
    )


def test_marking_the_deferred_sensor_failed_cancels_its_batches(cluster, emulator, tmp_path) -> None:
    emulator.configure(rate=0.0, cancel_seconds=0.0)
    started = time.monotonic()
    run_id, trigger = start_run(cluster, emulator, tmp_path)
    batch_ids = [chunk["attempts"][0]["batch_id"] for chunk in trigger["kwargs"]["job"]["chunks"]]
    assert len(batch_ids) == CHUNKS and emulator.stats()["batches.cancel"] == 0

    marked_at = time.monotonic()
    cluster.set_ti_state(DAG_ID, run_id, "wait", "failed")  # Airflow's own API: the UI's "mark failed"
    wait_until(
        lambda: emulator.stats()["batches.cancel"] >= CHUNKS,
        timeout=60,
        interval=0.25,
        what="the trigger's on_kill to cancel the batches",
        details=cluster.tail,
    )
    to_cancel = time.monotonic() - marked_at
    client = emulator.client()
    statuses = wait_until(
        lambda: (
            (s := [client.batches.retrieve(b).status for b in batch_ids]) and set(s) == {"cancelled"} and s
        ),
        timeout=30,
        what="the batches to be cancelled",
    )
    final = wait_until(
        lambda: (s := cluster.run_state(DAG_ID, run_id)) in ("success", "failed") and s,
        timeout=60,
        interval=0.5,
        what="the DAG run to end",
    )
    states = cluster.ti_states(DAG_ID, run_id)
    assert final == "failed" and states["wait"] == "failed", states
    assert states["collect"] in ("upstream_failed", None), states
    assert emulator.stats()["batches.cancel"] == CHUNKS
    trigger_logs = list(cluster.home.glob(f"logs/dag_id={DAG_ID}/run_id={run_id}/task_id=wait/*trigger*"))
    figures = assert_no_secret(cluster, [trigger["text"]])
    report(
        "mark failed while deferred",
        cancel_calls=emulator.stats()["batches.cancel"],
        statuses=json.dumps(statuses),
        seconds_to_cancel=to_cancel,
        trigger_log_files=len(trigger_logs),
        seconds=time.monotonic() - started,
        **figures,
    )
