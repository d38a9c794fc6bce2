"""prepare: validate every line, then split into the fewest chunk files that respect every limit."""

from __future__ import annotations

import hashlib
import io
import random
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_openai_batch.core import prepare as prepare_module
from airflow_openai_batch.core.jsonl import iter_lines
from airflow_openai_batch.core.prepare import (
    Chunk,
    PreparedInput,
    normalize_endpoint,
    prepare_from_lines,
    prepare_from_records,
)
from airflow_openai_batch.core.tokens import count_embedding_inputs, estimate_request_tokens
from airflow_openai_batch.exceptions import InputProblem, OpenAIBatchInputError

CHAT = "/v1/chat/completions"
EMB = "/v1/embeddings"


def req(cid: str, model: str | None = "gpt-4o-mini", url: str = CHAT, **body: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"messages": [{"role": "user", "content": f"hello {cid}"}], **body}
    if model is not None:
        b = {"model": model, **b}
    return {"custom_id": cid, "method": "POST", "url": url, "body": b}


def line(cid: str, model: str | None = "gpt-4o-mini", url: str = CHAT, **body: Any) -> bytes:
    return orjson.dumps(req(cid, model, url, **body))


def emb_line(cid: str, inputs: Any, model: str = "text-embedding-3-small") -> bytes:
    return orjson.dumps(
        {"custom_id": cid, "method": "POST", "url": EMB, "body": {"model": model, "input": inputs}}
    )


def chunk_lines(chunk: Chunk) -> list[bytes]:
    data = chunk.path.read_bytes()
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


def fail(lines: Iterable[bytes], work_dir: Path, **kwargs: Any) -> OpenAIBatchInputError:
    kwargs.setdefault("endpoint", CHAT)
    with pytest.raises(OpenAIBatchInputError) as info:
        prepare_from_lines(lines, work_dir=work_dir, **kwargs)
    assert list(work_dir.iterdir()) == [], "a failed preparation must leave nothing behind"
    return info.value


def only_problem(err: OpenAIBatchInputError) -> InputProblem:
    assert err.total == 1, str(err)
    return err.problems[0]


# -- one test per bad-input class ----------------------------------------------------------------------


def test_invalid_json(tmp_path: Path) -> None:
    err = fail([line("a"), b'{"custom_id": "b", '], tmp_path)
    p = only_problem(err)
    assert (p.line, p.field) == (2, None)
    assert "line 2" in str(err) and "invalid JSON" in str(err)


@pytest.mark.parametrize(
    ("raw", "kind"), [(b"[1, 2]", "an array"), (b'"text"', "a string"), (b"3", "a number")]
)
def test_not_an_object(tmp_path: Path, raw: bytes, kind: str) -> None:
    err = fail([line("a"), raw], tmp_path)
    p = only_problem(err)
    assert p.line == 2 and "not a JSON object" in p.reason and kind in p.reason


@pytest.mark.parametrize(
    ("cid", "reason"),
    [(None, "missing"), ("", "empty"), (17, "non-empty string"), (["x"], "non-empty string")],
)
def test_bad_custom_id(tmp_path: Path, cid: Any, reason: str) -> None:
    bad = req("x")
    if cid is None:
        del bad["custom_id"]
    else:
        bad["custom_id"] = cid
    err = fail([line("a"), orjson.dumps(bad)], tmp_path)
    p = only_problem(err)
    assert (p.line, p.field) == (2, "custom_id") and reason in p.reason
    assert "line 2, custom_id" in str(err)


def test_duplicate_custom_id_names_both_lines(tmp_path: Path) -> None:
    lines = [line("a"), line("b"), line("c"), line("b"), line("a")]
    err = fail(lines, tmp_path)
    assert err.total == 2
    assert [(p.line, p.field) for p in err.problems] == [(4, "custom_id"), (5, "custom_id")]
    assert 'line 4, custom_id: duplicate custom_id "b", first used on line 2' in str(err)
    assert "first used on line 1" in err.problems[1].reason


def test_duplicate_far_apart_and_merged_with_other_problems(tmp_path: Path) -> None:
    lines = [line(f"r{i}") for i in range(1000)] + [b"nope", line("r3")]
    err = fail(lines, tmp_path, max_requests_per_batch=100)
    assert [(p.line, p.field) for p in err.problems] == [(1001, None), (1002, "custom_id")]
    assert "first used on line 4" in err.problems[1].reason


@pytest.mark.parametrize("method", ["GET", None, "post"])
def test_method_not_post(tmp_path: Path, method: str | None) -> None:
    bad = req("b")
    if method is None:
        del bad["method"]
    else:
        bad["method"] = method
    p = only_problem(fail([line("a"), orjson.dumps(bad)], tmp_path))
    assert (p.line, p.field) == (2, "method") and "POST" in p.reason


@pytest.mark.parametrize("url", ["/v1/embeddings", "/chat/completions", None])
def test_url_not_endpoint(tmp_path: Path, url: str | None) -> None:
    bad = req("b")
    if url is None:
        del bad["url"]
    else:
        bad["url"] = url
    p = only_problem(fail([line("a"), orjson.dumps(bad)], tmp_path))
    assert (p.line, p.field) == (2, "url") and CHAT in p.reason


@pytest.mark.parametrize("model", [None, "fallback"])
@pytest.mark.parametrize("body", [None, [1], ["model"], "text", "model", 3, True])
def test_body_missing_or_not_object(tmp_path: Path, body: Any, model: str | None) -> None:
    bad = req("b")
    if body is None:
        del bad["body"]
    else:
        bad["body"] = body
    p = only_problem(fail([line("a"), orjson.dumps(bad)], tmp_path, model=model))
    assert (p.line, p.field) == (2, "body")


@pytest.mark.parametrize("model", [None, ""])
def test_no_model_and_no_model_argument(tmp_path: Path, model: str | None) -> None:
    p = only_problem(fail([line("a"), line("b", model=model)], tmp_path))
    assert (p.line, p.field) == (2, "body.model") and "no model argument" in p.reason


def test_model_not_a_string(tmp_path: Path) -> None:
    bad = req("b")
    bad["body"]["model"] = 4
    p = only_problem(fail([orjson.dumps(bad)], tmp_path, model="fallback"))
    assert (p.line, p.field) == (1, "body.model")


def test_stream_true(tmp_path: Path) -> None:
    p = only_problem(fail([line("a"), line("b", stream=True)], tmp_path))
    assert (p.line, p.field) == (2, "body.stream")


def test_stream_false_is_fine(tmp_path: Path) -> None:
    prepared = prepare_from_lines([line("a", stream=False)], endpoint=CHAT, work_dir=tmp_path)
    assert prepared.total_requests == 1


def test_line_larger_than_batch_bytes(tmp_path: Path) -> None:
    small, big = line("a"), line("b", pad="x" * 500)
    p = only_problem(fail([small, big], tmp_path, max_bytes_per_batch=300))
    assert p.line == 2 and f"{len(big) + 1} bytes" in p.reason and "max_bytes_per_batch" in p.reason


def test_embeddings_request_with_too_many_inputs(tmp_path: Path) -> None:
    lines = [emb_line("a", ["x"] * 3), emb_line("b", ["x"] * 11)]
    p = only_problem(fail(lines, tmp_path, endpoint=EMB, max_embedding_inputs=10))
    assert (p.line, p.field) == (2, "body.input") and "11 embedding inputs" in p.reason


def test_request_above_max_enqueued_tokens(tmp_path: Path) -> None:
    lines = [line("a"), line("b", messages=[{"role": "user", "content": "x" * 4000}])]
    p = only_problem(fail(lines, tmp_path, max_enqueued_tokens=500))
    assert (p.line, p.field) == (2, "body") and "max_enqueued_tokens" in p.reason


@pytest.mark.parametrize("lines", [[], [b""], [b"", b"   ", b"\t"]])
def test_empty_input(tmp_path: Path, lines: list[bytes]) -> None:
    err = fail(lines, tmp_path)
    p = only_problem(err)
    assert p.line is None and p.reason == "the input is empty"
    assert "the input is empty" in str(err)


def test_unknown_endpoint(tmp_path: Path) -> None:
    err = fail([line("a")], tmp_path, endpoint="/v1/fine_tuning/jobs")
    assert only_problem(err).field == "endpoint"
    with pytest.raises(OpenAIBatchInputError):
        prepare_from_records([req("a")], endpoint="/nope", work_dir=tmp_path)


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    err = fail([b"", line("a"), b"  ", b"{broken"], tmp_path)
    assert only_problem(err).line == 4
    prepared = prepare_from_lines([b"", line("a"), b"", line("b"), b""], endpoint=CHAT, work_dir=tmp_path)
    assert prepared.total_requests == 2


def test_several_problems_on_one_line_are_all_reported(tmp_path: Path) -> None:
    bad = {"custom_id": "", "method": "GET", "url": "/x", "body": {"stream": True}}
    err = fail([orjson.dumps(bad)], tmp_path)
    assert [p.field for p in err.problems] == ["custom_id", "method", "url", "body.model", "body.stream"]
    assert all(p.line == 1 for p in err.problems)


def test_problem_cap_with_total(tmp_path: Path) -> None:
    lines = [line(f"ok{i}") for i in range(100)] + [b"{bad" for _ in range(500)]
    err = fail(lines, tmp_path)
    assert err.total == 500
    assert len(err.problems) == 50
    assert [p.line for p in err.problems] == list(range(101, 151))
    message = str(err)
    assert "(500 problems)" in message and "... and 450 more" in message
    assert message.count("\n  - ") == 50


def test_cap_keeps_the_earliest_problems_across_duplicates(tmp_path: Path) -> None:
    lines: list[bytes] = []
    for i in range(60):
        lines += [line(f"r{i}"), line(f"r{i}") if i % 2 else b"{bad"]
    err = fail(lines, tmp_path)
    assert err.total == 60 and len(err.problems) == 50
    assert [p.line for p in err.problems] == list(range(2, 101, 2))
    assert [p.field for p in err.problems[:2]] == [None, "custom_id"]
    assert "... and 10 more" in str(err)


def test_source_error_propagates_and_cleans_up(tmp_path: Path) -> None:
    def source() -> Iterable[bytes]:
        for i in range(3000):
            yield line(f"r{i}", pad="p" * 1000)
        raise ConnectionError("S3 went away")

    with pytest.raises(ConnectionError):
        prepare_from_lines(source(), endpoint=CHAT, work_dir=tmp_path, max_requests_per_batch=500)
    assert list(tmp_path.iterdir()) == []


def test_max_problems_argument(tmp_path: Path) -> None:
    err = fail([b"x"] * 10, tmp_path, max_problems=3)
    assert (len(err.problems), err.total) == (3, 10)


def test_nothing_left_after_late_failure(tmp_path: Path) -> None:
    # Enough lines to write several chunk files (and flush blocks) before the bad last line.
    lines = [line(f"r{i}", pad="p" * 500) for i in range(5000)] + [b"{"]
    fail(lines, tmp_path, max_requests_per_batch=700)


def test_write_error_propagates_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = open
    calls = {"n": 0}

    def flaky_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "open", flaky_open, raising=False)
    lines = [line(f"r{i}", pad="p" * 1000) for i in range(3000)]
    with pytest.raises(OSError, match="No space left"):
        prepare_from_lines(lines, endpoint=CHAT, work_dir=tmp_path, max_requests_per_batch=500)
    assert list(tmp_path.iterdir()) == []


def test_invalid_limits_are_programming_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_requests_per_batch"):
        prepare_from_lines([line("a")], endpoint=CHAT, work_dir=tmp_path, max_requests_per_batch=0)


# -- records ------------------------------------------------------------------------------------------


def test_records_with_custom_id_and_body_only(tmp_path: Path) -> None:
    records = [
        {"custom_id": "a", "body": {"model": "m", "messages": []}},
        req("b", model="m"),  # a full line is fine too
    ]
    prepared = prepare_from_records(records, endpoint="chat/completions", work_dir=tmp_path)
    (chunk,) = prepared.chunks
    objs = [orjson.loads(x) for x in chunk_lines(chunk)]
    assert [o["custom_id"] for o in objs] == ["a", "b"]
    assert all(o["method"] == "POST" and o["url"] == CHAT for o in objs)
    assert list(objs[0]) == ["custom_id", "method", "url", "body"]


def test_records_numbering_is_item_index(tmp_path: Path) -> None:
    records: list[Any] = [
        {"custom_id": "a", "body": {"model": "m"}},
        "not a dict",
        {"custom_id": "a", "body": {}},
    ]
    with pytest.raises(OpenAIBatchInputError) as info:
        prepare_from_records(records, endpoint=CHAT, work_dir=tmp_path)
    assert [(p.line, p.field) for p in info.value.problems] == [
        (2, None),
        (3, "custom_id"),
        (3, "body.model"),
    ]
    assert "first used on line 1" in str(info.value)


def test_records_not_serializable(tmp_path: Path) -> None:
    records = [{"custom_id": "a", "body": {"model": "m", "x": {1, 2}}}]
    with pytest.raises(OpenAIBatchInputError) as info:
        prepare_from_records(records, endpoint=CHAT, work_dir=tmp_path)
    assert only_problem(info.value).line == 1 and "serializ" in str(info.value)


def test_records_keep_method_url_when_given(tmp_path: Path) -> None:
    records = [{"custom_id": "a", "method": "GET", "url": CHAT, "body": {"model": "m"}}]
    with pytest.raises(OpenAIBatchInputError) as info:
        prepare_from_records(records, endpoint=CHAT, work_dir=tmp_path)
    assert only_problem(info.value).field == "method"


def test_records_are_not_mutated(tmp_path: Path) -> None:
    records = [{"custom_id": "a", "body": {"messages": []}}]
    prepare_from_records(records, endpoint=CHAT, work_dir=tmp_path, model="m")
    assert records == [{"custom_id": "a", "body": {"messages": []}}]


# -- model filling and byte fidelity ----------------------------------------------------------------


def test_model_filled_only_where_missing(tmp_path: Path) -> None:
    lines = [line("a", model=None), line("b", model="other"), line("c", model="")]
    prepared = prepare_from_lines(lines, endpoint=CHAT, work_dir=tmp_path, model="fill")
    assert [(c.model, c.request_count) for c in prepared.chunks] == [("fill", 2), ("other", 1)]
    filled = [orjson.loads(x) for x in chunk_lines(prepared.chunks[0])]
    assert [o["body"]["model"] for o in filled] == ["fill", "fill"]
    assert chunk_lines(prepared.chunks[1]) == [lines[1]]


def test_unchanged_lines_are_written_byte_for_byte(tmp_path: Path) -> None:
    raw = (
        b'{ "custom_id" : "a",  "method":"POST", "url":"/v1/chat/completions",'
        b' "body": {"model": "m", "messages": [], "x": 1.50} }'
    )
    prepared = prepare_from_lines([raw], endpoint=CHAT, work_dir=tmp_path)
    assert prepared.chunks[0].path.read_bytes() == raw + b"\n"


def test_bom_crlf_and_final_line_without_newline(tmp_path: Path) -> None:
    lines = [line("a"), line("b"), line("c")]
    data = b"\xef\xbb\xbf" + lines[0] + b"\r\n" + lines[1] + b"\r\n\r\n" + lines[2]
    source = tmp_path / "in.jsonl"
    source.write_bytes(data)
    with source.open("rb") as stream:
        prepared = prepare_from_lines(iter_lines(stream), endpoint=CHAT, work_dir=tmp_path / "out")
    (chunk,) = prepared.chunks
    assert chunk.path.read_bytes() == b"\n".join(lines) + b"\n"
    assert chunk.request_count == 3


def test_file_object_is_read_as_lines(tmp_path: Path) -> None:
    stream = io.BytesIO(line("a") + b"\n" + line("b") + b"\n")
    prepared = prepare_from_lines(stream, endpoint=CHAT, work_dir=tmp_path)  # type: ignore[arg-type]
    assert chunk_lines(prepared.chunks[0]) == [line("a"), line("b")]


def test_chunk_metadata_hash_size_and_cleanup(tmp_path: Path) -> None:
    lines = [line(f"r{i}") for i in range(25)]
    prepared = prepare_from_lines(lines, endpoint=CHAT, work_dir=tmp_path, max_requests_per_batch=10)
    assert isinstance(prepared, PreparedInput)
    assert [c.index for c in prepared.chunks] == [0, 1, 2]
    assert [c.first_custom_id for c in prepared.chunks] == ["r0", "r10", "r20"]
    for chunk in prepared.chunks:
        data = chunk.path.read_bytes()
        assert chunk.sha256 == hashlib.sha256(data).hexdigest()
        assert chunk.byte_count == len(data) == chunk.path.stat().st_size
        assert chunk.path.parent == tmp_path
    assert prepared.total_requests == 25
    assert prepared.total_bytes == sum(len(x) + 1 for x in lines)
    assert prepared.endpoint == CHAT and prepared.work_dir == tmp_path
    prepared.cleanup()
    assert list(tmp_path.iterdir()) == []


def test_same_content_same_hash(tmp_path: Path) -> None:
    lines = [line(f"r{i}") for i in range(5)]
    a = prepare_from_lines(lines, endpoint=CHAT, work_dir=tmp_path / "a")
    b = prepare_from_records([orjson.loads(x) for x in lines], endpoint=CHAT, work_dir=tmp_path / "b")
    assert a.chunks[0].sha256 == b.chunks[0].sha256


# -- splitting ----------------------------------------------------------------------------------------


def test_split_by_request_count(tmp_path: Path) -> None:
    lines = [
        b'{"custom_id":"%d","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}' % i
        for i in range(120_001)
    ]
    prepared = prepare_from_lines(lines, endpoint=CHAT, work_dir=tmp_path, max_requests_per_batch=50_000)
    assert [c.request_count for c in prepared.chunks] == [50_000, 50_000, 20_001]
    assert [chunk_lines(c) for c in prepared.chunks] == [
        lines[:50_000],
        lines[50_000:100_000],
        lines[100_000:],
    ]


def test_two_models_are_grouped(tmp_path: Path) -> None:
    lines = [line(f"r{i}", model="gpt-a" if i % 3 else "gpt-b") for i in range(30)]
    prepared = prepare_from_lines(lines, endpoint=CHAT, work_dir=tmp_path)
    assert [(c.model, c.request_count) for c in prepared.chunks] == [("gpt-b", 10), ("gpt-a", 20)]
    assert chunk_lines(prepared.chunks[0]) == [x for i, x in enumerate(lines) if i % 3 == 0]
    assert chunk_lines(prepared.chunks[1]) == [x for i, x in enumerate(lines) if i % 3]


def test_models_in_first_appearance_order_then_sequence(tmp_path: Path) -> None:
    lines = [line(f"r{i}", model=["a", "b"][i % 2]) for i in range(10)]
    prepared = prepare_from_lines(lines, endpoint=CHAT, work_dir=tmp_path, max_requests_per_batch=2)
    assert [c.model for c in prepared.chunks] == ["a", "a", "a", "b", "b", "b"]
    assert [c.request_count for c in prepared.chunks] == [2, 2, 1, 2, 2, 1]
    assert [c.index for c in prepared.chunks] == list(range(6))
    assert [c.path.name for c in prepared.chunks] == [f"chunk-{i:05d}.jsonl" for i in range(6)]


def test_split_by_bytes_with_fewest_chunks(tmp_path: Path) -> None:
    lines = [line(f"r{i:03d}") for i in range(100)]
    size = len(lines[0]) + 1
    assert all(len(x) + 1 == size for x in lines)
    limit = size * 7 + size // 2  # room for exactly 7 lines
    prepared = prepare_from_lines(lines, endpoint=CHAT, work_dir=tmp_path, max_bytes_per_batch=limit)
    assert all(c.byte_count <= limit for c in prepared.chunks)
    assert [c.request_count for c in prepared.chunks] == [7] * 14 + [2]
    assert b"".join(c.path.read_bytes() for c in prepared.chunks) == b"".join(x + b"\n" for x in lines)


def test_split_embeddings_by_input_count(tmp_path: Path) -> None:
    sizes = [3, 4, 2, 5, 1, 1, 4]
    lines = [emb_line(f"e{i}", ["t"] * n) for i, n in enumerate(sizes)]
    lines.append(emb_line("tok", [1, 2, 3, 4]))  # one tokenized input
    lines.append(emb_line("s", "single"))
    prepared = prepare_from_lines(lines, endpoint=EMB, work_dir=tmp_path, max_embedding_inputs=9)
    # 3+4+2 | 5+1+1 (then 4 would make 11) | 4 + 1 (token list) + 1 (string)
    assert [c.embedding_inputs for c in prepared.chunks] == [9, 7, 6]
    assert [c.request_count for c in prepared.chunks] == [3, 3, 3]
    assert all(c.embedding_inputs <= 9 for c in prepared.chunks)


def test_embedding_limit_ignored_for_other_endpoints(tmp_path: Path) -> None:
    lines = [line(f"r{i}") for i in range(5)]
    prepared = prepare_from_lines(lines, endpoint=CHAT, work_dir=tmp_path, max_embedding_inputs=1)
    assert len(prepared.chunks) == 1 and prepared.chunks[0].embedding_inputs == 0


def test_split_by_estimated_tokens(tmp_path: Path) -> None:
    # Each request: 3 (request) + 4 (message) + 100 (400 chars) = 107 estimated tokens.
    lines = [line(f"r{i}", messages=[{"role": "user", "content": "x" * 400}]) for i in range(10)]
    prepared = prepare_from_lines(
        lines, endpoint=CHAT, work_dir=tmp_path, max_enqueued_tokens=350, token_count="heuristic"
    )
    assert [c.request_count for c in prepared.chunks] == [3, 3, 3, 1]
    assert [c.estimated_tokens for c in prepared.chunks] == [321, 321, 321, 107]
    # Without a limit the estimate is still made (sampled: the lines are alike, so it is the same).
    unlimited = prepare_from_lines(lines, endpoint=CHAT, work_dir=tmp_path / "u")
    assert unlimited.chunks[0].estimated_tokens == 1070


def test_split_by_exactly_counted_tokens(tmp_path: Path) -> None:
    # "x" * 400 is 50 tokens in o200k_base: the exact count (on by default with the limit) cuts by it.
    lines = [line(f"r{i}", messages=[{"role": "user", "content": "x" * 400}]) for i in range(10)]
    prepared = prepare_from_lines(lines, endpoint=CHAT, work_dir=tmp_path, max_enqueued_tokens=350)
    assert prepared.cost is not None and "o200k_base" in prepared.cost.counter
    assert [c.request_count for c in prepared.chunks] == [6, 4]
    assert [c.estimated_tokens for c in prepared.chunks] == [6 * 57, 4 * 57]


def test_normalize_endpoint() -> None:
    for spelling in ("/v1/chat/completions", "/chat/completions", "v1/chat/completions", "chat/completions/"):
        assert normalize_endpoint(spelling) == CHAT
    assert normalize_endpoint("/embeddings") == EMB
    for bad in ("/v1/files", "", "/v2/chat/completions"):
        with pytest.raises(OpenAIBatchInputError):
            normalize_endpoint(bad)


# -- property: limits respected, order kept, greedy-minimal chunk count -----------------------------


def greedy_count(
    items: list[tuple[int, int, int]], max_req: int, max_bytes: int, max_emb: int, max_tok: int
) -> int:
    """Reference: chunks of a greedy sequential cut of one model's (bytes, inputs, tokens) items."""
    count, req_n, b, e, t = 0, 0, 0, 0, 0
    for size, inputs, toks in items:
        if (
            count == 0
            or req_n == max_req
            or b + size > max_bytes
            or e + inputs > max_emb
            or t + toks > max_tok
        ):
            count, req_n, b, e, t = count + 1, 0, 0, 0, 0
        req_n, b, e, t = req_n + 1, b + size, e + inputs, t + toks
    return count


request_items = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 60), st.integers(1, 5)),  # model, padding, inputs
    min_size=1,
    max_size=60,
)


@settings(max_examples=120, deadline=None)
@given(
    items=request_items,
    embeddings=st.booleans(),
    max_req=st.integers(1, 12),
    extra_bytes=st.integers(0, 600),
    max_emb=st.integers(5, 20),
    max_tok=st.one_of(st.none(), st.integers(60, 200)),
    as_records=st.booleans(),
)
def test_split_property(
    items: list[tuple[int, int, int]],
    embeddings: bool,
    max_req: int,
    extra_bytes: int,
    max_emb: int,
    max_tok: int | None,
    as_records: bool,
) -> None:
    endpoint = EMB if embeddings else CHAT
    lines: list[bytes] = []
    models: list[str] = []
    for i, (m, pad, inputs) in enumerate(items):
        model = f"model-{m}"
        body: dict[str, Any]
        if embeddings:
            body = {"model": model, "input": ["w" * pad] * inputs}
        else:
            body = {"model": model, "messages": [{"role": "user", "content": "w" * (pad * 3)}]}
        lines.append(orjson.dumps({"custom_id": f"id-{i}", "method": "POST", "url": endpoint, "body": body}))
        models.append(model)
    sizes = [len(x) + 1 for x in lines]
    max_bytes = max(sizes) + extra_bytes
    inputs_of = [count_embedding_inputs(orjson.loads(x)["body"]) if embeddings else 0 for x in lines]
    toks_of = [estimate_request_tokens(endpoint, orjson.loads(x)["body"]) for x in lines]
    if max_tok is not None:
        max_tok = max(max_tok, max(toks_of))
    limits = {
        "max_requests_per_batch": max_req,
        "max_bytes_per_batch": max_bytes,
        "max_embedding_inputs": max_emb,
        "max_enqueued_tokens": max_tok,
        "token_count": "heuristic",  # what toks_of counts
    }

    with tempfile.TemporaryDirectory() as tmp:
        if as_records:
            prepared = prepare_from_records(
                [orjson.loads(x) for x in lines], endpoint=endpoint, work_dir=Path(tmp), **limits
            )
        else:
            prepared = prepare_from_lines(lines, endpoint=endpoint, work_dir=Path(tmp), **limits)

        by_model: dict[str, list[bytes]] = defaultdict(list)
        for chunk in prepared.chunks:
            got = chunk_lines(chunk)
            assert chunk.request_count == len(got) <= max_req
            assert chunk.byte_count == chunk.path.stat().st_size <= max_bytes
            assert chunk.sha256 == hashlib.sha256(chunk.path.read_bytes()).hexdigest()
            assert {orjson.loads(x)["body"]["model"] for x in got} == {chunk.model}
            if embeddings:
                assert chunk.embedding_inputs <= max_emb
            if max_tok is not None:
                assert chunk.estimated_tokens <= max_tok
            by_model[chunk.model].extend(got)

        first_seen = list(dict.fromkeys(models))
        assert list(dict.fromkeys(c.model for c in prepared.chunks)) == first_seen
        assert [c.index for c in prepared.chunks] == list(range(len(prepared.chunks)))
        expected_chunks = 0
        for model in first_seen:
            idx = [i for i, m in enumerate(models) if m == model]
            assert by_model[model] == [lines[i] for i in idx]
            expected_chunks += greedy_count(
                [(sizes[i], inputs_of[i], toks_of[i]) for i in idx],
                max_req,
                max_bytes,
                max_emb if embeddings else 1 << 62,
                max_tok if max_tok is not None else 1 << 62,
            )
        assert len(prepared.chunks) == expected_chunks
        assert prepared.total_requests == len(lines)


# -- moderations: the API's default model ----------------------------------------------------------------

GUIDE_MODERATION = (
    b'{"custom_id": "mod-1", "method": "POST", "url": "/v1/moderations", '
    b'"body": {"input": "Text to moderate"}}'
)


def test_the_guides_moderation_line_is_grouped_under_the_apis_default_model(tmp_path: Path) -> None:
    named = GUIDE_MODERATION.replace(b"mod-1", b"mod-2").replace(b'{"input"', b'{"model": "m", "input"')
    lines = [GUIDE_MODERATION, named, GUIDE_MODERATION.replace(b"mod-1", b"mod-3")]
    prepared = prepare_from_lines(lines, endpoint="/v1/moderations", work_dir=tmp_path)
    assert [(c.model, c.request_count) for c in prepared.chunks] == [("omni-moderation-latest", 2), ("m", 1)]
    assert chunk_lines(prepared.chunks[0]) == [lines[0], lines[2]]  # sent as they are: the API fills it in
    records = [{"custom_id": "r", "body": {"input": "x"}}]
    filled = prepare_from_records(records, endpoint="/v1/moderations", work_dir=tmp_path / "r", model="mine")
    assert [c.model for c in filled.chunks] == ["mine"]  # the model argument wins over the API's default


# -- blocks: a large input read in blocks, cut in many places ----------------------------------------------


def greedy_chunks(lines: list[bytes], models: list[str], max_req: int, max_bytes: int) -> list[list[bytes]]:
    """Reference: per model (by first appearance), a sequential greedy cut by requests and bytes."""
    chunks: list[list[bytes]] = []
    for model in dict.fromkeys(models):
        current: list[bytes] = []
        for x, m in zip(lines, models, strict=True):
            if m != model:
                continue
            if current and (
                len(current) == max_req or sum(len(y) + 1 for y in current) + len(x) + 1 > max_bytes
            ):
                chunks.append(current)
                current = []
            current.append(x)
        chunks.append(current)
    return chunks


def test_a_large_input_is_cut_exactly_as_a_greedy_sequential_cut(tmp_path: Path) -> None:
    """Many 1 MB blocks, three models interleaved in runs, ids out of order, CRLF line ends, cuts inside
    blocks: the chunks are the greedy cut of each model's lines, byte for byte, in order."""
    rng = random.Random(5)
    lines: list[bytes] = []
    models: list[str] = []
    while len(lines) < 24_000:
        model = rng.choice(["m-a", "m-b", "m-c"])
        for _ in range(rng.choice([1, 5, 400, 3000])):
            lines.append(
                line(f"id-{rng.getrandbits(48):012x}-{len(lines)}", model=model, pad="p" * rng.randrange(300))
            )
            models.append(model)
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(x + (b"\r\n" if i % 3 == 0 else b"\n") for i, x in enumerate(lines)))
    limits = {"max_requests_per_batch": 2500, "max_bytes_per_batch": 600_000}
    expected = greedy_chunks(lines, models, 2500, 600_000)
    assert source.stat().st_size > 6 << 20 and len(expected) > 10

    with source.open("rb") as stream:
        from_file = prepare_from_lines(iter_lines(stream), endpoint=CHAT, work_dir=tmp_path / "f", **limits)
    from_list = prepare_from_lines(lines, endpoint=CHAT, work_dir=tmp_path / "l", **limits)
    for prepared in (from_file, from_list):
        assert [chunk_lines(c) for c in prepared.chunks] == expected
        assert [c.first_custom_id for c in prepared.chunks] == [
            orjson.loads(c[0])["custom_id"] for c in expected
        ]
        assert [c.sha256 for c in prepared.chunks] == [c.sha256 for c in from_file.chunks]


@pytest.mark.parametrize(
    "odd",
    [
        line("odd").replace(b'"messages"', b'"big":1e400,"messages"'),  # valid: the body is passed through
        b"  " + line("odd") + b"\t",
        line("odd", model=None),  # filled by the model argument
        b'{"a": 1} {"b": 2}',
        b'{"custom_id": "odd", "custom_id": 1}',
    ],
)
def test_a_line_is_judged_alike_in_a_clean_block_and_in_a_block_with_a_bad_line(
    tmp_path: Path, odd: bytes
) -> None:
    def lines_named(lines: list[bytes], work_dir: Path) -> set[int]:
        try:
            prepare_from_lines(lines, endpoint=CHAT, work_dir=work_dir, model="fill")
        except OpenAIBatchInputError as err:
            return {p.line for p in err.problems if p.line is not None}
        return set()

    alone = lines_named([line("a"), odd], tmp_path / "alone")
    beside = lines_named([line("a"), odd, b"{bad"], tmp_path / "beside")
    assert beside == alone | {3}


# -- response schema: put into each line without a format of its own ---------------------------------------

SCHEMA = {
    "name": "label",
    "schema": {"type": "object", "properties": {"category": {"type": "string", "enum": ["a", "b"]}}},
}
RESP = "/v1/responses"


def resp_line(cid: str, **body: Any) -> bytes:
    b = {"model": "gpt-4o-mini", "input": f"hello {cid}", **body}
    return orjson.dumps({"custom_id": cid, "method": "POST", "url": RESP, "body": b})


def bodies_of(prepared: PreparedInput) -> dict[str, dict[str, Any]]:
    return {
        (obj := orjson.loads(x))["custom_id"]: obj["body"] for c in prepared.chunks for x in chunk_lines(c)
    }


@pytest.mark.parametrize("line_by_line", [False, True])
def test_schema_is_put_into_chat_lines_and_an_own_format_is_kept(tmp_path: Path, line_by_line: bool) -> None:
    own = {"type": "json_object"}
    lines = [line("r0"), line("r1", response_format=own), line("r2", max_tokens=5)]
    if line_by_line:
        lines.insert(1, b"")  # a blank line: the block is checked line by line
    lines.append(
        b'{"body":{"model":"gpt-4o-mini","messages":[]},"custom_id":"r3","method":"POST","url":"%s"}'
        % CHAT.encode()
    )
    prepared = prepare_from_lines(lines, endpoint=CHAT, work_dir=tmp_path, response_schema=SCHEMA)
    bodies = bodies_of(prepared)
    expected = {
        "type": "json_schema",
        "json_schema": {
            "name": "label",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"category": {"type": ["string", "null"], "enum": ["a", "b", None]}},
                "additionalProperties": False,
                "required": ["category"],
            },
        },
    }
    for cid in ("r0", "r2", "r3"):
        assert bodies[cid]["response_format"] == expected, cid
    assert bodies["r2"]["max_tokens"] == 5 and bodies["r3"]["messages"] == []
    assert bodies["r1"]["response_format"] == own
    assert prepared.own_formats == 1
    # Sizes and digests are those of the lines as written.
    chunk = prepared.chunks[0]
    assert chunk.byte_count == chunk.path.stat().st_size
    assert chunk.sha256 == hashlib.sha256(chunk.path.read_bytes()).hexdigest()


def test_schema_goes_into_responses_text_format(tmp_path: Path) -> None:
    own = {"format": {"type": "text"}}
    lines = [resp_line("r0"), resp_line("r1", text={"verbosity": "low"}), resp_line("r2", text=own)]
    prepared = prepare_from_lines(lines, endpoint=RESP, work_dir=tmp_path, response_schema=SCHEMA)
    bodies = bodies_of(prepared)
    fmt = bodies["r0"]["text"]["format"]
    assert (fmt["type"], fmt["name"], fmt["strict"]) == ("json_schema", "label", True)
    assert bodies["r1"]["text"] == {"verbosity": "low", "format": fmt}
    assert bodies["r2"]["text"] == own
    assert prepared.own_formats == 1


def test_schema_from_records_and_a_pydantic_model(tmp_path: Path) -> None:
    from pydantic import BaseModel

    class Ticket(BaseModel):
        category: str
        urgent: bool

    prepared = prepare_from_records(
        [req("a"), req("b")], endpoint=CHAT, work_dir=tmp_path, response_schema=Ticket
    )
    for body in bodies_of(prepared).values():
        spec = body["response_format"]["json_schema"]
        assert spec["name"] == "Ticket" and spec["schema"]["required"] == ["category", "urgent"]


@pytest.mark.parametrize("endpoint", [EMB, "/v1/completions", "/v1/moderations"])
def test_schema_for_an_endpoint_without_structured_answers_is_an_error(tmp_path: Path, endpoint: str) -> None:
    with pytest.raises(OpenAIBatchInputError) as info:
        prepare_from_lines([emb_line("e", "x")], endpoint=endpoint, work_dir=tmp_path, response_schema=SCHEMA)
    assert "response_schema" in str(info.value) and endpoint in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_schema_bytes_count_against_the_line_limit(tmp_path: Path) -> None:
    raw = line("r0")
    limit = len(raw) + 20  # the line fits, the line with the schema does not
    assert prepare_from_lines([raw], endpoint=CHAT, work_dir=tmp_path / "a", max_bytes_per_batch=limit)
    p = only_problem(fail([raw], tmp_path / "b", max_bytes_per_batch=limit, response_schema=SCHEMA))
    assert p.line == 1 and "max_bytes_per_batch" in p.reason


# -- the cost estimate -----------------------------------------------------------------------------------


def test_estimate_is_always_made_with_caps_and_unbounded_lines(tmp_path: Path) -> None:
    lines = [line(f"r{i}", max_completion_tokens=100) for i in range(70)]
    lines[4] = line("r4")  # line 5 sets no cap
    lines[40] = line("r40", max_tokens=7, n=2)
    prepared = prepare_from_lines(lines, endpoint=CHAT, work_dir=tmp_path, max_requests_per_batch=50)
    cost = prepared.cost
    assert cost is not None and [c.requests for c in cost.chunks] == [50, 20]
    assert "1 line in 256" in cost.counter
    assert cost.unbounded_requests == 1 and cost.unbounded_lines() == [5]
    limit = cost.model_limits["gpt-4o-mini"]
    assert limit and cost.chunks[0].output_tokens_max == 48 * 100 + 7 * 2 + limit
    assert cost.chunks[1].output_tokens_max == 20 * 100
    # Every chunk's prompt estimate is in the chunk log's figure, and none is zero.
    assert [c.estimated_tokens for c in prepared.chunks] == [c.input_tokens for c in cost.chunks]
    assert all(c.estimated_tokens > 0 for c in prepared.chunks)


def test_lines_sharing_one_cap_are_tallied_per_chunk(tmp_path: Path) -> None:
    # Every line of a block alike: the caps are summed with one product per chunk, across the cut.
    capped = [line(f"r{i:03d}", max_tokens=30) for i in range(70)]
    prepared = prepare_from_lines(capped, endpoint=CHAT, work_dir=tmp_path / "c", max_requests_per_batch=50)
    assert prepared.cost is not None and prepared.cost.unbounded_requests == 0
    assert [c.output_tokens_max for c in prepared.cost.chunks] == [50 * 30, 20 * 30]
    # No line sets a cap: each counts as unbounded, and each chunk keeps its first line numbers.
    capless = [line(f"r{i:03d}") for i in range(70)]
    prepared = prepare_from_lines(capless, endpoint=CHAT, work_dir=tmp_path / "u", max_requests_per_batch=50)
    cost = prepared.cost
    assert cost is not None and [c.requests for c in cost.chunks] == [50, 20]
    assert cost.unbounded_requests == 70
    assert cost.unbounded_lines() == list(range(1, 11))
    assert [list(c.unbounded_lines) for c in cost.chunks] == [list(range(1, 11)), list(range(51, 61))]


def test_exact_count_counts_every_line(tmp_path: Path) -> None:
    lines = [line(f"r{i}", max_completion_tokens=10) for i in range(40)]
    exact = prepare_from_lines(lines, endpoint=CHAT, work_dir=tmp_path / "e", token_count="exact")
    assert exact.cost is not None and exact.cost.counter == "o200k_base"
    # "hello rN": 3 + 4 per request and message, and the text's own tokens.
    body = orjson.loads(lines[0])["body"]
    from airflow_openai_batch.core.cost import O200K_BASE, PromptTokens, exact_counter

    counter = exact_counter(O200K_BASE)
    assert counter is not None
    expected = PromptTokens(CHAT, counter).count_many([orjson.loads(x)["body"] for x in lines])
    assert exact.cost.input_tokens == sum(expected) and expected[0] == PromptTokens(CHAT, counter).count(body)


def test_every_model_of_a_mixed_block_is_weighed(tmp_path: Path) -> None:
    # Alternating models: without each model's first line sampled, the second would be estimated at bytes/4.
    lines = [line(f"r{i}", model="gpt-4o-mini" if i % 2 else "gpt-4.1-nano") for i in range(10)]
    prepared = prepare_from_lines(lines, endpoint=CHAT, work_dir=tmp_path)
    tokens = [c.estimated_tokens for c in prepared.chunks]
    assert tokens[0] == tokens[1] < sum(c.byte_count for c in prepared.chunks[:1]) // 4
