"""Join a batch's input requests with its result lines by ``custom_id`` (no Airflow import, no network).

Every input request ends up in exactly one of two record streams, written to a
:class:`~airflow_openai_batch.core.writers.RecordSink` as soon as it is known:

- a *success* record for each 2xx result line;
- a *failure* record for each error line (HTTP 4xx/5xx or non-HTTP ``error``), for each 2xx answer
  that is not usable (``invalid_output``, ``refusal``, ``truncated``, ``content_filter``: see
  :class:`~airflow_openai_batch.core.records.RecordBuilder`) and for each input
  request that no result file mentions (``batch_expired`` / ``batch_cancelled`` / ``batch_failed`` /
  ``missing`` according to the batch's final status).

How, per batch (:meth:`Reconciler.add_batch`):

1. The input file is copied to a local file and indexed ``custom_id -> offset`` (:class:`_InputIndex`).
   That index, and the set of ids not answered yet, is the only per-request state: a failure reads its
   request line back from the copy (for the retry file), so request bodies are never held in memory.
2. The output file, then the error file, are streamed line by line. A line is decoded into a typed
   view that reads only the join's fields and keeps the body as JSON text (:class:`_ResultLine`); the
   body's answer is read by :class:`~airflow_openai_batch.core.records.RecordBuilder`, which makes
   every record. A line the typed view does not fit takes the careful path, which names what is odd.
3. Requests left unanswered fail with the code of the batch's final status.

Anomalies in the result files (a ``custom_id`` reported twice, a ``custom_id`` the input never had, a
line that does not parse, such as a truncated last line) are counted and sampled in the summary; they
never crash the run and are never silently merged: the first result for an id wins.

Retries: a chunk's later attempts are batches of the requests an earlier attempt failed. Reconciled
from the last attempt to the first, each earlier one is given the ids a later one answered
(``skip_ids``), so each request is reported once, from its last attempt (``attempts`` on the record).
"""

from __future__ import annotations

import bisect
import itertools
import os
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import msgspec
import orjson

from airflow_openai_batch.core.jsonl import LineIterator, line_starts, unix_line_ends
from airflow_openai_batch.core.media import MediaSink
from airflow_openai_batch.core.records import (
    RecordBuilder,
    SuccessColumns,
    as_counts,
    endpoint_kind,
    error_fields,
    usage_counts,
)
from airflow_openai_batch.core.schema import AnswerSchema, RequestSchemas, StructuredAnswer
from airflow_openai_batch.core.schema import response_schema as _normalise_schema
from airflow_openai_batch.core.writers import RecordSink
from airflow_openai_batch.statuses import BatchStatus

__all__ = [
    "MAX_ANOMALY_EXAMPLES",
    "BatchResultFiles",
    "BatchTally",
    "ReconcileSummary",
    "Reconciler",
    "present_file_id",
]

#: Examples kept per anomaly kind (the counts are always complete).
MAX_ANOMALY_EXAMPLES = 100

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

_USAGE_KEYS: tuple[str, ...] = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
)

#: Failed requests' lines are read back from the input copy in spans of at most about this many bytes.
_SPAN_BYTES = 1 << 20
#: ... and a span ends where more than about this many bytes of lines not asked for come before the next
#: one: a read of its own costs less than copying them.
_SPAN_GAP_BYTES = 4 << 10
#: Failed requests whose records are made and written at once.
_FAILURES_AT_ONCE = 4096
#: Input lines are copied and indexed in slabs of about this many bytes (and at most so many lines).
_SLAB_BYTES = 512 * 1024
_SLAB_MAX_LINES = 8192
_BOM = b"\xef\xbb\xbf"


def present_file_id(file_id: str | None) -> str | None:
    """Return ``file_id``, or ``None`` when the batch has no such file.

    Azure reports a missing output/error file as ``""`` where OpenAI says ``null``.

    :param file_id: ``output_file_id`` / ``error_file_id`` as the API returned it.
    """
    return file_id or None


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
    :param attempt: which attempt of its chunk the batch is (1 for the first).
    :param total: input requests reported from this batch (non-blank input lines, less ``skipped``).
    :param succeeded: success records written.
    :param failed: failure records written.
    :param failed_by_code: ``{error_code: n}``, adding up to ``failed``.
    :param retried: successes of a batch that is a retry (``attempt > 1``).
    :param skipped: input requests left out because a later attempt answered them (``skip_ids``).
    :param usage: token sums over the successes and the unusable answers, which are billed too
        (``input_tokens``, ``output_tokens``, ``total_tokens``, ``cached_input_tokens``,
        ``reasoning_tokens``; cached tokens are part of the input, reasoning tokens part of the output).
    :param anomalies: ``{kind: n}`` of the anomalies found in this batch's files.
    """

    batch_id: str
    status: str
    model: str | None = None
    endpoint: str | None = None
    attempt: int = 1
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    failed_by_code: dict[str, int] = field(default_factory=dict)
    retried: int = 0
    skipped: int = 0
    usage: dict[str, int] = field(default_factory=_empty_usage)
    anomalies: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "status": self.status,
            "model": self.model,
            "endpoint": self.endpoint,
            "attempt": self.attempt,
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "failed_by_code": dict(self.failed_by_code),
            "retried": self.retried,
            "skipped": self.skipped,
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
    :param retried: requests that succeeded in a later attempt than the first.
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
    retried: int = 0

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
            "retried": self.retried,
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
        self, tally: BatchTally, kind: str, custom_id: str | None, source: str, line: int, detail: str
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


# -- the input ------------------------------------------------------------------------------------------


def _slabs(lines: Iterable[bytes]) -> Iterator[list[bytes]]:
    """Lines in lists of about ``_SLAB_BYTES``.

    Lines with their newline (iterating a file object) lose it, and a leading BOM is dropped, as
    :func:`~airflow_openai_batch.core.jsonl.iter_lines` does.
    """
    lines = iter(lines)
    size = 256  # grows to about _SLAB_BYTES per slab once the line size is known
    strip_newlines = None
    while slab := list(itertools.islice(lines, size)):
        if strip_newlines is None:
            strip_newlines = slab[0].endswith(b"\n")
            if slab[0].startswith(_BOM):
                slab[0] = slab[0][3:]
        if strip_newlines:
            slab = [line.rstrip(b"\r\n") for line in slab]
        # Sized by bytes, not lines: requests with long documents must not make a slab of many megabytes.
        size = max(16, min(_SLAB_MAX_LINES, len(slab) * _SLAB_BYTES // (sum(map(len, slab)) or 1)))
        yield slab


def _blocks(lines: Iterable[bytes]) -> Iterator[bytes]:
    """Lines in newline-terminated blocks of about a megabyte or less.

    From :func:`~airflow_openai_batch.core.jsonl.iter_lines` untouched, the blocks are the raw blocks
    read (no line is split out and joined again, and CRLF line ends are left as they are); from any other
    source, :func:`_slabs` joined.
    """
    if isinstance(lines, LineIterator):
        raw = lines.take_raw_blocks()
        if raw is not None:
            yield from raw
            return
    for slab in _slabs(lines):
        yield b"\n".join([*slab, b""])


def _lines_of(block: bytes) -> list[bytes]:
    """The lines of a :func:`_blocks` block, without newlines or CRs."""
    lines = block.split(b"\n")
    lines.pop()  # after the last newline
    if b"\r" in block:
        lines = [line.removesuffix(b"\r") for line in lines]
    return lines


class _RequestHead(msgspec.Struct, gc=False):
    """A request line read for its custom_id only (decoding skips the rest)."""

    custom_id: str


_decode_request_heads = msgspec.json.Decoder(_RequestHead).decode_lines


def _first_request(lines: list[bytes]) -> Any:
    """The first non-blank line, parsed (``False`` when it does not parse): its url and body.model."""
    for line in lines:
        if line.strip():
            try:
                return orjson.loads(line)
            except orjson.JSONDecodeError:
                return False
    return None


class _InputIndex:
    """A batch's input lines, copied to a local file and indexed by custom_id.

    :param path: where the copy goes (the caller deletes it).
    """

    def __init__(self, path: Path, endpoint: str | None = None, read_schemas: bool = True) -> None:
        self.path = path
        self._endpoint = endpoint
        self._read_schemas = read_schemas
        self._schemas: RequestSchemas | None = None
        #: What most requests asked their answer to be (the first line's), and the ids of the requests
        #: that asked for something else (chat and responses; see :class:`RequestSchemas`).
        self.default_schema: AnswerSchema | None = None
        self.schema_by_id: dict[str, AnswerSchema | None] = {}
        #: The distinct structured schemas asked for (by identity: equal formats share one object).
        self.asked: dict[int, AnswerSchema] = {}
        self._schema_known = False
        #: custom_id -> offset of its (first) line in the copy, in file order.
        self.offsets: dict[str, int] = {}
        #: ``(line number, offset)`` of lines without a usable custom_id.
        self.invalid: list[tuple[int, int]] = []
        #: ``(custom_id, offset, line number)`` of lines repeating an earlier line's custom_id.
        self.repeated: list[tuple[str, int, int]] = []
        #: The first non-blank line, parsed (see :func:`_first_request`).
        self.first_request: Any = None
        #: Non-blank lines: the requests.
        self.requests = 0
        self._end = 0  # bytes in the copy
        self._line_no = 0  # source lines read (blank ones included, for 1-based line numbers)
        #: Reads a block's request lines (custom_id, and what each asks when schemas are read).
        self._decode_heads = _decode_request_heads

    @property
    def size(self) -> int:
        """Bytes in the copy."""
        return self._end

    def copy(self, lines: Iterable[bytes]) -> None:
        """Copy and index ``lines``.

        A block whose lines are all JSON objects with a new, non-empty string custom_id is indexed by one
        typed decode (which skips the request bodies) and a few C-level calls; any other goes line by
        line (blank lines, broken lines, repeats, a custom_id that is not a string).
        """
        offsets = self.offsets
        with open(self.path, "wb") as out:
            for data in _blocks(lines):
                data = unix_line_ends(data)  # the copy's lines end without CR
                if self.first_request is None:
                    self.first_request = _first_request(_lines_of(data))
                    self._start_schemas()
                starts = line_starts(data, self._end)
                count = len(starts)
                heads = self._heads(data, count)
                if heads is not None:
                    ids = [head.custom_id for head in heads]
                    found = dict(zip(ids, starts, strict=True))
                    # No id empty, none repeated (in the slab, or from an earlier one).
                    if len(found) == count and "" not in found and offsets.keys().isdisjoint(found):
                        offsets.update(found)
                        if self._schemas is not None:
                            self._note_block(ids, [head.body for head in heads])
                        out.write(data)
                        self._end += len(data)
                        self.requests += count
                        self._line_no += count
                        continue
                self._add_lines(_lines_of(data), out)

    def _heads(self, data: bytes, count: int) -> list[Any] | None:
        """The ``count`` lines of ``data`` read by :attr:`_decode_heads`; ``None`` unless every one fits."""
        try:
            heads = self._decode_heads(data)
        except msgspec.DecodeError:
            return None
        return heads if len(heads) == count else None  # fewer: blank lines, which decoding skips

    def _start_schemas(self) -> None:
        """Read what each request asks its answer to be, for the chat and responses endpoints."""
        first = self.first_request
        url = first.get("url") if isinstance(first, dict) else None
        kind = endpoint_kind(self._endpoint or (url if isinstance(url, str) else None))
        if self._read_schemas and kind in ("chat", "responses"):
            self._schemas = RequestSchemas(kind)
            self._decode_heads = self._schemas.decode_lines

    def _note_block(self, ids: list[str], asks: list[Any]) -> None:
        """The schemas of a slab's requests: at once for a slab whose requests all ask the same."""
        schemas = self._schemas
        assert schemas is not None
        same, schema = schemas.of_block(asks)
        if same:
            self._note(ids, schema)
        else:
            for cid, asked in zip(ids, asks, strict=True):
                self._note([cid], schemas.of_asks(asked))

    def _note(self, ids: list[str], schema: AnswerSchema | None) -> None:
        if not self._schema_known:
            self.default_schema = schema
            self._schema_known = True
        if schema is not None:
            self.asked.setdefault(id(schema), schema)
        if schema is not self.default_schema:
            self.schema_by_id.update(dict.fromkeys(ids, schema))

    def parsed_schema(self) -> tuple[bool, dict[str, Any] | None]:
        """``(structured, schema)``: whether any request asked for a format or tools, and the one JSON
        Schema every such answer is held to (``None`` when there is no single one)."""
        if not self.asked:
            return False, None
        outputs = [
            s.output.schema if s.output is not None and not s.tools else None for s in self.asked.values()
        ]
        first = outputs[0]
        return True, first if first is not None and all(o == first for o in outputs) else None

    def _add_lines(self, slab: list[bytes], out: Any) -> None:
        """The careful path of :meth:`copy`: one line at a time."""
        for line in slab:
            self._line_no += 1
            if not line.strip():
                continue  # blank lines are not requests
            try:
                request = orjson.loads(line)
            except orjson.JSONDecodeError:
                request = None
            cid = request.get("custom_id") if isinstance(request, dict) else None
            if not isinstance(cid, str) or not cid:
                self.invalid.append((self._line_no, self._end))
            elif self.offsets.setdefault(cid, self._end) != self._end:
                self.repeated.append((cid, self._end, self._line_no))
            elif self._schemas is not None:
                self._note([cid], self._schemas.of_body(request.get("body")))
            out.write(line)
            out.write(b"\n")
            self._end += len(line) + 1
            self.requests += 1


class _RequestFetcher:
    """Read one request line back from the input copy by offset.

    One ``pread`` per line (no seek, no buffer refill): failures are fetched in file order but far apart,
    so a buffered reader would read and drop a whole buffer for each one. (A memory map of the copy was
    measured too: it needs no system call, but every page it touches counts in the process's RSS.)

    :param fd: the input copy's file descriptor.
    :param line_bytes: the copy's mean line size: a first read of twice that finds most lines whole.
    """

    def __init__(self, fd: int, line_bytes: int) -> None:
        self._fd = fd
        self._first_read = max(256, 2 * line_bytes)

    def __call__(self, offset: int) -> bytes:
        size = self._first_read
        while True:
            data = os.pread(self._fd, size, offset)
            end = data.find(b"\n")
            if end >= 0:
                return data[:end]
            if len(data) < size:
                return data  # the end of the copy (every line in it ends with a newline, though)
            size *= 4

    def spans(
        self, offsets: Sequence[int], span_bytes: int = _SPAN_BYTES, gap_bytes: int = _SPAN_GAP_BYTES
    ) -> Iterator[list[bytes]]:
        """The lines at ``offsets`` (ascending), a span of the copy at a time: one read for each run of
        them within ``span_bytes`` with no gap wider than ``gap_bytes`` (many failures close together, as
        an expired batch leaves them, cost a read per span instead of one per line; failures far apart,
        a read each instead of the lines between them). Yields each span's lines, in order.
        """
        count = len(offsets)
        start = 0
        while start < count:
            first = offsets[start]
            stop = bisect.bisect_left(offsets, first + span_bytes, start + 1, count)
            # A first read is about two lines: lines asked for that would fill less than a quarter of
            # the span are cut where a wide gap comes (start to start: a line, at most a first read's
            # worth, plus the gap). A dense span, as an expired batch makes, is not looked into.
            if (stop - start) * 2 * self._first_read < offsets[stop - 1] - first:
                widest = self._first_read + gap_bytes
                limit, stop = stop, start + 1
                while stop < limit and offsets[stop] - offsets[stop - 1] <= widest:
                    stop += 1
            data = os.pread(self._fd, offsets[stop - 1] - first + self._first_read, first)
            lines = []
            for offset in offsets[start:stop]:
                begin = offset - first
                end = data.find(b"\n", begin)
                lines.append(data[begin:end] if end >= 0 else self(offset))  # a long last line: read alone
            yield lines
            start = stop


# -- the results ----------------------------------------------------------------------------------------


# gc=False: decoded JSON only, never in a reference cycle (see the views in core/records.py).
class _Response(msgspec.Struct, gc=False):
    status_code: int
    body: msgspec.Raw = msgspec.Raw(b"null")


class _ResultLine(msgspec.Struct, gc=False):
    """The typed view of a result line: what the join reads, the body kept as JSON text.

    Every line OpenAI writes fits it; one that does not (a custom_id that is not a string, a status code
    that is not an integer...) takes the careful path.
    """

    custom_id: str
    response: _Response | None = None
    error: Any = None


_RESULT_LINES = msgspec.json.Decoder(_ResultLine)
_decode_result = _RESULT_LINES.decode


def _response_dict(response: _Response) -> dict[str, Any]:
    """A response as :func:`~airflow_openai_batch.core.records.error_fields` reads it."""
    return {"status_code": response.status_code, "body": msgspec.json.decode(response.body)}


def _decode_block(block: bytes, lines: int) -> list[_ResultLine] | None:
    """The ``lines`` lines of ``block``, decoded in one call; ``None`` unless every one fits the view."""
    try:
        results = _RESULT_LINES.decode_lines(block)
        if not block.isascii():
            # Bodies go on as they are, so they must be UTF-8 (msgspec checks only the strings it decodes).
            block.decode()
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    # Fewer results than lines: blank lines, which decoding skips (the careful path keeps line numbers).
    return results if len(results) == lines else None


class _Failed:
    """Failed requests whose records are not written yet, a column per field."""

    def __init__(self) -> None:
        self.ids: list[str | None] = []
        self.status_codes: list[int | None] = []
        self.codes: list[str] = []
        self.messages: list[str] = []
        self.outputs: list[str | None] = []
        #: Where each one's request line is in the input copy.
        self.offsets: list[int] = []

    def add(
        self,
        custom_id: str | None,
        status_code: int | None,
        code: str,
        message: str,
        output: str | None,
        offset: int,
    ) -> None:
        self.ids.append(custom_id)
        self.status_codes.append(status_code)
        self.codes.append(code)
        self.messages.append(message)
        self.outputs.append(output)
        self.offsets.append(offset)

    def add_alike(self, ids: list[str], offsets: list[int], code: str, message: str) -> None:
        """Requests that failed alike, without a response (e.g. left unanswered by an expired batch)."""
        count = len(ids)
        self.ids += ids
        self.status_codes += [None] * count
        self.codes += [code] * count
        self.messages += [message] * count
        self.outputs += [None] * count
        self.offsets += offsets


class _BatchJoin:
    """One batch being reconciled: what its result lines are joined with, and where records go.

    :param sink: where records go.
    :param tally: the batch's counts (updated as records are written).
    :param index: the batch's input.
    :param fetch: reads a request line back from the input copy.
    :param anomalies: where odd lines are reported.
    :param skip_ids: ids answered by a later attempt: left out, silently.
    """

    def __init__(
        self,
        sink: RecordSink,
        tally: BatchTally,
        index: _InputIndex,
        fetch: _RequestFetcher,
        anomalies: _Anomalies,
        skip_ids: AbstractSet[str],
        answer_schema: AnswerSchema | None = None,
        media: MediaSink | None = None,
    ) -> None:
        self.sink = sink
        self.tally = tally
        self.index = index
        self.fetch = fetch
        self.anomalies = anomalies
        self.skip_ids = skip_ids
        self.build = RecordBuilder(
            tally.batch_id,
            endpoint_kind(tally.endpoint),
            attempt=tally.attempt,
            raw_json=sink.takes_raw_json,
            media=media,
            usage_counts=sink.takes_usage_counts,
        )
        #: What each request asked its answer to be: ``schema_by_id.get(cid, default_schema)``.
        self.default_schema = answer_schema if answer_schema is not None else index.default_schema
        self.schema_by_id = {} if answer_schema is not None else index.schema_by_id
        #: The ids no result has answered yet. Taking ids out of a set, rather than out of ``offsets``,
        #: keeps ``offsets`` whole to tell a repeated result from an unknown one.
        self.unanswered = set(index.offsets)
        if skip_ids:
            self.unanswered -= skip_ids
        #: ``[input, output, total, cached_input, reasoning]`` token sums per model.
        self.usage: dict[str, list[int]] = {}
        #: Failed requests whose records are not written yet.
        self._failed = _Failed()
        self._batch_model = tally.model or "unknown"

    def join(self, lines: Iterable[bytes], source: str) -> None:
        """Stream one result file: a record per first result of each known custom_id.

        The file goes by blocks of about a megabyte (:func:`_blocks`): a block whose lines all fit the
        typed view is decoded in one call, any other line by line.
        """
        line_no = 0  # lines before the block (blank ones included, for 1-based line numbers)
        for block in _blocks(lines):
            count = len(line_starts(block))  # faster than block.count (see line_starts)
            results = _decode_block(block, count)
            if results is not None:
                if not self._take_block(block, results):
                    self._take(results, source, line_no)
            else:
                for i, line in enumerate(_lines_of(block), line_no + 1):
                    self._take_line(line, source, i)
            line_no += count

    def _take_block(self, block: bytes, results: list[_ResultLine]) -> bool:
        """Join a block of result lines a column at a time, if every line is a 2xx answer, the first to an
        unanswered request, and all those requests asked for the same thing (see
        :meth:`~airflow_openai_batch.core.records.RecordBuilder.successes`); else change nothing.

        :return: whether the block was joined.
        """
        responses = [result.response for result in results]
        errors = [result.error for result in results]
        if not all(responses) or errors.count(None) != len(errors):
            return False
        codes = [response.status_code for response in responses]
        if min(codes) < 200 or max(codes) >= 300:
            return False
        ids = [result.custom_id for result in results]
        if self.schema_by_id and not self.schema_by_id.keys().isdisjoint(ids):
            return False  # some request asked for something else than the batch's most
        unanswered = self.unanswered
        if not unanswered.issuperset(ids):
            return False
        before = len(unanswered)
        unanswered.difference_update(ids)
        if before - len(unanswered) == len(ids):  # no id twice in the block
            bodies = [response.body for response in responses]
            successes = self.build.successes(block, ids, codes, bodies, self.default_schema)
            if successes is not None:
                if successes:
                    self._count_block(successes)
                    self.sink.write_successes(successes)
                    self.tally.succeeded += len(successes)
                for cid, status_code, view, answer in successes.unusable:
                    self._count(view)  # an unusable answer was billed too
                    self._unusable(cid, status_code, answer)
                return True
        unanswered.update(ids)  # every one of them was unanswered before
        return False

    def _take(self, results: list[_ResultLine], source: str, line_no: int) -> None:
        """Join decoded result lines (``line_no``: the lines before them).

        This is the hot loop of a collect, one iteration per request: hence the local names.
        """
        unanswered = self.unanswered
        view_of = self.build.view
        success_record = self.build.success
        write_success = self.sink.write_success
        count = self._count
        schema_by_id = self.schema_by_id
        schema = self.default_schema
        succeeded = 0
        for i, result in enumerate(results, line_no + 1):
            cid = result.custom_id
            try:
                unanswered.remove(cid)
            except KeyError:
                self._unexpected(cid, source, i)
                continue
            response = result.response
            if response is not None and 200 <= response.status_code < 300 and result.error is None:
                body = response.body
                view = view_of(body)
                record = success_record(
                    cid,
                    response.status_code,
                    body,
                    view,
                    schema_by_id.get(cid, schema) if schema_by_id else schema,
                )
                count(view)  # an unusable answer was billed too
                if type(record) is dict:
                    write_success(record)
                    succeeded += 1
                else:
                    self._unusable(cid, response.status_code, record)
            else:
                line = {"response": response and _response_dict(response), "error": result.error}
                self.fail(cid, *error_fields(line))
        self.tally.succeeded += succeeded

    def _take_line(self, line: bytes, source: str, line_no: int) -> None:
        """One result line, on its own (its block had a line that needs care)."""
        try:
            result = _decode_result(line)
            if not line.isascii():
                line.decode()  # see _decode_block
        except (msgspec.DecodeError, UnicodeDecodeError):
            self._odd_line(line, source, line_no)
            return
        self._take([result], source, line_no - 1)

    def _odd_line(self, line: bytes, source: str, line_no: int) -> None:
        """A result line the typed view does not fit: report what is odd, or join it as it is."""
        if not line.strip():
            return  # blank line (e.g. Azure's zero-byte error file, a trailing newline)
        try:
            obj = orjson.loads(line)
            cid = obj["custom_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError, IndexError) as exc:
            detail = f"{type(exc).__name__}: {exc}"[:200]
            self.anomalies.add(self.tally, "unparseable_result_line", None, source, line_no, detail)
            return
        if type(cid) is not str:
            detail = f"custom_id is {type(cid).__name__}, not a string"
            self.anomalies.add(self.tally, "unparseable_result_line", None, source, line_no, detail)
            return
        if cid not in self.unanswered:
            self._unexpected(cid, source, line_no)
            return
        self.unanswered.remove(cid)
        response = obj.get("response")
        status = response.get("status_code") if isinstance(response, dict) else None
        if type(status) is int and 200 <= status < 300 and obj.get("error") is None:
            body = msgspec.Raw(orjson.dumps(response.get("body")))
            view = self.build.view(body)
            record = self.build.success(
                cid, status, body, view, self.schema_by_id.get(cid, self.default_schema)
            )
            self._count(view)
            if type(record) is dict:
                self.sink.write_success(record)
                self.tally.succeeded += 1
            else:
                self._unusable(cid, status, record)
        else:
            self.fail(cid, *error_fields(obj))

    def _unusable(self, cid: str, status_code: int, answer: StructuredAnswer) -> None:
        """A 2xx answer that is not usable (``invalid_output``, ``refusal``, ``truncated``,
        ``content_filter``): a failure holding the answer's text."""
        self.fail(
            cid,
            status_code,
            answer.error_code or "invalid_output",
            answer.error_message or "",
            output=answer.text,
        )

    def _unexpected(self, cid: str, source: str, line_no: int) -> None:
        """A result for an id that is not waiting for one: answered already, by a later attempt, or never
        asked."""
        if cid in self.skip_ids:
            return
        if cid in self.index.offsets:
            detail = "an earlier result for it was kept"
            self.anomalies.add(self.tally, "duplicate_result", cid, source, line_no, detail)
        else:
            detail = "not in the batch's input"
            self.anomalies.add(self.tally, "unknown_custom_id", cid, source, line_no, detail)

    def _count_block(self, successes: SuccessColumns) -> None:
        """:meth:`_count` of a block of successes, a column at a time where they all name one model."""
        models, usage = successes.models, successes.usage
        model = models[0]
        if (
            usage.missing is not None
            or type(model) is not str
            or not model
            or models.count(model) != len(models)
        ):
            for model, counts in zip(models, usage.rows(), strict=True):
                self._add_counts(model, None if counts is None else as_counts(counts))
            return
        inputs, outputs, totals, cached, reasoning = usage.counts
        if None in totals:
            rows = zip(inputs, outputs, totals, strict=True)
            totals = [(i or 0) + (o or 0) if t is None else t for i, o, t in rows]
        self._add_counts(
            model, [sum(filter(None, column)) for column in (inputs, outputs, totals, cached, reasoning)]
        )

    def _add_counts(self, model: Any, counts: Sequence[int] | None) -> None:
        if counts is None:
            return
        key = model if type(model) is str and model else self._batch_model
        sums = self.usage.get(key)
        if sums is None:
            sums = self.usage[key] = [0, 0, 0, 0, 0]
        sums[0] += counts[0]
        sums[1] += counts[1]
        sums[2] += counts[2]
        sums[3] += counts[3]
        sums[4] += counts[4]

    def _count(self, view: Any) -> None:
        """Add a success's tokens to its model's sums: the response's model (the dated snapshot, the real
        model behind an Azure deployment name), which is what prices go by, else the batch's."""
        self._add_counts(view.model, usage_counts(view.usage))

    def fail_unanswered(self) -> None:
        """Fail every input request that got no result, then the input lines that cannot be joined."""
        tally, index = self.tally, self.index
        code = _ABSENT_CODE_BY_STATUS.get(tally.status, "missing")
        message = _ABSENT_MESSAGES[code].format(status=tally.status)
        unanswered = self.unanswered
        # In file order; none at all in a completed batch, where a pass over the input is not needed.
        ids = [cid for cid in index.offsets if cid in unanswered] if unanswered else []
        offsets = list(map(index.offsets.__getitem__, ids))
        for start in range(0, len(ids), _FAILURES_AT_ONCE):
            stop = start + _FAILURES_AT_ONCE
            self._failed.add_alike(ids[start:stop], offsets[start:stop], code, message)
            self.write_failures()
        for cid, offset, line_no in index.repeated:
            if cid in self.skip_ids:
                continue
            detail = "custom_id repeated: this line is failed, the first one is joined"
            self.anomalies.add(tally, "duplicate_input_custom_id", cid, "input", line_no, detail)
            self.fail(cid, None, "duplicate_custom_id", "The input repeats this custom_id.", offset)
        for line_no, offset in index.invalid:
            self.anomalies.add(tally, "invalid_input_line", None, "input", line_no, "no usable custom_id")
            message = f"Input line {line_no} is not a JSON object with a non-empty string custom_id."
            self.fail(None, None, "invalid_input_line", message, offset)
        self.write_failures()

    def fail(
        self,
        custom_id: str | None,
        status_code: int | None,
        code: str,
        message: str,
        offset: int | None = None,
        output: str | None = None,
    ) -> None:
        """Fail a request (``offset``: of its request line, when not the custom_id's first; ``output``: an
        unusable answer's text). Its record is written, in turn, with the next :data:`_FAILURES_AT_ONCE`
        (see :meth:`write_failures`)."""
        if offset is None:
            offset = self.index.offsets[custom_id]  # type: ignore[index]
        failed = self._failed
        failed.add(custom_id, status_code, code, message, output, offset)
        if len(failed.ids) >= _FAILURES_AT_ONCE:
            self.write_failures()

    def write_failures(self) -> None:
        """Write the records of the requests failed so far, in the order they failed: their lines read
        back from the input copy a span at a time, their records made and written as columns."""
        failed = self._failed
        if not failed.ids:
            return
        self._failed = _Failed()
        offsets = failed.offsets
        ascending = sorted(offsets)
        if ascending == offsets:
            lines = list(itertools.chain.from_iterable(self.fetch.spans(offsets)))
        else:
            # Read in file order all the same (an error file need not follow the input's order).
            order = sorted(range(len(offsets)), key=offsets.__getitem__)
            lines = [b""] * len(offsets)
            positions = iter(order)
            for span in self.fetch.spans(ascending):
                for line in span:
                    lines[next(positions)] = line
        self.sink.write_failures(
            self.build.failures(
                failed.ids, failed.status_codes, failed.codes, failed.messages, failed.outputs, lines
            )
        )
        tally = self.tally
        tally.failed += len(lines)
        by_code = tally.failed_by_code
        for code, count in Counter(failed.codes).items():
            by_code[code] = by_code.get(code, 0) + count


class Reconciler:
    """Reconcile batches one after another into a :class:`~airflow_openai_batch.core.writers.RecordSink`,
    keeping totals.

    :param sink: receives every success and failure record as soon as it is known.
    :param work_dir: a local folder for the per-batch copy of the input file (deleted after each batch).
    :param endpoint: the batch endpoint, for the convenience field; when ``None`` each batch's first input
        line's ``url`` decides.
    :param response_schema: chat and responses answers are held to this schema (collect's
        ``response_schema=``) instead of the one each request asked for; ``None``: each request's own.
    :param media: where images batches' base64 images are written as files (``None``: kept in the body).
    """

    def __init__(
        self,
        sink: RecordSink,
        work_dir: Path,
        endpoint: str | None = None,
        *,
        response_schema: Any = None,
        media: MediaSink | None = None,
    ) -> None:
        self.sink = sink
        self.work_dir = Path(work_dir)
        self.endpoint = endpoint
        self.media = media
        #: The override, compiled; its JSON Schema fixes the ``parsed`` column.
        self._answer_schema: AnswerSchema | None = None
        self._parsed_schema: dict[str, Any] | None = None
        if response_schema is not None:
            spec = _normalise_schema(response_schema)
            self._answer_schema = AnswerSchema.of(spec)
            self._parsed_schema = spec.schema
        self._tallies: dict[str, BatchTally] = {}
        self._usage_by_model: dict[str, dict[str, int]] = {}
        self._anomalies = _Anomalies()

    def add_batch(
        self, files: BatchResultFiles, *, skip_ids: AbstractSet[str] = frozenset(), attempt: int = 1
    ) -> BatchTally:
        """Reconcile one batch: write its records to the sink and return its tally.

        If reading a source raises (e.g. a dropped download), the exception propagates, the batch is not
        counted and the sink holds part of its records: abort the sink and start over.

        :param files: the batch's status and line sources.
        :param skip_ids: custom_ids a later attempt of the same requests answered: where they appear in
            this batch (input or results) they are neither reported nor counted.
        :param attempt: which attempt of its chunk this batch is (1 for the first), stamped on its records
            as ``attempts``.
        :raises ValueError: if the same batch id was already added (its records would count twice).
        """
        if files.batch_id in self._tallies:
            raise ValueError(f"batch {files.batch_id!r} was already reconciled")
        # A BatchStatus member is a str, but str() of it is "BatchStatus.EXPIRED" before Python 3.12.
        status = files.status.value if isinstance(files.status, Enum) else str(files.status)
        tally = BatchTally(batch_id=files.batch_id, status=status, model=files.model, attempt=attempt)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        index = _InputIndex(
            self.work_dir / f".input-{uuid.uuid4().hex}.jsonl",
            self.endpoint,
            read_schemas=self._answer_schema is None,
        )
        try:
            index.copy(files.input_lines)
            self._learn_model_and_endpoint(tally, index.first_request)
            if self._answer_schema is not None:
                self.sink.parsed_schema(self._parsed_schema)
            else:
                structured, schema = index.parsed_schema()
                if structured:
                    self.sink.parsed_schema(schema)
            with open(index.path, "rb") as copy:
                batch = _BatchJoin(
                    self.sink,
                    tally,
                    index,
                    _RequestFetcher(copy.fileno(), index.size // max(1, index.requests)),
                    self._anomalies,
                    skip_ids,
                    self._answer_schema,
                    self.media,
                )
                tally.skipped = len(index.offsets) - len(batch.unanswered)
                tally.skipped += sum(1 for cid, _, _ in index.repeated if cid in skip_ids)
                tally.total = index.requests - tally.skipped
                if files.output_lines is not None:
                    batch.join(files.output_lines, "output")
                if files.error_lines is not None:
                    batch.join(files.error_lines, "error")
                batch.fail_unanswered()
            self._add_usage(tally, batch.usage)
        finally:
            index.path.unlink(missing_ok=True)
        if attempt > 1:
            tally.retried = tally.succeeded
        self._tallies[files.batch_id] = tally
        return tally

    def summary(self) -> ReconcileSummary:
        """Totals across the batches added so far."""
        tallies = self._tallies.values()
        failed_by_code: dict[str, int] = {}
        usage = _empty_usage()
        for tally in tallies:
            for code, n in tally.failed_by_code.items():
                failed_by_code[code] = failed_by_code.get(code, 0) + n
            for key in _USAGE_KEYS:
                usage[key] += tally.usage[key]
        return ReconcileSummary(
            batch_ids=list(self._tallies),
            total=sum(t.total for t in tallies),
            succeeded=sum(t.succeeded for t in tallies),
            failed=sum(t.failed for t in tallies),
            failed_by_code=failed_by_code,
            retried=sum(t.retried for t in tallies),
            usage=usage,
            usage_by_model={m: dict(u) for m, u in self._usage_by_model.items()},
            anomalies={"counts": dict(self._anomalies.counts), "examples": list(self._anomalies.examples)},
            batches=dict(self._tallies),
        )

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

    def _add_usage(self, tally: BatchTally, usage: dict[str, list[int]]) -> None:
        for model, sums in usage.items():
            per_model = self._usage_by_model.get(model)
            if per_model is None:
                per_model = self._usage_by_model[model] = _empty_usage()
            for target in (tally.usage, per_model):
                for key, n in zip(_USAGE_KEYS, sums, strict=True):
                    target[key] += n
