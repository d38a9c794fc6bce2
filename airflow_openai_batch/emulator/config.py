"""Knobs of the emulator: one dataclass, readable from ``OPENAI_BATCH_EMULATOR_*`` env vars."""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

#: Names of the API routes, as used by ``fault_routes`` and the stats.
ROUTE_NAMES: tuple[str, ...] = (
    "files.create",
    "files.retrieve",
    "files.list",
    "files.content",
    "files.delete",
    "batches.create",
    "batches.retrieve",
    "batches.list",
    "batches.cancel",
)

#: Kinds of injected faults.
FAULT_KINDS: tuple[str, ...] = ("429", "500", "drop")

TOKEN_LIMIT_MODES: tuple[str, ...] = ("fail", "reject")

#: Kinds of failing request lines (``failure_kinds``): an HTTP status, or a non-HTTP internal error. All
#: but ``400`` are transient: they depend on the line's attempt, as real transient faults do.
LINE_FAILURE_KINDS: tuple[str, ...] = ("400", "429", "500", "503", "internal")

ENV_PREFIX = "OPENAI_BATCH_EMULATOR_"

#: One-line help per knob (CLI ``--help``).
KNOB_HELP: dict[str, str] = {
    "rate": "request lines processed per (virtual) second per batch; 0 stalls processing",
    "validation_seconds": "seconds a batch spends in validating",
    "finalizing_seconds": "seconds a batch spends in finalizing",
    "failure_rate": "share of request lines that fail (half HTTP 400/500, half non-HTTP errors)",
    "failure_kinds": "comma-separated kinds of failing lines among 400,429,500,503,internal (default: "
    "a quarter 400, a quarter 500, half internal); all but 400 fail again only by a fresh draw per attempt",
    "cached_prompt_rate": "share of lines with a prompt of 1,024+ tokens that report it read from the prompt "
    "cache (in 128-token steps)",
    "missing_rate": "share of processed lines of a batch left out of both result files (never returned)",
    "expire_after": "seconds in progress before a batch expires ('none' = 24 h from creation)",
    "expire_next_batches": "the next N batches created expire once half their requests are processed",
    "cancel_seconds": "seconds a batch spends in cancelling",
    "fault_rate": "share of API calls answered with an injected fault",
    "fault_routes": "comma-separated route names that may be faulted (default all), e.g. batches.list",
    "fault_kinds": "comma-separated fault kinds among 429,500,drop",
    "fault_after_create_rate": "share of batches.create calls that create the batch but answer 500/drop",
    "retry_after": "seconds announced by injected 429s (retry-after-ms and retry-after)",
    "enqueued_token_limit": "per model, most estimated prompt tokens enqueued at once ('none' = no limit)",
    "token_limit_mode": "'fail' (batch goes failed: token_limit_exceeded) or 'reject' (create answers 400)",
    "enqueued_request_limit": "per model, most requests enqueued at once ('none' = no limit; OpenAI caps "
    "embeddings at 1,000,000); follows token_limit_mode, failing with request_limit_exceeded",
    "seed": "seed of every pseudo-random choice (failing lines, faults, output order)",
    "max_requests_per_batch": "most request lines per batch (more: too_many_tasks)",
    "max_bytes": "largest batch input file in bytes (larger: file_too_large)",
    "max_embedding_inputs": "most embedding inputs across an embeddings batch",
    "data_dir": "directory for the stored file bytes (default: a temporary directory)",
    "time_scale": "virtual seconds per real second (0 freezes the clock; use /_emulator/advance)",
    "answer_invalid_json_rate": "share of structured answers (json_schema/json_object, forced tool call) "
    "that are not JSON",
    "answer_schema_miss_rate": "share of structured answers that are JSON not valid against the schema",
    "answer_refusal_rate": "share of structured answers refused (message.refusal / a refusal part)",
    "answer_truncated_rate": "share of structured answers cut short (finish_reason length / incomplete)",
    "answer_content_filter_rate": "share of structured answers stopped by the content filter",
}

#: The knobs of spoiled structured answers (see ``emulator/answers.py``); their sum is at most 1.
ANSWER_RATE_KNOBS: tuple[str, ...] = (
    "answer_invalid_json_rate",
    "answer_schema_miss_rate",
    "answer_refusal_rate",
    "answer_truncated_rate",
    "answer_content_filter_rate",
)


@dataclass(frozen=True)
class EmulatorConfig:
    """Behaviour knobs of the emulator. Every knob can be changed at runtime (``configure``).

    :param rate: request lines processed per second per batch (virtual seconds); 0 stalls processing.
    :param validation_seconds: time a batch spends in ``validating``.
    :param finalizing_seconds: time a batch spends in ``finalizing``.
    :param failure_rate: share of request lines that fail (decided per custom_id from ``seed``); half
        of them are HTTP errors (status 400/500 with an error body), half non-HTTP errors
        (``response: null``, ``error: {code, message}``). Snapshotted per batch at creation.
    :param failure_kinds: kinds of failing lines (see :data:`LINE_FAILURE_KINDS`), each failing line picking
        one by its custom_id; ``None`` = a quarter HTTP 400, a quarter HTTP 500, half non-HTTP errors. A
        400 line fails at every attempt; a transient one (the others) fails again only if a fresh draw
        for its attempt says so (the attempt of a custom_id is one more than its earlier transient
        failures in this emulator). Snapshotted per batch at creation.
    :param cached_prompt_rate: share of the lines whose prompt has 1,024 tokens or more that report it
        read from the prompt cache (``cached_tokens``: the prompt up to its last whole 128-token step), in
        the lines' usage and in ``Batch.usage``. Snapshotted per batch at creation.
    :param missing_rate: share of processed lines that appear in neither result file, so clients must
        detect requests that were never answered. Snapshotted per batch at creation.
    :param expire_after: seconds after ``in_progress_at`` at which an unfinished batch expires;
        ``None`` means OpenAI's 24 h window counted from ``created_at``.
    :param expire_next_batches: the next this many batches created expire part-way, once half their
        requests are processed (a scenario knob: it counts down as batches are created, so the retry
        batches that follow run normally).
    :param cancel_seconds: time a batch spends in ``cancelling``.
    :param fault_rate: share of API calls answered with an injected fault, decided before the route
        does any work.
    :param fault_routes: route names (see ``ROUTE_NAMES``) that may be faulted; ``None`` = all.
    :param fault_kinds: kinds of faults to inject: ``"429"`` (with Retry-After), ``"500"``, ``"drop"``
        (the connection is closed in the middle of the response body).
    :param fault_after_create_rate: share of ``batches.create`` calls whose batch IS created but whose
        response is a 500 or a dropped connection (the ambiguous case retry-safety must handle).
    :param retry_after: seconds announced by injected 429s (``retry-after-ms`` and ``retry-after``).
    :param enqueued_token_limit: per model, the most estimated prompt tokens that may be enqueued
        (in progress or finalizing) at once; ``None`` = no limit.
    :param token_limit_mode: ``"fail"``: a batch over the limit goes validating -> failed with
        ``token_limit_exceeded`` (as OpenAI does); ``"reject"``: ``batches.create`` answers 400.
    :param enqueued_request_limit: per model, the most requests that may be enqueued at once (OpenAI
        caps embeddings models at 1,000,000); ``None`` = no limit. Over it, a batch fails with
        ``request_limit_exceeded`` ("Enqueued request limit reached ...") or, in ``reject`` mode,
        ``batches.create`` answers 400.
    :param seed: seed of every pseudo-random choice (failing lines, faults, output order).
    :param max_requests_per_batch: more request lines than this fail validation (``too_many_tasks``).
    :param max_bytes: a larger input file fails validation (``file_too_large``).
    :param max_embedding_inputs: most embedding inputs across all lines of an embeddings batch.
    :param data_dir: where file bytes are stored; ``None`` = a fresh temporary directory.
    :param time_scale: virtual seconds per real second; 0 freezes the clock so only ``advance``
        moves it (fully deterministic tests).
    :param answer_invalid_json_rate: share of structured answers (a ``json_schema`` / ``json_object``
        format, or a forced tool call) whose text is not JSON. Like the other ``answer_*`` shares it is
        decided per custom_id from ``seed`` and read when a batch's results are written.
    :param answer_schema_miss_rate: share of structured answers that are JSON the schema rejects.
    :param answer_refusal_rate: share of structured answers refused.
    :param answer_truncated_rate: share of structured answers cut at the output token limit.
    :param answer_content_filter_rate: share of structured answers stopped by the content filter.
    """

    rate: float = 1000.0
    validation_seconds: float = 0.0
    finalizing_seconds: float = 0.0
    failure_rate: float = 0.0
    failure_kinds: tuple[str, ...] | None = None
    missing_rate: float = 0.0
    cached_prompt_rate: float = 0.0
    expire_after: float | None = None
    expire_next_batches: int = 0
    cancel_seconds: float = 0.0
    fault_rate: float = 0.0
    fault_routes: tuple[str, ...] | None = None
    fault_kinds: tuple[str, ...] = FAULT_KINDS
    fault_after_create_rate: float = 0.0
    retry_after: float = 0.05
    enqueued_token_limit: int | None = None
    token_limit_mode: str = "fail"
    enqueued_request_limit: int | None = None
    seed: int = 0
    max_requests_per_batch: int = 50_000
    max_bytes: int = 200_000_000
    max_embedding_inputs: int = 50_000
    data_dir: str | None = None
    time_scale: float = 1.0
    answer_invalid_json_rate: float = 0.0
    answer_schema_miss_rate: float = 0.0
    answer_refusal_rate: float = 0.0
    answer_truncated_rate: float = 0.0
    answer_content_filter_rate: float = 0.0

    def __post_init__(self) -> None:
        # Normalise values that arrive as lists (JSON, kwargs) so the frozen object stays hashable.
        for name in ("fault_routes", "fault_kinds", "failure_kinds"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(part.strip() for part in value.split(",") if part.strip())
            if value is not None and not isinstance(value, tuple):
                value = tuple(value)
            object.__setattr__(self, name, value)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first knob out of range."""
        for name in (
            "failure_rate",
            "missing_rate",
            "cached_prompt_rate",
            "fault_rate",
            "fault_after_create_rate",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value!r}")
        self._validate_answer_rates()
        for name in ("rate", "validation_seconds", "finalizing_seconds", "cancel_seconds", "retry_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.time_scale < 0:
            raise ValueError(f"time_scale must be >= 0, got {self.time_scale!r}")
        if self.expire_after is not None and self.expire_after <= 0:
            raise ValueError(f"expire_after must be > 0 or None, got {self.expire_after!r}")
        if self.failure_kinds is not None:
            unknown = set(self.failure_kinds) - set(LINE_FAILURE_KINDS)
            if unknown or not self.failure_kinds:
                raise ValueError(
                    f"failure_kinds must be among {list(LINE_FAILURE_KINDS)}, got {list(self.failure_kinds)}"
                )
        if self.expire_next_batches < 0:
            raise ValueError(f"expire_next_batches must be >= 0, got {self.expire_next_batches!r}")
        unknown = set(self.fault_kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault_kinds {sorted(unknown)}; choose from {list(FAULT_KINDS)}")
        if self.fault_routes is not None:
            unknown = set(self.fault_routes) - set(ROUTE_NAMES)
            if unknown:
                raise ValueError(f"unknown fault_routes {sorted(unknown)}; choose from {list(ROUTE_NAMES)}")
        if self.token_limit_mode not in TOKEN_LIMIT_MODES:
            raise ValueError(f"token_limit_mode must be one of {list(TOKEN_LIMIT_MODES)}")
        if self.enqueued_token_limit is not None and self.enqueued_token_limit < 0:
            raise ValueError("enqueued_token_limit must be >= 0 or None")
        if self.enqueued_request_limit is not None and self.enqueued_request_limit < 0:
            raise ValueError("enqueued_request_limit must be >= 0 or None")
        for name in ("max_requests_per_batch", "max_bytes", "max_embedding_inputs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    def _validate_answer_rates(self) -> None:
        for name in ANSWER_RATE_KNOBS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value!r}")
        if sum(getattr(self, name) for name in ANSWER_RATE_KNOBS) > 1.0 + 1e-9:
            raise ValueError(f"the answer_*_rate knobs add up to more than 1: {', '.join(ANSWER_RATE_KNOBS)}")

    def replace(self, **knobs: Any) -> EmulatorConfig:
        """Return a copy with ``knobs`` changed (unknown names raise ``TypeError``)."""
        unknown = set(knobs) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown emulator knobs: {sorted(unknown)}")
        return dataclasses.replace(self, **knobs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view of the knobs."""
        out = dataclasses.asdict(self)
        for name in ("fault_routes", "fault_kinds", "failure_kinds"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> EmulatorConfig:
        """Build a config from ``OPENAI_BATCH_EMULATOR_<UPPER_NAME>`` variables, then ``overrides``.

        :param environ: the environment to read (default ``os.environ``).
        :param overrides: knobs that win over the environment.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = parse_knob(f.name, raw)
        values.update(overrides)
        return cls(**values)


_HINTS: dict[str, Any] | None = None


def _hints() -> dict[str, Any]:
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(EmulatorConfig)
    return _HINTS


def knob_names() -> tuple[str, ...]:
    """Names of every knob, in declaration order."""
    return tuple(f.name for f in fields(EmulatorConfig))


def parse_knob(name: str, raw: str) -> Any:
    """Parse the text form of knob ``name`` (env var or CLI flag) into its Python value.

    ``none``/``null``/empty means ``None`` for optional knobs; tuples are comma-separated.
    """
    hint = _hints()[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional and raw.strip().lower() in ("", "none", "null"):
        return None
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    origin = typing.get_origin(base)
    if origin is tuple or base is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if base is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if base is int:
        return int(float(raw)) if "e" in raw.lower() else int(raw.replace("_", ""))
    if base is float:
        return float(raw)
    return raw
