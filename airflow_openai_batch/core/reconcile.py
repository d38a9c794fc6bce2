"""Join a batch's input requests with its result lines by ``custom_id`` (no Airflow import, no network).

Every input request ends up in exactly one of two record streams, written to a :class:`RecordSink` as
soon as it is known:

- a *success* record for each 2xx result line;
- a *failure* record for each error line (HTTP 4xx/5xx or non-HTTP ``error``) and for each input
  request that no result file mentions (``batch_expired`` / ``batch_cancelled`` / ``batch_failed`` /
  ``missing`` according to the batch's final status).

Result files are streamed and never held in memory. The only per-request state is an index
``custom_id -> byte offset`` into a local copy of the input file, which is what lets a failure carry the
original request line (for the retry file) without keeping request bodies in memory, and the set of ids
not answered yet.

Into a sink that takes whole blocks (:class:`~airflow_openai_batch.core.writers.ResultWriter`), files are
handled in blocks of about a megabyte: each result block is scanned (parsed, its records built and
serialized) without the index, by this process or, for large batches, by a helper process
(:class:`~airflow_openai_batch.core.jsonl.BlockHelper`), then applied here in file order: the join, the
failures, the writes. Since a scan needs no index, the helper starts on the output file's first blocks
while this process is still copying the input. A block the scan cannot vouch for (an odd line, an
unknown or repeated id) goes line by line through the same path as any other sink, which reports what
is wrong.

Anomalies in the result files (a ``custom_id`` reported twice, a ``custom_id`` the input never had, a
line that does not parse, such as a truncated last line) are counted and sampled in the summary; they
never crash the run and are never silently merged: the first result for an id wins.
"""

from __future__ import annotations

import array
import base64
import contextlib
import itertools
import operator
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from airflow_openai_batch.core.jsonl import (
    BlockHelper,
    BlockPipeline,
    LineBlock,
    LineIterator,
    gc_paused,
    lines_of,
    split_block,
)
from airflow_openai_batch.statuses import BatchStatus

__all__ = [
    "ANOMALY_KINDS",
    "MAX_ANOMALY_EXAMPLES",
    "BatchResultFiles",
    "BatchTally",
    "ReconcileSummary",
    "Reconciler",
    "RecordSink",
    "endpoint_kind",
    "extract_content",
    "present_file_id",
    "usage_counts",
]

# The jsonl module's ``loads`` is this same function; binding orjson directly keeps the hot loops free of
# an attribute lookup and this module importable on its own.
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError

#: Examples kept per anomaly kind (the counts are always complete).
MAX_ANOMALY_EXAMPLES = 100

#: Kinds of anomalies the summary may report.
ANOMALY_KINDS: tuple[str, ...] = (
    "duplicate_result",  # a custom_id answered twice (in the output and/or error file): first one wins
    "unknown_custom_id",  # a result for a custom_id that is not in the batch's input
    "unparseable_result_line",  # not JSON, not an object, or no custom_id (e.g. a truncated last line)
    "invalid_input_line",  # an input line without a usable custom_id (reported as a failure too)
    "duplicate_input_custom_id",  # the input repeats a custom_id (OpenAI fails such a batch)
)

#: ``error_code`` given to input requests that no result file mentions, by final batch status.
_ABSENT_CODE_BY_STATUS: dict[str, str] = {
    BatchStatus.EXPIRED.value: "batch_expired",
    BatchStatus.CANCELLED.value: "batch_cancelled",
    BatchStatus.CANCELLING.value: "batch_cancelled",
    BatchStatus.FAILED.value: "batch_failed",
}

_ABSENT_MESSAGES: dict[str, str] = {
    "batch_expired": "The batch expired (24 h window) before this request was processed.",
    "batch_cancelled": "The batch was cancelled before this request was processed.",
    "batch_failed": "The batch failed (e.g. input validation or enqueued-token limit); "
    "this request was never processed.",
    "missing": "The request is in the input file but in neither the output nor the error file "
    "(batch status {status!r}).",
}

# Input lines written by orjson / JSON.stringify start with {"custom_id":"...", those written by Python's
# json.dumps with {"custom_id": "...". For those the custom_id is read straight from the bytes, which
# saves a full parse of every request body (often the largest part of the input). An id with a
# backslash (an escape) is left to the parser. The leading newline makes the pattern start with a
# literal, which the regex engine searches for quickly (a "^" anchor is several times slower).
_FAST_ID_RE = re.compile(rb'\n\{"custom_id": ?"([^"\\\n]+)"')
#: Input lines are copied and indexed in slabs of about this many bytes (and at most so many lines).
_SLAB_BYTES = 512 * 1024
_SLAB_MAX_LINES = 8192
#: The start of a line, where the fast path looks for the custom_id.
_line_head = operator.itemgetter(slice(0, 256))
_BOM = b"\xef\xbb\xbf"
_UNSET = object()
#: From how many requests a batch's result blocks are scanned by a helper process too, per output format:
#: ``(requests, input bytes)``, the first when the batch's request count is known, the second (the input
#: copied so far) when it is not. Starting the helper (an interpreter, its imports) costs ~0.1 CPU-s, and
#: into Parquet the Arrow writer thread already takes part of the second core: measured on 2 cores, the
#: helper pays for itself from ~50k requests into JSONL and ~100k into Parquet.
_RESULT_HELPER_MIN: dict[str, tuple[int, int]] = {"jsonl": (50_000, 12 << 20), "parquet": (100_000, 24 << 20)}
_RESULTS_FACTORY = "airflow_openai_batch.core.reconcile:_results_handler"
#: Blocks sent to the helper and not answered yet (at first, and at most as the split adapts), and
#: blocks scanned, not yet applied, at most.
_RESULT_INFLIGHT = 3
_RESULT_MAX_INFLIGHT = 5
_RESULT_MAX_PENDING = 6
#: Seconds to wait for one answer of the helper before scanning its blocks here instead.
_RESULT_HELPER_TIMEOUT = 300.0
#: Output blocks sent to the helper while the input is still being copied, at most (each held with its
#: answer until the join can start: a few megabytes).
_RESULT_AHEAD_BLOCKS = 5
_APPEND_NEWLINE = orjson.OPT_APPEND_NEWLINE

_USAGE_KEYS: tuple[str, ...] = ("input_tokens", "output_tokens", "total_tokens", "cached_input_tokens")


def present_file_id(file_id: str | None) -> str | None:
    """Return ``file_id``, or ``None`` when the batch has no such file.

    Azure reports a missing output/error file as ``""`` where OpenAI says ``null``.

    :param file_id: ``output_file_id`` / ``error_file_id`` as the API returned it.
    """
    return file_id or None


def endpoint_kind(endpoint: str | None) -> str:
    """Classify a batch endpoint: ``chat``, ``completions``, ``responses``, ``embeddings`` or ``other``.

    Accepts OpenAI's spelling (``/v1/chat/completions``) and Azure's older one (``/chat/completions``).

    :param endpoint: the endpoint or a request line's ``url``.
    """
    if not endpoint:
        return "other"
    path = endpoint.split("?", 1)[0].rstrip("/")
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/completions"):
        return "completions"
    if path.endswith("/responses"):
        return "responses"
    if path.endswith("/embeddings"):
        return "embeddings"
    return "other"


def _content_chat(body: Any) -> str | None:
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    if isinstance(content, str) or content is None:
        return content
    # Some models answer with a list of content parts; keep the text ones.
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "".join(texts) if texts else None
    return None


def _content_completions(body: Any) -> str | None:
    try:
        text = body["choices"][0]["text"]
    except (KeyError, IndexError, TypeError):
        return None
    return text if isinstance(text, str) else None


def _content_responses(body: Any) -> str | None:
    try:
        output = body["output"]
    except (KeyError, TypeError):
        return None
    if not isinstance(output, list):
        return None
    parts: list[str] = []
    for item in output:
        # Reasoning items, tool calls... carry no output_text: only message items do.
        content = item.get("content") if isinstance(item, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == "output_text":
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
    return "".join(parts) if parts else None


def _decode_vector(value: Any) -> list[float] | None:
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        # encoding_format="base64": little-endian float32, as the SDK decodes it.
        try:
            vec = array.array("f", base64.b64decode(value))
        except (ValueError, TypeError):
            return None
        if sys.byteorder != "little":
            vec.byteswap()
        return vec.tolist()
    return None


def _embeddings(body: Any) -> list[list[float] | None] | None:
    try:
        data = body["data"]
    except (KeyError, TypeError):
        return None
    if not isinstance(data, list) or not data:
        return None
    if len(data) > 1:
        # The API documents ``index`` as the position of the input: follow it, not the list order.
        with contextlib.suppress(KeyError, TypeError):
            data = sorted(data, key=lambda d: d["index"])
    try:
        return [_decode_vector(d["embedding"]) for d in data]
    except (KeyError, TypeError):
        return None


def extract_content(kind: str, body: Any) -> dict[str, Any]:
    """Compute a success record's convenience fields from a response body.

    :param kind: the endpoint kind (see :func:`endpoint_kind`).
    :param body: the response body (``response.body`` of a result line).
    :return: ``{"content": str | None}`` for text endpoints, ``{"embedding": [...] | None}`` (plus
        ``"embeddings"`` when the request had several inputs) for embeddings, ``{}`` otherwise.
    """
    content_of = _CONTENT_EXTRACTORS.get(kind)
    if content_of is not None:
        return {"content": content_of(body)}
    if kind == "embeddings":
        vectors = _embeddings(body)
        if vectors and len(vectors) > 1:
            return {"embedding": vectors[0], "embeddings": vectors}
        return {"embedding": vectors[0] if vectors else None}
    return {}


def usage_counts(usage: Any) -> tuple[int, int, int, int] | None:
    """Normalize a response body's ``usage`` to ``(input, output, total, cached_input)`` tokens.

    Chat/completions/embeddings say ``prompt_tokens``/``completion_tokens``, the Responses API says
    ``input_tokens``/``output_tokens``; both name cached tokens under ``*_tokens_details``.

    :param usage: ``body["usage"]`` (any value).
    :return: the four counts, or ``None`` when ``usage`` is not an object.
    """
    if not isinstance(usage, dict):
        return None
    get = usage.get
    inp = get("input_tokens")
    if inp is None:
        inp = get("prompt_tokens")
    out = get("output_tokens")
    if out is None:
        out = get("completion_tokens")
    inp = inp if type(inp) is int else 0
    out = out if type(out) is int else 0
    total = get("total_tokens")
    if type(total) is not int:
        total = inp + out
    details = get("input_tokens_details") or get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return inp, out, total, cached if type(cached) is int else 0


def _usage_keys(kind: str) -> tuple[str, str, str]:
    """The usual ``usage`` keys of an endpoint kind: input, output and cached-input details.

    The hot loops read these directly, once per success, and leave any other shape to
    :func:`usage_counts`.
    """
    if kind == "responses":
        return "input_tokens", "output_tokens", "input_tokens_details"
    return "prompt_tokens", "completion_tokens", "prompt_tokens_details"


class RecordSink(Protocol):
    """Where reconciled records go (e.g. :class:`airflow_openai_batch.core.writers.ResultWriter`)."""

    def write_success(self, record: dict[str, Any]) -> None: ...

    def write_failure(self, record: dict[str, Any], request_line: bytes) -> None:
        """:param request_line: the request exactly as in the input file (no newline), for retries.

        The record's ``request`` is that line parsed, unless the sink has a ``needs_parsed_requests()``
        that says ``False``: then it is ``None`` (the line says it all).
        """
        ...

    def close(self) -> None: ...


@dataclass
class BatchResultFiles:
    """One batch to reconcile: its final status and its three files as line sources.

    :param batch_id: the batch id.
    :param status: the batch's final status (decides the code of requests no result file mentions).
    :param input_lines: the input file's raw lines (bytes, without newline; blank lines are skipped).
    :param output_lines: the output file's lines, or ``None`` when the batch has no output file
        (``output_file_id`` null, or ``""`` on Azure).
    :param error_lines: the error file's lines, or ``None`` when the batch has no error file.
    :param model: the batch's model; when ``None`` it is read from the first input line's ``body.model``.
    :param expected_results: how many requests the batch holds, when known (its ``request_counts.total``):
        decides before anything is read whether a helper process is worth starting. Only a hint: every
        line is reconciled whatever it says.
    """

    batch_id: str
    status: str
    input_lines: Iterable[bytes]
    output_lines: Iterable[bytes] | None
    error_lines: Iterable[bytes] | None
    model: str | None = None
    expected_results: int | None = None


def _empty_usage() -> dict[str, int]:
    return dict.fromkeys(_USAGE_KEYS, 0)


@dataclass
class BatchTally:
    """The counts of one reconciled batch.

    :param batch_id: the batch id.
    :param status: the batch's final status.
    :param model: the batch's model (given or learned from the input).
    :param endpoint: the endpoint used to pick the convenience field (given or the input's ``url``).
    :param total: input requests (non-blank input lines).
    :param succeeded: success records written.
    :param failed: failure records written.
    :param failed_by_code: ``{error_code: n}``, adding up to ``failed``.
    :param usage: token sums over the successes (``input_tokens``, ``output_tokens``, ``total_tokens``,
        ``cached_input_tokens``).
    :param anomalies: ``{kind: n}`` of the anomalies found in this batch's files.
    """

    batch_id: str
    status: str
    model: str | None = None
    endpoint: str | None = None
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    failed_by_code: dict[str, int] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=_empty_usage)
    anomalies: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "status": self.status,
            "model": self.model,
            "endpoint": self.endpoint,
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "failed_by_code": dict(self.failed_by_code),
            "usage": dict(self.usage),
            "anomalies": dict(self.anomalies),
        }


@dataclass
class ReconcileSummary:
    """Totals across every batch given to a :class:`Reconciler`.

    :param batch_ids: the batches, in the order they were added.
    :param total: input requests.
    :param succeeded: success records.
    :param failed: failure records (``total == succeeded + failed``).
    :param failed_by_code: ``{error_code: n}``, adding up to ``failed``.
    :param usage: token sums over all successes.
    :param usage_by_model: the same sums per model (the response's ``model`` when it says one, else the
        batch's): what :meth:`airflow_openai_batch.core.pricing.PriceTable.estimate_cost` takes.
    :param anomalies: ``{"counts": {kind: n}, "examples": [{kind, batch_id, custom_id, source, line,
        detail}, ...]}`` with at most :data:`MAX_ANOMALY_EXAMPLES` examples per kind.
    :param batches: ``{batch_id: BatchTally}``.
    """

    batch_ids: list[str]
    total: int
    succeeded: int
    failed: int
    failed_by_code: dict[str, int]
    usage: dict[str, int]
    usage_by_model: dict[str, dict[str, int]]
    anomalies: dict[str, Any]
    batches: dict[str, BatchTally]

    @property
    def failure_ratio(self) -> float:
        """``failed / total`` (0.0 when there is nothing)."""
        return self.failed / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe copy (plain dicts, lists, str and int)."""
        return {
            "batch_ids": list(self.batch_ids),
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "failed_by_code": dict(self.failed_by_code),
            "usage": dict(self.usage),
            "usage_by_model": {m: dict(u) for m, u in self.usage_by_model.items()},
            "anomalies": {
                "counts": dict(self.anomalies["counts"]),
                "examples": [dict(e) for e in self.anomalies["examples"]],
            },
            "batches": {bid: t.to_dict() for bid, t in self.batches.items()},
        }


class _Anomalies:
    """Counts per kind plus a bounded sample, so a file full of junk cannot blow up the summary."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: list[dict[str, Any]] = []

    def add(
        self,
        tally: BatchTally,
        kind: str,
        custom_id: str | None,
        source: str,
        line: int,
        detail: str,
    ) -> None:
        n = self.counts.get(kind, 0)
        self.counts[kind] = n + 1
        tally.anomalies[kind] = tally.anomalies.get(kind, 0) + 1
        if n < MAX_ANOMALY_EXAMPLES:
            self.examples.append(
                {
                    "kind": kind,
                    "batch_id": tally.batch_id,
                    "custom_id": custom_id,
                    "source": source,
                    "line": line,
                    "detail": detail,
                }
            )


def _error_fields(obj: dict[str, Any], response: Any) -> tuple[int | None, str, str]:
    """``(status_code, error_code, error_message)`` of a failed result line."""
    if isinstance(response, dict):
        status = response.get("status_code")
        status = status if type(status) is int else None
        body = response.get("body")
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            # A 2xx response next to a non-null ``error``: the error object is what explains the failure.
            err = obj.get("error") if isinstance(obj.get("error"), dict) else {}
        code = err.get("code")
        message = err.get("message")
        if not code:
            code = f"http_{status}" if status is not None else "error"
        if not message:
            message = f"HTTP {status}" if status is not None else "The request failed without a message."
        return status, str(code), str(message)
    err = obj.get("error")
    err = err if isinstance(err, dict) else {}
    code = err.get("code") or "error"
    message = err.get("message") or "The request failed without a message."
    return None, str(code), str(message)


class Reconciler:
    """Reconcile batches one after another into a :class:`RecordSink`, keeping totals.

    :param sink: receives every success and failure record as soon as it is known.
    :param work_dir: a local folder for the per-batch copy of the input file (deleted after each batch).
    :param endpoint: the batch endpoint, for the convenience field; when ``None`` each batch's first input
        line's ``url`` decides.
    """

    def __init__(self, sink: RecordSink, work_dir: Path, endpoint: str | None = None) -> None:
        self.sink = sink
        self.work_dir = Path(work_dir)
        self.endpoint = endpoint
        self._tallies: dict[str, BatchTally] = {}
        self._usage_by_model: dict[str, dict[str, int]] = {}
        self._anomalies = _Anomalies()
        #: How result blocks are scanned, set when the helper process starts (see _maybe_start_helper).
        self._scanner: Any = None
        #: Whether failure records carry the parsed request (see RecordSink.write_failure).
        self._parse_requests = True
        #: The batch's helper process, if one runs; whether one is to start once the input proves large.
        self._helper: BlockHelper | None = None
        self._helper_wanted = False

    # -- public -----------------------------------------------------------------------------------

    def add_batch(self, files: BatchResultFiles) -> BatchTally:
        """Reconcile one batch: write its records to the sink and return its tally.

        If reading a source raises (e.g. a dropped download), the exception propagates, the batch is not
        counted and the sink holds part of its records: abort the sink and start over.

        :param files: the batch's status and line sources.
        :raises ValueError: if the same batch id was already added (its records would count twice).
        """
        if files.batch_id in self._tallies:
            raise ValueError(f"batch {files.batch_id!r} was already reconciled")
        # A BatchStatus member is a str, but str() of it is "BatchStatus.EXPIRED" before Python 3.12.
        status = str(getattr(files.status, "value", files.status))
        tally = BatchTally(batch_id=files.batch_id, status=status, model=files.model)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp_path = self.work_dir / f".input-{uuid.uuid4().hex}.jsonl"
        # A sink that keeps the request line as it is (Parquet) does without the parsed request.
        needs_requests = getattr(self.sink, "needs_parsed_requests", None)
        self._parse_requests = not callable(needs_requests) or bool(needs_requests())
        self._plan_helper(files)
        # The output's first blocks go to the helper while the input is still being copied: scanning them
        # needs no index, so the helper works from the start instead of waiting for the join.
        ahead = _ResultsAhead(files.output_lines) if files.output_lines is not None else None
        try:
            with gc_paused():
                index, bad_lines, dup_lines, first_request = self._copy_input(
                    files,
                    tmp_path,
                    tally,
                    between_slabs=None if ahead is None else (lambda: self._send_ahead(ahead)),
                )
                requests = _Requests(index)
                self._learn_model_and_endpoint(tally, first_request)
                with open(tmp_path, "rb") as reader:
                    fetch = _RequestFetcher(reader)
                    if files.output_lines is not None:
                        self._read_results(files.output_lines, "output", requests, fetch, tally, ahead)
                    if files.error_lines is not None:
                        self._read_results(files.error_lines, "error", requests, fetch, tally)
                    self._write_absent(requests, bad_lines, dup_lines, fetch, tally)
        except BaseException:
            if self._helper is not None:
                self._helper.close(kill=True)
            raise
        finally:
            if self._helper is not None:
                self._helper.close()
                self._helper = None
            tmp_path.unlink(missing_ok=True)
        self._tallies[files.batch_id] = tally
        return tally

    def summary(self) -> ReconcileSummary:
        """Totals across the batches added so far."""
        failed_by_code: dict[str, int] = {}
        usage = _empty_usage()
        for tally in self._tallies.values():
            for code, n in tally.failed_by_code.items():
                failed_by_code[code] = failed_by_code.get(code, 0) + n
            for key in _USAGE_KEYS:
                usage[key] += tally.usage[key]
        return ReconcileSummary(
            batch_ids=list(self._tallies),
            total=sum(t.total for t in self._tallies.values()),
            succeeded=sum(t.succeeded for t in self._tallies.values()),
            failed=sum(t.failed for t in self._tallies.values()),
            failed_by_code=failed_by_code,
            usage=usage,
            usage_by_model={m: dict(u) for m, u in self._usage_by_model.items()},
            anomalies={"counts": dict(self._anomalies.counts), "examples": list(self._anomalies.examples)},
            batches=dict(self._tallies),
        )

    # -- steps ------------------------------------------------------------------------------------

    def _learn_model_and_endpoint(self, tally: BatchTally, first_request: Any) -> None:
        """The batch's model (unless given) and endpoint (unless the Reconciler has one) from its input."""
        if tally.model is None and isinstance(first_request, dict):
            body = first_request.get("body")
            model = body.get("model") if isinstance(body, dict) else None
            tally.model = model if isinstance(model, str) else None
        if self.endpoint is not None:
            tally.endpoint = self.endpoint
        elif isinstance(first_request, dict) and isinstance(first_request.get("url"), str):
            tally.endpoint = first_request["url"]

    def _block_format(self) -> str | None:
        """``jsonl`` / ``parquet`` when the sink takes whole blocks of successes, else ``None``."""
        fmt = getattr(self.sink, "success_block_format", None)
        takes_blocks = getattr(self.sink, "takes_success_blocks", None)
        if fmt not in ("jsonl", "parquet") or not callable(takes_blocks) or not takes_blocks():
            return None
        return fmt

    def _plan_helper(self, files: BatchResultFiles) -> None:
        """Whether a helper process scans this batch's result blocks too (see :class:`_ResultScanner`): only
        into a sink that takes whole blocks, and only for a large batch. Known to be large by its request
        count, the helper starts now and imports while the input is copied, so it is ready for the first
        result block; of unknown size, once the input proves large (:meth:`_maybe_start_helper`)."""
        self._helper = None
        fmt = self._block_format()
        self._helper_wanted = fmt is not None and (
            files.output_lines is not None or files.error_lines is not None
        )
        expected = files.expected_results
        if self._helper_wanted and isinstance(expected, int):
            self._helper_wanted = False
            if expected >= _RESULT_HELPER_MIN[str(fmt)][0]:
                self._helper = self._start_helper()

    def _start_helper(self) -> BlockHelper | None:
        return BlockHelper.start(_RESULTS_FACTORY, None, preload=_results_preload(self._block_format()))

    def _maybe_start_helper(self, copied: int, tally: BatchTally, first_request: Any) -> None:
        """Configure the helper started early, or start one once the input proves large (its results
        will be at least as large). Either needs the first request: it tells the model and endpoint."""
        if first_request is None:
            return
        helper = self._helper
        if helper is None:
            if not self._helper_wanted or copied < _RESULT_HELPER_MIN[str(self._block_format())][1]:
                return
            self._helper_wanted = False
            helper = self._helper = self._start_helper()
            if helper is None:
                return
        elif helper.configured:
            return
        probe = BatchTally(batch_id=tally.batch_id, status=tally.status, model=tally.model)
        self._learn_model_and_endpoint(probe, first_request)
        config = orjson.dumps(
            {
                "batch_id": tally.batch_id,
                "model": probe.model or "unknown",
                "kind": endpoint_kind(probe.endpoint),
                "format": self._block_format(),
            }
        )
        helper.configure(config)
        # What the result blocks are scanned with, known now (the tally learns the same after the copy).
        self._scanner = _ResultScanner.from_config(config)

    def _ready_helper(self) -> BlockHelper | None:
        """The helper, if one runs and may be sent blocks."""
        helper = self._helper
        return helper if helper is not None and helper.configured else None

    def _results_pipeline(
        self, helper: BlockHelper | None, scanner: _ResultScanner, apply: Any
    ) -> BlockPipeline:
        """A pipeline that scans result blocks here or in ``helper`` and applies them in order."""

        def work(unit: _Unit) -> _ScanResult | None:
            lines = unit.get_lines()
            return scanner.scan(lines) if all(type(line) is bytes for line in lines) else None

        return BlockPipeline(
            helper,
            work,
            _ScanResult.decode,
            apply,
            inflight=_RESULT_INFLIGHT,
            max_inflight=_RESULT_MAX_INFLIGHT,
            max_pending=_RESULT_MAX_PENDING,
            timeout=_RESULT_HELPER_TIMEOUT,
        )

    def _send_ahead(self, ahead: _ResultsAhead) -> None:
        """Between input slabs: send the output's next blocks to the helper while it has room."""
        helper = self._ready_helper()
        if helper is None or ahead.finished:
            return
        if ahead.pipeline is None:
            ahead.pipeline = self._results_pipeline(helper, self._scanner, None)
        while True:
            unit = ahead.peek()
            if unit is None or not ahead.pipeline.send_ahead(unit, unit.sendable(), _RESULT_AHEAD_BLOCKS):
                return
            ahead.taken()

    def _copy_input(
        self,
        files: BatchResultFiles,
        tmp_path: Path,
        tally: BatchTally,
        between_slabs: Callable[[], None] | None = None,
    ) -> tuple[dict[str, int], list[tuple[int, int]], list[tuple[str, int, int | None]], Any]:
        """Copy the input lines to ``tmp_path`` and index them.

        Lines are taken in slabs of a few thousand. A slab whose lines all start with ``{"custom_id":``
        (what orjson, ``JSON.stringify`` and ``json.dumps`` write, and what the submit operator uploads)
        is indexed by one regex scan and a few C-level calls: no per-line Python, no parse of request
        bodies. Any other slab (blank lines, another key order, escapes in an id, duplicates, broken
        lines) goes through :meth:`_index_lines`, line by line. Straight from
        :func:`~airflow_openai_batch.core.jsonl.iter_lines`, the slabs are the raw blocks read.

        :param between_slabs: called after each slab (the helper process, once started, is meanwhile
            given result blocks to scan ahead).

        :return: ``(index, bad_lines, dup_lines, first_request)``: ``index`` maps custom_id -> offset of
            its line in ``tmp_path``; ``bad_lines`` are ``(line_no, offset)`` of lines without a usable
            custom_id; ``dup_lines`` are ``(custom_id, offset, line_no)`` of repeated custom_ids;
            ``first_request`` is the first line parsed (for ``url`` and ``body.model``).
        """
        index: dict[str, int] = {}
        bad_lines: list[tuple[int, int]] = []
        dup_lines: list[tuple[str, int, int | None]] = []
        first_request: Any = None
        offset = 0  # where the next line goes in the copy
        line_no = 0  # source lines consumed so far (blank ones included, for 1-based line numbers)
        count = 0

        def add_ids(ids: list[str], lengths: Iterable[int], data: bytes, lines: int) -> bool:
            """Index ``lines`` lines (``data``, newline-terminated) whose ids and lengths are known."""
            nonlocal index, dup_lines, offset, count
            # Offset of line i: offset + the lengths of the lines before it + i newlines. (One value
            # more than lines: the end of the slab, dropped by zip.)
            offsets = map(operator.add, itertools.accumulate(lengths, initial=offset), itertools.count())
            before = len(index)
            index.update(zip(ids, offsets, strict=False))
            if len(index) - before == lines:
                out.write(data)
                offset += len(data)
                count += lines
                return True
            # A custom_id seen twice (in this slab or before): update() kept the later offset, so
            # rebuild the index from the copy so far and take the slab slowly. Rare: OpenAI fails such
            # a batch at validation. (The rebuild finds the repeats already copied again, without their
            # line numbers: those known are kept.)
            known = {off: no for _, off, no in dup_lines}
            out.flush()
            index, dup_lines = _index_copy(tmp_path, bad_lines)
            dup_lines = [(cid, off, known.get(off, no)) for cid, off, no in dup_lines]
            return False

        def add_slab(slab: list[bytes], data: bytes | None = None, fast: bool = True) -> None:
            nonlocal offset, count, line_no, first_request
            if first_request is None:
                first_request = _first_request(slab)
            base_no = line_no
            line_no += len(slab)
            if self._helper_wanted or (self._helper is not None and not self._helper.configured):
                self._maybe_start_helper(offset, tally, first_request)
            if fast and all(slab):
                if data is None:
                    slab.append(b"")
                    data = b"\n".join(slab)
                    slab.pop()
                scanned = _scan_input(slab)
                if scanned is not None and add_ids(scanned.ids, scanned.lengths, data, len(slab)):
                    return
            written, offset = self._index_lines(slab, base_no, offset, out, index, bad_lines, dup_lines)
            count += written

        with open(tmp_path, "wb", buffering=1 << 20) as out:
            for unit in _units(files.input_lines, input_file=True):
                add_slab(unit.get_lines(), unit.data)
                if between_slabs is not None:
                    between_slabs()
        tally.total += count
        return index, bad_lines, dup_lines, first_request

    @staticmethod
    def _index_lines(
        lines: list[bytes],
        base_no: int,
        offset: int,
        out: Any,
        index: dict[str, int],
        bad_lines: list[tuple[int, int]],
        dup_lines: list[tuple[str, int, int | None]],
    ) -> tuple[int, int]:
        """The careful path of :meth:`_copy_input`: one line at a time.

        :return: ``(lines written, offset after them)``.
        """
        written = 0
        pending: list[bytes] = []
        for i, line in enumerate(lines):
            if not line or not line.strip():
                continue  # blank lines are not requests
            cid: Any = None
            try:
                obj = _loads(line)
            except _JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                cid = obj.get("custom_id")
            if not isinstance(cid, str) or not cid:
                bad_lines.append((base_no + i + 1, offset))
            elif index.setdefault(cid, offset) != offset:
                # Offsets only grow, so a different stored offset means an earlier line had this id.
                dup_lines.append((cid, offset, base_no + i + 1))
            pending.append(line)
            offset += len(line) + 1
            written += 1
        if pending:
            pending.append(b"")
            out.write(b"\n".join(pending))
        return written, offset

    def _read_results(
        self,
        lines: Iterable[bytes],
        source: str,
        requests: _Requests,
        fetch: _RequestFetcher,
        tally: BatchTally,
        ahead: _ResultsAhead | None = None,
    ) -> None:
        """Stream one result file: write a record per first result of each known custom_id.

        Straight from :func:`~airflow_openai_batch.core.jsonl.iter_lines` into a sink that takes whole
        blocks (:class:`~airflow_openai_batch.core.writers.ResultWriter`), the file is read as raw blocks:
        each is scanned by :class:`_ResultScanner` (here or in the helper process) and applied in order
        by :meth:`_apply_scan`. Otherwise, and for any block the scanner leaves to it, line by line.

        :param ahead: the file's blocks already sent to the helper while the input was copied, if any.
        """
        fmt = self._block_format()
        units: Iterable[_Unit]
        if ahead is not None and ahead.pipeline is not None:
            units = ahead.rest()
        elif fmt is None:
            # Lines the read-ahead may have taken (none when the sink takes no blocks: it never started).
            self._result_lines(lines, source, requests, fetch, tally, 0)
            return
        else:
            units = ahead.rest() if ahead is not None else _units(lines, input_file=False)
        applied = [0]  # lines applied so far (blank ones included, for 1-based line numbers)

        def apply(unit: _Unit, scan: _ScanResult | None) -> None:
            applied[0] = self._apply_scan(unit, scan, source, requests, fetch, tally, applied[0])

        if ahead is not None and ahead.pipeline is not None:
            pipeline = ahead.pipeline
            pipeline.release(apply)
        else:
            scanner = _ResultScanner(
                tally.batch_id, tally.model or "unknown", endpoint_kind(tally.endpoint), str(fmt)
            )
            pipeline = self._results_pipeline(self._ready_helper(), scanner, apply)
        for unit in units:
            pipeline.feed(unit, unit.sendable())
            if unit.lines is not None:
                # Joined only to be sent (the send keeps its own reference until written): while the
                # block waits for its answer, holding the lines is enough.
                unit.data = None
        pipeline.finish()

    def _apply_scan(
        self,
        unit: _Unit,
        scan: _ScanResult | None,
        source: str,
        requests: _Requests,
        fetch: _RequestFetcher,
        tally: BatchTally,
        line_no: int,
    ) -> int:
        """Apply one scanned block in file order; return the number of lines applied so far.

        The scan assumed every custom_id is in the input and answered once: when one is not (unknown,
        answered twice), or the scanner left the block to the careful path (``scan`` is ``None``), the
        block goes line by line through :meth:`_result_lines`, which reports what is wrong.
        """
        if scan is not None and unit.lines is not None and scan.count != len(unit.lines):
            scan = None  # lines with a newline inside: the careful path sees them as they are
        if scan is not None:
            ids = scan.ids
            # Set operations, each one C-level pass (about four times faster than a dict lookup per id):
            # every id of the block is unanswered so far and appears once in it, or the block goes line by
            # line.
            block = set(ids)
            unanswered = requests.unanswered
            if len(block) == len(ids) and block <= unanswered:
                unanswered -= block
                offsets = requests.offsets
                for i, status_code, code, message in scan.failures:
                    cid = ids[i]
                    self._fail(tally, fetch, offsets[cid], cid, status_code, code, message)
                if scan.succeeded:
                    self.sink.write_success_block(scan.payload, scan.succeeded)  # type: ignore[attr-defined]
                    tally.succeeded += scan.succeeded
                self._merge_usage(tally, {row[0]: row[1:] for row in scan.usage})
                return line_no + scan.count
        return self._result_lines(unit.get_lines(), source, requests, fetch, tally, line_no)

    def _merge_usage(self, tally: BatchTally, usage_acc: dict[str, Any]) -> None:
        t_usage = tally.usage
        for model, (inp, out, tot, cached) in usage_acc.items():
            per_model = self._usage_by_model.get(model)
            if per_model is None:
                per_model = self._usage_by_model[model] = _empty_usage()
            for target in (t_usage, per_model):
                target["input_tokens"] += inp
                target["output_tokens"] += out
                target["total_tokens"] += tot
                target["cached_input_tokens"] += cached

    def _result_lines(
        self,
        lines: Iterable[bytes],
        source: str,
        requests: _Requests,
        fetch: _RequestFetcher,
        tally: BatchTally,
        line_no: int,
    ) -> int:
        """Result lines one by one (``line_no``: lines before them); return the line count after them.

        This is the hot loop of a collect into other sinks (one iteration per request), hence the local
        aliases and the inlined usage arithmetic.
        """
        sink_success = self.sink.write_success
        anomalies = self._anomalies
        batch_id = tally.batch_id
        batch_model = tally.model or "unknown"
        kind = endpoint_kind(tally.endpoint)
        content_of = _CONTENT_EXTRACTORS.get(kind)
        embeddings = kind == "embeddings"
        offsets = requests.offsets
        answered = requests.unanswered.remove
        k_input, k_output, k_details = _usage_keys(kind)
        usage_acc: dict[str, list[int]] = {}
        last_model: Any = _UNSET  # not None: a body without "model" must still pick its accumulator
        acc: list[int] = []
        succeeded = 0
        for line in lines:
            line_no += 1
            try:
                obj = _loads(line)
                cid = obj["custom_id"]
            except (_JSONDecodeError, KeyError, TypeError, IndexError) as exc:
                if not line.strip():
                    continue  # blank line (e.g. Azure's zero-byte error file, a trailing newline)
                detail = f"{type(exc).__name__}: {exc}"[:200]
                anomalies.add(tally, "unparseable_result_line", None, source, line_no, detail)
                continue
            try:
                answered(cid)
            except (KeyError, TypeError):  # not waiting for an answer (or not even hashable)
                if type(cid) is not str:
                    detail = f"custom_id is {type(cid).__name__}, not a string"
                    anomalies.add(tally, "unparseable_result_line", None, source, line_no, detail)
                elif cid in offsets:
                    anomalies.add(
                        tally, "duplicate_result", cid, source, line_no, "an earlier result for it was kept"
                    )
                else:
                    anomalies.add(
                        tally, "unknown_custom_id", cid, source, line_no, "not in the batch's input"
                    )
                continue
            # Subscripts rather than .get(): this runs once per request. A null or odd response raises and
            # takes the failure path, which sorts out what it is.
            try:
                response = obj["response"]
                status = response["status_code"]
                ok = type(status) is int and 200 <= status < 300 and obj.get("error") is None
            except (KeyError, TypeError):
                response = obj.get("response")
                ok = False
            if not ok:
                status_code, code, message = _error_fields(obj, response)
                self._fail(tally, fetch, offsets[cid], cid, status_code, code, message)
                continue
            body = response.get("body")
            usage = body.get("usage") if type(body) is dict else None
            sink_success(success_record(cid, batch_id, status, body, usage, content_of, embeddings))
            succeeded += 1
            if usage is None:
                continue
            # Inlined usage_counts() for the usual shape of this endpoint's usage; anything else (missing
            # or null fields, embeddings' missing completion_tokens) takes the careful path.
            try:
                inp = usage[k_input]
                out = usage[k_output]
                tot = usage["total_tokens"]
                cached = usage[k_details]["cached_tokens"]
                _ = inp + out + tot + cached  # raises TypeError on a non-number before anything is added
            except (KeyError, TypeError):
                counts = usage_counts(usage)
                if counts is None:
                    continue
                inp, out, tot, cached = counts
            # Keyed by the response's model (the dated snapshot, and the real model behind an Azure
            # deployment name), which is what prices are found by.
            model = body.get("model")
            if model != last_model:
                last_model = model
                key = model if type(model) is str and model else batch_model
                acc = usage_acc.get(key)  # type: ignore[assignment]
                if acc is None:
                    acc = usage_acc[key] = [0, 0, 0, 0]
            acc[0] += inp
            acc[1] += out
            acc[2] += tot
            acc[3] += cached
        tally.succeeded += succeeded
        self._merge_usage(tally, usage_acc)
        return line_no

    def _write_absent(
        self,
        requests: _Requests,
        bad_lines: list[tuple[int, int]],
        dup_lines: list[tuple[str, int, int | None]],
        fetch: _RequestFetcher,
        tally: BatchTally,
    ) -> None:
        """Fail every input request that got no result (and the input lines that cannot be joined)."""
        code = _ABSENT_CODE_BY_STATUS.get(tally.status, "missing")
        message = _ABSENT_MESSAGES[code].format(status=tally.status)
        # The index is in file order, so the reads below walk the copy forwards.
        unanswered = requests.unanswered
        if unanswered:
            for cid, off in requests.offsets.items():
                if cid in unanswered:
                    self._fail(tally, fetch, off, cid, None, code, message)
        for cid, off, line_no in dup_lines:
            detail = "custom_id repeated: this line is failed, the first one is joined"
            self._anomalies.add(tally, "duplicate_input_custom_id", cid, "input", line_no, detail)
            self._fail(
                tally, fetch, off, cid, None, "duplicate_custom_id", "The input repeats this custom_id."
            )
        for line_no, off in bad_lines:
            self._anomalies.add(tally, "invalid_input_line", None, "input", line_no, "no usable custom_id")
            self._fail(
                tally,
                fetch,
                off,
                None,
                None,
                "invalid_input_line",
                f"Input line {line_no} is not a JSON object with a non-empty string custom_id.",
            )

    def _fail(
        self,
        tally: BatchTally,
        fetch: _RequestFetcher,
        offset: int,
        custom_id: str | None,
        status_code: int | None,
        code: str,
        message: str,
    ) -> None:
        request_line = fetch(offset)
        request = None
        if self._parse_requests:
            # None only for input lines that never were valid JSON.
            with contextlib.suppress(_JSONDecodeError):
                request = _loads(request_line)
        record = {
            "custom_id": custom_id,
            "batch_id": tally.batch_id,
            "status_code": status_code,
            "error_code": code,
            "error_message": message,
            "request": request,
        }
        self.sink.write_failure(record, request_line)
        tally.failed += 1
        tally.failed_by_code[code] = tally.failed_by_code.get(code, 0) + 1


def success_record(
    cid: str,
    batch_id: str,
    status: int,
    body: Any,
    usage: Any,
    content_of: Callable[[Any], str | None] | None,
    embeddings: bool,
) -> dict[str, Any]:
    """A success record: the response plus ``content`` (text endpoints) or ``embedding(s)`` (embeddings)."""
    record = {"custom_id": cid, "batch_id": batch_id, "status_code": status, "body": body, "usage": usage}
    if content_of is not None:
        record["content"] = content_of(body)
    elif embeddings:
        vectors = _embeddings(body)
        record["embedding"] = vectors[0] if vectors else None
        if vectors and len(vectors) > 1:
            record["embeddings"] = vectors
    return record


class _Unit(LineBlock):
    """Consecutive lines of a file (see :class:`LineBlock`), ready to be sent to the helper process."""

    __slots__ = ()

    def sendable(self) -> bytes | None:
        """The bytes a helper can split back into exactly these lines, or ``None``.

        Lines with a CR (which the helper cannot tell from a CRLF ending) or that are not bytes stay
        here.
        """
        try:
            data = self.get_data()
        except TypeError:
            return None
        return None if b"\r" in data else data


def _units(source: Iterable[Any], *, input_file: bool) -> Iterator[_Unit]:
    """A file's lines in units of about ``_SLAB_BYTES``.

    Straight from :func:`~airflow_openai_batch.core.jsonl.iter_lines`, the units are the raw blocks read
    (no per-line objects until needed). Any other iterable of lines is taken in slabs; for the input file,
    lines with their newline (a file object) lose it, and a leading BOM is dropped, as the line-by-line
    path always did.
    """
    if isinstance(source, LineIterator):
        raw = source.take_raw_blocks()
        if raw is not None:
            for data in raw:
                # CRLF lines lose their CR, as iter_lines yields them.
                yield _Unit(split_block(data), None) if b"\r" in data else _Unit(None, data)
            return
    lines = iter(source)
    size = 256  # grows to about _SLAB_BYTES per slab once the line size is known
    first = True
    strip_newlines = False
    while True:
        slab = list(itertools.islice(lines, size))
        if not slab:
            return
        if input_file:
            if first:
                # Iterating a file object keeps each line's newline; the project's iter_lines does not.
                strip_newlines = slab[0].endswith(b"\n")
                if slab[0].startswith(_BOM):
                    slab[0] = slab[0][3:]
            if strip_newlines:
                slab = [line.rstrip(b"\r\n") for line in slab]
        first = False
        # Size slabs by bytes, not lines: requests with long documents must not make one slab hold tens
        # of megabytes.
        try:
            slab_bytes = sum(map(len, slab)) or 1
        except TypeError:
            slab_bytes = _SLAB_BYTES
        size = max(16, min(_SLAB_MAX_LINES, len(slab) * _SLAB_BYTES // slab_bytes))
        yield _Unit(slab, None)


class _InputScan:
    """The custom_ids and line lengths of a block of input lines (see :func:`_scan_input`)."""

    __slots__ = ("ids", "lengths")

    def __init__(self, ids: list[str], lengths: Iterable[int]) -> None:
        self.ids = ids
        self.lengths = lengths


def _scan_input(lines: list[bytes]) -> _InputScan | None:
    """The ids of input lines that all start with ``{"custom_id":"<id>"`` (else ``None``).

    Only the start of each line is searched (not the request bodies), joined with a newline before
    each. Each match starts at a newline, so as many matches as lines means every line starts with
    {"custom_id":"<id>" and ids[i] is line i's. (An id longer than the head does not match, and its
    slab takes the careful path.)
    """
    if not all(lines):
        return None
    ids = _FAST_ID_RE.findall(b"\n".join(itertools.chain((b"",), map(_line_head, lines))))
    if len(ids) != len(lines):
        return None
    try:
        keys = list(map(bytes.decode, ids))
    except UnicodeDecodeError:
        return None
    return _InputScan(keys, list(map(len, lines)))


class _ScanResult:
    """What :class:`_ResultScanner` made of a block of result lines (see :meth:`Reconciler._apply_scan`).

    :param ids: the custom_id of every line, in order.
    :param count: the number of lines.
    :param failures: ``[line index, status_code, error_code, error_message]`` of the failed lines.
    :param usage: ``[model, input, output, total, cached_input]`` token sums of the successes, per model.
    :param succeeded: the number of successes.
    :param payload: the success records in the sink's block form (JSON lines, or an Arrow batch).
    """

    __slots__ = ("count", "failures", "ids", "payload", "succeeded", "usage")

    def __init__(
        self,
        ids: list[str],
        count: int,
        failures: list[list[Any]],
        usage: list[list[Any]],
        succeeded: int,
        payload: bytes,
    ) -> None:
        self.ids = ids
        self.count = count
        self.failures = failures
        self.usage = usage
        self.succeeded = succeeded
        self.payload = payload

    def encode(self) -> tuple[bytes, Any]:
        """The answer in two parts (see :func:`~airflow_openai_batch.core.jsonl._helper_main`), so the
        payload, most of it, is not copied into one bytes object."""
        meta = orjson.dumps([self.ids, self.count, self.failures, self.usage, self.succeeded])
        return meta + b"\n", self.payload

    @classmethod
    def decode(cls, answer: bytes) -> _ScanResult | None:
        if not answer:
            return None
        cut = answer.index(b"\n")
        ids, count, failures, usage, succeeded = orjson.loads(memoryview(answer)[:cut])
        # A view, not a copy: the payload is most of the answer.
        return cls(ids, count, failures, usage, succeeded, memoryview(answer)[cut + 1 :])


class _ResultScanner:
    """Turns a block of result lines into a :class:`_ScanResult`, without the input index.

    It makes exactly the records :meth:`Reconciler._result_lines` would for lines whose custom_id is in
    the input and answered once (which :meth:`Reconciler._apply_scan` then checks), so a block can be
    scanned anywhere (here or in the helper process) and applied in order. Any line that needs more care
    (blank, not JSON, no string custom_id) makes it answer ``None``: the block then goes line by line.
    """

    def __init__(self, batch_id: str, batch_model: str, kind: str, output_format: str) -> None:
        self.batch_id = batch_id
        self.batch_model = batch_model
        self.kind = kind
        self.output_format = output_format

    @classmethod
    def from_config(cls, config: bytes) -> _ResultScanner:
        """A scanner from the JSON settings the helper process is started with."""
        settings = orjson.loads(config)
        return cls(settings["batch_id"], settings["model"], settings["kind"], settings["format"])

    def scan(self, lines: list[bytes]) -> _ScanResult | None:
        loads = _loads
        batch_id = self.batch_id
        batch_model = self.batch_model
        content_of = _CONTENT_EXTRACTORS.get(self.kind)
        embeddings = self.kind == "embeddings"
        jsonl = self.output_format == "jsonl"
        dumps = orjson.dumps
        k_input, k_output, k_details = _usage_keys(self.kind)
        ids: list[str] = []
        add_id = ids.append
        failures: list[list[Any]] = []
        # The JSON lines are appended to one buffer as they are made: kept as separate bytes objects until
        # a final join, hundreds of kilobyte-sized allocations stay alive at once, which makes each one
        # slower (measured: the whole scan took twice as long).
        records = bytearray()
        rows: Any = None
        if not jsonl:
            # Parquet: straight into the writer's column buffers, without a record dict per row.
            from airflow_openai_batch.core.writers import success_block, success_columns

            rows = success_columns()
            add_row = rows.add_row
        succeeded = 0
        usage_acc: dict[str, list[int]] = {}
        for line in lines:
            try:
                obj = loads(line)
                cid = obj["custom_id"]
            except Exception:
                return None
            if type(cid) is not str:
                return None
            add_id(cid)
            try:
                response = obj["response"]
                status = response["status_code"]
                ok = type(status) is int and 200 <= status < 300 and obj.get("error") is None
            except (KeyError, TypeError):
                response = obj.get("response")
                ok = False
            if not ok:
                failures.append([len(ids) - 1, *_error_fields(obj, response)])
                continue
            body = response.get("body")
            usage = body.get("usage") if type(body) is dict else None
            succeeded += 1
            if not jsonl:
                if content_of is not None:
                    add_row(cid, batch_id, status, body, usage, content_of(body), None)
                elif embeddings:
                    vectors = _embeddings(body)
                    add_row(cid, batch_id, status, body, usage, None, vectors[0] if vectors else None)
                else:
                    add_row(cid, batch_id, status, body, usage, None, None)
            else:
                record = success_record(cid, batch_id, status, body, usage, content_of, embeddings)
                records += dumps(record, option=_APPEND_NEWLINE)
            if usage is None:
                continue
            # The same arithmetic as Reconciler._result_lines.
            try:
                inp = usage[k_input]
                out = usage[k_output]
                tot = usage["total_tokens"]
                cached = usage[k_details]["cached_tokens"]
                _ = inp + out + tot + cached
            except (KeyError, TypeError):
                counts = usage_counts(usage)
                if counts is None:
                    continue
                inp, out, tot, cached = counts
            model = body.get("model")
            key = model if type(model) is str and model else batch_model
            acc = usage_acc.get(key)
            if acc is None:
                acc = usage_acc[key] = [0, 0, 0, 0]
            acc[0] += inp
            acc[1] += out
            acc[2] += tot
            acc[3] += cached
        # Kept as made (a bytearray, an Arrow buffer): written out as they are, not copied.
        payload = records if jsonl else success_block(rows)
        usage_rows = [[key, *acc] for key, acc in usage_acc.items()]
        return _ScanResult(ids, len(lines), failures, usage_rows, succeeded, payload)


def _results_preload(output_format: str | None) -> tuple[str, ...]:
    """What the helper imports before its config comes: all it needs for ``output_format`` blocks."""
    return ("airflow_openai_batch.core.writers", "pyarrow") if output_format == "parquet" else ()


def _results_handler(config: bytes) -> Callable[[bytes], bytes]:
    """In the helper process (see :class:`~airflow_openai_batch.core.jsonl.BlockHelper`): scan blocks of
    a result file (:class:`_ResultScanner`)."""
    scanner = _ResultScanner.from_config(config)

    def handle(data: bytes) -> bytes | tuple[bytes, Any]:
        result = scanner.scan(lines_of(data))
        return b"" if result is None else result.encode()

    return handle


class _ResultsAhead:
    """A result file's blocks, some of them sent to the helper before the join can start.

    :param lines: the file's lines (read only once the first block is asked for).
    """

    def __init__(self, lines: Iterable[bytes]) -> None:
        self._units = _units(lines, input_file=False)
        self._next: _Unit | None = None
        self.finished = False
        #: The pipeline the blocks were sent through (``None`` while none was).
        self.pipeline: BlockPipeline | None = None

    def peek(self) -> _Unit | None:
        """The next block, kept until :meth:`taken`; ``None`` at the end of the file."""
        if self._next is None and not self.finished:
            self._next = next(self._units, None)
            self.finished = self._next is None
        return self._next

    def taken(self) -> None:
        self._next = None

    def rest(self) -> Iterator[_Unit]:
        """The blocks not taken yet."""
        if self._next is not None:
            unit, self._next = self._next, None
            yield unit
        if not self.finished:
            yield from self._units


class _RequestFetcher:
    """Read one request line back from the local input copy by offset.

    One ``pread`` per line (no seek, no buffer refill): failures are fetched in file order but far apart,
    so a buffered reader would read and drop a whole buffer for each one.
    """

    #: Bytes read at first; a longer line is read again with a larger size.
    _FIRST_READ = 4096

    def __init__(self, reader: Any) -> None:
        self._fd = reader.fileno()

    def __call__(self, offset: int) -> bytes:
        size = self._FIRST_READ
        while True:
            data = os.pread(self._fd, size, offset)
            end = data.find(b"\n")
            if end >= 0:
                return data[:end]
            if len(data) < size:
                return data  # the end of the copy (every line in it ends with a newline, though)
            size *= 4


def _first_request(lines: list[bytes]) -> Any:
    """The first non-blank line, parsed (``False`` when it does not parse): its url and body.model."""
    for line in lines:
        if line and line.strip():
            try:
                return _loads(line)
            except _JSONDecodeError:
                return False
    return None


def _index_copy(
    tmp_path: Path, bad_lines: list[tuple[int, int]]
) -> tuple[dict[str, int], list[tuple[str, int, int | None]]]:
    """Index the input copy (as written so far) from scratch, first occurrence first.

    :return: ``(index, dup_lines)``; a duplicate's source line number is not known here (None).
    """
    bad_offsets = {off for _, off in bad_lines}
    index: dict[str, int] = {}
    dup_lines: list[tuple[str, int, int | None]] = []
    offset = 0
    with open(tmp_path, "rb") as copy:
        for line in copy:
            if offset not in bad_offsets:
                cid = _loads(line)["custom_id"]  # lines in the copy with a good custom_id only
                if index.setdefault(cid, offset) != offset:
                    dup_lines.append((cid, offset, None))
            offset += len(line)
    return index, dup_lines


class _Requests:
    """A batch's input requests as the join sees them.

    :param offsets: custom_id -> offset of its line in the input copy, in file order.
    """

    __slots__ = ("offsets", "unanswered")

    def __init__(self, offsets: dict[str, int]) -> None:
        self.offsets = offsets
        #: The ids no result has answered yet. A set rather than taking ids out of ``offsets``: checking
        #: and removing a block's ids is a few C-level set operations, several times faster than one dict
        #: lookup per id, and ``offsets`` stays whole to tell a repeated result from an unknown one.
        self.unanswered = set(offsets)


#: Endpoint kinds whose convenience field is ``content``: the function that reads it from a body.
_CONTENT_EXTRACTORS: dict[str, Callable[[Any], str | None]] = {
    "chat": _content_chat,
    "completions": _content_completions,
    "responses": _content_responses,
}
