"""Result files: JSONL and Parquet round trips, crash safety, the retry file, empty outputs."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from airflow_openai_batch.core.jsonl import iter_lines
from airflow_openai_batch.core.reconcile import BatchResultFiles, Reconciler
from airflow_openai_batch.core.records import RecordBuilder
from airflow_openai_batch.core.writers import RecordSink, ResultWriter, read_records, write_manifest

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
    # (records written without ``attempts``: the fixed schema has the column, null)
    assert list(read_records(paths["failures"])) == [
        {**record, "attempts": None, "output": None} for record, _ in failures()
    ]
    # the request column holds the submitted text byte for byte
    table = pq.read_table(paths["failures"])
    assert table.column("request").to_pylist() == [line.decode() for _, line in failures()]


def test_parquet_schemas_are_fixed(tmp_path: Path) -> None:
    writer = write_all(tmp_path, "parquet")
    writer.close()
    schema = pq.read_schema(writer.paths()["successes"])
    assert schema.names == [
        "custom_id",
        "batch_id",
        "status_code",
        "content",
        "embedding",
        "body",
        "usage",
        "embeddings",
        "attempts",
        "finish_reason",
        "tool_calls",
        "parsed",
        "images",
    ]
    assert schema.field("finish_reason").type == pa.string()
    assert schema.field("tool_calls").type == pa.list_(
        pa.struct([("name", pa.string()), ("arguments", pa.string())])
    )
    assert schema.field("parsed").type == pa.string()  # no answer schema told: JSON text
    assert schema.field("images").type == pa.list_(pa.string())
    assert schema.field("embeddings").type == pa.list_(pa.list_(pa.float32()))
    assert schema.field("attempts").type == pa.int32()
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
        "attempts",
        "output",
    ]
    assert failure_schema.field("status_code").type == pa.int32()
    assert failure_schema.field("output").type == pa.string()


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
    expected = [f"failures.{output_format}.partial", "retry_requests.jsonl.partial"]
    # Parquet's successes file starts at its first row group (its parsed column's type may be learned
    # until then): before it, there is no file at all.
    if output_format == "jsonl":
        expected.append(f"successes.{output_format}.partial")
    assert names == sorted(expected)
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


class MemorySink(RecordSink):
    """Keeps the records, parsed (what any sink that does not take raw JSON gets)."""

    def __init__(self) -> None:
        self.successes: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []

    def write_success(self, record: dict[str, Any]) -> None:
        self.successes.append(record)

    def write_failure(self, record: dict[str, Any], request_line: bytes) -> None:
        self.failures.append(record)

    def close(self) -> None:
        pass


def chat_ok(cid: str, usage: Any = None, content: str | None = None) -> bytes:
    body = {
        "model": "m",
        "choices": [{"message": {"content": content or f"a-{cid}"}}],
        "usage": usage if usage is not None else {"total_tokens": 1},
    }
    return orjson.dumps({"custom_id": cid, "response": {"status_code": 200, "body": body}, "error": None})


def chat_request(cid: str, pad: str = "") -> bytes:
    return orjson.dumps({"custom_id": cid, "method": "POST", "url": CHAT, "body": {"model": "m", "pad": pad}})


def lines_of(lines: list[bytes]) -> Any:
    """Lines as the collect operator reads them (iter_lines over a downloaded file)."""
    return iter_lines(io.BytesIO(b"".join(line + b"\n" for line in lines)))


def reconciled(
    sink: RecordSink,
    tmp_path: Path,
    inputs: list[bytes],
    output: list[bytes],
    errors: list[bytes],
    status: str = "completed",
    attempt: int = 1,
) -> Any:
    rec = Reconciler(sink, tmp_path / "work")
    rec.add_batch(
        BatchResultFiles("b", status, lines_of(inputs), lines_of(output), lines_of(errors)), attempt=attempt
    )
    sink.close()
    return rec.summary()


def comparable(record: dict[str, Any], output_format: str) -> dict[str, Any]:
    """A record as both formats read it back: Parquet has a column for every field (null when absent)
    and its own usage columns (see test_parquet_usage_column_and_sums_read_usage_alike)."""
    skip = ("usage",) if output_format == "parquet" else ()
    return {k: v for k, v in record.items() if v is not None and k not in skip}


@pytest.mark.parametrize("output_format", FORMATS)
def test_the_files_hold_what_a_sink_of_parsed_records_gets(tmp_path: Path, output_format: str) -> None:
    """Records reach a writer as raw JSON and any other sink parsed: read back, the files hold the same
    records, for a batch of several thousand lines with every outcome."""
    n = 3000
    inputs = [chat_request(f"r{i}", "x" * (i % 300)) for i in range(n)]
    usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9, "prompt_tokens_details": {}}
    output = [chat_ok(f"r{i}", usage) for i in range(n) if i % 7]
    errors = [
        orjson.dumps(
            {"custom_id": f"r{i}", "response": None, "error": {"code": "server_error", "message": "m"}}
        )
        for i in range(0, n, 14)
    ]
    memory = MemorySink()
    expected = reconciled(memory, tmp_path / "memory", inputs, output, errors)
    writer = ResultWriter(tmp_path / "stage", output_format)
    got = reconciled(writer, tmp_path / "files", inputs, output, errors)
    assert got.to_dict() == expected.to_dict()
    assert got.failed_by_code == {"server_error": len(errors), "missing": n // 7 + 1 - len(errors)}
    paths = writer.paths()
    successes = list(read_records(paths["successes"]))
    assert [comparable(r, output_format) for r in successes] == [
        comparable(r, output_format) for r in memory.successes
    ]
    failures = list(read_records(paths["failures"]))
    assert [comparable(r, output_format) for r in failures] == [
        comparable(r, output_format) for r in memory.failures
    ]
    assert all(r["request"] == orjson.loads(inputs[int(r["custom_id"][1:])]) for r in failures)
    retry = paths["retry_requests"].read_bytes().splitlines()
    assert retry == [inputs[int(r["custom_id"][1:])] for r in memory.failures]


@pytest.mark.parametrize("where", ["late", "early"])
@pytest.mark.parametrize("output_format", FORMATS)
def test_repeats_and_unknown_ids_in_a_large_file_are_reported(
    tmp_path: Path, output_format: str, where: str
) -> None:
    """Answered ids leave the join's set of ids waiting for an answer: a later repeat must still be told
    apart from an id the input never had, wherever in the file the odd lines are."""
    n = 30_000
    inputs = [chat_request(f"r{i}", "x" * 150) for i in range(n)]
    answered = [f"r{i}" for i in range(n) if i % 10]  # every tenth request gets no result
    lines = [chat_ok(cid) for cid in answered]
    odd = [chat_ok("r1"), chat_ok("nobody")]  # r1 answered again; an id never asked
    lines = odd[:1] + lines + odd[1:] if where == "early" else lines + odd
    errors = [orjson.dumps({"custom_id": "r2", "response": None, "error": {"code": "x", "message": "y"}})]
    writer = ResultWriter(tmp_path / "stage", output_format)
    summary = reconciled(writer, tmp_path, inputs, lines, errors)
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


def test_parquet_usage_column_and_sums_read_usage_alike(tmp_path: Path) -> None:
    """The usage column and the summary's sums read a usage object by the same rule: input_tokens before
    prompt_tokens, a missing count null in the column and 0 in the sums."""
    usages = [
        {
            "prompt_tokens": 7,
            "completion_tokens": 2,
            "total_tokens": 9,
            "prompt_tokens_details": {"cached_tokens": 1},
        },
        {"prompt_tokens": 7, "input_tokens": 8, "completion_tokens": 2, "total_tokens": 10},
        {"prompt_tokens": 5, "total_tokens": 5},
        {"prompt_tokens": "many", "completion_tokens": 1},
    ]
    ids = [f"c{i}" for i in range(len(usages) + 1)]
    output = [chat_ok(cid, usage, "x") for cid, usage in zip(ids, usages, strict=False)]
    output.append(
        orjson.dumps(
            {"custom_id": ids[-1], "response": {"status_code": 200, "body": {"choices": []}}, "error": None}
        )
    )
    writer = ResultWriter(tmp_path / "stage", "parquet")
    summary = reconciled(writer, tmp_path, [chat_request(cid) for cid in ids], output, [])
    rows = list(read_records(writer.paths()["successes"]))
    assert [r["usage"] for r in rows] == [
        {"input_tokens": 7, "output_tokens": 2, "total_tokens": 9},
        {"input_tokens": 8, "output_tokens": 2, "total_tokens": 10},
        {"input_tokens": 5, "output_tokens": None, "total_tokens": 5},
        {"input_tokens": None, "output_tokens": 1, "total_tokens": None},
        None,
    ]
    assert summary.usage == {
        "input_tokens": 7 + 8 + 5,
        "output_tokens": 2 + 2 + 1,
        "total_tokens": 9 + 10 + 5 + 1,
        "cached_input_tokens": 1,
        "reasoning_tokens": 0,
    }
    assert [r["content"] for r in rows] == ["x"] * 4 + [None] and rows[0]["embedding"] is None


@pytest.mark.parametrize("output_format", FORMATS)
def test_every_vector_of_a_multi_input_embedding_request_is_kept(tmp_path: Path, output_format: str) -> None:
    vectors = [[0.5, 1.5], [2.0, -1.0], [0.25, 0.0]]
    body = {
        "object": "list",
        "model": "text-embedding-3-small",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": 6, "total_tokens": 6},
    }
    single = dict(body, data=body["data"][:1])
    inputs = [
        orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/embeddings", "body": {"model": "e"}})
        for cid in ("many", "one")
    ]
    output = [
        orjson.dumps({"custom_id": cid, "response": {"status_code": 200, "body": b}, "error": None})
        for cid, b in (("many", body), ("one", single))
    ]
    writer = ResultWriter(tmp_path / "stage", output_format)
    reconciled(writer, tmp_path, inputs, output, [])
    got = {r["custom_id"]: r for r in read_records(writer.paths()["successes"])}
    assert got["many"]["embedding"] == vectors[0]
    assert got["many"]["embeddings"] == vectors
    assert got["one"]["embedding"] == vectors[0]
    assert got["one"].get("embeddings") is None


@pytest.mark.parametrize("output_format", FORMATS)
def test_records_carry_their_attempt(tmp_path: Path, output_format: str) -> None:
    inputs = [chat_request("a"), chat_request("b")]
    writer = ResultWriter(tmp_path / "stage", output_format)
    summary = reconciled(writer, tmp_path, inputs, [chat_ok("a")], [], status="expired", attempt=3)
    paths = writer.paths()
    assert [(r["custom_id"], r["attempts"]) for r in read_records(paths["successes"])] == [("a", 3)]
    assert [(r["custom_id"], r["attempts"]) for r in read_records(paths["failures"])] == [("b", 3)]
    assert summary.retried == 1


def test_failure_records_carry_the_request_into_every_sink(tmp_path: Path) -> None:
    """Parsed for a sink of parsed records; as JSON text into the files, read back as the same object;
    byte for byte in the retry file; None where the line is not JSON."""
    request = {"custom_id": "r1", "method": "POST", "url": CHAT, "body": {"model": "m", "n": 1}}
    line = json.dumps(request).encode()  # spaced: the retry file keeps the bytes
    broken = b'{"custom_id": "r2", "body": '
    memory = MemorySink()
    reconciled(memory, tmp_path / "memory", [line, broken], [], [], status="expired")
    assert [f["request"] for f in memory.failures] == [request, None]
    for fmt in FORMATS:
        writer = ResultWriter(tmp_path / fmt, fmt)
        reconciled(writer, tmp_path / f"work-{fmt}", [line, broken], [], [], status="expired")
        assert [f["request"] for f in read_records(writer.paths()["failures"])] == [request, None]
        assert writer.paths()["retry_requests"].read_bytes() == line + b"\n" + broken + b"\n"


@pytest.mark.parametrize("output_format", FORMATS)
def test_failures_given_as_columns_are_written_as_one_by_one(tmp_path: Path, output_format: str) -> None:
    ids = [f"f{i}" for i in range(50)]
    lines = [request_line(cid) for cid in ids]
    lines[3] = lines[3].replace(b'"n": 1', b'"n": "\xff"')  # not UTF-8: request None, the line kept
    lines[4] = b"not json"
    count = len(ids)
    failures = RecordBuilder("b1", "chat", raw_json=True).failures(
        ids, [500] * count, ["server_error"] * count, ["Oops."] * count, [None] * count, lines
    )
    one = ResultWriter(tmp_path / "one", output_format)
    for record, line in zip(failures.records(), lines, strict=True):
        one.write_failure(record, line)
    one.close()
    many = ResultWriter(tmp_path / "many", output_format)
    many.write_failures(failures)
    many.close()
    assert many.failed == one.failed == 50
    for name in (f"failures.{output_format}", "retry_requests.jsonl"):
        if name.endswith(".parquet"):
            assert pq.read_table(tmp_path / "many" / name).equals(pq.read_table(tmp_path / "one" / name))
        else:
            assert (tmp_path / "many" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    records = list(read_records(tmp_path / "many" / f"failures.{output_format}"))
    assert [r["request"] for r in records[5:]] == [orjson.loads(line) for line in lines[5:]]
    assert records[4]["request"] is None
