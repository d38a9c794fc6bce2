"""Offline prompt-token estimates (the cost estimator's heuristic) and embedding input counts."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_openai_batch.core.cost import HEURISTIC, PromptTokens
from airflow_openai_batch.core.tokens import (
    IMAGE_PART_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    REQUEST_OVERHEAD_TOKENS,
    count_embedding_inputs,
    estimate_request_tokens,
    estimate_text_tokens,
    request_token_estimator,
)

M = MESSAGE_OVERHEAD_TOKENS
R = REQUEST_OVERHEAD_TOKENS
CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("text", "expected"), [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2), ("x" * 400, 100)]
)
def test_text_heuristic(text: str, expected: int) -> None:
    assert estimate_text_tokens(text) == expected


def test_chat_messages() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are terse."},  # 14 chars -> 4
            {"role": "user", "content": [{"type": "text", "text": "12345678"}, {"type": "image_url"}]},
        ],
    }
    assert estimate_request_tokens("/v1/chat/completions", body) == R + (M + 4) + (M + 2 + IMAGE_PART_TOKENS)
    # The same with or without the /v1 prefix (Azure's older spelling).
    assert estimate_request_tokens("/chat/completions", body) == estimate_request_tokens(
        "v1/chat/completions", body
    )


def test_chat_counts_tools() -> None:
    plain = {"messages": [{"role": "user", "content": "hi"}]}
    with_tools = {**plain, "tools": [{"type": "function", "function": {"name": "f" * 40}}]}
    assert (
        estimate_request_tokens("/v1/chat/completions", with_tools)
        > estimate_request_tokens("/v1/chat/completions", plain) + 10
    )


def test_responses_input() -> None:
    ep = "/v1/responses"
    assert estimate_request_tokens(ep, {"input": "abcdefgh"}) == R + M + 2
    body: dict[str, Any] = {
        "instructions": "abcd",
        "input": [
            {"role": "user", "content": "abcd"},
            {"role": "user", "content": [{"type": "input_text", "text": "ab"}]},
        ],
    }
    assert estimate_request_tokens(ep, body) == R + (M + 1) + (M + 1) + (M + 1)


def test_completions_prompt() -> None:
    ep = "/v1/completions"
    assert estimate_request_tokens(ep, {"prompt": "abcdefgh"}) == 2
    assert estimate_request_tokens(ep, {"prompt": ["abcd", "abcde"]}) == 3
    assert estimate_request_tokens(ep, {"prompt": [1, 2, 3]}) == 3
    assert estimate_request_tokens(ep, {"prompt": [[1, 2], [3]]}) == 3


def test_embeddings_and_moderations_input() -> None:
    assert estimate_request_tokens("/v1/embeddings", {"input": "abcdefghi"}) == 3
    assert estimate_request_tokens("/v1/embeddings", {"input": ["abcd", "abcd"]}) == 2
    assert estimate_request_tokens("/v1/embeddings", {"input": [5, 6, 7, 8]}) == 4
    assert estimate_request_tokens("/v1/embeddings", {"input": [[5, 6], [7]]}) == 3
    assert estimate_request_tokens("/v1/moderations", {"input": "abcd"}) == 1
    assert estimate_request_tokens("/v1/moderations", {"input": [{"type": "text", "text": "abcdefgh"}]}) == 2


def test_unknown_shapes_count_zero() -> None:
    assert estimate_request_tokens("/v1/chat/completions", {"messages": "oops"}) == R
    assert estimate_request_tokens("/v1/embeddings", {}) == 0
    assert estimate_request_tokens("/v1/images/generations", {"prompt": "abcd"}) == 1


def test_estimator_is_reusable() -> None:
    estimate = request_token_estimator("/v1/embeddings")
    assert estimate({"input": "abcd"}) == 1
    assert estimate({"input": ["a", "b"]}) == 2


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("text", 1),
        (["a", "b", "c"], 3),
        ([1, 2, 3], 1),
        ([[1, 2], [3], [4]], 3),
        ([], 0),
        (None, 1),
    ],
)
def test_count_embedding_inputs(value: Any, expected: int) -> None:
    body = {"model": "text-embedding-3-small"}
    if value is not None:
        body["input"] = value
    assert count_embedding_inputs(body) == expected


def test_the_estimate_is_the_cost_estimators_heuristic() -> None:
    body = {"messages": [{"role": "user", "content": "\u00e9t\u00e9 \u4e2d\u6587"}]}
    assert estimate_request_tokens(CHAT, body) == PromptTokens(CHAT, HEURISTIC).count(body)
    assert estimate_text_tokens("\u4e2d\u6587") == 2  # UTF-8 bytes / 4: six bytes
