"""API faults: 429 (with Retry-After), 500 and dropped connections on 20% of the calls.

Each run is compared with the fault-free run of the same emulator seed (which decides, per custom_id,
which requests fail and how): the set of custom_ids per outcome and the error codes must be identical,
and exactly one batch per chunk may exist at the emulator (nothing paid twice). The SDK retries what is
safe to retry (the connection says ``max_retries=8``); ``batches.create`` is never retried blindly.

Regression tests below pin three bugs this suite found and that are fixed: a 429 on ``batches.create``
failed the submit, a dropped ``files.content`` download failed the collect, and poke-mode ``on_kill``
gave up on a batch after one failed cancel call.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openai
import pytest

from airflow_openai_batch.core.writers import read_records
from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
from airflow_openai_batch.sensors.batch import OpenAIBatchSensor
from tests.conftest import TEST_DAGS_FOLDER, connection_uri_json
from tests.support.reliability.helpers import chat_request, count_ids, outcome_of, report, reseed
from tests.support.reliability.pipeline import rebuild, run_pipeline
from tests.support.reliability.worker import make_context

SEEDS = (11, 12, 13)
#: Seed 13 first: its (deterministic, sequential) submit stage meets a 429 on batches.create.
DAG_SEEDS = (13, 11, 12)
FAULT_RATE = 0.2
REQUESTS = 60
PER_BATCH = 20
#: The line outcomes (deterministic per seed and custom_id) and a validation phase, so the sensor's
#: first look finds the batches live and the trigger path runs.
LINE_KNOBS: dict[str, Any] = {"failure_rate": 0.2, "missing_rate": 0.05, "validation_seconds": 0.2}
ALL_KINDS = ("429", "500", "drop")


@pytest.fixture
def faulty_conn(emulator, monkeypatch) -> Any:
    monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_uri_json(emulator.base_url, max_retries=8))
    return emulator


def seed_with_fault_pattern(emulator: Any, pattern: Sequence[bool], rate: float, kinds: Sequence[str]) -> int:
    """A seed whose first fault decisions are exactly ``pattern`` (probed on files.list, then rewound)."""
    probe = emulator.client(max_retries=0)
    for seed in range(1000):
        reseed(emulator, seed)
        emulator.configure(fault_rate=rate, fault_kinds=tuple(kinds), fault_routes=("files.list",))
        seen = []
        for _ in pattern:
            try:
                probe.files.list()
                seen.append(False)
            except (openai.APIStatusError, openai.APIConnectionError):
                seen.append(True)
        if seen == list(pattern):
            emulator.configure(fault_rate=0.0, fault_routes=None)
            return seed
    raise AssertionError(f"no seed below 1000 starts its fault stream with {pattern}")


def require(condition: object, message: str) -> None:
    """A precondition: a broken set-up raises RuntimeError, so it cannot pass for the behaviour under test."""
    if not condition:
        raise RuntimeError(message)


def fault_figures(stats: dict[str, Any]) -> dict[str, int]:
    return {route: n for route, n in stats["faults"].items() if n}


# -- the whole pipeline, in a real DAG run --------------------------------------------------------


def run_dag(tmp_path, run_tag: str) -> tuple[Any, dict[str, Any]]:
    from tests.support.airflow_versions import DagBag

    bag = DagBag(dag_folder=str(TEST_DAGS_FOLDER / "reliability_pipeline.py"))
    assert bag.import_errors == {}
    dag = bag.get_dag("reliability_pipeline")
    conf = {"requests": REQUESTS, "per_batch": PER_BATCH, "output_root": str(tmp_path / run_tag)}
    started = time.monotonic()
    dag_run = dag.test(run_conf=conf)
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    return dag_run, {"states": states, "seconds": time.monotonic() - started}


def dag_outcome(dag_run) -> dict[str, Any]:
    summary = dag_run.get_task_instance("collect").xcom_pull(task_ids="collect")
    folder = Path(summary["output_uri"].removeprefix("file://"))
    successes = list(read_records(folder / "successes.jsonl"))
    failures = list(read_records(folder / "failures.jsonl"))
    assert summary["total"] == REQUESTS == len(successes) + len(failures)
    return outcome_of(successes, failures)


def test_dag_run_under_20pct_faults_on_every_route_equals_the_fault_free_run(
    airflow_db, faulty_conn, monkeypatch, tmp_path
) -> None:
    emulator = faulty_conn
    monkeypatch.setenv("AOB_RELIABILITY_POLL_INTERVAL", "0.05")
    for seed in DAG_SEEDS:
        emulator.reset()
        emulator.configure(seed=seed, fault_rate=0.0, **LINE_KNOBS)
        clean_run, clean = run_dag(tmp_path, f"clean-{seed}")
        require(clean_run.state == "success", f"the fault-free run failed: {clean['states']}")
        expected = dag_outcome(clean_run)
        # The chunks' batches and the sensor's retry rounds of their failed lines (the same in both runs).
        clean_batches = emulator.stats()["batches"]

        emulator.reset()  # rewinds the fault stream to the seed
        emulator.configure(fault_rate=FAULT_RATE, fault_kinds=ALL_KINDS, fault_routes=None, retry_after=0.2)
        faulty_run, faulty = run_dag(tmp_path, f"faults-{seed}")
        stats = emulator.stats()
        report(
            f"dag.test under 20% faults, seed {seed}",
            faults=fault_figures(stats),
            by_kind=stats["faults_by_kind"],
            states=faulty["states"],
            batches_created=stats["batches"],
            seconds=faulty["seconds"],
        )
        assert faulty_run.state == "success", f"seed {seed}: {faulty['states']}"
        assert stats["batches"] == clean_batches, "a chunk or a retry round was paid twice"
        assert dag_outcome(faulty_run) == expected
        assert sum(stats["faults"][r] for r in ("files.create", "batches.create", "batches.retrieve")) > 0


# -- each stage under the faults it handles -------------------------------------------------------


def test_each_stage_survives_20pct_faults_and_results_equal_the_fault_free_run(faulty_conn, tmp_path) -> None:
    """Every stage under every fault kind on every route, plus ambiguous creates (created, then
    answered 500/drop) during the submit."""
    emulator = faulty_conn
    rows = [chat_request(i) for i in range(2 * REQUESTS)]
    everywhere = {"fault_rate": FAULT_RATE, "fault_routes": None, "retry_after": 0.2}
    knobs = {
        "submit": {**everywhere, "fault_kinds": ALL_KINDS, "fault_after_create_rate": FAULT_RATE},
        "wait": {**everywhere, "fault_kinds": ALL_KINDS, "fault_after_create_rate": 0.0},
        "collect": {**everywhere, "fault_kinds": ALL_KINDS},
    }
    faults_per_route: Counter = Counter()
    for seed in SEEDS:
        emulator.reset()
        emulator.configure(seed=seed, fault_rate=0.0, fault_after_create_rate=0.0, **LINE_KNOBS)
        clean = run_pipeline(emulator, rows, tmp_path, f"clean-{seed}", per_batch=PER_BATCH)
        clean_batches = emulator.stats()["batches"]

        emulator.reset()
        faulty = run_pipeline(
            emulator,
            rows,
            tmp_path,
            f"faults-{seed}",
            per_batch=PER_BATCH,
            stage_knobs=knobs,
            stage_seed=seed,
        )
        stats = emulator.stats()
        faults_per_route.update(stats["faults"])
        report(
            f"stages under 20% faults, seed {seed}",
            faults=fault_figures(stats),
            by_kind=stats["faults_by_kind"],
            ambiguous_creates=stats["faults_after_create"],
            batches_created=stats["batches"],
            requests_accounted=faulty["records"],
            failed_by_code=faulty["summary"]["failed_by_code"],
            deferrals=faulty["deferrals"],
            seconds=faulty["seconds"],
        )
        assert faulty["outcome"] == clean["outcome"], f"seed {seed}: results differ from the fault-free run"
        assert faulty["records"] == faulty["summary"]["total"] == len(rows)
        # The chunks' batches and the sensor's retry rounds of their failed lines, each made once.
        assert stats["batches"] == clean_batches >= len(rows) // PER_BATCH, "a chunk was paid twice"
        assert faulty["deferrals"] >= 1, "the trigger path must have run"
    used = ("files.create", "batches.create", "batches.list", "batches.retrieve", "files.content")
    assert all(faults_per_route[route] > 0 for route in used), dict(faults_per_route)


def test_killing_the_deferred_task_cancels_every_batch_under_20pct_faults(faulty_conn) -> None:
    from airflow_openai_batch.compat import TaskDeferred

    emulator = faulty_conn
    cancel_faults = 0
    for seed in SEEDS:
        emulator.reset()
        emulator.configure(seed=seed, rate=0.0, fault_rate=0.0)  # the batches stay in progress
        rows = [chat_request(i) for i in range(2 * REQUESTS)]
        spec = {"dag_id": "reliability_faults", "run_id": f"kill-{seed}", "run_after": time.time() - 300}
        ids = OpenAIBatchSubmitOperator(
            task_id="submit", requests=rows, max_requests_per_batch=PER_BATCH
        ).execute(make_context({**spec, "task_id": "submit"}))
        sensor = OpenAIBatchSensor(task_id="wait", batch_ids=ids, poll_interval=0.05, max_poll_interval=0.1)
        with pytest.raises(TaskDeferred) as deferred:
            sensor.execute(make_context({**spec, "task_id": "wait"}))
        trigger = rebuild(deferred.value.trigger)
        polls_before = emulator.stats()["batches.retrieve"]

        async def wait_then_kill(trigger=trigger, ids=ids, polls_before=polls_before, seed=seed) -> None:
            events = trigger.run()
            task = asyncio.ensure_future(events.__anext__())
            while emulator.stats()["batches.retrieve"] < polls_before + 2 * len(ids):
                await asyncio.sleep(0.02)  # the trigger polls every 0.05 s; bounded by the test timeout
            reseed(emulator, seed)
            emulator.configure(fault_rate=FAULT_RATE, fault_kinds=ALL_KINDS, retry_after=0.2)
            task.cancel()  # what the triggerer does on a user action, before awaiting on_kill()
            await asyncio.gather(task, return_exceptions=True)
            await events.aclose()
            await asyncio.wait_for(trigger.on_kill(), timeout=30)  # the triggerer's default bound

        asyncio.run(wait_then_kill())
        emulator.configure(fault_rate=0.0)
        stats = emulator.stats()
        statuses = Counter(emulator.client().batches.retrieve(b).status for b in ids)
        cancel_faults += stats["faults"]["batches.cancel"]
        report(
            f"deferred on_kill under 20% faults, seed {seed}",
            batches=len(ids),
            cancel_calls=stats["batches.cancel"],
            cancel_faults=stats["faults"]["batches.cancel"],
            statuses=dict(statuses),
        )
        assert set(statuses) <= {"cancelling", "cancelled"}, f"seed {seed}: {dict(statuses)}"
        assert stats["batches.cancel"] == len(ids) + stats["faults"]["batches.cancel"]
    assert cancel_faults > 0, "the seeds must have faulted some cancel calls"


# -- the bugs, pinned -----------------------------------------------------------------------------


def test_a_429_on_batches_create_is_waited_out_and_retried(faulty_conn) -> None:
    emulator = faulty_conn
    seed = seed_with_fault_pattern(emulator, [True, False], 0.5, ["429"])
    rows = [chat_request(i) for i in range(5)]
    reseed(emulator, seed)
    emulator.configure(
        fault_rate=0.5, fault_kinds=("429",), fault_routes=("batches.create",), retry_after=0.2
    )
    spec = {"dag_id": "reliability_faults", "task_id": "submit", "run_id": "429", "run_after": time.time()}
    try:
        ids = OpenAIBatchSubmitOperator(task_id="submit", requests=rows).execute(make_context(spec))
    finally:
        stats = emulator.stats()
        report("429 on batches.create", create_calls=stats["batches.create"], faults=fault_figures(stats))
    assert len(ids) == 1 and stats["batches"] == 1
    assert stats["batches.create"] == 2 and stats["faults"]["batches.create"] == 1


def test_collect_survives_a_dropped_result_download(faulty_conn) -> None:
    emulator = faulty_conn
    # One batch: three downloads (input, output, error). The first is dropped, every later one works.
    seed = seed_with_fault_pattern(emulator, [True, False, False, False], 0.5, ["drop"])
    emulator.configure(failure_rate=0.3)
    rows = [chat_request(i) for i in range(20)]
    spec = {"dag_id": "reliability_faults", "task_id": "submit", "run_id": "drop", "run_after": time.time()}
    ids = OpenAIBatchSubmitOperator(task_id="submit", requests=rows).execute(make_context(spec))
    emulator.advance(60)
    reseed(emulator, seed)
    emulator.configure(fault_rate=0.5, fault_kinds=("drop",), fault_routes=("files.content",))
    try:
        summary = OpenAIBatchCollectOperator(task_id="collect", batch_ids=ids).execute(
            make_context({**spec, "task_id": "collect"})
        )
    finally:
        stats = emulator.stats()
        report("dropped files.content", content_calls=stats["files.content"], faults=fault_figures(stats))
    assert stats["faults"]["files.content"] == 1
    counts = count_ids(summary["successes"], summary["failures"])
    assert sorted(counts) == sorted(r["custom_id"] for r in rows) and set(counts.values()) == {1}


def test_poke_mode_on_kill_cancels_despite_a_transient_fault(faulty_conn) -> None:
    emulator = faulty_conn
    seed = seed_with_fault_pattern(emulator, [True, False], 0.5, ["500"])
    emulator.configure(rate=0.0)
    rows = [chat_request(i) for i in range(5)]
    spec = {"dag_id": "reliability_faults", "task_id": "submit", "run_id": "poke", "run_after": time.time()}
    ids = OpenAIBatchSubmitOperator(task_id="submit", requests=rows).execute(make_context(spec))
    sensor = OpenAIBatchSensor(task_id="wait", batch_ids=ids, deferrable=False, poll_interval=0.05)
    require(not sensor.poke(make_context({**spec, "task_id": "wait"})).is_done, "the batch must be live")
    reseed(emulator, seed)
    emulator.configure(fault_rate=0.5, fault_kinds=("500",), fault_routes=("batches.cancel",))
    sensor.on_kill()
    stats = emulator.stats()
    status = emulator.client().batches.retrieve(ids[0]).status
    report("poke-mode on_kill, one 500 on cancel", cancel_calls=stats["batches.cancel"], status=status)
    assert status in ("cancelling", "cancelled")
