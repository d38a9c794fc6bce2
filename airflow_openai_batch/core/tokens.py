"""Prompt-token estimates and embedding input counts, for the submit's per-batch limits.

The one estimator lives in :mod:`airflow_openai_batch.core.cost` (:class:`~airflow_openai_batch.core.cost.
PromptTokens`: the free UTF-8 bytes / 4 heuristic, or OpenAI's own encodings with the ``[tokens]`` extra);
this module re-exports its heuristic under the names the limits use, and counts embedding inputs (OpenAI's
per-batch input limit), which is not a token question.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow_openai_batch.core.cost import (
    HEURISTIC,
    IMAGE_PART_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    REQUEST_OVERHEAD_TOKENS,
    request_token_estimator,
)

__all__ = [
    "IMAGE_PART_TOKENS",
    "MESSAGE_OVERHEAD_TOKENS",
    "REQUEST_OVERHEAD_TOKENS",
    "count_embedding_inputs",
    "count_inputs",
    "estimate_request_tokens",
    "estimate_text_tokens",
    "request_token_estimator",
]


def estimate_text_tokens(text: str) -> int:
    """The free estimate of one text's tokens: its UTF-8 bytes / 4, rounded up.

    :param text: the text.
    """
    return HEURISTIC.total([text])


def estimate_request_tokens(endpoint: str, body: Mapping[str, Any]) -> int:
    """The free estimate of one request's prompt tokens (see
    :class:`~airflow_openai_batch.core.cost.PromptTokens` for what is counted).

    :param endpoint: the batch endpoint, e.g. ``/v1/chat/completions`` (with or without ``/v1``).
    :param body: the request body.
    """
    return request_token_estimator(endpoint)(body)


def count_embedding_inputs(body: Mapping[str, Any]) -> int:
    """Count the inputs of one embeddings request, as OpenAI's per-batch input limit counts them.

    :param body: the ``/v1/embeddings`` request body.
    :return: :func:`count_inputs` of its ``input``.
    """
    return count_inputs(body.get("input"))


def count_inputs(value: Any) -> int:
    """Count the inputs in an embeddings request's ``input``.

    :param value: the ``input`` value.
    :return: 1 for a str, ``len`` for a list of str, 1 for a list of ints (one tokenized input),
        ``len`` for a list of lists of ints, 0 for an empty list, and 1 for anything else (the request
        still counts once; the API rejects malformed input per request).
    """
    if type(value) is str:
        return 1
    if isinstance(value, list):
        if not value:
            return 0
        first = value[0]
        if isinstance(first, int) and not isinstance(first, bool):
            return 1
        return len(value)
    return 1
