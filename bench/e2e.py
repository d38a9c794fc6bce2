"""End to end: a 50,000-request DAG (submit -> deferred sensor -> collect) in ``dag.test()``.

Runs in its own process with its own ``AIRFLOW_HOME`` (a fresh SQLite metadata DB) against an instant
emulator (``rate`` 1e9 lines/s) in another process, which times every request it serves
(:mod:`bench.emulator_timed`). The wall time of ``dag.test()`` is then split into the emulator's time
(inside its request handlers: uploads, batch lifecycle and result files, downloads), Airflow's own time
(``dag.test()`` minus the three task instances' durations) and ours (the tasks minus the emulator).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

DAGS = Path(__file__).resolve().parent / "dags"


def _start_emulator(knobs: dict[str, Any]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.emulator_timed", json.dumps(knobs)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"the emulator did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[1].strip()


def _time_our_code() -> dict[str, float]:
    """Add up the wall time spent in the three operators' methods and in the trigger's wait."""
    import functools

    from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
    from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
    from airflow_openai_batch.sensors.batch import OpenAIBatchSensor
    from airflow_openai_batch.triggers.batch import OpenAIBatchTrigger

    spent: dict[str, float] = {}

    def timed(key: str, method: Any) -> Any:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - start

        return wrapper

    for key, cls, name in (
        ("submit", OpenAIBatchSubmitOperator, "execute"),
        ("wait", OpenAIBatchSensor, "execute"),
        ("wait", OpenAIBatchSensor, "execute_complete"),
        ("collect", OpenAIBatchCollectOperator, "execute"),
    ):
        setattr(cls, name, timed(key, getattr(cls, name)))
    original_run = OpenAIBatchTrigger.run

    async def run(self: Any) -> Any:
        start = time.perf_counter()
        try:
            async for event in original_run(self):
                spent["wait"] = spent.get("wait", 0.0) + time.perf_counter() - start
                yield event
                start = time.perf_counter()
        finally:
            pass

    OpenAIBatchTrigger.run = run  # type: ignore[method-assign]
    return spent


def run(requests_path: str, requests: int, work_dir: str, output_format: str = "parquet") -> dict[str, Any]:
    home = Path(work_dir) / "airflow-e2e"
    home.mkdir(parents=True, exist_ok=True)
    output = Path(work_dir) / "e2e-results"
    os.environ.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(
                [
                    {
                        "name": "bench",
                        "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
                        "kwargs": {"path": str(DAGS), "refresh_interval": 0},
                    }
                ]
            ),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AOB_BENCH_REQUESTS": requests_path,
            "AOB_BENCH_OUTPUT": str(output),
            "AOB_BENCH_FORMAT": output_format,
        }
    )
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        os.environ.pop(var, None)
    emulator, url = _start_emulator({"rate": 1e9, "seed": 1})
    try:
        os.environ["AIRFLOW_CONN_OPENAI_DEFAULT"] = json.dumps(
            {"conn_type": "openai_batch", "password": "sk-bench", "host": url + "/v1"}
        )
        from airflow.dag_processing.dagbag import DagBag
        from airflow.utils import db

        db.resetdb()
        bag = DagBag(dag_folder=str(DAGS))
        if bag.import_errors:
            raise RuntimeError(f"DAG import errors: {bag.import_errors}")
        dag = bag.get_dag("bench_e2e")
        # What a warm worker has loaded already (this environment compiles every module it imports).
        import openai
        from airflow.sdk import ObjectStoragePath

        import airflow_openai_batch.core.prepare
        import airflow_openai_batch.core.reconcile
        import airflow_openai_batch.core.writers
        import airflow_openai_batch.hooks.batch
        import airflow_openai_batch.triggers.batch  # noqa: F401

        openai.OpenAI(api_key="sk-warm-up", base_url=url + "/v1").close()
        ObjectStoragePath(f"file://{home}").exists()
        if output_format == "parquet":
            from airflow_openai_batch.core.writers import successes_schema

            successes_schema()

        spent = _time_our_code()
        start = time.perf_counter()
        dag_run = dag.test()
        wall = time.perf_counter() - start
        with urllib.request.urlopen(url + "/_bench/timing") as response:
            timing = json.loads(response.read())
        tasks: dict[str, Any] = {}
        for ti in dag_run.get_task_instances():
            duration = (
                (ti.end_date - ti.start_date).total_seconds() if ti.end_date and ti.start_date else None
            )
            tasks[ti.task_id] = {"state": str(ti.state), "seconds": duration}
        summary = dag_run.get_task_instance("collect").xcom_pull(task_ids="collect") or {}
    finally:
        emulator.terminate()
        try:
            emulator.wait(timeout=20)
        except subprocess.TimeoutExpired:
            emulator.kill()
    ours_total = sum(spent.values())
    return {
        "requests": requests,
        "state": str(dag_run.state),
        "wall_seconds": wall,
        "emulator_seconds": timing["seconds"],
        "emulator_cpu_seconds": timing["cpu_seconds"],
        "emulator_calls": timing["calls"],
        "emulator_by_route": timing["by_route"],
        "our_code_seconds": dict(spent),
        "ours_with_emulator_seconds": ours_total,
        "tasks": tasks,
        "airflow_seconds": wall - ours_total,
        "ours_seconds": ours_total - timing["seconds"],
        "collected_total": summary.get("total"),
        "collected_succeeded": summary.get("succeeded"),
    }
