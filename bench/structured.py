"""Per-line costs of structured answers (core/schema.py), against the bare orjson parse loop.

``python -m bench.structured [--lines 200000] [--rounds 5]`` prints, each as best-of-rounds wall time
(rounds interleaved, so a slow spell on a shared host hits both sides) and the same-run ratio:

- **inject**: submit's per-line work (``orjson.loads`` + :meth:`SchemaInjector.inject_line`) vs the bare
  parse loop over the same request lines (target >= 0.8x);
- **validate**: :meth:`CompiledSchema.check` of each answer text vs ``orjson.loads`` of the same text;
- **collect**: parse each result line, :func:`read_answer`, :class:`ParsedColumn` and a Parquet file of
  the ``parsed`` column vs the bare parse loop over the same result lines (target >= 0.4x).

The generated lines are the emulator's own answers to the Batch guide's ticket-classification schema.

The ``structured`` section of ``make bench`` (:func:`bench`) measures the real collect (reconcile and
``ResultWriter``, as the operator runs them) of such a batch into Parquet, in its own process, against
the bare parse loop over the same three files (target >= 0.4x, peak RSS < 300 MB).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from airflow_openai_batch.core.schema import (
    AnswerSchema,
    ParsedColumn,
    SchemaInjector,
    compile_schema,
    read_answer,
    response_schema,
)
from airflow_openai_batch.emulator.answers import AnswerFaults, shape_answer
from airflow_openai_batch.emulator.responses import line_usage, response_body

CHAT = "/v1/chat/completions"


#: The Batch guide's classification answer, as a hand-written schema (an optional assignee).
TICKET = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["billing", "technical", "general"]},
        "urgency": {"type": "string", "enum": ["low", "medium", "high"]},
        "summary": {"type": "string"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string"}},
        "assignee": {"type": "string"},
    },
    "required": ["category", "urgency", "summary", "confidence", "tags"],
}


def request_lines(count: int) -> list[bytes]:
    return [
        orjson.dumps(
            {
                "custom_id": f"request-{i:07d}",
                "method": "POST",
                "url": CHAT,
                "body": {
                    "model": "gpt-4o-mini",
                    "messages": [
                        {"role": "system", "content": "Classify the support ticket."},
                        {"role": "user", "content": f"Ticket {i}: my invoice shows a double charge " * 3},
                    ],
                    "max_tokens": 200,
                },
            }
        )
        for i in range(count)
    ]


def result_lines(requests: list[bytes], injector: SchemaInjector, distinct: int = 2000) -> list[bytes]:
    """Result lines of the emulator's answers (``distinct`` bodies made, then reused under every id)."""
    bodies = []
    faults = AnswerFaults(invalid_json=0.01, schema_miss=0.01, refusal=0.01, truncated=0.01)
    for i, raw in enumerate(requests[:distinct]):
        line = orjson.loads(injector.inject_line(raw, orjson.loads(raw)))
        body = line["body"]
        usage = line_usage(CHAT, body, line["custom_id"], 0)
        answer = response_body(CHAT, body, line["custom_id"], 0, usage, 1_700_000_000 + i)
        bodies.append(shape_answer(CHAT, body, answer, line["custom_id"], 0, faults))
    return [
        orjson.dumps(
            {
                "id": f"batch_req_{i}",
                "custom_id": f"request-{i:07d}",
                "response": {"status_code": 200, "request_id": f"req_{i}", "body": bodies[i % distinct]},
                "error": None,
            }
        )
        for i in range(len(requests))
    ]


def write_results(folder: Path, lines: int) -> None:
    """A structured chat batch as collect reads it: ``input.jsonl`` (the schema injected as submit does),
    ``output.jsonl`` (the emulator's answers, 1% of each fault) and an empty ``error.jsonl``."""
    folder.mkdir(parents=True, exist_ok=True)
    injector = SchemaInjector(response_schema({"name": "ticket", "schema": TICKET}), CHAT)
    plain = request_lines(lines)
    requests = [injector.inject_line(raw, orjson.loads(raw)) or raw for raw in plain]
    (folder / "input.jsonl").write_bytes(b"\n".join([*requests, b""]))
    (folder / "output.jsonl").write_bytes(b"\n".join([*result_lines(plain, injector), b""]))
    (folder / "error.jsonl").write_bytes(b"")


def bench(runner: Any, lines: int) -> list[Any]:
    """The ``structured`` section of ``make bench``: collect into Parquet vs the bare parse loop."""
    from bench.report import Row

    folder = runner.tmp / "data" / f"structured-{lines}"
    write_results(folder, lines)
    out = str(runner.tmp / "structured-out")

    def case(name: str, **kwargs: Any) -> dict[str, Any]:
        return {"kind": "case", "case": name, "kwargs": {"folder": str(folder), "work_dir": out, **kwargs}}

    timed = runner.best_interleaved(
        {
            "structured-bare": case("collect_bare"),
            "structured-parquet": case("collect_ours", output_format="parquet"),
            "structured-jsonl": case("collect_ours", output_format="jsonl"),
        },
        max(runner.repeat, 5),
    )
    bare = lines / timed["structured-bare"]["seconds"]
    rows = []
    for fmt in ("parquet", "jsonl"):
        ours = timed[f"structured-{fmt}"]
        if ours["rows"] != lines:
            raise RuntimeError(f"structured collect {fmt}: {ours['rows']} rows, expected {lines}")
        rows.append(
            Row(
                f"Collect {lines:,} structured answers -> {fmt}",
                "rows/s",
                lines / ours["seconds"],
                "bare orjson parse of the 3 files",
                bare,
                target=">= 0.40x" if fmt == "parquet" else "(info)",
                goal=(lambda r: r >= 0.4) if fmt == "parquet" else None,
                note=f"peak RSS {ours['peak_rss_mb']:.0f} MB; {ours['failed']:,} answers failed",
            )
        )
    rows.append(
        Row(
            f"Collect {lines:,} structured answers -> parquet",
            "peak RSS MB",
            timed["structured-parquet"]["peak_rss_mb"],
            "bare parse",
            timed["structured-bare"]["peak_rss_mb"],
            target="ours < 300 MB",
            lower_is_better=True,
            goal_value=lambda v: v < 300,
        )
    )
    return rows


def best_of(rounds: int, cases: dict[str, Callable[[], object]]) -> dict[str, float]:
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):
        for name, work in cases.items():
            start = time.perf_counter()
            work()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n = args.lines
    spec = response_schema({"name": "ticket", "schema": TICKET})
    injector = SchemaInjector(spec, CHAT)
    requests = request_lines(n)
    results = result_lines(requests, injector)
    schema = AnswerSchema.of(spec)
    compiled = compile_schema(spec.schema)
    # The answer texts that are JSON (what a bare loads can also take), valid against the schema or not.
    texts = []
    for raw in results:
        text = read_answer("chat", orjson.loads(raw)["response"]["body"], schema).text
        try:
            orjson.loads(text or "")
        except orjson.JSONDecodeError:
            continue
        texts.append(text)
    loads = orjson.loads

    def bare(lines: list[bytes]) -> Callable[[], None]:
        def run() -> None:
            for raw in lines:
                loads(raw)

        return run

    def inject() -> None:
        inject_line = injector.inject_line
        for raw in requests:
            inject_line(raw, loads(raw))

    def bare_texts() -> None:
        for text in texts:
            loads(text)

    def validate() -> None:
        check = compiled.check
        for text in texts:
            check(text)

    tmp = Path(tempfile.mkdtemp(prefix="bench-structured-"))

    def collect() -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        column = ParsedColumn(spec.schema)
        add = column.add
        ids = []
        for raw in results:
            line = loads(raw)
            ids.append(line["custom_id"])
            add(read_answer("chat", line["response"]["body"], schema))
        pq.write_table(pa.table({"custom_id": ids, "parsed": column.finish()}), tmp / "parsed.parquet")

    timings = best_of(
        args.rounds,
        {
            "bare requests": bare(requests),
            "inject": inject,
            "bare texts": bare_texts,
            "validate": validate,
            "bare results": bare(results),
            "collect": collect,
        },
    )
    rows = [
        ("inject (loads + inject_line)", "bare requests", "inject", 0.8),
        ("validate (CompiledSchema.check)", "bare texts", "validate", None),
        ("collect (loads + read_answer + ParsedColumn + Parquet)", "bare results", "collect", 0.4),
    ]
    print(f"{n} lines, best of {args.rounds} interleaved rounds")
    for label, base, case, target in rows:
        ratio = timings[base] / timings[case]
        per_line = (timings[case] - timings[base]) / n * 1e6
        goal = f" (target >= {target}x)" if target else ""
        print(
            f"{label}: {n / timings[case]:,.0f}/s vs bare {n / timings[base]:,.0f}/s = {ratio:.2f}x{goal}; "
            f"+{per_line:.2f} us per line"
        )


if __name__ == "__main__":
    main()
