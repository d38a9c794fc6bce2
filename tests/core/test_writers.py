"""Result files: JSONL and Parquet round trips, crash safety, the retry file, empty outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from airflow_openai_batch.core import reconcile
from airflow_openai_batch.core.reconcile import BatchResultFiles, Reconciler
from airflow_openai_batch.core.writers import ResultWriter, read_records, write_manifest

CHAT = "/v1/chat/completions"

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

FORMATS = ["jsonl", "parquet"]


def request_line(cid: str) -> bytes:
    # Spaced JSON on purpose: the retry file must keep the submitted bytes, not a re-serialization.
    return json.dumps(
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o", "n": 1},
        }
    ).encode()


def successes() -> list[dict[str, Any]]:
    chat_usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    return [
        {
            "custom_id": "s1",
            "batch_id": "b1",
            "status_code": 200,
            "body": {
                "choices": [{"message": {"content": "héllo"}}],
                "usage": chat_usage,
                "n": [1, None, 2.5],
            },
            "usage": chat_usage,
            "content": "héllo",
        },
        {
            "custom_id": "s2",
            "batch_id": "b1",
            "status_code": 200,
            "body": {"output": [], "usage": {"input_tokens": 4, "output_tokens": 5, "total_tokens": 9}},
            "usage": {"input_tokens": 4, "output_tokens": 5, "total_tokens": 9},
            "content": None,
        },
        {
            "custom_id": "s3",
            "batch_id": "b2",
            "status_code": 201,
            "body": {"data": [{"embedding": [0.5, -1.25, 3.0]}]},
            "usage": None,
            "embedding": [0.5, -1.25, 3.0],  # float32-exact values
        },
    ]


def failures() -> list[tuple[dict[str, Any], bytes]]:
    return [
        (
            {
                "custom_id": cid,
                "batch_id": "b1",
                "status_code": status,
                "error_code": code,
                "error_message": f"{code} happened",
                "request": orjson.loads(request_line(cid)),
            },
            request_line(cid),
        )
        for cid, status, code in [("f1", 400, "invalid_prompt"), ("f2", None, "batch_expired")]
    ]


def write_all(staging: Path, output_format: str, **kwargs: Any) -> ResultWriter:
    writer = ResultWriter(staging, output_format, **kwargs)
    for record in successes():
        writer.write_success(record)
    for record, line in failures():
        writer.write_failure(record, line)
    return writer


def test_jsonl_round_trip(tmp_path: Path) -> None:
    writer = write_all(tmp_path, "jsonl")
    writer.close()
    paths = writer.paths()
    assert list(read_records(paths["successes"])) == successes()
    assert list(read_records(paths["failures"])) == [record for record, _ in failures()]
    assert (writer.succeeded, writer.failed) == (3, 2)


def test_parquet_round_trip(tmp_path: Path) -> None:
    writer = write_all(tmp_path, "parquet")
    writer.close()
    paths = writer.paths()
    got = list(read_records(paths["successes"]))
    assert [r["custom_id"] for r in got] == ["s1", "s2", "s3"]
    for record, original in zip(got, successes(), strict=True):
        assert record["body"] == original["body"]
        assert record["batch_id"] == original["batch_id"]
        assert record["status_code"] == original["status_code"]
        assert record["content"] == original.get("content")
        assert record["embedding"] == original.get("embedding")
    # usage is normalized to the Responses API's names in the fixed schema
    assert got[0]["usage"] == {"input_tokens": 10, "output_tokens": 3, "total_tokens": 13}
    assert got[1]["usage"] == {"input_tokens": 4, "output_tokens": 5, "total_tokens": 9}
    assert got[2]["usage"] is None
    assert list(read_records(paths["failures"])) == [record for record, _ in failures()]
    # the request column holds the submitted text byte for byte
    table = pq.read_table(paths["failures"])
    assert table.column("request").to_pylist() == [line.decode() for _, line in failures()]


def test_parquet_schemas_are_fixed(tmp_path: Path) -> None:
    writer = write_all(tmp_path, "parquet")
    writer.close()
    schema = pq.read_schema(writer.paths()["successes"])
    assert schema.names == ["custom_id", "batch_id", "status_code", "content", "embedding", "body", "usage"]
    assert schema.field("status_code").type == pa.int32()
    assert schema.field("embedding").type == pa.list_(pa.float32())
    assert schema.field("body").type == pa.string()
    assert schema.field("usage").type == pa.struct(
        [("input_tokens", pa.int64()), ("output_tokens", pa.int64()), ("total_tokens", pa.int64())]
    )
    failure_schema = pq.read_schema(writer.paths()["failures"])
    assert failure_schema.names == [
        "custom_id",
        "batch_id",
        "status_code",
        "error_code",
        "error_message",
        "request",
    ]
    assert failure_schema.field("status_code").type == pa.int32()


def test_parquet_is_written_in_row_groups(tmp_path: Path) -> None:
    writer = ResultWriter(tmp_path, "parquet", row_group_rows=3)
    records = [dict(successes()[0], custom_id=f"s{i}") for i in range(10)]
    for record in records:
        writer.write_success(record)
    writer.close()
    meta = pq.ParquetFile(writer.paths()["successes"]).metadata
    assert (meta.num_rows, meta.num_row_groups) == (10, 4)
    assert [r["custom_id"] for r in read_records(writer.paths()["successes"], batch_size=4)] == [
        f"s{i}" for i in range(10)
    ]


def test_odd_token_counts_do_not_break_the_parquet_usage_column(tmp_path: Path) -> None:
    writer = ResultWriter(tmp_path, "parquet")
    writer.write_success(dict(successes()[0], usage={"prompt_tokens": "many", "total_tokens": 3}))
    writer.close()
    (record,) = read_records(writer.paths()["successes"])
    assert record["usage"] == {"input_tokens": None, "output_tokens": None, "total_tokens": 3}


@pytest.mark.parametrize("output_format", FORMATS)
def test_retry_file_holds_the_original_request_lines(tmp_path: Path, output_format: str) -> None:
    writer = write_all(tmp_path, output_format)
    writer.close()
    retry = writer.paths()["retry_requests"]
    assert retry.name == "retry_requests.jsonl"
    assert retry.read_bytes() == b"".join(line + b"\n" for _, line in failures())


@pytest.mark.parametrize("output_format", FORMATS)
def test_unclosed_writer_leaves_only_partial_files(tmp_path: Path, output_format: str) -> None:
    writer = write_all(tmp_path, output_format)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        [
            f"successes.{output_format}.partial",
            f"failures.{output_format}.partial",
            "retry_requests.jsonl.partial",
        ]
    )
    assert not any(path.exists() for path in writer.paths().values())
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"successes.{output_format}", f"failures.{output_format}", "retry_requests.jsonl"]
    )
    writer.close()  # idempotent


@pytest.mark.parametrize("output_format", FORMATS)
def test_abort_and_context_manager(tmp_path: Path, output_format: str) -> None:
    with pytest.raises(RuntimeError), ResultWriter(tmp_path / "a", output_format) as writer:
        writer.write_success(successes()[0])
        raise RuntimeError("boom")
    assert list((tmp_path / "a").iterdir()) == []
    with ResultWriter(tmp_path / "b", output_format) as writer:
        writer.write_success(successes()[0])
    assert all(path.exists() for path in writer.paths().values())


@pytest.mark.parametrize("output_format", FORMATS)
def test_empty_outputs_are_valid_files(tmp_path: Path, output_format: str) -> None:
    writer = ResultWriter(tmp_path, output_format)
    writer.close()
    paths = writer.paths()
    for key in ("successes", "failures", "retry_requests"):
        assert paths[key].exists()
        assert list(read_records(paths[key])) == []
    if output_format == "parquet":
        table = pq.read_table(paths["successes"])
        assert table.num_rows == 0 and "embedding" in table.schema.names
        assert pq.read_table(paths["failures"]).num_rows == 0


@pytest.mark.parametrize("output_format", FORMATS)
def test_broken_request_lines_are_kept_for_retry_and_readable(tmp_path: Path, output_format: str) -> None:
    writer = ResultWriter(tmp_path, output_format)
    lines = [b"{broken", b'{"custom_id": "x\xff"}']
    for line in lines:
        record = {"custom_id": None, "batch_id": "b", "status_code": None, "error_code": "invalid_input_line"}
        writer.write_failure({**record, "error_message": "m", "request": None}, line)
    writer.close()
    assert writer.paths()["retry_requests"].read_bytes() == b"{broken\n" + lines[1] + b"\n"
    got = list(read_records(writer.paths()["failures"]))
    assert [r["error_code"] for r in got] == ["invalid_input_line"] * 2
    assert got[0]["request"] is None


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="output_format"):
        ResultWriter(tmp_path, "csv")


def test_manifest_is_written_atomically(tmp_path: Path) -> None:
    summary = {"total": 3, "succeeded": 2, "failed": 1, "failed_by_code": {"missing": 1}}
    path = write_manifest(tmp_path, summary)
    assert path == tmp_path / "manifest.json"
    assert json.loads(path.read_text()) == summary
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    write_manifest(tmp_path, {**summary, "total": 4})  # replaces
    assert json.loads(path.read_text())["total"] == 4


@pytest.mark.parametrize("output_format", FORMATS)
def test_reconciler_into_writer_end_to_end(tmp_path: Path, output_format: str) -> None:
    inputs = [
        orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings", "body": {}})
        for i in range(4)
    ]
    body = {
        "data": [{"index": 0, "embedding": [0.25, 0.5]}],
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }
    output = [
        orjson.dumps({"custom_id": f"r{i}", "response": {"status_code": 200, "body": body}, "error": None})
        for i in (0, 2)
    ]
    errors = [
        orjson.dumps(
            {"custom_id": "r1", "response": None, "error": {"code": "batch_expired", "message": "x"}}
        )
    ]
    writer = ResultWriter(tmp_path / "stage", output_format)
    rec = Reconciler(writer, tmp_path / "work")
    rec.add_batch(BatchResultFiles("b", "expired", inputs, output, errors, model="text-embedding-3-small"))
    writer.close()
    summary = rec.summary()
    write_manifest(tmp_path / "stage", summary.to_dict())
    paths = writer.paths()
    got = list(read_records(paths["successes"]))
    assert [(r["custom_id"], r["embedding"]) for r in got] == [("r0", [0.25, 0.5]), ("r2", [0.25, 0.5])]
    assert [(r["custom_id"], r["error_code"]) for r in read_records(paths["failures"])] == [
        ("r1", "batch_expired"),
        ("r3", "batch_expired"),
    ]
    assert paths["retry_requests"].read_bytes().splitlines() == [inputs[1], inputs[3]]
    manifest = json.loads((tmp_path / "stage" / "manifest.json").read_text())
    assert manifest["failed_by_code"] == {"batch_expired": 2}
    assert manifest["usage_by_model"] == {"text-embedding-3-small": manifest["usage"]}


@pytest.mark.parametrize("expected", [None, 999, 1000], ids=["unknown", "below", "at-threshold"])
def test_the_batch_request_count_decides_the_helper_before_anything_is_read(
    tmp_path: Path, expected: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request count at or past the threshold starts the helper before the first input line is read (it
    imports meanwhile); one below it means no helper at all, however large the input; without one, the
    input's size decides, once that much is copied."""
    from airflow_openai_batch.core.jsonl import BlockHelper, iter_lines

    monkeypatch.setenv("OPENAI_BATCH_HELPER_PROCESS", "1")
    monkeypatch.setattr(reconcile, "_RESULT_HELPER_MIN", {"jsonl": (1000, 64 << 10)})
    events: list[str] = []
    real_start = BlockHelper.start.__func__  # type: ignore[attr-defined]

    def observed_start(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
        events.append("helper")
        return real_start(cls, *args, **kwargs)

    monkeypatch.setattr(BlockHelper, "start", classmethod(observed_start))
    n = 3000  # ~600 KB of input, ~10 times the size threshold
    pad = "x" * 150
    inputs = [
        orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": {"model": "m", "p": pad}})
        for i in range(n)
    ]

    def input_lines():  # type: ignore[no-untyped-def]
        events.append("input")
        yield from inputs

    body = {"model": "m", "choices": [{"message": {"content": "a"}}], "usage": {"total_tokens": 1}}
    output = b"".join(
        orjson.dumps({"custom_id": f"r{i}", "response": {"status_code": 200, "body": body}, "error": None})
        + b"\n"
        for i in range(n)
    )
    import io

    writer = ResultWriter(tmp_path / "stage", "jsonl")
    rec = Reconciler(writer, tmp_path / "work")
    files = BatchResultFiles(
        "b", "completed", input_lines(), iter_lines(io.BytesIO(output)), None, expected_results=expected
    )
    tally = rec.add_batch(files)
    writer.close()
    assert (tally.total, tally.succeeded) == (n, n)
    assert sum(1 for _ in read_records(tmp_path / "stage" / "successes.jsonl")) == n
    if expected is None:
        assert events == ["input", "helper"]
    elif expected < 1000:
        assert events == ["input"]
    else:
        assert events == ["helper", "input"]


@pytest.mark.parametrize("where", ["late", "early"])
@pytest.mark.parametrize("helper", ["1", "0"], ids=["helper-process", "one-process"])
@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
def test_block_path_reports_repeats_across_blocks_and_unknown_ids(
    tmp_path: Path, output_format: str, helper: str, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large files go through the block path (and a helper process): answered ids leave the index there,
    so a later repeat must still be told apart from an id the input never had. "early" puts the odd lines
    in the first output block, which the helper scans while the input is still being copied."""
    import io

    from airflow_openai_batch.core.jsonl import BlockPipeline, iter_lines

    sent_ahead: list[bool] = []
    real_send_ahead = BlockPipeline.send_ahead

    def observed(self, block, data, limit):  # type: ignore[no-untyped-def]
        sent_ahead.append(real_send_ahead(self, block, data, limit))
        return sent_ahead[-1]

    monkeypatch.setattr(BlockPipeline, "send_ahead", observed)
    monkeypatch.setenv("OPENAI_BATCH_HELPER_PROCESS", helper)
    # The helper starts from 1 MB of input here (its usual size would make a slow test).
    monkeypatch.setattr(reconcile, "_RESULT_HELPER_MIN", {"jsonl": (1, 1 << 20), "parquet": (1, 1 << 20)})
    n = 30_000  # ~7 MB of input
    pad = "x" * 150
    inputs = b"".join(
        orjson.dumps(
            {"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": {"model": "m", "pad": pad}}
        )
        + b"\n"
        for i in range(n)
    )

    def ok(cid: str) -> bytes:
        body = {"model": "m", "choices": [{"message": {"content": f"a-{cid}"}}], "usage": {"total_tokens": 1}}
        return orjson.dumps({"custom_id": cid, "response": {"status_code": 200, "body": body}, "error": None})

    answered = [f"r{i}" for i in range(n) if i % 10]  # every tenth request gets no result
    lines = [ok(cid) for cid in answered]
    odd = [ok("r1"), ok("nobody")]  # r1 answered again; an id never asked
    lines = odd[:1] + lines + odd[1:] if where == "early" else lines + odd
    output = b"\n".join(lines) + b"\n"
    errors = orjson.dumps({"custom_id": "r2", "response": None, "error": {"code": "x", "message": "y"}})

    writer = ResultWriter(tmp_path / "stage", output_format)
    rec = Reconciler(writer, tmp_path / "work")
    rec.add_batch(
        BatchResultFiles(
            "b",
            "completed",
            iter_lines(io.BytesIO(inputs)),
            iter_lines(io.BytesIO(output)),
            iter_lines(io.BytesIO(errors + b"\n")),
        )
    )
    writer.close()
    summary = rec.summary()
    assert any(sent_ahead) == (helper == "1")  # the helper got output blocks while the input was read
    assert summary.anomalies["counts"] == {"duplicate_result": 2, "unknown_custom_id": 1}
    kinds = {(e["kind"], e["custom_id"], e["source"]) for e in summary.anomalies["examples"]}
    # "early": the first r1 is the odd line, and the one in its place later is the repeat.
    assert kinds == {
        ("duplicate_result", "r1", "output"),
        ("duplicate_result", "r2", "error"),
        ("unknown_custom_id", "nobody", "output"),
    }
    assert summary.succeeded == len(answered)
    assert summary.failed_by_code == {"missing": n - len(answered)}
    got = [r["custom_id"] for r in read_records(writer.paths()["successes"])]
    assert sorted(got) == sorted(answered)
    assert got.count("r1") == 1


def test_scanned_parquet_rows_read_usage_like_written_records() -> None:
    """The scanner's fast path (counts read once for the sums) fills the usage column exactly as a record
    written one by one would: input_tokens before prompt_tokens, nulls where a count is missing."""
    from airflow_openai_batch.core.reconcile import _ResultScanner
    from airflow_openai_batch.core.writers import successes_schema

    usages = [
        {
            "prompt_tokens": 7,
            "completion_tokens": 2,
            "total_tokens": 9,
            "prompt_tokens_details": {"cached_tokens": 1},
        },
        {
            "prompt_tokens": 7,
            "input_tokens": 8,
            "completion_tokens": 2,
            "total_tokens": 9,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
        {"prompt_tokens": 5, "total_tokens": 5},
        None,
    ]
    lines = [
        orjson.dumps(
            {
                "custom_id": f"c{i}",
                "response": {
                    "status_code": 200,
                    "body": {"choices": [{"message": {"content": "x"}}], "usage": u},
                },
                "error": None,
            }
        )
        for i, u in enumerate(usages)
    ]
    scan = _ResultScanner("b", "m", "chat", "parquet").scan(lines)
    assert scan is not None and scan.succeeded == 4
    rows = pa.ipc.read_record_batch(pa.py_buffer(scan.payload), successes_schema()).to_pylist()
    assert [r["usage"] for r in rows] == [
        {"input_tokens": 7, "output_tokens": 2, "total_tokens": 9},
        {"input_tokens": 8, "output_tokens": 2, "total_tokens": 9},
        {"input_tokens": 5, "output_tokens": None, "total_tokens": 5},
        None,
    ]
    # The sums count every success's usage, normalized (a missing count is 0).
    assert scan.usage == [["m", 7 + 7 + 5, 2 + 2, 9 + 9 + 5, 1]]
    assert [r["content"] for r in rows] == ["x"] * 4 and rows[0]["embedding"] is None


def test_success_blocks_are_built_without_loading_pyarrow_compute() -> None:
    """A helper process builds Parquet blocks: importing pyarrow.compute (what masks and casts load) or
    pyarrow.parquet would cost it ~0.1 s at every start, before its first answer."""
    import subprocess
    import sys

    code = """
import sys
from airflow_openai_batch.core.writers import success_block, success_columns
rows = success_columns()
usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
rows.add_row("a", "b", 200, {"x": 1}, usage, "hi", None)
rows.add_row("c", "b", 200, {"x": 2}, None, None, [0.5, 1.5])
assert len(success_block(rows)) > 0
print(sorted(m for m in ("pyarrow.compute", "pyarrow.parquet") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_failure_records_carry_the_parsed_request_only_where_a_sink_needs_it(tmp_path: Path) -> None:
    """Into Parquet the request line is stored as it is, so it is not parsed; a wrapped write_failure (or
    JSONL) still gets it parsed. Either way the files hold the request."""
    import io

    from airflow_openai_batch.core.jsonl import iter_lines

    request = {"custom_id": "r1", "method": "POST", "url": CHAT, "body": {"model": "m", "n": 1}}
    line = orjson.dumps(request) + b"\n"
    wrapped_saw: list[Any] = []
    for fmt, wrap in (("parquet", False), ("parquet", True), ("jsonl", False)):
        writer = ResultWriter(tmp_path / f"{fmt}-{wrap}", fmt)
        if wrap:
            real = writer.write_failure

            def observed(record: dict[str, Any], request_line: bytes, real: Any = real) -> None:
                wrapped_saw.append(record["request"])
                real(record, request_line)

            writer.write_failure = observed  # type: ignore[method-assign]
        assert writer.needs_parsed_requests() == (fmt == "jsonl" or wrap)
        rec = Reconciler(writer, tmp_path / "work")
        rec.add_batch(BatchResultFiles("b", "expired", iter_lines(io.BytesIO(line)), None, None))
        writer.close()
        assert [f["request"] for f in read_records(writer.paths()["failures"])] == [request]
        assert writer.paths()["retry_requests"].read_bytes() == line
    assert wrapped_saw == [request]
