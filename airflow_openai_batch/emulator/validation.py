"""The emulator's own check of a batch input file, as OpenAI does while a batch is ``validating``.

Independent of the provider's client-side validation on purpose: a bug shared by both would pass
every test. The scan streams the file line by line (memory stays flat) and, for a valid file,
pre-computes per-line prefix sums (failed lines, token usage) so request counts and usage can be
reported for any number of processed lines in O(1).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .responses import (
    BATCH_ENDPOINTS,
    DEFAULT_MODELS,
    ENDPOINT_EMBEDDINGS,
    MODEL_REQUIRED,
    SUCCESS,
    canonical_endpoint,
    embedding_inputs,
    is_transient,
    line_outcome,
    line_usage,
)

#: At most this many errors are listed on a failed batch (the scan still checks every line).
MAX_REPORTED_ERRORS = 100

_ALL_URLS = frozenset(BATCH_ENDPOINTS) | {e[3:] for e in BATCH_ENDPOINTS}


@dataclass
class ScanResult:
    """Outcome of scanning one input file.

    ``cum_*`` arrays have ``total + 1`` entries: entry ``i`` sums lines ``0 .. i-1`` (usage only
    over lines that succeed), so the figures for the first ``p`` processed lines are ``cum[p]``.
    """

    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0
    total: int = 0
    model: str | None = None
    prompt_tokens: int = 0
    cum_failed: array = field(default_factory=lambda: array("q", [0]))
    cum_input: array = field(default_factory=lambda: array("q", [0]))
    cum_output: array = field(default_factory=lambda: array("q", [0]))
    cum_reasoning: array = field(default_factory=lambda: array("q", [0]))
    cum_cached: array = field(default_factory=lambda: array("q", [0]))
    #: The ``cached_prompt_rate`` the usage figures were made with (the output lines use it too).
    cached_prompt_rate: float = 0.0
    #: Lines at a later attempt than their first: ``{custom_id: attempt}``.
    attempts: dict[str, int] = field(default_factory=dict)
    #: Lines whose outcome is a transient failure at their attempt (the next attempt draws afresh).
    transient_failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def add_error(self, code: str, message: str, param: str | None = None, line: int | None = None) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def scan_input(
    path: str | os.PathLike[str],
    endpoint: str,
    *,
    seed: int,
    failure_rate: float,
    max_requests: int,
    max_bytes: int,
    max_embedding_inputs: int,
    failure_kinds: tuple[str, ...] | None = None,
    attempt_of: Callable[[str], int] | None = None,
    cached_prompt_rate: float = 0.0,
) -> ScanResult:
    """Validate the JSONL batch input at ``path`` for a batch on ``endpoint``.

    :param path: the input file.
    :param endpoint: the batch's endpoint as given to ``batches.create``; every line's ``url``
        must equal it.
    :param seed: seed deciding which lines fail (with ``failure_rate``) and their usage.
    :param failure_rate: share of lines that fail when processed.
    :param max_requests: more lines than this fail with ``too_many_tasks``.
    :param max_bytes: a larger file fails with ``file_too_large`` (and is not read at all).
    :param max_embedding_inputs: most embedding inputs over all lines of an embeddings batch.
    :param failure_kinds: the kinds failing lines pick from (``None``: the default mix).
    :param attempt_of: each line's attempt, by custom_id (``None``: every line at its first).
    :param cached_prompt_rate: share of long prompts read from the prompt cache (see ``line_usage``).
    """
    result = ScanResult(cached_prompt_rate=cached_prompt_rate)
    size = Path(path).stat().st_size
    if size > max_bytes:
        result.add_error(
            "file_too_large",
            f"The batch input file is larger than the {max_bytes} bytes maximum. "
            "Please try again with a smaller batch.",
        )
        return result

    canonical = canonical_endpoint(endpoint)
    seen: dict[str, int] = {}
    embedding_count = 0
    first_model: str | None = None
    first_model_line = 0
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) carry no request
            result.total += 1
            if result.total > max_requests:
                continue  # only counted: reported once below as too_many_tasks
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict):
                result.add_error(
                    "invalid_json_line", "This line is not parseable as valid JSON.", None, line_no
                )
                continue
            before = result.error_count

            custom_id = obj.get("custom_id")
            if custom_id is None or custom_id == "":
                result.add_error(
                    "missing_required_parameter",
                    "Missing required parameter: 'custom_id'.",
                    "custom_id",
                    line_no,
                )
            elif not isinstance(custom_id, str):
                result.add_error(
                    "invalid_type",
                    "Invalid type for 'custom_id': expected a string, but got "
                    f"{_type_name(custom_id)} instead.",
                    "custom_id",
                    line_no,
                )
            elif custom_id in seen:
                result.add_error(
                    "duplicate_custom_id",
                    f"The custom_id '{custom_id}' is duplicated; it was first used on line "
                    f"{seen[custom_id]}. "
                    "Every custom_id must be unique within a batch.",
                    "custom_id",
                    line_no,
                )
            else:
                seen[custom_id] = line_no

            method = obj.get("method")
            if method is None:
                result.add_error(
                    "missing_required_parameter", "Missing required parameter: 'method'.", "method", line_no
                )
            elif method != "POST":
                result.add_error(
                    "invalid_method",
                    f"Invalid method {method!r}: only 'POST' is supported.",
                    "method",
                    line_no,
                )

            url = obj.get("url")
            if url is None:
                result.add_error(
                    "missing_required_parameter", "Missing required parameter: 'url'.", "url", line_no
                )
            elif url != endpoint:
                if url in _ALL_URLS:
                    result.add_error(
                        "url_mismatch",
                        f"The url {url!r} does not match the batch endpoint {endpoint!r}.",
                        "url",
                        line_no,
                    )
                else:
                    result.add_error(
                        "invalid_url", f"The url {url!r} is not a supported batch url.", "url", line_no
                    )

            body = obj.get("body")
            model: Any = None
            if body is None:
                result.add_error(
                    "missing_required_parameter", "Missing required parameter: 'body'.", "body", line_no
                )
            elif not isinstance(body, dict):
                result.add_error(
                    "invalid_type",
                    f"Invalid type for 'body': expected an object, but got {_type_name(body)} instead.",
                    "body",
                    line_no,
                )
            else:
                model = body.get("model")
                if model is None and canonical in MODEL_REQUIRED:
                    result.add_error(
                        "missing_required_parameter",
                        "Missing required parameter: 'body.model'.",
                        "body.model",
                        line_no,
                    )
                elif model is not None and not isinstance(model, str):
                    result.add_error(
                        "invalid_type",
                        "Invalid type for 'body.model': expected a string.",
                        "body.model",
                        line_no,
                    )
                    model = None
                if isinstance(model, str):
                    if first_model is None:
                        first_model, first_model_line = model, line_no
                    elif model != first_model:
                        result.add_error(
                            "model_mismatch",
                            f"The model {model!r} differs from the model {first_model!r} of line "
                            f"{first_model_line}; a batch must use one model.",
                            "body.model",
                            line_no,
                        )
                if canonical == ENDPOINT_EMBEDDINGS:
                    embedding_count += len(embedding_inputs(body))

            if result.error_count != before or not result.ok:
                continue  # no need for usage figures: the batch will fail
            assert isinstance(body, dict) and isinstance(custom_id, str)
            usage = line_usage(canonical, body, custom_id, seed, cached_prompt_rate)
            result.prompt_tokens += usage.input_tokens
            attempt = attempt_of(custom_id) if attempt_of is not None else 1
            if attempt > 1:
                result.attempts[custom_id] = attempt
            outcome = line_outcome(seed, custom_id, failure_rate, attempt, failure_kinds)
            failed = outcome != SUCCESS
            if is_transient(outcome):
                result.transient_failures.append(custom_id)
            result.cum_failed.append(result.cum_failed[-1] + failed)
            result.cum_input.append(result.cum_input[-1] + (0 if failed else usage.input_tokens))
            result.cum_output.append(result.cum_output[-1] + (0 if failed else usage.output_tokens))
            result.cum_reasoning.append(result.cum_reasoning[-1] + (0 if failed else usage.reasoning_tokens))
            result.cum_cached.append(result.cum_cached[-1] + (0 if failed else usage.cached_tokens))

    if result.total == 0:
        result.add_error("empty_file", "The batch input file is empty.")
    if result.total > max_requests:
        result.add_error(
            "too_many_tasks",
            f"The batch input file has {result.total} requests, more than the maximum of {max_requests}.",
        )
    if embedding_count > max_embedding_inputs:
        result.add_error(
            "too_many_tasks",
            f"The batch has {embedding_count} embedding inputs, more than the maximum of "
            f"{max_embedding_inputs} across all requests.",
        )
    result.model = first_model or DEFAULT_MODELS.get(canonical)
    if not result.ok:
        # The per-line figures are meaningless for a failed batch: drop them.
        for name in ("cum_failed", "cum_input", "cum_output", "cum_reasoning", "cum_cached"):
            setattr(result, name, array("q", [0]))
        result.attempts, result.transient_failures = {}, []
    return result
