"""Runs a submit or collect operator's ``execute`` in its own process and blocks at a chosen point.

``python -m tests.support.reliability.worker SPEC.json`` (started by ``helpers.Worker``). When the run reaches
``spec["kill_point"]`` the worker writes ``spec["marker"]`` (JSON, atomically) and then blocks forever,
so the test can SIGKILL it exactly there: a real crash, with no ``finally`` block, no ``atexit`` and no
exception handler running. The emulator runs in the test process and is reached over loopback
(``AIRFLOW_CONN_OPENAI_DEFAULT`` is inherited).

Submit kill points: ``before_upload`` / ``after_upload`` (of chunk ``kill_at_call``), ``after_create``
(the batch exists at the API but the operator has not recorded it), ``after_execute`` (everything done,
result not yet handed back to Airflow). Collect kill points: ``mid_reconcile`` (after ``after_records``
records were staged), ``mid_publish`` (half of ``failures.jsonl`` copied into the output folder),
``before_manifest`` (data files published, manifest not yet).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any


def reach(spec: dict[str, Any], point: str, **info: Any) -> None:
    """Announce that ``point`` is reached (atomic marker file), then block until killed."""
    if spec.get("kill_point") != point:
        return
    marker = Path(spec["marker"])
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({"point": point, "pid": os.getpid(), **info}))
    os.replace(tmp, marker)
    threading.Event().wait()  # forever: this process is about to be SIGKILLed


class _TaskInstance:
    def __init__(self, dag_id: str, task_id: str, run_id: str, map_index: int = -1) -> None:
        self.dag_id, self.task_id, self.run_id, self.map_index = dag_id, task_id, run_id, map_index
        self.xcoms: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value


class _OutletEvents(dict):
    def __getitem__(self, alias: Any) -> Any:
        class _Accessor:
            def add(self, asset: Any, extra: Any = None) -> None:
                pass

        return _Accessor()


def make_context(spec: dict[str, Any]) -> dict[str, Any]:
    import pendulum

    from tests.support.reliability.helpers import FileTaskStateStore

    class _DagRun:
        run_after = pendulum.from_timestamp(spec["run_after"], tz="UTC")

    context: dict[str, Any] = {
        "ti": _TaskInstance(spec["dag_id"], spec["task_id"], spec["run_id"]),
        "dag_run": _DagRun(),
        "run_id": spec["run_id"],
        "outlet_events": _OutletEvents(),
    }
    if spec.get("state_store"):
        context["task_state_store"] = FileTaskStateStore(spec["state_store"])
    return context


def run_submit(spec: dict[str, Any]) -> None:
    from airflow_openai_batch.hooks.batch import OpenAIBatchHook
    from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator

    target = int(spec.get("kill_at_call", 1))
    calls = {"upload": 0, "create": 0}
    original_upload = OpenAIBatchHook.upload_file
    original_create = OpenAIBatchHook.create_batch

    def upload_file(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["upload"] += 1
        if calls["upload"] == target:
            reach(spec, "before_upload", uploads_done=calls["upload"] - 1)
        file = original_upload(self, *args, **kwargs)
        if calls["upload"] == target:
            reach(spec, "after_upload", file_id=file.id)
        return file

    def create_batch(self: Any, *args: Any, **kwargs: Any) -> Any:
        batch = original_create(self, *args, **kwargs)
        calls["create"] += 1
        if calls["create"] == target:
            reach(spec, "after_create", batch_id=batch.id)
        return batch

    OpenAIBatchHook.upload_file = upload_file  # type: ignore[method-assign]
    OpenAIBatchHook.create_batch = create_batch  # type: ignore[method-assign]
    op = OpenAIBatchSubmitOperator(
        task_id=spec["task_id"],
        requests=spec["requests"],
        max_requests_per_batch=spec["max_requests_per_batch"],
    )
    ids = op.execute(make_context(spec))
    reach(spec, "after_execute", batch_ids=ids)
    Path(spec["result"]).write_text(json.dumps(ids))


def run_collect(spec: dict[str, Any]) -> None:
    from airflow_openai_batch.core import writers
    from airflow_openai_batch.operators import collect
    from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator

    staged = {"n": 0}
    original_init = writers.ResultWriter.__init__

    def writer_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        write_success = self.write_success

        def counting(record: dict[str, Any]) -> None:
            write_success(record)
            staged["n"] += 1
            if staged["n"] == int(spec.get("after_records", 1)):
                reach(spec, "mid_reconcile", staged=staged["n"], staging=str(self.staging_dir))

        self.write_success = counting
        write_successes = self.write_successes

        def counting_block(successes: Any) -> None:  # a block of plain answers, written at once
            before = staged["n"]
            write_successes(successes)
            staged["n"] += len(successes)
            if before < int(spec.get("after_records", 1)) <= staged["n"]:
                reach(spec, "mid_reconcile", staged=staged["n"], staging=str(self.staging_dir))

        self.write_successes = counting_block

    original_copyfile = shutil.copyfile

    def copyfile(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        if spec.get("kill_point") == "mid_publish" and Path(dst).name.startswith("failures"):
            data = Path(src).read_bytes()
            with open(dst, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                os.fsync(out.fileno())
            reach(spec, "mid_publish", copied=len(data) // 2, of=len(data), target=str(dst))
        return original_copyfile(src, dst, *args, **kwargs)

    original_copyfileobj = shutil.copyfileobj

    def copyfileobj(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        # Object-store targets (s3://...) are written through a file object, not copied by path.
        name = str(getattr(dst, "path", "") or getattr(dst, "name", ""))
        if spec.get("kill_point") == "mid_publish" and Path(name).name.startswith("failures"):
            data = src.read()
            dst.write(data[: len(data) // 2])
            dst.flush()
            reach(spec, "mid_publish", copied=len(data) // 2, of=len(data), target=name)
        return original_copyfileobj(src, dst, *args, **kwargs)

    original_manifest = collect.write_manifest

    def write_manifest(*args: Any, **kwargs: Any) -> Any:
        reach(spec, "before_manifest")
        return original_manifest(*args, **kwargs)

    writers.ResultWriter.__init__ = writer_init  # type: ignore[method-assign]
    shutil.copyfile = copyfile
    shutil.copyfileobj = copyfileobj
    collect.write_manifest = write_manifest
    op = OpenAIBatchCollectOperator(
        task_id=spec["task_id"], batch_ids=spec["batch_ids"], output_uri=spec["output_uri"]
    )
    summary = op.execute(make_context(spec))
    Path(spec["result"]).write_text(json.dumps(summary, default=str))


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec["mode"] == "submit":
        run_submit(spec)
    elif spec["mode"] == "collect":
        run_collect(spec)
    else:
        raise SystemExit(f"unknown mode {spec['mode']!r}")


if __name__ == "__main__":
    main(sys.argv[1])
