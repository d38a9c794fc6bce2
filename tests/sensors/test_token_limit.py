"""Jobs larger than the enqueued-token limit still finish: capacity-failed batches are re-created."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from airflow_openai_batch.core.tokens import estimate_request_tokens
from airflow_openai_batch.core.writers import read_records
from airflow_openai_batch.exceptions import OpenAIBatchFailedError
from airflow_openai_batch.sensors.batch import OpenAIBatchSensor
from tests.conftest import TEST_DAGS_FOLDER
from tests.support.request_lines import write_jsonl

CHUNKS = 6
PER_CHUNK = 50


def request(i: int) -> dict:
    # 40 characters of content: 16 prompt tokens per request as the emulator counts them (10 + framing).
    return {
        "custom_id": f"t{i:04d}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"{i:04d}" + "x" * 36}]},
    }


def run_dag(requests_path: str):
    from airflow.utils.state import DagRunState

    from tests.support.airflow_versions import DagBag

    bag = DagBag(dag_folder=str(TEST_DAGS_FOLDER / "token_limit_dag.py"))
    dag = bag.get_dag("openai_batch_token_limit_test")
    dag_run = dag.test(run_conf={"requests": requests_path, "max_requests_per_batch": PER_CHUNK})
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert dag_run.state == DagRunState.SUCCESS, states
    return dag_run


def run_deferred(sensor: OpenAIBatchSensor, context: dict):
    """Drive a deferrable sensor through every deferral, running each trigger inline from serialize()."""
    import asyncio

    from airflow.providers.common.compat.module_loading import import_string

    from airflow_openai_batch.compat import TaskDeferred

    async def first_event(trigger):
        async for event in trigger.run():
            return event.payload

    call = lambda: sensor.execute(context)  # noqa: E731
    for _ in range(100):
        try:
            return call()
        except TaskDeferred as deferred:
            classpath, kwargs = deferred.trigger.serialize()
            payload = asyncio.run(first_event(import_string(classpath)(**json.loads(json.dumps(kwargs)))))
            method = getattr(sensor, deferred.method_name)
            call = lambda m=method, p=payload: m(context, event=p)  # noqa: E731
    raise AssertionError("the sensor kept deferring")


def all_batches(emulator) -> list:
    return list(emulator.client().batches.list(limit=100))


@pytest.fixture
def limited(emulator, tmp_path):
    """An input of 6 equal chunks and a limit that admits only 2 of them at a time."""
    path = write_jsonl(tmp_path / "in.jsonl", [request(i) for i in range(CHUNKS * PER_CHUNK)])
    tokens_per_chunk = PER_CHUNK * 16
    emulator.configure(rate=100.0, enqueued_token_limit=int(tokens_per_chunk * 2.5))
    return path


@pytest.mark.parametrize("mode", ["fail", "reject"])
def test_a_job_over_the_limit_finishes_with_every_request_once(mode, airflow_db, emulator, limited) -> None:
    emulator.configure(token_limit_mode=mode)
    dag_run = run_dag(str(limited))
    submitted = dag_run.get_task_instance("submit").xcom_pull(task_ids="submit")
    waited = dag_run.get_task_instance("wait").xcom_pull(task_ids="wait")
    summary = dag_run.get_task_instance("collect").xcom_pull(task_ids="collect")

    job = dag_run.get_task_instance("submit").xcom_pull(task_ids="submit", key="job")
    assert len(job["chunks"]) == CHUNKS
    never_created = [c for c in job["chunks"] if "batch_id" not in c["attempts"][0]]
    # The submit task returns the batch ids it created; the chunks it could not create are in its job.
    assert len(submitted) == CHUNKS - len(never_created)
    assert all(isinstance(b, str) and b.startswith("batch_") for b in submitted)
    if mode == "reject":
        # At least one create refused (how many depends on how fast the first batches finish).
        assert never_created
    assert len(waited) == CHUNKS and all(s["status"] == "completed" for s in waited.values())
    created_by_sensor = [b for b, s in waited.items() if s["replaces"] or b not in submitted]
    assert created_by_sensor, "some batches must have been (re-)created by the sensor"
    if mode == "reject":
        assert len([b for b in waited if b not in submitted]) == len(never_created)
    assert summary["total"] == CHUNKS * PER_CHUNK == summary["succeeded"]
    ids = Counter(r["custom_id"] for r in summary["successes"])
    assert len(ids) == CHUNKS * PER_CHUNK and set(ids.values()) == {1}

    batches = all_batches(emulator)
    failed = [b for b in batches if b.status == "failed"]
    assert all(b.errors.data[0].code == "token_limit_exceeded" for b in failed)
    if mode == "fail":
        # Every failed batch is replaced by exactly one newer one of the same chunk.
        replaced = [old for s in waited.values() for old in s["replaces"]]
        assert sorted(replaced) == sorted(b.id for b in failed)
    print(
        f"\n[{mode}] batches created {len(batches)}, failed on the limit {len(failed)}, final {len(waited)}"
    )


def test_a_rerun_of_the_sensor_follows_the_chains_and_creates_nothing(
    airflow_db, emulator, limited, make_context
):
    dag_run = run_dag(str(limited))
    submitted = dag_run.get_task_instance("submit").xcom_pull(task_ids="submit")
    waited = dag_run.get_task_instance("wait").xcom_pull(task_ids="wait")
    before = len(all_batches(emulator))
    rerun = OpenAIBatchSensor(task_id="wait", batch_ids=submitted, poll_interval=0.05, max_poll_interval=0.2)
    result = rerun.execute(make_context(task_id="wait"))
    assert result == waited
    assert len(all_batches(emulator)) == before


def test_max_resubmits_bounds_the_re_creations(emulator, tmp_path, make_context) -> None:
    from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator

    # A limit below one chunk: no batch can ever be admitted.
    emulator.configure(enqueued_token_limit=10)
    ids = OpenAIBatchSubmitOperator(task_id="submit", requests=[request(i) for i in range(5)]).execute(
        make_context()
    )
    sensor = OpenAIBatchSensor(
        task_id="wait", batch_ids=ids, poll_interval=0.01, max_poll_interval=0.02, max_resubmits=2
    )
    with pytest.raises(OpenAIBatchFailedError, match="token_limit_exceeded"):
        run_deferred(sensor, make_context(task_id="wait"))
    assert len(all_batches(emulator)) == 3  # the first batch and 2 re-creations


def test_estimate_is_within_tolerance_of_the_emulators_count(emulator, make_context) -> None:
    """Our offline estimate errs high (safe for the limit): within [1.0, 1.25] x the emulator's count."""
    import csv

    from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
    from tests.conftest import REPO_ROOT

    with (REPO_ROOT / "dags" / "data" / "support_tickets.csv").open() as f:
        rows = list(csv.DictReader(f))[:500]
    requests = [
        {
            "custom_id": row["ticket_id"],
            "body": {
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "Label the support ticket."},
                    {"role": "user", "content": row["text"]},
                ],
            },
        }
        for row in rows
    ]
    ours = sum(estimate_request_tokens("/v1/chat/completions", r["body"]) for r in requests)
    (batch_id,) = OpenAIBatchSubmitOperator(task_id="s", requests=requests).execute(make_context())
    emulator.advance(3600)
    theirs = emulator.client().batches.retrieve(batch_id).usage.input_tokens
    ratio = ours / theirs
    print(f"\nestimate {ours:,} vs emulator {theirs:,} prompt tokens: ratio {ratio:.2f}")
    assert 1.0 <= ratio <= 1.25


def test_poke_mode_re_creates_as_capacity_frees(emulator, limited, make_context) -> None:
    from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator

    emulator.configure(time_scale=0)  # the test moves time: the sensor's clock and the emulator's
    now = [float(emulator.stats()["now"])]

    class SimulatedSensor(OpenAIBatchSensor):
        clock = staticmethod(lambda: now[0])

    ids = OpenAIBatchSubmitOperator(
        task_id="submit", requests=str(limited), max_requests_per_batch=PER_CHUNK
    ).execute(make_context())
    sensor = SimulatedSensor(task_id="wait", batch_ids=ids, deferrable=False, poll_interval=1)
    context = make_context(task_id="wait")
    for _ in range(200):
        emulator.advance(0.2)
        now[0] += 0.2
        result = sensor.poke(context)
        if result.is_done:
            break
    assert result.is_done
    waited = result.xcom_value
    assert len(waited) == CHUNKS and all(s["status"] == "completed" for s in waited.values())
    replaced = [old for s in waited.values() for old in s["replaces"]]
    failed = [b.id for b in all_batches(emulator) if b.status == "failed"]
    assert replaced and sorted(replaced) == sorted(failed)


def embedding_request(i: int) -> dict:
    return {
        "custom_id": f"e{i:04d}",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "text-embedding-3-small", "input": f"row {i}"},
    }


@pytest.mark.parametrize("mode", ["fail", "reject"])
def test_an_embeddings_job_over_the_request_cap_is_split_and_re_created(
    mode, emulator, tmp_path, make_context, capfd
):
    """The enqueued-*requests* cap (OpenAI: 1,000,000 for embeddings) is met like the token cap: the job is
    split with ``max_requests_per_batch`` at submit, and chunks refused for the cap are re-created once the
    earlier ones finish."""
    from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
    from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator

    emulator.configure(rate=100.0, enqueued_request_limit=int(PER_CHUNK * 2.5), token_limit_mode=mode)
    requests = [embedding_request(i) for i in range(CHUNKS * PER_CHUNK)]
    submit = OpenAIBatchSubmitOperator(
        task_id="submit", requests=requests, endpoint="/v1/embeddings", max_requests_per_batch=PER_CHUNK
    )
    submit_context = make_context(task_id="submit")
    ids = submit.execute(submit_context)
    job = submit_context["ti"].xcoms["job"]  # names the chunks whose create was refused, too
    sensor = OpenAIBatchSensor(task_id="wait", batch_ids=job, poll_interval=0.01, max_poll_interval=0.05)
    waited = run_deferred(sensor, make_context(task_id="wait"))

    assert len(waited) == CHUNKS and all(s["status"] == "completed" for s in waited.values())
    refused = [b for b in all_batches(emulator) if b.status == "failed"]
    if mode == "fail":
        assert refused and all(b.errors.data[0].code == "request_limit_exceeded" for b in refused)
        assert sorted(old for s in waited.values() for old in s["replaces"]) == sorted(b.id for b in refused)
        log = capfd.readouterr().out
        assert f"{refused[0].id} failed with request_limit_exceeded: it will be re-created" in log
        assert f"batch {refused[0].id} failed with request_limit_exceeded" in log
        assert "the task will fail" not in log
    else:
        assert len(ids) < CHUNKS and not refused, "creates over the cap are refused, then made by the sensor"
    summary = OpenAIBatchCollectOperator(
        task_id="collect", batch_ids=waited, output_uri=str(tmp_path / "out")
    ).execute(make_context(task_id="collect"))
    assert summary["total"] == CHUNKS * PER_CHUNK == summary["succeeded"]
    ids_seen = Counter(r["custom_id"] for r in read_records(tmp_path / "out" / "successes.jsonl"))
    assert set(ids_seen) == {r["custom_id"] for r in requests} and set(ids_seen.values()) == {1}
