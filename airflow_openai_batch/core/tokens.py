"""Offline prompt-token estimates for batch requests (no network, no downloads, no Airflow import).

OpenAI counts *enqueued prompt tokens* per model and fails a whole batch late (``token_limit_exceeded``)
when they exceed the organisation's limit. These estimates let the submit operator cut batches below
that limit before anything is uploaded.

Heuristic: ``ceil(characters / 4)`` per text (OpenAI's own rule of thumb for English), plus
:data:`MESSAGE_OVERHEAD_TOKENS` per chat message / input item and :data:`REQUEST_OVERHEAD_TOKENS` per
request (the role and separator tokens of the chat format); pre-tokenized inputs (lists of ints) count
one token per int; an image part counts :data:`IMAGE_PART_TOKENS`; ``tools`` / ``functions``
definitions count by the length of their JSON. Tolerance (rule of thumb, not a guarantee): for English
prose expect roughly +/-25 % against the real tokenizer; text with more tokens per character (CJK,
emoji, dense code, long numbers) is *under*-estimated, by up to 2-3x. Leave headroom in
``max_enqueued_tokens`` accordingly (e.g. set it to ~80 % of the real limit).

If the optional ``tiktoken`` package is importable *and* the ``cl100k_base`` encoding file is already in
its local cache, text is counted with it instead (more exact; no download is ever triggered).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import orjson

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

#: Tokens added per chat message / responses input item (role, separators).
MESSAGE_OVERHEAD_TOKENS = 4
#: Tokens added once per chat-like request (the assistant reply priming).
REQUEST_OVERHEAD_TOKENS = 3
#: Tokens counted for one image part (the "low detail" base cost; high-detail images cost more).
IMAGE_PART_TOKENS = 85

_TIKTOKEN_ENCODING = "cl100k_base"
_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
#: tiktoken re-downloads a cached file whose hash does not match this, so it is checked first.
_TIKTOKEN_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_UNSET: Any = object()
_encoder: Any = _UNSET


def _offline_tiktoken() -> Callable[[str], int] | None:
    """Return a tiktoken-based counter if tiktoken and its cached encoding file are both present."""
    try:
        import tiktoken  # type: ignore[import-not-found]
    except ImportError:
        return None
    # tiktoken downloads the encoding when its cache cannot serve it; mirror its cache lookup (same
    # variables, same precedence; "" disables its cache) so that it never has to.
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return None
    cached = os.path.join(cache_dir, hashlib.sha1(_TIKTOKEN_URL.encode()).hexdigest())
    try:
        with open(cached, "rb") as fh:
            if hashlib.sha256(fh.read()).hexdigest() != _TIKTOKEN_SHA256:
                return None
        encoding = tiktoken.get_encoding(_TIKTOKEN_ENCODING)
    except Exception:
        return None

    def count(text: str) -> int:
        return len(encoding.encode_ordinary(text))

    return count


def _text_counter() -> Callable[[str], int] | None:
    global _encoder
    if _encoder is _UNSET:
        _encoder = _offline_tiktoken()
    return _encoder


def estimate_text_tokens(text: str) -> int:
    """Estimate the tokens of one text.

    :param text: the text.
    :return: ``ceil(len(text) / 4)``, or tiktoken's exact count when it is available offline.
    """
    counter = _text_counter()
    if counter is not None:
        return counter(text)
    return (len(text) + 3) // 4


def _tokens_of_value(value: Any, count: Callable[[str], int] | None) -> int:
    """Tokens of a prompt-like value: a str, a list of str, a token list, or a list of token lists."""
    if isinstance(value, str):
        return count(value) if count is not None else (len(value) + 3) // 4
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, bool):
                continue
            if isinstance(item, int):
                total += 1
            else:
                total += _tokens_of_value(item, count)
        return total
    return 0


def _tokens_of_content(content: Any, count: Callable[[str], int] | None) -> int:
    """Tokens of a message's ``content``: a str or a list of typed parts (text, image, ...)."""
    if isinstance(content, str):
        return count(content) if count is not None else (len(content) + 3) // 4
    if not isinstance(content, list):
        return 0
    total = 0
    for part in content:
        if isinstance(part, str):
            total += _tokens_of_value(part, count)
        elif isinstance(part, Mapping):
            text = part.get("text")
            if isinstance(text, str):
                total += _tokens_of_value(text, count)
            elif "image_url" in part or part.get("type") in ("image_url", "input_image"):
                total += IMAGE_PART_TOKENS
    return total


def _tokens_of_definitions(body: Mapping[str, Any], count: Callable[[str], int] | None) -> int:
    """Tools/functions are part of the prompt; their JSON length is a fair proxy."""
    total = 0
    for key in ("tools", "functions"):
        defs = body.get(key)
        if defs:
            with contextlib.suppress(TypeError):
                total += _tokens_of_value(orjson.dumps(defs).decode(), count)
    return total


def _estimate_chat(body: Mapping[str, Any]) -> int:
    count = _text_counter()
    total = REQUEST_OVERHEAD_TOKENS
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, Mapping):
                content = message.get("content")
                # Plain string content is by far the most common: count it inline.
                if count is None and type(content) is str:
                    total += MESSAGE_OVERHEAD_TOKENS + (len(content) + 3) // 4
                else:
                    total += MESSAGE_OVERHEAD_TOKENS + _tokens_of_content(content, count)
    if "tools" in body or "functions" in body:
        total += _tokens_of_definitions(body, count)
    return total


def _estimate_responses(body: Mapping[str, Any]) -> int:
    count = _text_counter()
    total = REQUEST_OVERHEAD_TOKENS
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        total += MESSAGE_OVERHEAD_TOKENS + _tokens_of_value(instructions, count)
    items = body.get("input")
    if isinstance(items, str):
        total += MESSAGE_OVERHEAD_TOKENS + _tokens_of_value(items, count)
    elif isinstance(items, list):
        for item in items:
            if isinstance(item, Mapping):
                total += MESSAGE_OVERHEAD_TOKENS + _tokens_of_content(item.get("content"), count)
            else:
                total += _tokens_of_content([item], count)
    if "tools" in body:
        total += _tokens_of_definitions(body, count)
    return total


def _estimate_prompt(body: Mapping[str, Any]) -> int:
    return _tokens_of_value(body.get("prompt"), _text_counter())


def _estimate_input(body: Mapping[str, Any]) -> int:
    return _tokens_of_value(body.get("input"), _text_counter())


def _estimate_moderation(body: Mapping[str, Any]) -> int:
    count = _text_counter()
    value = body.get("input")
    if isinstance(value, list):
        # Multi-modal moderation input: a list of {"type": "text", "text": ...} / image parts.
        return sum(
            _tokens_of_content([item], count) if isinstance(item, Mapping) else _tokens_of_value(item, count)
            for item in value
        )
    return _tokens_of_value(value, count)


_ESTIMATORS: dict[str, Callable[[Mapping[str, Any]], int]] = {
    "/chat/completions": _estimate_chat,
    "/responses": _estimate_responses,
    "/completions": _estimate_prompt,
    "/embeddings": _estimate_input,
    "/moderations": _estimate_moderation,
}


def request_token_estimator(endpoint: str) -> Callable[[Mapping[str, Any]], int]:
    """Return the estimator for one endpoint, to call once per request body in a hot loop.

    :param endpoint: the batch endpoint, with or without the ``/v1`` prefix.
    :return: a function ``body -> estimated prompt tokens``. Endpoints without a text prompt model
        (images, videos) count the body's ``prompt`` if it has one.
    """
    path = "/" + endpoint.strip().strip("/")
    if path.startswith("/v1/"):
        path = path[3:]
    return _ESTIMATORS.get(path, _estimate_prompt)


def estimate_request_tokens(endpoint: str, body: Mapping[str, Any]) -> int:
    """Estimate the prompt tokens of one batch request from its text, without any network call.

    Counted per endpoint: chat ``messages`` (string content and list parts with ``text``), responses
    ``input`` (str or list of items with ``content``) and ``instructions``, completions ``prompt``
    (str, list of str, token lists), embeddings and moderations ``input`` (str, list of str; ints count
    as one token each); ``tools``/``functions`` by their JSON length. Heuristic: ``ceil(chars / 4)`` per
    text plus :data:`MESSAGE_OVERHEAD_TOKENS` per message/item and :data:`REQUEST_OVERHEAD_TOKENS` per
    chat/responses request; usually within +/-25 % of the real count for English prose, up to 2-3x
    under for CJK/emoji/dense code (see the module docstring).

    :param endpoint: the batch endpoint, e.g. ``/v1/chat/completions`` (with or without ``/v1``).
    :param body: the request body.
    :return: the estimated prompt tokens (>= 0).
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
