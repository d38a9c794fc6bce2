"""Reconciliation: every input request lands exactly once in successes or failures, with the right code."""

from __future__ import annotations

import base64
import io
import itertools
import json
import random
import struct
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_openai_batch.core.reconcile import (
    MAX_ANOMALY_EXAMPLES,
    BatchResultFiles,
    Reconciler,
    _RequestFetcher,
    present_file_id,
)
from airflow_openai_batch.core.records import (
    FailureColumns,
    endpoint_kind,
    extract_content,
    usage_counts,
)
from airflow_openai_batch.core.writers import RecordSink
from airflow_openai_batch.statuses import BatchStatus

CHAT = "/v1/chat/completions"


# -- line builders ------------------------------------------------------------------------------------


def request(cid: str, url: str = CHAT, model: str = "gpt-4o-mini", **body: Any) -> bytes:
    return orjson.dumps({"custom_id": cid, "method": "POST", "url": url, "body": {"model": model, **body}})


def chat_body(content: str | None = "hi", prompt: int = 10, completion: int = 2, cached: int = 0) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }


def ok_line(cid: str, body: dict | None = None, status: int = 200) -> bytes:
    return orjson.dumps(
        {
            "id": f"batch_req_{cid}",
            "custom_id": cid,
            "response": {"status_code": status, "request_id": f"r_{cid}", "body": body or chat_body()},
            "error": None,
        }
    )


def http_error_line(
    cid: str, status: int = 400, code: str | None = "invalid_request", msg: str = "bad"
) -> bytes:
    body = {"error": {"message": msg, "type": "invalid_request_error", "param": None, "code": code}}
    return orjson.dumps(
        {
            "id": f"batch_req_{cid}",
            "custom_id": cid,
            "response": {"status_code": status, "request_id": f"r_{cid}", "body": body},
            "error": None,
        }
    )


def error_line(
    cid: str, code: str = "batch_expired", msg: str = "This request could not be executed."
) -> bytes:
    return orjson.dumps(
        {
            "id": f"batch_req_{cid}",
            "custom_id": cid,
            "response": None,
            "error": {"code": code, "message": msg},
        }
    )


class MemorySink(RecordSink):
    """A RecordSink that keeps everything (tests only: small inputs)."""

    def __init__(self) -> None:
        self.successes: list[dict] = []
        self.failures: list[dict] = []
        self.request_lines: list[bytes] = []
        self.closed = False

    def write_success(self, record: dict) -> None:
        self.successes.append(record)

    def write_failure(self, record: dict, request_line: bytes) -> None:
        self.failures.append(record)
        self.request_lines.append(request_line)

    def close(self) -> None:
        self.closed = True

    def ids(self) -> list[str]:
        return [r["custom_id"] for r in self.successes + self.failures]


def reconcile(
    tmp_path: Path,
    inputs: list[bytes],
    output: list[bytes] | None,
    errors: list[bytes] | None,
    status: str = "completed",
    endpoint: str | None = None,
    model: str | None = "gpt-4o-mini",
) -> tuple[MemorySink, Any]:
    sink = MemorySink()
    rec = Reconciler(sink, tmp_path / "work", endpoint=endpoint)
    rec.add_batch(BatchResultFiles("batch_1", status, inputs, output, errors, model=model))
    return sink, rec.summary()


def assert_invariant(sink: MemorySink, summary: Any, input_ids: list[str]) -> None:
    assert summary.total == len(input_ids) == summary.succeeded + summary.failed
    assert sum(summary.failed_by_code.values()) == summary.failed
    assert sorted(sink.ids()) == sorted(input_ids)
    assert len(set(sink.ids())) == len(sink.ids())


# -- outcomes -----------------------------------------------------------------------------------------


def test_completed_batch_mixes_successes_http_errors_non_http_errors_and_missing(tmp_path: Path) -> None:
    ids = [f"r{i}" for i in range(10)]
    inputs = [request(c, messages=[{"role": "user", "content": f"q{c}"}]) for c in ids]
    output = [
        ok_line("r3", chat_body("three", prompt=7, completion=3, cached=4)),
        ok_line("r0", chat_body("zero", prompt=10, completion=2)),
        ok_line("r1", chat_body("one")),
        ok_line("r2", chat_body("two")),
        ok_line("r4", chat_body("four")),
    ]
    errors = [
        http_error_line("r5", 400, "invalid_prompt", "Prompt rejected"),
        http_error_line("r6", 500, None, "Server error"),
        error_line("r7", "server_error", "Something broke"),
    ]
    sink, summary = reconcile(tmp_path, inputs, output, errors)

    assert_invariant(sink, summary, ids)
    assert (summary.succeeded, summary.failed) == (5, 5)
    assert summary.failed_by_code == {"invalid_prompt": 1, "http_500": 1, "server_error": 1, "missing": 2}
    by_id = {r["custom_id"]: r for r in sink.failures}
    assert by_id["r5"]["status_code"] == 400 and by_id["r5"]["error_message"] == "Prompt rejected"
    assert by_id["r6"]["status_code"] == 500 and by_id["r6"]["error_code"] == "http_500"
    assert by_id["r7"]["status_code"] is None and by_id["r7"]["error_message"] == "Something broke"
    assert by_id["r8"]["error_code"] == "missing" and "completed" in by_id["r8"]["error_message"]
    # The failure carries the original request, parsed and byte for byte.
    for record, line in zip(sink.failures, sink.request_lines, strict=True):
        original = inputs[ids.index(record["custom_id"])]
        assert line == original
        assert record["request"] == orjson.loads(original)
        assert record["batch_id"] == "batch_1"

    success = {r["custom_id"]: r for r in sink.successes}
    assert success["r3"]["content"] == "three"
    assert success["r3"]["status_code"] == 200
    assert success["r3"]["usage"] == chat_body("three", 7, 3, 4)["usage"]
    assert success["r3"]["body"]["choices"][0]["message"]["content"] == "three"
    assert set(success["r3"]) == {
        "custom_id",
        "batch_id",
        "status_code",
        "body",
        "usage",
        "content",
        "finish_reason",
        "attempts",
    }
    assert {r["attempts"] for r in sink.successes + sink.failures} == {1}

    # usage: 7+10+10*3 prompt, 3+2+2*3 completion; per model keyed by the response's model
    assert summary.usage == {
        "input_tokens": 47,
        "output_tokens": 11,
        "total_tokens": 58,
        "cached_input_tokens": 4,
        "reasoning_tokens": 0,
    }
    assert summary.usage_by_model == {"gpt-4o-mini-2024-07-18": summary.usage}
    assert summary.anomalies == {"counts": {}, "examples": []}
    tally = summary.batches["batch_1"]
    assert (tally.total, tally.succeeded, tally.failed) == (10, 5, 5)
    assert tally.endpoint == CHAT
    # the local copy of the input is gone
    assert list((tmp_path / "work").iterdir()) == []


def test_non_2xx_line_in_the_output_file_is_a_failure(tmp_path: Path) -> None:
    inputs = [request("a"), request("b")]
    output = [ok_line("a"), http_error_line("b", 429, "rate_limit_exceeded", "slow down")]
    sink, summary = reconcile(tmp_path, inputs, output, None)
    assert summary.succeeded == 1
    assert summary.failed_by_code == {"rate_limit_exceeded": 1}
    assert sink.failures[0]["status_code"] == 429


def test_expired_batch_counts_expired_lines_and_absent_lines_as_batch_expired(tmp_path: Path) -> None:
    ids = [f"e{i}" for i in range(6)]
    inputs = [request(c) for c in ids]
    output = [ok_line("e0"), ok_line("e1")]
    errors = [error_line("e2", "batch_expired"), error_line("e3", "batch_expired")]
    sink, summary = reconcile(tmp_path, inputs, output, errors, status="expired")
    assert_invariant(sink, summary, ids)
    assert summary.succeeded == 2
    assert summary.failed_by_code == {"batch_expired": 4}
    absent = [r for r in sink.failures if r["custom_id"] in ("e4", "e5")]
    assert all("expired" in r["error_message"] and r["status_code"] is None for r in absent)


def test_status_may_be_a_batch_status_member(tmp_path: Path) -> None:
    _, summary = reconcile(tmp_path, [request("a")], None, None, status=BatchStatus.EXPIRED)
    assert summary.failed_by_code == {"batch_expired": 1}
    assert summary.batches["batch_1"].status == "expired"


@pytest.mark.parametrize("status", ["cancelled", "cancelling"])
def test_cancelled_batch_absent_lines_are_batch_cancelled(tmp_path: Path, status: str) -> None:
    ids = [f"c{i}" for i in range(5)]
    sink, summary = reconcile(tmp_path, [request(c) for c in ids], [ok_line("c1")], None, status=status)
    assert_invariant(sink, summary, ids)
    assert summary.failed_by_code == {"batch_cancelled": 4}


def test_failed_batch_without_output_fails_every_request_as_batch_failed(tmp_path: Path) -> None:
    ids = [f"f{i}" for i in range(4)]
    sink, summary = reconcile(tmp_path, [request(c) for c in ids], None, None, status="failed")
    assert_invariant(sink, summary, ids)
    assert summary.failed_by_code == {"batch_failed": 4}
    assert sink.request_lines == [request(c) for c in ids]


def test_empty_input(tmp_path: Path) -> None:
    _, summary = reconcile(tmp_path, [], None, None, model=None)
    assert (summary.total, summary.succeeded, summary.failed) == (0, 0, 0)
    assert summary.failure_ratio == 0.0


# -- Azure quirks -------------------------------------------------------------------------------------


def test_azure_quirks_empty_file_ids_null_request_counts_zero_byte_error_file(tmp_path: Path) -> None:
    azure_batch = {
        "id": "batch_az",
        "status": "completed",
        "endpoint": None,
        "output_file_id": "file-out",
        "error_file_id": "",
        "request_counts": {"total": None, "completed": None, "failed": None},
    }
    assert present_file_id(azure_batch["error_file_id"]) is None
    assert present_file_id(None) is None
    assert present_file_id("file-out") == "file-out"
    inputs = [request(c, url="/chat/completions", model="my-gpt4o-deployment") for c in ("a", "b")]
    output = [ok_line("a", chat_body("A")), ok_line("b", chat_body("B"))]
    sink = MemorySink()
    rec = Reconciler(sink, tmp_path)
    # Nothing is read from request_counts: the counts come from the lines themselves.
    rec.add_batch(BatchResultFiles(azure_batch["id"], azure_batch["status"], inputs, output, None))
    # A zero-byte error file next to a success yields no line at all (or one blank one).
    rec.add_batch(BatchResultFiles("batch_az2", "completed", [request("c")], [ok_line("c")], [b""]))
    rec.add_batch(BatchResultFiles("batch_az3", "completed", [request("d")], [ok_line("d")], []))
    summary = rec.summary()
    assert (summary.total, summary.succeeded, summary.failed) == (4, 4, 0)
    assert [r["content"] for r in sink.successes] == ["A", "B", "hi", "hi"]
    assert summary.batches["batch_az"].model == "my-gpt4o-deployment"  # learned from the input
    assert summary.anomalies["counts"] == {}
    # The deployment name is not a model: usage is keyed by the response's real model.
    assert list(summary.usage_by_model) == ["gpt-4o-mini-2024-07-18"]


# -- anomalies ----------------------------------------------------------------------------------------


def test_truncated_last_line_is_reported_and_its_request_is_missing(tmp_path: Path) -> None:
    ids = ["t0", "t1", "t2"]
    output = [ok_line("t0"), ok_line("t1"), ok_line("t2")[:40]]
    sink, summary = reconcile(tmp_path, [request(c) for c in ids], output, None)
    assert_invariant(sink, summary, ids)
    assert summary.failed_by_code == {"missing": 1}
    assert summary.anomalies["counts"] == {"unparseable_result_line": 1}
    example = summary.anomalies["examples"][0]
    assert example["kind"] == "unparseable_result_line"
    assert example["source"] == "output" and example["line"] == 3 and example["batch_id"] == "batch_1"


def test_duplicate_and_unknown_custom_ids_are_reported_first_result_wins(tmp_path: Path) -> None:
    ids = ["d0", "d1", "d2"]
    output = [ok_line("d0", chat_body("first")), ok_line("d0", chat_body("second")), ok_line("zz")]
    errors = [error_line("d0", "server_error"), http_error_line("d1"), http_error_line("d1"), b"[1, 2]"]
    sink, summary = reconcile(tmp_path, [request(c) for c in ids], output, errors)
    assert_invariant(sink, summary, ids)
    assert [r["content"] for r in sink.successes] == ["first"]
    assert summary.failed_by_code == {"invalid_request": 1, "missing": 1}
    assert summary.anomalies["counts"] == {
        "duplicate_result": 3,
        "unknown_custom_id": 1,
        "unparseable_result_line": 1,
    }
    kinds = Counter((e["kind"], e["custom_id"], e["source"]) for e in summary.anomalies["examples"])
    assert kinds[("duplicate_result", "d0", "output")] == 1
    assert kinds[("duplicate_result", "d0", "error")] == 1
    assert kinds[("unknown_custom_id", "zz", "output")] == 1
    assert summary.batches["batch_1"].anomalies == summary.anomalies["counts"]


def test_anomaly_examples_are_capped_but_counts_are_complete(tmp_path: Path) -> None:
    output = [ok_line(f"ghost{i}") for i in range(MAX_ANOMALY_EXAMPLES + 50)]
    _, summary = reconcile(tmp_path, [request("a")], [*output, ok_line("a")], None)
    assert summary.anomalies["counts"] == {"unknown_custom_id": MAX_ANOMALY_EXAMPLES + 50}
    assert len(summary.anomalies["examples"]) == MAX_ANOMALY_EXAMPLES
    assert summary.succeeded == 1


def test_odd_result_lines_never_crash(tmp_path: Path) -> None:
    output = [
        b"not json",
        b"{}",
        b'{"custom_id": {"nested": 1}}',
        b'{"custom_id": 12}',
        b'"a string"',
        b"   ",
        orjson.dumps({"custom_id": "a", "response": {"status_code": 200, "body": None}, "error": None}),
        orjson.dumps({"custom_id": "b", "response": {"status_code": "200"}, "error": None}),
        orjson.dumps(
            {"custom_id": "c", "response": {"status_code": 200, "body": {}}, "error": {"code": "x"}}
        ),
        orjson.dumps({"custom_id": "d", "response": None, "error": None}),
    ]
    sink, summary = reconcile(tmp_path, [request(c) for c in "abcde"], output, None)
    assert_invariant(sink, summary, list("abcde"))
    assert [r["custom_id"] for r in sink.successes] == ["a"]
    assert sink.successes[0]["content"] is None and sink.successes[0]["usage"] is None
    assert summary.failed_by_code == {"error": 2, "x": 1, "missing": 1}
    assert summary.anomalies["counts"] == {"unparseable_result_line": 5}


def test_input_duplicates_and_invalid_lines_still_add_up(tmp_path: Path) -> None:
    inputs = [request("a"), request("b"), request("a"), b"{broken", b'{"custom_id": ""}', b"", request("c")]
    sink, summary = reconcile(tmp_path, inputs, [ok_line("a"), ok_line("c")], None, status="failed")
    # 6 non-blank input lines -> 6 records
    assert summary.total == 6 == summary.succeeded + summary.failed
    assert summary.failed_by_code == {"batch_failed": 1, "duplicate_custom_id": 1, "invalid_input_line": 2}
    assert summary.anomalies["counts"] == {"duplicate_input_custom_id": 1, "invalid_input_line": 2}
    bad = [r for r in sink.failures if r["error_code"] == "invalid_input_line"]
    assert [r["request"] for r in bad] == [None, {"custom_id": ""}]
    assert "line 4" in bad[0]["error_message"]
    lines = {e["kind"]: e["line"] for e in summary.anomalies["examples"]}
    assert lines == {"duplicate_input_custom_id": 3, "invalid_input_line": 5}
    assert sorted(sink.request_lines) == sorted(
        [request("b"), request("a"), b"{broken", b'{"custom_id": ""}']
    )


def test_duplicate_input_ids_in_clean_slabs(tmp_path: Path) -> None:
    inputs = [request("a"), request("b"), request("a"), request("c"), request("b")]
    sink, summary = reconcile(tmp_path, inputs, [ok_line("a"), ok_line("b")], None, status="failed")
    assert summary.total == 5 == summary.succeeded + summary.failed
    assert summary.failed_by_code == {"batch_failed": 1, "duplicate_custom_id": 2}
    examples = [(e["custom_id"], e["line"]) for e in summary.anomalies["examples"]]
    assert examples == [("a", 3), ("b", 5)]
    assert sink.request_lines == [request("c"), request("a"), request("b")]


def test_reconciling_the_same_batch_twice_is_refused(tmp_path: Path) -> None:
    rec = Reconciler(MemorySink(), tmp_path)
    rec.add_batch(BatchResultFiles("b", "completed", [request("a")], [ok_line("a")], None))
    with pytest.raises(ValueError, match="already"):
        rec.add_batch(BatchResultFiles("b", "completed", [request("a")], [ok_line("a")], None))


# -- input shapes -------------------------------------------------------------------------------------


def test_every_input_form_is_indexed(tmp_path: Path) -> None:
    """Other key orders, spaced JSON, escaped and non-ASCII ids, newlines kept, a BOM, blank lines."""
    lines = [
        b"\xef\xbb\xbf" + request("bom") + b"\n",
        json.dumps({"custom_id": "spaced", "method": "POST", "url": CHAT, "body": {"model": "m"}}).encode()
        + b"\n",
        orjson.dumps({"method": "POST", "custom_id": "late", "url": CHAT, "body": {}}) + b"\r\n",
        orjson.dumps({"custom_id": 'quo"te\\', "method": "POST", "url": CHAT, "body": {}}) + b"\n",
        request("ünï-çødé") + b"\n",
        b"\n",
        request("last"),  # no final newline
    ]
    ids = ["bom", "spaced", "late", 'quo"te\\', "ünï-çødé", "last"]
    output = [ok_line(c) for c in ids[:3]]
    sink, summary = reconcile(tmp_path, lines, output, None, model=None)
    assert_invariant(sink, summary, ids)
    assert summary.batches["batch_1"].model == "gpt-4o-mini"
    # request lines come back without newline or BOM
    assert dict(zip([r["custom_id"] for r in sink.failures], sink.request_lines, strict=True)) == {
        'quo"te\\': lines[3][:-1],
        "ünï-çødé": lines[4][:-1],
        "last": lines[6],
    }


def test_file_object_and_iter_lines_sources(tmp_path: Path) -> None:
    from airflow_openai_batch.core.jsonl import iter_lines

    data = b"\n".join(request(f"x{i}") for i in range(10)) + b"\n"
    out = b"\n".join(ok_line(f"x{i}") for i in range(0, 10, 2)) + b"\n"
    for src in (lambda b: io.BytesIO(b), lambda b: iter_lines(io.BytesIO(b))):
        sink, summary = reconcile(tmp_path / str(id(src)), src(data), src(out), None)
        assert_invariant(sink, summary, [f"x{i}" for i in range(10)])
        assert summary.succeeded == 5
        assert sink.request_lines[0] == request("x1")


def test_many_slabs_with_a_duplicate_across_slabs(tmp_path: Path) -> None:
    n = 10_000
    inputs = [request(f"id-{i}") for i in range(n)]
    inputs.append(request("id-5"))  # in a later slab than the first id-5
    inputs.insert(6000, orjson.dumps({"url": CHAT, "custom_id": "other-order", "body": {}}))
    output = [ok_line(f"id-{i}") for i in range(0, n, 3)] + [ok_line("other-order")]
    random.Random(1).shuffle(output)
    sink, summary = reconcile(tmp_path, inputs, output, None)
    assert summary.total == n + 2
    assert summary.succeeded == len(output)
    assert summary.failed_by_code == {"missing": n - len(output) + 1, "duplicate_custom_id": 1}
    # every request line came back intact from the local copy
    expected = {orjson.loads(line)["custom_id"]: line for line in inputs[:-1]}
    for record, line in zip(sink.failures, sink.request_lines, strict=True):
        if record["error_code"] == "missing":
            assert expected[record["custom_id"]] == line


# -- convenience fields -------------------------------------------------------------------------------


def _embedding_body(*vectors: Any) -> dict:
    return {
        "object": "list",
        "model": "text-embedding-3-small",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": 5, "total_tokens": 5},
    }


def test_convenience_fields_for_every_endpoint(tmp_path: Path) -> None:
    responses_body = {
        "object": "response",
        "model": "gpt-5-mini-2025-08-07",
        "output": [
            {"type": "reasoning", "summary": []},
            {
                "type": "message",
                "content": [
                    {"type": "output_text", "text": "Hello, "},
                    {"type": "refusal", "refusal": "no"},
                    {"type": "output_text", "text": "world"},
                ],
            },
        ],
        "usage": {
            "input_tokens": 20,
            "output_tokens": 8,
            "total_tokens": 28,
            "input_tokens_details": {"cached_tokens": 5},
            "output_tokens_details": {"reasoning_tokens": 3},
        },
    }
    completions_body = {
        "object": "text_completion",
        "model": "gpt-3.5-turbo-instruct",
        "choices": [{"text": "done", "index": 0}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    b64 = base64.b64encode(struct.pack("<3f", 0.5, -1.0, 2.0)).decode()
    moderation_body = {"id": "modr-1", "model": "omni-moderation-latest", "results": [{"flagged": False}]}
    cases = [
        ("/v1/chat/completions", chat_body("chat!"), {"content": "chat!"}),
        ("/v1/chat/completions", chat_body(None), {"content": None}),
        # n=2: the first choice is the answer, whatever the others hold
        (
            "/v1/chat/completions",
            {
                "model": "gpt-4o-mini",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "first"},
                        "finish_reason": "stop",
                    },
                    {"index": 1, "message": {"content": ["not", "read"]}, "finish_reason": 7},
                ],
            },
            {"content": "first"},
        ),
        ("/v1/chat/completions", {"model": "gpt-4o-mini", "choices": []}, {"content": None}),
        ("/v1/responses", responses_body, {"content": "Hello, world"}),
        # output_text parts only (not a reasoning item's text); annotations and logprobs skipped
        (
            "/v1/responses",
            {
                "output": [
                    {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "thinking"}]},
                    {
                        "type": "message",
                        "content": [
                            {
                                "type": "output_text",
                                "text": "cited",
                                "annotations": [{"type": "url_citation", "url": "https://example.com"}],
                                "logprobs": [{"token": "cited", "logprob": -0.1, "top_logprobs": []}],
                            }
                        ],
                    },
                ]
            },
            {"content": "cited"},
        ),
        (
            "/v1/responses",
            {"output": [{"type": "function_call", "name": "f", "arguments": '{"a": 1}'}]},
            {"content": None, "tool_calls": [{"name": "f", "arguments": {"a": 1}}], "parsed": {"a": 1}},
        ),
        ("/v1/completions", completions_body, {"content": "done"}),
        ("/v1/completions", {"choices": [{"text": "one"}, {"text": "two"}]}, {"content": "one"}),
        ("/v1/embeddings", _embedding_body([0.1, 0.2]), {"embedding": [0.1, 0.2]}),
        (
            "/v1/embeddings",
            {"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}]},
            {"embedding": [1.0], "embeddings": [[1.0], [2.0]]},
        ),
        ("/v1/embeddings", _embedding_body(b64), {"embedding": [0.5, -1.0, 2.0]}),
        ("/v1/embeddings", {"data": []}, {"embedding": None}),
        ("/v1/moderations", moderation_body, {}),
    ]
    for i, (url, body, expected) in enumerate(cases):
        sink, _ = reconcile(tmp_path / str(i), [request("x", url=url)], [ok_line("x", body)], None)
        record = sink.successes[0]
        extra = {
            k: v
            for k, v in record.items()
            if k not in ("custom_id", "batch_id", "status_code", "body", "usage", "attempts", "finish_reason")
        }
        assert extra == expected, url
        assert record["body"] == body
        convenience = {k: v for k, v in expected.items() if k not in ("tool_calls", "parsed")}
        assert extract_content(endpoint_kind(url), body) == convenience

    # the Responses API's usage names, and cached tokens
    sink, summary = reconcile(
        tmp_path / "r", [request("x", url="/v1/responses")], [ok_line("x", responses_body)], None
    )
    assert summary.usage == {
        "input_tokens": 20,
        "output_tokens": 8,
        "total_tokens": 28,
        "cached_input_tokens": 5,
        "reasoning_tokens": 3,
    }
    assert list(summary.usage_by_model) == ["gpt-5-mini-2025-08-07"]


def test_endpoint_argument_overrides_the_input_url(tmp_path: Path) -> None:
    sink, _ = reconcile(tmp_path, [request("x", url="/v1/whatever")], [ok_line("x")], None, endpoint=CHAT)
    assert sink.successes[0]["content"] == "hi"


def test_endpoint_kind_and_usage_counts() -> None:
    assert endpoint_kind("/v1/chat/completions") == "chat"
    assert endpoint_kind("/chat/completions") == "chat"  # Azure, older API versions
    assert endpoint_kind("/v1/completions") == "completions"
    assert endpoint_kind("/v1/responses/") == "responses"
    assert endpoint_kind("/v1/embeddings") == "embeddings"
    assert endpoint_kind("/v1/moderations") == "other"
    assert endpoint_kind(None) == "other"
    assert usage_counts({"prompt_tokens": 3, "completion_tokens": 2}) == (3, 2, 5, 0, 0)
    assert usage_counts({"input_tokens": 3, "output_tokens": "x", "total_tokens": None}) == (3, 0, 3, 0, 0)
    # chat's reasoning tokens, under completion_tokens_details, parsed or as JSON text alike
    chat = {
        "prompt_tokens": 9,
        "completion_tokens": 7,
        "total_tokens": 16,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 5},
    }
    assert usage_counts(chat) == usage_counts(orjson.dumps(chat)) == (9, 7, 16, 4, 5)
    assert usage_counts(None) is None


def test_odd_usage_values_do_not_crash_and_do_not_count(tmp_path: Path) -> None:
    body = chat_body()
    body["usage"] = {"prompt_tokens": "ten", "completion_tokens": 2}
    _, summary = reconcile(tmp_path, [request("x")], [ok_line("x", body)], None)
    assert summary.usage["input_tokens"] == 0 and summary.usage["output_tokens"] == 2


def test_summary_across_batches_is_json_safe(tmp_path: Path) -> None:
    sink = MemorySink()
    rec = Reconciler(sink, tmp_path)
    rec.add_batch(BatchResultFiles("b1", "completed", [request("a"), request("b")], [ok_line("a")], None))
    rec.add_batch(BatchResultFiles("b2", "expired", [request("c")], None, [error_line("c")], model="gpt-4o"))
    summary = rec.summary()
    as_dict = summary.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["batch_ids"] == ["b1", "b2"]
    assert (as_dict["total"], as_dict["succeeded"], as_dict["failed"]) == (3, 1, 2)
    assert as_dict["failed_by_code"] == {"missing": 1, "batch_expired": 1}
    assert as_dict["batches"]["b2"]["model"] == "gpt-4o"
    assert as_dict["batches"]["b2"]["failed_by_code"] == {"batch_expired": 1}
    assert summary.failure_ratio == pytest.approx(2 / 3)


# -- the invariant, over random mixes -----------------------------------------------------------------

FATES = ("ok", "output_http", "error_http", "error_other", "absent")
STATUSES = ("completed", "expired", "cancelled", "cancelling", "failed", "in_progress")
ABSENT_CODE = {"expired": "batch_expired", "cancelled": "batch_cancelled", "cancelling": "batch_cancelled"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fates=st.lists(st.sampled_from(FATES), max_size=40),
    duplicates=st.lists(st.tuples(st.integers(0, 39), st.booleans()), max_size=6),
    unknowns=st.integers(0, 3),
    truncate=st.booleans(),
    status=st.sampled_from(STATUSES),
    seed=st.integers(0, 2**16),
)
def test_every_input_request_lands_exactly_once(
    fates: list[str],
    duplicates: list[tuple[int, bool]],
    unknowns: int,
    truncate: bool,
    status: str,
    seed: int,
) -> None:
    rng = random.Random(seed)
    ids = [f"id-{i}" for i in range(len(fates))]
    output: list[bytes] = []
    errors: list[bytes] = []
    for cid, fate in zip(ids, fates, strict=True):
        if fate == "ok":
            output.append(ok_line(cid))
        elif fate == "output_http":
            output.append(http_error_line(cid, 500, "server_error"))
        elif fate == "error_http":
            errors.append(http_error_line(cid, 400, None))
        elif fate == "error_other":
            errors.append(error_line(cid, "batch_expired"))
    for index, to_output in duplicates:
        if ids:
            (output if to_output else errors).append(error_line(ids[index % len(ids)], "dup_code"))
    for i in range(unknowns):
        output.append(ok_line(f"unknown-{i}"))
    rng.shuffle(output)
    rng.shuffle(errors)
    if truncate and output:
        output[-1] = output[-1][: len(output[-1]) // 2]

    # What should happen: output lines first, then error lines; the first parseable result per id wins.
    expected: dict[str, str] = {}
    dup_count = unknown_count = unparseable = 0
    for line in output + errors:
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            unparseable += 1
            continue
        cid = obj["custom_id"]
        if cid not in ids:
            unknown_count += 1
        elif cid in expected:
            dup_count += 1
        elif obj["response"] and obj["response"]["status_code"] == 200:
            expected[cid] = "ok"
        elif obj["response"]:
            expected[cid] = (
                obj["response"]["body"]["error"]["code"] or f"http_{obj['response']['status_code']}"
            )
        else:
            expected[cid] = obj["error"]["code"]
    absent_code = ABSENT_CODE.get(status, "batch_failed" if status == "failed" else "missing")
    for cid in ids:
        expected.setdefault(cid, absent_code)

    with tempfile.TemporaryDirectory() as tmp:
        sink = MemorySink()
        rec = Reconciler(sink, Path(tmp))
        rec.add_batch(
            BatchResultFiles("b", status, [request(c) for c in ids], output or None, errors or None)
        )
        summary = rec.summary()
        assert list(Path(tmp).iterdir()) == []

    assert_invariant(sink, summary, ids)
    got = {r["custom_id"]: "ok" for r in sink.successes}
    got.update({r["custom_id"]: r["error_code"] for r in sink.failures})
    assert got == expected
    assert summary.failed_by_code == dict(Counter(v for v in expected.values() if v != "ok"))
    counts = summary.anomalies["counts"]
    assert counts.get("duplicate_result", 0) == dup_count
    assert counts.get("unknown_custom_id", 0) == unknown_count
    assert counts.get("unparseable_result_line", 0) == unparseable


# -- memory -------------------------------------------------------------------------------------------


def _template(line: bytes) -> list[bytes]:
    return line.split(b"@ID@")


def _generated(n: int, kind: str, pad_words: int = 12) -> Iterator[bytes]:
    """Lines made on the fly from templates, so the test itself holds no file in memory (and each line is
    an exact-size bytes object, as ``iter_lines`` yields them)."""
    pad = "lorem ipsum dolor sit amet " * pad_words
    req = _template(request("@ID@", messages=[{"role": "user", "content": pad}]))
    # A lean body (few JSON objects per line) keeps tracemalloc's per-allocation cost down.
    body = {
        "model": "gpt-4o-mini",
        "choices": [{"message": {"content": pad}}],
        "usage": {"prompt_tokens": 30},
    }
    ok = _template(ok_line("@ID@", body))
    bad = _template(http_error_line("@ID@", 400, "invalid_prompt"))
    for i in range(n):
        cid = b"request-%08d" % i
        if kind == "input":
            parts = req
        elif i % 50 == 7:
            continue  # absent -> missing
        elif i % 50 == 3:
            parts = bad
        else:
            parts = ok
        yield cid.join(parts)


def _data_bytes(n: int, pad_words: int = 12) -> int:
    """Bytes of input + output lines for ``n`` requests (from a sample: the lines differ only by id)."""
    sample = 1_000
    size = sum(len(x) for x in _generated(sample, "input", pad_words))
    size += sum(len(x) for x in _generated(sample, "output", pad_words))
    return size * n // sample


def _reconcile_generated(tmp_path: Path, n: int, pad_words: int = 12) -> tuple[Any, Any]:
    from airflow_openai_batch.core.writers import ResultWriter

    writer = ResultWriter(tmp_path / "stage", "parquet")
    rec = Reconciler(writer, tmp_path / "work")
    inputs, outputs = _generated(n, "input", pad_words), _generated(n, "output", pad_words)
    rec.add_batch(BatchResultFiles("b", "completed", inputs, outputs, None))
    writer.close()
    summary = rec.summary()
    assert summary.total == n == summary.succeeded + summary.failed
    assert summary.failed_by_code == {"invalid_prompt": n // 50, "missing": n // 50}
    return writer, summary


def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def test_reconciling_200k_results_into_parquet_keeps_rss_flat(tmp_path: Path) -> None:
    """The real budget: peak RSS (Python objects *and* Arrow buffers) for 200k results, ~200 MB of data."""
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from airflow_openai_batch.core.writers import read_records

    try:
        # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM), so it can be measured here.
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        baseline = _vm_kb("VmRSS")
    except OSError:
        pytest.skip("needs Linux /proc to read the peak RSS")
    n = 200_000
    started = time.perf_counter()
    writer, summary = _reconcile_generated(tmp_path, n)
    elapsed = time.perf_counter() - started
    grown_mb = (_vm_kb("VmHWM") - baseline) / 1024

    data_mb = _data_bytes(n) / 1e6
    assert data_mb > 150
    assert grown_mb < 150, f"peak RSS grew by {grown_mb:.0f} MB for {data_mb:.0f} MB of data"
    paths = writer.paths()
    metadata = pq.ParquetFile(paths["successes"]).metadata
    assert metadata.num_rows == summary.succeeded
    assert metadata.num_row_groups > 1  # streamed in row groups, not one table
    first = next(read_records(paths["successes"]))
    assert first["content"].startswith("lorem") and first["usage"]["input_tokens"] == 30
    assert paths["retry_requests"].read_bytes().count(b"\n") == summary.failed
    print(f"\n200k into parquet: {elapsed:.1f}s, peak RSS +{grown_mb:.0f} MB for {data_mb:.0f} MB of data")


def test_reconcile_python_heap_peak_is_well_below_the_data_size(tmp_path: Path) -> None:
    """tracemalloc's peak: only the id index and one row group are ever held, never the bodies.

    tracemalloc slows every allocation down, so this uses fewer, larger requests (30k, ~3 KB each).
    """
    pytest.importorskip("pyarrow")
    n, pad_words = 30_000, 48
    _reconcile_generated(tmp_path / "warm-up", 100)  # imports, schemas, codecs: not part of the peak
    tracemalloc.start()
    try:
        _reconcile_generated(tmp_path / "measured", n, pad_words)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    data = _data_bytes(n, pad_words)
    assert data > 80_000_000
    # Held at the peak: the id index and the ids not answered yet (~3 MB), one block of result lines and
    # its decoded lines, one row group. Never the bodies: the data is four to five times that.
    assert peak < data / 3, f"peak {peak / 1e6:.0f} MB for {data / 1e6:.0f} MB of data"


def test_long_request_lines_come_back_whole_for_the_retry_file(tmp_path: Path) -> None:
    # Request lines far longer than one read of the input copy, next to short ones.
    inputs = [
        request(f"long-{i}", messages=[{"role": "user", "content": "w" * (9000 * i)}]) for i in range(4)
    ]
    inputs.insert(2, request("short"))
    sink, summary = reconcile(tmp_path, inputs, [ok_line("long-1")], None)
    assert summary.failed == 4
    assert sorted(sink.request_lines) == sorted(line for line in inputs if b'"long-1"' not in line)


# -- retry chains -------------------------------------------------------------------------------------


def test_a_chain_of_attempts_reports_each_request_once_from_its_last_attempt(tmp_path: Path) -> None:
    """Attempts reconciled last to first: an earlier attempt leaves out, silently, what a later one
    answered (in its input, results and repeats), and every record says which attempt it came from."""
    first_inputs = [request(c) for c in ("a", "b", "c", "d", "b")]  # "b" repeated: OpenAI would refuse
    first_output = [ok_line("a"), http_error_line("b", 500, "server_error")]
    first_errors = [error_line("c", "batch_expired")]  # "d": no result at all
    retry_inputs = [request(c) for c in ("b", "c", "d")]
    retry_output = [ok_line("b"), ok_line("c")]
    retry_errors = [http_error_line("d", 429, "rate_limit_exceeded")]
    sink = MemorySink()
    rec = Reconciler(sink, tmp_path)
    retry = rec.add_batch(
        BatchResultFiles("batch_2", "completed", retry_inputs, retry_output, retry_errors), attempt=2
    )
    answered = set(sink.ids())
    first = rec.add_batch(
        BatchResultFiles("batch_1", "expired", first_inputs, first_output, first_errors),
        skip_ids=frozenset(answered),
        attempt=1,
    )
    summary = rec.summary()
    assert_invariant(sink, summary, ["a", "b", "c", "d"])
    assert {r["custom_id"]: r["attempts"] for r in sink.successes} == {"a": 1, "b": 2, "c": 2}
    assert [(r["custom_id"], r["attempts"], r["error_code"]) for r in sink.failures] == [
        ("d", 2, "rate_limit_exceeded")
    ]
    assert (retry.total, retry.succeeded, retry.retried, retry.skipped) == (3, 2, 2, 0)
    assert (first.total, first.succeeded, first.failed, first.skipped) == (1, 1, 0, 4)
    assert (summary.retried, summary.failed_by_code) == (2, {"rate_limit_exceeded": 1})
    assert summary.anomalies["counts"] == {}
    assert summary.to_dict()["retried"] == 2
    assert summary.to_dict()["batches"]["batch_2"]["attempt"] == 2


# -- blocks of plain answers (a sink taking raw JSON joins them a column at a time) ----------------------


def _odd_bodies() -> list[dict]:
    """Bodies that each make the column-at-a-time join take a branch of its own."""
    parts = chat_body()
    parts["choices"][0]["message"]["content"] = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    parts["choices"][0]["finish_reason"] = 7  # not a string: None in the record
    return [
        chat_body(prompt=10, completion=2, cached=1),
        {**chat_body(), "usage": None},
        {**chat_body(), "model": "gpt-4o-2024-08-06"},
        {**chat_body(), "usage": {"input_tokens": 5, "output_tokens": 7}},  # no total: input + output
        {**chat_body(), "usage": {"prompt_tokens": 3, "completion_tokens": "many"}},  # not a count: 0
        parts,
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("odd", [False, True], ids=["uniform", "odd"])
def test_a_block_of_answers_gives_the_records_and_usage_each_body_states(
    tmp_path: Path, fmt: str, odd: bool
) -> None:
    from airflow_openai_batch.core.writers import ResultWriter, read_records

    bodies = (
        _odd_bodies() * 50
        if odd
        else [chat_body(prompt=i % 7, completion=3, cached=i % 2) for i in range(300)]
    )
    ids = [f"r{i}" for i in range(len(bodies))]
    output = [ok_line(cid, body) for cid, body in zip(ids, bodies, strict=True)]
    repeat = [ok_line(ids[3], bodies[3])]  # a second result for an id: the first one is kept
    with ResultWriter(tmp_path / "out", fmt) as writer:
        rec = Reconciler(writer, tmp_path / "work")
        rec.add_batch(
            BatchResultFiles("b1", "completed", [request(c) for c in ids], output, repeat, model="m")
        )
    summary = rec.summary()
    assert (summary.succeeded, summary.failed) == (len(ids), 0)
    assert summary.anomalies["counts"] == {"duplicate_result": 1}
    expected: dict[str, list[int]] = {}
    for body in bodies:
        counts = usage_counts(orjson.dumps(body["usage"]))
        if counts is not None:
            sums = expected.setdefault(body["model"], [0] * 5)
            sums[:] = [a + b for a, b in zip(sums, counts, strict=True)]
    keys = ["input_tokens", "output_tokens", "total_tokens", "cached_input_tokens", "reasoning_tokens"]
    assert summary.usage_by_model == {m: dict(zip(keys, s, strict=True)) for m, s in expected.items()}
    records = {r["custom_id"]: r for r in read_records(tmp_path / "out" / f"successes.{fmt}")}
    for cid, body in zip(ids, bodies, strict=True):
        record = records[cid]
        assert record["body"] == body
        content = body["choices"][0]["message"]["content"]
        assert record["content"] == ("ab" if isinstance(content, list) else content)
        finish = body["choices"][0]["finish_reason"]
        assert record["finish_reason"] == (finish if isinstance(finish, str) else None)
        if fmt == "jsonl":
            assert record["usage"] == body["usage"]  # as the API gave it
        elif body["usage"] is None:
            assert record["usage"] is None
        else:
            stated = body["usage"]
            assert record["usage"]["input_tokens"] == stated.get("input_tokens", stated.get("prompt_tokens"))
            assert record["usage"]["total_tokens"] == stated.get("total_tokens")


# -- blocks of structured answers (classified one by one, joined a column at a time) --------------------

_TICKET = {
    "type": "object",
    "properties": {"category": {"type": "string", "enum": ["a", "b"]}, "score": {"type": "number"}},
    "required": ["category", "score"],
    "additionalProperties": False,
}
_CHAT_FORMAT = {"type": "json_schema", "json_schema": {"name": "ticket", "strict": True, "schema": _TICKET}}
_RESPONSES_FORMAT = {"type": "json_schema", "name": "ticket", "strict": True, "schema": _TICKET}


def _structured_chat_bodies() -> list[dict]:
    """One chat answer of each outcome: valid, not JSON, a schema miss, refused, truncated, filtered, a
    tool call, text spanning lines."""

    def answer(content: Any, finish: str = "stop", **message: Any) -> dict:
        body = chat_body(content)
        body["choices"][0]["message"].update(message)
        body["choices"][0]["finish_reason"] = finish
        return body

    call = {"type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}
    return [
        answer('{"category": "a", "score": 0.5}'),
        answer("not json"),
        answer('{"category": "c", "score": 1}'),
        answer(None, refusal="I can't help with that"),
        answer('{"category": "a", "sc', "length"),
        answer("", "content_filter"),
        answer(None, "tool_calls", tool_calls=[call]),
        answer('{\n  "category": "b",\n  "score": 2\n}'),
    ]


def _structured_responses_bodies() -> list[dict]:
    def answer(*content: dict, status: str = "completed", reason: str | None = None) -> dict:
        return {
            "object": "response",
            "model": "gpt-5-mini",
            "status": status,
            "incomplete_details": {"reason": reason} if reason else None,
            "output": [{"type": "message", "content": list(content)}],
            "usage": {"input_tokens": 4, "output_tokens": 3, "total_tokens": 7},
        }

    def text(value: str) -> dict:
        return {"type": "output_text", "text": value}

    call = {
        "object": "response",
        "model": "gpt-5-mini",
        "status": "completed",
        "output": [{"type": "function_call", "name": "lookup", "arguments": '{"q": 2}'}],
        "usage": {"input_tokens": 4, "output_tokens": 3, "total_tokens": 7},
    }
    return [
        answer(text('{"category": "b", "score": 1.5}')),
        answer(text("{oops")),
        answer(text('{"category": "a"}')),
        answer({"type": "refusal", "refusal": "no"}),
        answer(text('{"cat'), status="incomplete", reason="max_output_tokens"),
        answer(text(""), status="incomplete", reason="content_filter"),
        call,
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("url", [CHAT, "/v1/responses"])
def test_a_block_of_structured_answers_gives_the_records_of_the_line_by_line_join(
    tmp_path: Path, fmt: str, url: str
) -> None:
    from airflow_openai_batch.core.writers import ResultWriter, read_records

    if url == CHAT:
        bodies, asked = _structured_chat_bodies() * 40, {"response_format": _CHAT_FORMAT}
    else:
        bodies, asked = _structured_responses_bodies() * 40, {"text": {"format": _RESPONSES_FORMAT}}
    ids = [f"r{i}" for i in range(len(bodies))]
    inputs = [request(cid, url=url, **asked) for cid in ids]
    output = [ok_line(cid, body) for cid, body in zip(ids, bodies, strict=True)]
    # The line-by-line join (a sink taking parsed records), as the reference.
    expected, expected_summary = reconcile(tmp_path / "lines", inputs, output, None)
    with ResultWriter(tmp_path / "out", fmt) as writer:
        rec = Reconciler(writer, tmp_path / "work")
        rec.add_batch(BatchResultFiles("batch_1", "completed", inputs, output, None, model="gpt-4o-mini"))
    summary = rec.summary()
    assert summary.to_dict() == expected_summary.to_dict()
    assert 0 < summary.succeeded < summary.total  # both outcomes are in the blocks
    successes = list(read_records(tmp_path / "out" / f"successes.{fmt}"))
    failures = list(read_records(tmp_path / "out" / f"failures.{fmt}"))
    assert [r["custom_id"] for r in successes] == [r["custom_id"] for r in expected.successes]
    assert [r["custom_id"] for r in failures] == [r["custom_id"] for r in expected.failures]
    for got, want in zip(failures, expected.failures, strict=True):
        assert (got["error_code"], got["error_message"], got["output"]) == (
            want["error_code"],
            want["error_message"],
            want["output"],
        )
    for got, want in zip(successes, expected.successes, strict=True):
        if fmt == "jsonl":
            assert got == want
            continue
        assert (got["body"], got["content"], got["finish_reason"]) == (
            want["body"],
            want["content"],
            want["finish_reason"],
        )
        assert got["parsed"] == want["parsed"]  # the typed struct column, read back
        calls = want["tool_calls"]
        assert got["tool_calls"] == (
            None
            if calls is None
            else [
                {"name": c["name"], "arguments": json.dumps(c["arguments"], separators=(",", ":"))}
                for c in calls
            ]
        )


def _plain_responses_bodies() -> list[dict]:
    """Plain Responses API answers: the usual one first, then the shapes a block of them may also hold."""

    def answer(*items: dict, status: str = "completed", reason: str | None = None) -> dict:
        return {
            "object": "response",
            "model": "gpt-5-mini",
            "status": status,
            "incomplete_details": {"reason": reason} if reason else None,
            "output": list(items),
            "usage": {"input_tokens": 4, "output_tokens": 3, "total_tokens": 7},
        }

    def message(*parts: dict) -> dict:
        return {"type": "message", "role": "assistant", "content": list(parts)}

    def text(value: Any) -> dict:
        return {"type": "output_text", "text": value, "annotations": [], "logprobs": []}

    reasoning = {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "hmm"}]}
    return [
        answer(message(text("the usual"))),
        answer(reasoning, message(text("after thought"))),
        answer(message(text("two "), text("parts"))),
        answer(message(text("cut"))),
        answer(message(text("cut")), status="incomplete", reason="max_output_tokens"),
        answer(message({"type": "refusal", "refusal": "no"})),
        answer(message(text(None))),
        answer(message(text("queued")), status="in_progress"),
        answer(),
        answer(message()),
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("shape", ["mixed", *range(len(_plain_responses_bodies()))])
def test_a_block_of_plain_responses_answers_gives_the_records_of_the_line_by_line_join(
    tmp_path: Path, fmt: str, shape: str | int
) -> None:
    """Blocks of one shape each (the usual one is read a column at a time, any other one by one), and
    of every shape mixed."""
    from airflow_openai_batch.core.writers import ResultWriter, read_records

    shapes = _plain_responses_bodies()
    bodies = shapes * 40 if shape == "mixed" else [shapes[int(shape)]] * 60
    ids = [f"r{i}" for i in range(len(bodies))]
    inputs = [request(cid, url="/v1/responses") for cid in ids]
    output = [ok_line(cid, body) for cid, body in zip(ids, bodies, strict=True)]
    expected, expected_summary = reconcile(tmp_path / "lines", inputs, output, None)
    with ResultWriter(tmp_path / "out", fmt) as writer:
        rec = Reconciler(writer, tmp_path / "work")
        rec.add_batch(BatchResultFiles("batch_1", "completed", inputs, output, None, model="gpt-4o-mini"))
    assert rec.summary().to_dict() == expected_summary.to_dict()
    successes = list(read_records(tmp_path / "out" / f"successes.{fmt}"))
    assert len(successes) == len(bodies)
    for got, want in zip(successes, expected.successes, strict=True):
        assert (got["custom_id"], got["content"], got["finish_reason"]) == (
            want["custom_id"],
            want["content"],
            want["finish_reason"],
        )
    if shape == "mixed":
        assert {r["content"] for r in successes} == {
            "the usual",
            "after thought",
            "two parts",
            "cut",
            None,
            "queued",
        }
        assert {r["finish_reason"] for r in successes} == {"stop", "length", "in_progress"}


class RawMemorySink(MemorySink):
    """A MemorySink given raw JSON (as the result writer is); failures come as columns, each recorded as
    the default ``write_failures`` passes them on, one by one."""

    takes_raw_json = True

    def __init__(self) -> None:
        super().__init__()
        self.failed_as_columns = 0

    def write_failures(self, failures: FailureColumns) -> None:
        self.failed_as_columns += len(failures)
        super().write_failures(failures)


def test_requests_an_expired_batch_left_unanswered_each_get_their_failure_record(tmp_path) -> None:
    """Failed many at a time (their lines read back in spans of the input copy, their records made as
    columns), each request gets its own record, odd lines too (not UTF-8; a number only some readers
    load; a line longer than a span's read)."""
    inputs = [request(f"r{i:05d}", temperature=0.5, note="x" * (i % 300)) for i in range(9000)]
    inputs[4001] = request("r04001", note="y" * 50_000)  # longer than a span's read past its last offset
    inputs[7001] = request("r07001").replace(b'"gpt-4o-mini"', b'"gpt-4o-mini","t":"\xff"')
    inputs[8002] = request("r08002", max_tokens=0).replace(b'"max_tokens":0', b'"max_tokens":1e999')
    output = [ok_line(f"r{i:05d}") for i in range(0, 9000, 7)]
    sink = RawMemorySink()
    rec = Reconciler(sink, tmp_path / "work")
    rec.add_batch(BatchResultFiles("b1", "expired", inputs, output, None))
    summary = rec.summary()

    answered = {f"r{i:05d}" for i in range(0, 9000, 7)}
    left = [(line, f"r{i:05d}") for i, line in enumerate(inputs) if f"r{i:05d}" not in answered]
    message = sink.failures[0]["error_message"]
    assert "expired" in message
    assert sink.failures == [
        {
            "custom_id": cid,
            "batch_id": "b1",
            "status_code": None,
            "error_code": "batch_expired",
            "error_message": message,
            "request": None if cid == "r07001" else msgspec.Raw(line),  # not UTF-8: not JSON to load back
            "output": None,
            "attempts": 1,
        }
        for line, cid in left
    ]
    assert sink.request_lines == [line for line, _ in left]
    assert summary.failed_by_code == {"batch_expired": len(left)}
    assert sink.failed_as_columns == len(left)
    by_id = {r["custom_id"]: r for r in sink.failures}
    assert bytes(by_id["r08002"]["request"]) == inputs[8002]  # valid JSON, kept as it is
    assert bytes(by_id["r04001"]["request"]) == inputs[4001]


@given(
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=60),
    picks=st.data(),
    span_bytes=st.sampled_from([64, 1000, 1 << 20]),
    gap_bytes=st.sampled_from([0, 300, 4096]),
)
@settings(max_examples=60, deadline=None)
def test_lines_read_back_by_spans_are_the_lines_at_their_offsets(sizes, picks, span_bytes, gap_bytes) -> None:
    lines = [(b"%d:" % i).ljust(size, b"x") for i, size in enumerate(sizes)]
    offsets = list(itertools.accumulate((len(line) + 1 for line in lines[:-1]), initial=0))
    chosen = sorted(picks.draw(st.sets(st.integers(0, len(lines) - 1), min_size=1)))
    with tempfile.TemporaryFile() as copy:
        copy.write(b"".join(line + b"\n" for line in lines))
        copy.flush()
        fetch = _RequestFetcher(copy.fileno(), line_bytes=100)
        spans = list(fetch.spans([offsets[i] for i in chosen], span_bytes, gap_bytes))
    assert [line for span in spans for line in span] == [lines[i] for i in chosen]
    assert all(spans)
