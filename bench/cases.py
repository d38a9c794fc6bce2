"""The measured work of the submit-preparation and collect benchmarks, and of their baselines.

Each function runs inside its own interpreter (:mod:`bench.child`) and does the whole job on files that
:mod:`bench.gen` wrote beforehand. Imports happen before the clock starts, for ours and the baselines
alike (pyarrow's import is a one-off per task, not a per-row cost).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import orjson

CHAT = "/v1/chat/completions"


# -- submit preparation ----------------------------------------------------------------------------------


def prep_ours(path: str, work_dir: str) -> dict[str, Any]:
    """What the submit operator does before uploading: validate every line and split into chunk files."""
    from airflow_openai_batch.core.jsonl import iter_lines
    from airflow_openai_batch.core.prepare import prepare_from_lines

    with open(path, "rb") as stream:
        prepared = prepare_from_lines(iter_lines(stream), endpoint=CHAT, work_dir=work_dir)
    result = {"requests": prepared.total_requests, "chunks": len(prepared.chunks)}
    prepared.cleanup()
    return result


def prep_ours_exact(path: str, work_dir: str) -> dict[str, Any]:
    """:func:`prep_ours` with every line's prompt tokens counted exactly (``exact_token_count=True`` at
    submit; what a budget cap or ``max_enqueued_tokens`` turns on)."""
    from airflow_openai_batch.core.jsonl import iter_lines
    from airflow_openai_batch.core.prepare import prepare_from_lines

    with open(path, "rb") as stream:
        prepared = prepare_from_lines(
            iter_lines(stream), endpoint=CHAT, work_dir=work_dir, token_count="exact"
        )
    assert prepared.cost is not None and prepared.cost.counter != "utf8/4", prepared.cost.counter
    result = {"requests": prepared.total_requests, "chunks": len(prepared.chunks)}
    prepared.cleanup()
    return result


def prep_ours_line_by_line(path: str, work_dir: str) -> dict[str, Any]:
    """:func:`prep_ours` with the block decode off: every line goes through the diagnosis (an ablation)."""
    from airflow_openai_batch.core.requests import RequestRules

    RequestRules.check_block = lambda self, lines, data=None: None  # type: ignore[method-assign]
    return prep_ours(path, work_dir)


def prep_bare(path: str, work_dir: str) -> dict[str, Any]:
    """The parse limit: a loop that only parses each line with orjson (no checks, no output)."""
    loads = orjson.loads
    n = 0
    with open(path, "rb") as stream:
        for line in stream:
            loads(line)
            n += 1
    return {"requests": n}


def prep_naive(path: str, work_dir: str) -> dict[str, Any]:
    """The Batch guide's way: read every line into a list of dicts with json.loads, then write the
    batch files (50,000 requests each) with json.dumps. No validation at all."""
    with open(path, encoding="utf-8") as stream:
        tasks = [json.loads(line) for line in stream if line.strip()]
    out = Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = 0
    for start in range(0, len(tasks), 50_000):
        with open(out / f"batch_tasks_{files}.jsonl", "w", encoding="utf-8") as file:
            for obj in tasks[start : start + 50_000]:
                file.write(json.dumps(obj) + "\n")
        files += 1
    result = {"requests": len(tasks), "chunks": files}
    shutil.rmtree(out, ignore_errors=True)
    return result


# -- collect -----------------------------------------------------------------------------------------------


def _streamed(stream: Any) -> Any:
    """Lines as the collect operator gets them from ``OpenAIBatchHook.iter_file_lines``: raw blocks read
    from a (spooled) file once the first line is asked for."""
    from airflow_openai_batch.core.jsonl import iter_raw_blocks, lines_from_raw_blocks

    def blocks() -> Any:
        yield from iter_raw_blocks(stream)

    return lines_from_raw_blocks(blocks())


def collect_ours(folder: str, work_dir: str, output_format: str, expired: bool = False) -> dict[str, Any]:
    """What the collect operator does once the files stream in: reconcile by custom_id, write results.

    :param expired: the batch expired before answering anything: no output or error file, every request
        a failure.
    """
    from airflow_openai_batch.core.reconcile import BatchResultFiles, Reconciler
    from airflow_openai_batch.core.writers import ResultWriter

    src = Path(folder)
    out = Path(work_dir)
    with (
        ResultWriter(out / "results", output_format) as writer,
        open(src / "input.jsonl", "rb") as inp,
        open(src / "output.jsonl", "rb") as outp,
        open(src / "error.jsonl", "rb") as err,
    ):
        reconciler = Reconciler(writer, out / "work")
        reconciler.add_batch(
            BatchResultFiles(
                "batch_bench",
                "expired" if expired else "completed",
                _streamed(inp),
                None if expired else _streamed(outp),
                None if expired else _streamed(err),
            )
        )
    summary = reconciler.summary()
    shutil.rmtree(out, ignore_errors=True)
    return {"rows": summary.total, "succeeded": summary.succeeded, "failed": summary.failed}


def collect_ours_line_by_line(folder: str, work_dir: str, output_format: str) -> dict[str, Any]:
    """:func:`collect_ours` with the block decode off: every result line decoded on its own (an ablation)."""
    from airflow_openai_batch.core import reconcile

    reconcile._decode_block = lambda block, lines: None  # type: ignore[assignment]
    return collect_ours(folder, work_dir, output_format)


def collect_bare(
    folder: str, work_dir: str, output_format: str = "", input_only: bool = False
) -> dict[str, Any]:
    """The parse limit: parse every line of the input, output and error files with orjson (``input_only``:
    of the input file, all an expired batch has)."""
    loads = orjson.loads
    rows = 0
    for name in ("input",) if input_only else ("input", "output", "error"):
        with open(Path(folder) / f"{name}.jsonl", "rb") as stream:
            for line in stream:
                loads(line)
                if name == "input":
                    rows += 1
    return {"rows": rows}


def collect_naive(folder: str, work_dir: str, output_format: str) -> dict[str, Any]:
    """The Batch guide's way: each file's whole content, ``decode().split("\\n")``, json.loads into lists,
    then join by custom_id and write the records (json.dumps per line, or one pyarrow table)."""
    src = Path(folder)

    def load(name: str) -> list[dict[str, Any]]:
        content = (src / f"{name}.jsonl").read_bytes()  # files.content(file_id).content
        return [json.loads(line) for line in content.decode().split("\n") if line]

    inputs = load("input")
    outputs = load("output")
    errors = load("error")
    requests = {task["custom_id"]: task for task in inputs}
    successes: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    seen: set[str] = set()
    for result in outputs + errors:
        cid = result["custom_id"]
        seen.add(cid)
        response = result.get("response") or {}
        if response.get("status_code") == 200 and result.get("error") is None:
            body = response["body"]
            successes.append(
                {
                    "custom_id": cid,
                    "batch_id": "batch_bench",
                    "status_code": 200,
                    "body": body,
                    "usage": body.get("usage"),
                    "content": body["choices"][0]["message"]["content"],
                }
            )
        else:
            error = (response.get("body") or {}).get("error") or result.get("error") or {}
            failures.append(
                {
                    "custom_id": cid,
                    "batch_id": "batch_bench",
                    "status_code": response.get("status_code"),
                    "error_code": error.get("code"),
                    "error_message": error.get("message"),
                    "request": requests.get(cid),
                }
            )
    for cid, task in requests.items():
        if cid not in seen:
            failures.append({"custom_id": cid, "error_code": "missing", "request": task})
    out = Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    if output_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        for record in successes:
            record["body"] = json.dumps(record["body"])
        for record in failures:
            record["request"] = json.dumps(record["request"])
        pq.write_table(pa.Table.from_pylist(successes), out / "successes.parquet")
        pq.write_table(pa.Table.from_pylist(failures), out / "failures.parquet")
    else:
        for name, records in (("successes", successes), ("failures", failures)):
            with open(out / f"{name}.jsonl", "w", encoding="utf-8") as file:
                for record in records:
                    file.write(json.dumps(record) + "\n")
    result = {"rows": len(inputs), "succeeded": len(successes), "failed": len(failures)}
    shutil.rmtree(out, ignore_errors=True)
    return result


CASES = {
    "prep_ours": prep_ours,
    "prep_ours_line_by_line": prep_ours_line_by_line,
    "prep_ours_exact": prep_ours_exact,
    "prep_bare": prep_bare,
    "prep_naive": prep_naive,
    "collect_ours": collect_ours,
    "collect_ours_line_by_line": collect_ours_line_by_line,
    "collect_bare": collect_bare,
    "collect_naive": collect_naive,
}


def preload(case: str, kwargs: dict[str, Any]) -> None:
    """Import what a case uses before the clock starts."""
    if case.startswith(("prep_ours", "collect_ours")):
        import airflow_openai_batch.core.jsonl
        import airflow_openai_batch.core.prepare
        import airflow_openai_batch.core.reconcile
        import airflow_openai_batch.core.writers  # noqa: F401
    if kwargs.get("output_format") == "parquet":
        import pyarrow
        import pyarrow.json  # the typed ``parsed`` column of structured answers
        import pyarrow.parquet  # noqa: F401
