"""requests: one statement of what a valid request line is, applied by the block decode and by the diagnosis
of one line; both must accept exactly the same lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_openai_batch.core.requests import NotALine, RequestRules, normalize_endpoint
from airflow_openai_batch.exceptions import OpenAIBatchInputError
from airflow_openai_batch.limits import MAX_JSON_NESTING

CHAT = "/v1/chat/completions"
MODERATIONS = "/v1/moderations"


def rules(endpoint: str = CHAT, model: str | None = None, **limits: Any) -> RequestRules:
    settings_: dict[str, Any] = {"max_bytes": 10_000, "max_embedding_inputs": 5, "max_tokens": None}
    return RequestRules(endpoint, model=model, **{**settings_, **limits})


def chat(cid: Any = "a", **body: Any) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": CHAT, "body": {"model": "m", "messages": [], **body}}


def problems(line: bytes, **kwargs: Any) -> list[tuple[str | None, str]]:
    checked = rules(**kwargs).check_line(line)
    assert checked is not None
    return checked.problems


def test_a_valid_line_is_kept_as_it_is() -> None:
    line = (
        b'{"url": "/v1/chat/completions", "custom_id": "x", "body": {"model": "m", "n": 1.50}, '
        b'"method": "POST"}'
    )
    checked = rules().check_line(line)
    assert checked is not None and not checked.problems
    assert (checked.line, checked.custom_id, checked.model) == (line, "x", "m")


def test_blank_lines_are_no_requests() -> None:
    assert rules().check_line(b"  \t") is None


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        (b"{", None, "invalid JSON"),
        (b"[1]", None, "not a JSON object (got an array)"),
        (orjson.dumps(chat(cid=3)), "custom_id", "non-empty string, got a number"),
        (orjson.dumps({**chat(), "method": "GET"}), "method", '"GET", must be "POST"'),
        (orjson.dumps({**chat(), "url": "/v1/embeddings"}), "url", f'does not match the endpoint "{CHAT}"'),
        (orjson.dumps({**chat(), "body": "x"}), "body", "must be an object, got a string"),
        (orjson.dumps(chat(stream=True)), "body.stream", "streaming is not supported"),
        (orjson.dumps(chat(stream="yes")), "body.stream", "streaming is not supported"),
        (orjson.dumps(chat(model="")), "body.model", "no model argument"),
        (orjson.dumps(chat(pad="x" * 20_000)), None, "above max_bytes_per_batch=10000"),
        # A key given twice: the decoder reads both, the last one wins in an object; no field rule
        # explains the refusal, so the decoder's own words are reported.
        (
            b'{"custom_id":1,"custom_id":"a","method":"POST","url":"'
            + CHAT.encode()
            + b'","body":{"model":"m"}}',
            None,
            "invalid JSON",
        ),
        (orjson.dumps(chat()).replace(b"[]", b"[" * 2000 + b"]" * 2000), None, "nested too deeply"),
        # Bytes that are not UTF-8, where the decoder skips them (the body) or reads them (the id).
        (orjson.dumps(chat()).replace(b"[]", b'["\xff\xfe"]'), None, "invalid JSON"),
        (orjson.dumps(chat(cid="BROKEN")).replace(b"BROKEN", b"BR\xc0\xafOKEN"), None, "invalid JSON"),
    ],
)
def test_each_problem_names_its_field_and_reason(line: bytes, field: str | None, words: str) -> None:
    [(got_field, reason)] = problems(line)
    assert got_field == field and words in reason


def test_the_decoder_refusals_that_orjson_would_not_make_are_the_rules() -> None:
    # A body number beyond float range: the fast decode skips the body, so the line is valid; exact big
    # integers too. Both paths say the same (see test_block_and_line_agree).
    assert problems(orjson.dumps(chat()).replace(b"[]", b"[1e400, 123456789012345678901234567890]")) == []


def test_stream_false_or_null_is_fine() -> None:
    assert problems(orjson.dumps(chat(stream=False))) == problems(orjson.dumps(chat(stream=None))) == []


def test_items_that_are_not_lines() -> None:
    assert problems(NotALine("type set is not JSON serializable")) == [  # type: ignore[arg-type]
        (None, "not JSON-serializable: type set is not JSON serializable")
    ]
    assert problems(42) == [(None, "not a line of text (got int)")]  # type: ignore[arg-type]
    assert problems(orjson.dumps(chat()).decode()) == []  # type: ignore[arg-type]
    assert problems(orjson.dumps(chat(), option=orjson.OPT_INDENT_2))[0][1].startswith("a line break")


def test_the_model_argument_fills_missing_null_and_empty_models() -> None:
    for model in (None, "", "ABSENT"):
        body: dict[str, Any] = {"messages": []} if model == "ABSENT" else {"model": model, "messages": []}
        line = orjson.dumps({"custom_id": "a", "method": "POST", "url": CHAT, "body": body})
        checked = rules(model="fill").check_line(line)
        assert checked is not None and not checked.problems
        assert checked.model == "fill" and orjson.loads(checked.line)["body"]["model"] == "fill"
    assert problems(orjson.dumps(chat(model=4)), model="fill") == [
        ("body.model", "must be a non-empty string, got 4")
    ]


def test_an_api_default_model_groups_lines_without_one_and_leaves_them_unchanged() -> None:
    line = b'{"custom_id": "mod-1", "method": "POST", "url": "/v1/moderations", "body": {"input": "Text"}}'
    checked = rules(MODERATIONS).check_line(line)
    assert checked is not None and not checked.problems
    assert (checked.model, checked.line) == ("omni-moderation-latest", line)
    filled = rules(MODERATIONS, model="text-moderation-stable").check_line(line)
    assert filled is not None and filled.model == "text-moderation-stable"
    assert orjson.loads(filled.line)["body"]["model"] == "text-moderation-stable"
    empty = line.replace(b'{"input"', b'{"model": "", "input"')
    assert problems(empty, endpoint=MODERATIONS) == [("body.model", 'must be a non-empty string, got ""')]


def test_embedding_inputs_and_token_estimates_are_limits_of_a_line() -> None:
    emb = {
        "custom_id": "e",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "m", "input": ["x"] * 6},
    }
    assert problems(orjson.dumps(emb), endpoint="/v1/embeddings") == [
        ("body.input", "6 embedding inputs, above the 5 allowed per batch")
    ]
    long = orjson.dumps(chat(messages=[{"role": "user", "content": "x" * 400}]))
    [(field, reason)] = problems(long, max_tokens=50)
    assert field == "body" and "max_enqueued_tokens=50" in reason
    checked = rules(max_tokens=500).check_line(long)
    assert checked is not None and checked.tokens == 3 + 4 + 100


@pytest.fixture
def raised_recursion_limit() -> Iterator[None]:
    """As some frameworks (and Hypothesis) run code: the decoder then follows deeper nesting."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10 * MAX_JSON_NESTING)
    yield
    sys.setrecursionlimit(limit)


@pytest.mark.usefixtures("raised_recursion_limit")
def test_nesting_is_limited_whatever_the_recursion_limit() -> None:
    def nested(levels: int) -> bytes:  # the line itself and its body are two levels
        return orjson.dumps(chat()).replace(b"[]", b"[" * (levels - 2) + b"]" * (levels - 2))

    the_rules = rules(max_bytes=100_000)
    for levels, accepted in ((MAX_JSON_NESTING, True), (MAX_JSON_NESTING + 1, False)):
        line = nested(levels)
        checked = the_rules.check_line(line)
        assert checked is not None
        assert checked.problems == (
            [] if accepted else [(None, f"JSON nested more than {MAX_JSON_NESTING} levels deep")]
        )
        assert (the_rules.check_block([line], line + b"\n") is not None) == accepted


def test_retired_and_unknown_endpoints() -> None:
    with pytest.raises(OpenAIBatchInputError, match="no longer accepts"):
        normalize_endpoint("/v1/videos")
    with pytest.raises(OpenAIBatchInputError, match="not a Batch API endpoint"):
        normalize_endpoint("/v1/files")


# -- the block decode and the line diagnosis agree ---------------------------------------------------------

ODD_LINES = [
    b"",
    b"   ",
    b"{",
    b"null",
    b'{"a": 1} {"b": 2}',
    b'{"custom_id": "x"}',
    orjson.dumps(chat(cid="")),
    orjson.dumps(chat(stream=True)),
    orjson.dumps(chat(model="")),
    orjson.dumps(chat(model=None)),
    orjson.dumps(chat(model="other")),
    orjson.dumps(chat()).replace(b"[]", b"[1e400]"),
    b"  " + orjson.dumps(chat()) + b"  ",
    orjson.dumps(chat()) + b"\r",
    orjson.dumps(chat(pad="x" * 300)),
    json.dumps(chat(cid="\ud800"), ensure_ascii=True).encode(),
    orjson.dumps(chat()).replace(b"[]", b'["\xed\xa0\x80"]'),
    orjson.dumps(chat(content="é 漢字")),
]


@settings(max_examples=300, deadline=None)
@given(
    picks=st.lists(st.one_of(st.sampled_from(ODD_LINES), st.integers(0, 10**6)), min_size=1, max_size=12),
    model=st.sampled_from([None, "fill"]),
    endpoint=st.sampled_from([CHAT, MODERATIONS]),
    max_bytes=st.sampled_from([250, 10_000]),
)
def test_block_and_line_agree(picks: list[Any], model: str | None, endpoint: str, max_bytes: int) -> None:
    lines = [
        orjson.dumps({**chat(cid=f"id-{p}"), "url": endpoint})
        if isinstance(p, int)
        else p.replace(CHAT.encode(), endpoint.encode())
        for p in picks
    ]
    the_rules = rules(endpoint, model=model, max_bytes=max_bytes)
    one_by_one = [the_rules.check_line(line) for line in lines]
    block = the_rules.check_block(lines, b"".join(line + b"\n" for line in lines))
    unchanged = all(
        c is not None and not c.problems and c.line == line for c, line in zip(one_by_one, lines, strict=True)
    )
    assert (block is not None) == unchanged
    if block is not None:
        models = [c.model for c in one_by_one]  # type: ignore[union-attr]
        assert block.ids == [c.custom_id for c in one_by_one]  # type: ignore[union-attr]
        assert block.models == (models[0] if len(set(models)) == 1 else models)
