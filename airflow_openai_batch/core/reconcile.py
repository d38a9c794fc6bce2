"""Join a batch's input requests with its result lines by ``custom_id`` (no Airflow import, no network).

Every input request ends up in exactly one of two record streams, written to a :class:`RecordSink` as
soon as it is known:

- a *success* record for each 2xx result line;
- a *failure* record for each error line (HTTP 4xx/5xx or non-HTTP ``error``) and for each input
  request that no result file mentions (``batch_expired`` / ``batch_cancelled`` / ``batch_failed`` /
  ``missing`` according to the batch's final status).

Result files are streamed line by line and never held in memory. The only per-request state is an index
``custom_id -> byte offset`` into a local copy of the input file, which is what lets a failure carry the
original request line (for the retry file) without keeping request bodies in memory.

Anomalies in the result files (a ``custom_id`` reported twice, a ``custom_id`` the input never had, a
line that does not parse, such as a truncated last line) are counted and sampled in the summary; they
never crash the run and are never silently merged: the first result for an id wins.
"""

from __future__ import annotations

import array
import base64
import contextlib
import gc
import itertools
import operator
import re
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

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
_SLAB_BYTES = 2 * 1024 * 1024
_SLAB_MAX_LINES = 8192
#: The start of a line, where the fast path looks for the custom_id.
_line_head = operator.itemgetter(slice(0, 256))
_BOM = b"\xef\xbb\xbf"
_UNSET = object()

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


class RecordSink(Protocol):
    """Where reconciled records go (e.g. :class:`airflow_openai_batch.core.writers.ResultWriter`)."""

    def write_success(self, record: dict[str, Any]) -> None: ...

    def write_failure(self, record: dict[str, Any], request_line: bytes) -> None:
        """:param request_line: the request exactly as in the input file (no newline), for retries."""
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
    """

    batch_id: str
    status: str
    input_lines: Iterable[bytes]
    output_lines: Iterable[bytes] | None
    error_lines: Iterable[bytes] | None
    model: str | None = None


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
        try:
            with _gc_paused():
                index, bad_lines, dup_lines, first_request = self._copy_input(files, tmp_path, tally)
                if tally.model is None and isinstance(first_request, dict):
                    body = first_request.get("body")
                    model = body.get("model") if isinstance(body, dict) else None
                    tally.model = model if isinstance(model, str) else None
                if self.endpoint is not None:
                    tally.endpoint = self.endpoint
                elif isinstance(first_request, dict) and isinstance(first_request.get("url"), str):
                    tally.endpoint = first_request["url"]
                with open(tmp_path, "rb") as reader:
                    fetch = _RequestFetcher(reader)
                    if files.output_lines is not None:
                        self._read_results(files.output_lines, "output", index, fetch, tally)
                    if files.error_lines is not None:
                        self._read_results(files.error_lines, "error", index, fetch, tally)
                    self._write_absent(index, bad_lines, dup_lines, fetch, tally)
        finally:
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

    def _copy_input(
        self, files: BatchResultFiles, tmp_path: Path, tally: BatchTally
    ) -> tuple[dict[str, int], list[tuple[int, int]], list[tuple[str, int, int | None]], Any]:
        """Copy the input lines to ``tmp_path`` and index them.

        Lines are taken in slabs of a few thousand. A slab whose lines all start with ``{"custom_id":``
        (what orjson, ``JSON.stringify`` and ``json.dumps`` write, and what the submit operator uploads)
        is indexed by one regex scan and a few C-level calls: no per-line Python, no parse of request
        bodies. Any other slab (blank lines, another key order, escapes in an id, duplicates, broken
        lines) goes through :meth:`_index_lines`, line by line.

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
        strip_newlines = False
        find_ids = _FAST_ID_RE.findall
        source = iter(files.input_lines)
        slab_lines = 256  # grows to about _SLAB_BYTES per slab once the line size is known
        with open(tmp_path, "wb", buffering=1 << 20) as out:
            while True:
                slab = list(itertools.islice(source, slab_lines))
                if not slab:
                    break
                if line_no == 0:
                    # Iterating a file object keeps each line's newline; the project's iter_lines does not.
                    strip_newlines = slab[0].endswith(b"\n")
                    if slab[0].startswith(_BOM):
                        slab[0] = slab[0][3:]
                if strip_newlines:
                    slab = [line.rstrip(b"\r\n") for line in slab]
                if first_request is None:
                    first_request = _first_request(slab)
                base_no = line_no
                line_no += len(slab)
                # Size slabs by bytes, not lines: requests with long documents must not make one slab
                # hold tens of megabytes.
                slab_bytes = sum(map(len, slab)) or 1
                slab_lines = max(16, min(_SLAB_MAX_LINES, len(slab) * _SLAB_BYTES // slab_bytes))
                if all(slab):
                    slab.append(b"")
                    data = b"\n".join(slab)
                    slab.pop()
                    # Only the start of each line is searched (not the request bodies), joined with a
                    # newline before each. Each match starts at a newline, so len(ids) == len(slab) means
                    # every line starts with {"custom_id":"<id>" and ids[i] is line i's. (An id longer than
                    # the head does not match, and its slab takes the careful path.)
                    ids = find_ids(b"\n".join(itertools.chain((b"",), map(_line_head, slab))))
                    if len(ids) == len(slab):
                        # Offset of line i: offset + the lengths of the lines before it + i newlines.
                        # (One value more than lines: the end of the slab, dropped by zip.)
                        offsets = map(
                            operator.add,
                            itertools.accumulate(map(len, slab), initial=offset),
                            itertools.count(),
                        )
                        try:
                            keys = list(map(bytes.decode, ids))
                        except UnicodeDecodeError:
                            keys = None
                        if keys is not None:
                            before = len(index)
                            index.update(zip(keys, offsets, strict=False))
                            if len(index) - before == len(keys):
                                out.write(data)
                                offset += len(data)
                                count += len(slab)
                                continue
                            # A custom_id seen twice (in this slab or before): update() kept the later
                            # offset, so rebuild the index from the copy so far and take the slab slowly.
                            # Rare: OpenAI fails such a batch at validation.
                            index, dup_lines = self._reindex_copy(out, tmp_path, bad_lines)
                written, offset = self._index_lines(slab, base_no, offset, out, index, bad_lines, dup_lines)
                count += written
        tally.total += count
        return index, bad_lines, dup_lines, first_request

    @staticmethod
    def _reindex_copy(
        out: Any, tmp_path: Path, bad_lines: list[tuple[int, int]]
    ) -> tuple[dict[str, int], list[tuple[str, int, int | None]]]:
        """Index the input copy written so far from scratch, first occurrence first.

        :return: ``(index, dup_lines)``; a duplicate's source line number is not known here (None).
        """
        out.flush()
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
        index: dict[str, int],
        fetch: _RequestFetcher,
        tally: BatchTally,
    ) -> None:
        """Stream one result file: write a record per first result of each known custom_id.

        This is the hot loop of a collect (one iteration per request), hence the local aliases and the
        inlined usage arithmetic.
        """
        sink_success = self.sink.write_success
        anomalies = self._anomalies
        batch_id = tally.batch_id
        batch_model = tally.model or "unknown"
        kind = endpoint_kind(tally.endpoint)
        content_of = _CONTENT_EXTRACTORS.get(kind)
        embeddings = kind == "embeddings"
        index_get = index.get
        if kind == "responses":
            k_input, k_output, k_details = "input_tokens", "output_tokens", "input_tokens_details"
        else:
            k_input, k_output, k_details = "prompt_tokens", "completion_tokens", "prompt_tokens_details"
        usage_acc: dict[str, list[int]] = {}
        last_model: Any = _UNSET  # not None: a body without "model" must still pick its accumulator
        acc: list[int] = []
        succeeded = 0
        line_no = 0
        for line in lines:
            line_no += 1
            try:
                obj = _loads(line)
                cid = obj["custom_id"]
                off = index_get(cid)
            except (_JSONDecodeError, KeyError, TypeError, IndexError) as exc:
                if not line.strip():
                    continue  # blank line (e.g. Azure's zero-byte error file, a trailing newline)
                detail = f"{type(exc).__name__}: {exc}"[:200]
                anomalies.add(tally, "unparseable_result_line", None, source, line_no, detail)
                continue
            if off is None:
                if type(cid) is str:
                    anomalies.add(
                        tally, "unknown_custom_id", cid, source, line_no, "not in the batch's input"
                    )
                else:
                    detail = f"custom_id is {type(cid).__name__}, not a string"
                    anomalies.add(tally, "unparseable_result_line", None, source, line_no, detail)
                continue
            if off < 0:
                anomalies.add(
                    tally, "duplicate_result", cid, source, line_no, "an earlier result for it was kept"
                )
                continue
            index[cid] = -1  # consumed: a later result for this id is a duplicate
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
                self._fail(tally, fetch, off, cid, status_code, code, message)
                continue
            body = response.get("body")
            usage = body.get("usage") if type(body) is dict else None
            if content_of is not None:
                record = {
                    "custom_id": cid,
                    "batch_id": batch_id,
                    "status_code": status,
                    "body": body,
                    "usage": usage,
                    "content": content_of(body),
                }
            elif embeddings:
                vectors = _embeddings(body)
                record = {
                    "custom_id": cid,
                    "batch_id": batch_id,
                    "status_code": status,
                    "body": body,
                    "usage": usage,
                    "embedding": vectors[0] if vectors else None,
                }
                if vectors and len(vectors) > 1:
                    record["embeddings"] = vectors
            else:
                record = {
                    "custom_id": cid,
                    "batch_id": batch_id,
                    "status_code": status,
                    "body": body,
                    "usage": usage,
                }
            sink_success(record)
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

    def _write_absent(
        self,
        index: dict[str, int],
        bad_lines: list[tuple[int, int]],
        dup_lines: list[tuple[str, int, int | None]],
        fetch: _RequestFetcher,
        tally: BatchTally,
    ) -> None:
        """Fail every input request that got no result (and the input lines that cannot be joined)."""
        code = _ABSENT_CODE_BY_STATUS.get(tally.status, "missing")
        message = _ABSENT_MESSAGES[code].format(status=tally.status)
        # Insertion order is file order, so the reads below walk the copy forwards.
        for cid, off in index.items():
            if off >= 0:
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
        try:
            request = _loads(request_line)
        except _JSONDecodeError:
            request = None  # only for input lines that never were valid JSON
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


class _RequestFetcher:
    """Read one request line back from the local input copy by offset."""

    def __init__(self, reader: Any) -> None:
        self._seek = reader.seek
        self._readline = reader.readline

    def __call__(self, offset: int) -> bytes:
        self._seek(offset)
        return self._readline()[:-1]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for the duration of one batch.

    Parsing creates a few container objects per line, which triggers a young-generation collection
    every hundred lines or so: ~20% of the reconcile time, for nothing, since the records built here are
    trees freed by reference counting. Collection resumes (and catches up) when the batch is done.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _first_request(lines: list[bytes]) -> Any:
    """The first non-blank line, parsed (``False`` when it does not parse): its url and body.model."""
    for line in lines:
        if line and line.strip():
            try:
                return _loads(line)
            except _JSONDecodeError:
                return False
    return None


#: Endpoint kinds whose convenience field is ``content``: the function that reads it from a body.
_CONTENT_EXTRACTORS: dict[str, Callable[[Any], str | None]] = {
    "chat": _content_chat,
    "completions": _content_completions,
    "responses": _content_responses,
}
