"""Where reconciled records go: the sink interface, and result files in a local staging folder (no Airflow,
no fsspec, no network).

:class:`RecordSink` is everything a :class:`~airflow_openai_batch.core.reconcile.Reconciler` calls.
:class:`ResultWriter` is the sink of the collect operator: it writes the results into a local staging
folder, which the operator then publishes to object storage whole file by whole file.

Crash safety: every file is written as ``<name>.partial`` and renamed to its final name only by
:meth:`ResultWriter.close`; :func:`write_manifest` writes ``manifest.json`` last, atomically. So a file
with its final name is always complete, and a folder with a ``manifest.json`` is a finished result.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import msgspec
import orjson

from airflow_openai_batch.core.records import FailureColumns, SuccessColumns, usage_fields
from airflow_openai_batch.core.schema import ParsedColumn, arrow_type, tool_calls_array, tool_calls_arrow_type

__all__ = [
    "OUTPUT_FORMATS",
    "RecordSink",
    "ResultWriter",
    "failures_schema",
    "read_records",
    "successes_schema",
    "write_manifest",
]

OUTPUT_FORMATS: tuple[str, ...] = ("jsonl", "parquet")
MANIFEST_NAME = "manifest.json"
RETRY_NAME = "retry_requests.jsonl"
PARTIAL_SUFFIX = ".partial"

#: Rows buffered before a Parquet row group is written.
PARQUET_ROW_GROUP_ROWS = 10_000
#: ... or estimated bytes buffered, whichever comes first (embeddings and long answers fill it first).
#: Small on purpose: the buffered rows, their Arrow copy and the encoded pages of one row group are all
#: in memory at once.
PARQUET_ROW_GROUP_BYTES = 4 * 1024 * 1024
#: Bytes of one buffered row besides its body, content and vectors (tuple, small objects).
_ROW_OVERHEAD = 256
#: JSONL bytes gathered before one write call.
_WRITE_BYTES = 256 << 10

_Raw = msgspec.Raw
_UNSET = object()
_MIXED = object()


class RecordSink(ABC):
    """Where reconciled records go: every method a :class:`~airflow_openai_batch.core.reconcile.Reconciler`
    calls on it. Records are made by :class:`~airflow_openai_batch.core.records.RecordBuilder`.
    """

    #: ``True`` when records may carry ``body`` and ``request`` as ``msgspec.Raw`` (their JSON text as
    #: received) instead of parsed objects: a sink that only writes them out is spared parsing them.
    takes_raw_json: ClassVar[bool] = False
    #: ``True`` when a block of successes (:meth:`write_successes`) is read for its usage counts only
    #: (:attr:`SuccessColumns.usage`), never for its ``usage`` column's JSON text.
    takes_usage_counts: bool = False

    @abstractmethod
    def write_success(self, record: dict[str, Any]) -> None:
        """Take one success record."""

    def write_successes(self, successes: SuccessColumns) -> None:
        """Take a block of success records, given as columns; by default one :meth:`write_success` per
        record. A sink that stores columns, or writes many records at once, does better."""
        for record in successes.records():
            self.write_success(record)

    @abstractmethod
    def write_failure(self, record: dict[str, Any], request_line: bytes) -> None:
        """Take one failure record.

        :param request_line: the request exactly as in the input file (no newline), for a retry.
        """

    def write_failures(self, failures: FailureColumns) -> None:
        """Take many failure records, given as columns with their request lines; by default one
        :meth:`write_failure` per record."""
        for record, request_line in zip(failures.records(), failures.request_lines, strict=True):
            self.write_failure(record, request_line)

    @abstractmethod
    def close(self) -> None:
        """No more records come."""

    def parsed_schema(self, schema: Mapping[str, Any] | None) -> None:  # noqa: B027  (optional to act on)
        """The JSON Schema the ``parsed`` values of the records that follow are valid against (told per
        batch, before its records, when its requests asked for a format or offered tools); ``None``: no
        single schema. A sink with typed columns uses it; the others need not."""


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "output_format='parquet' needs pyarrow: pip install 'airflow-openai-batch[parquet]'"
        ) from exc
    return pyarrow


def _parquet() -> Any:
    _pyarrow()
    import pyarrow.parquet

    return pyarrow.parquet


@functools.cache
def _schemas() -> tuple[Any, Any]:
    pa = _pyarrow()
    vector = pa.list_(pa.float32())
    usage = pa.struct(
        [
            pa.field("input_tokens", pa.int64()),
            pa.field("output_tokens", pa.int64()),
            pa.field("total_tokens", pa.int64()),
        ]
    )
    successes = pa.schema(
        [
            pa.field("custom_id", pa.string()),
            pa.field("batch_id", pa.string()),
            pa.field("status_code", pa.int32()),
            pa.field("content", pa.string()),
            pa.field("embedding", vector),
            pa.field("body", pa.string()),
            pa.field("usage", usage),
            pa.field("embeddings", pa.list_(vector)),
            pa.field("attempts", pa.int32()),
            pa.field("finish_reason", pa.string()),
            pa.field("tool_calls", tool_calls_arrow_type()),
            pa.field("parsed", pa.string()),  # typed by the answers' schema when there is one
            pa.field("images", pa.list_(pa.string())),
        ]
    )
    failures = pa.schema(
        [
            pa.field("custom_id", pa.string()),
            pa.field("batch_id", pa.string()),
            pa.field("status_code", pa.int32()),
            pa.field("error_code", pa.string()),
            pa.field("error_message", pa.string()),
            pa.field("request", pa.string()),
            pa.field("attempts", pa.int32()),
            pa.field("output", pa.string()),
        ]
    )
    return successes, failures


def successes_schema(parsed: Mapping[str, Any] | None = None) -> Any:
    """The Parquet schema of ``successes.parquet`` (needs pyarrow).

    :param parsed: the JSON Schema of the answers, which types the ``parsed`` column as a struct
        (:func:`~airflow_openai_batch.core.schema.arrow_type`); ``None``: ``parsed`` is JSON text.
    """
    schema = _schemas()[0]
    if parsed is None:
        return schema
    index = schema.get_field_index("parsed")
    return schema.set(index, schema.field(index).with_type(arrow_type(parsed)))


def failures_schema() -> Any:
    """The Parquet schema of ``failures.parquet`` (needs pyarrow)."""
    return _schemas()[1]


def _json_text(value: Any) -> bytes:
    """A record's ``body`` / ``request`` as JSON text: raw JSON as it is, anything else serialized.

    (Bytes, not a view of the raw JSON: pyarrow 26 leaks every memoryview it converts.)
    """
    return bytes(value) if type(value) is _Raw else orjson.dumps(value)


# -- files -----------------------------------------------------------------------------------------------


class _PartialFile(ABC):
    """One output, written as ``<path>.partial`` and given its final name by :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.partial = path.with_name(path.name + PARTIAL_SUFFIX)
        #: Records written so far.
        self.count = 0

    @abstractmethod
    def add(self, record: dict[str, Any], request_line: bytes = b"") -> None:
        """Append one record (``request_line``: a failure's request, as in the input file)."""

    @abstractmethod
    def add_block(self, records: SuccessColumns | FailureColumns) -> None:
        """Append a block of records, given as columns."""

    @abstractmethod
    def _finish(self) -> None:
        """Write what is buffered and close the file."""

    @abstractmethod
    def _discard(self) -> None:
        """Close the file without writing what is buffered."""

    def close(self) -> None:
        self._finish()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self._discard()
        self.partial.unlink(missing_ok=True)


class _JsonlFile(_PartialFile):
    """Records as JSON lines (``body`` / ``request`` as nested JSON); raw JSON is written through."""

    _encode_into = msgspec.json.Encoder().encode_into
    _encode_lines = msgspec.json.Encoder().encode_lines

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._file = open(self.partial, "wb")  # noqa: SIM115  (closed in _finish / _discard)
        self._buffer = bytearray()

    def add(self, record: dict[str, Any], request_line: bytes = b"") -> None:
        buffer = self._buffer
        self._encode_into(record, buffer, -1)
        buffer += b"\n"
        self.count += 1
        if len(buffer) >= _WRITE_BYTES:
            self._flush()

    def add_block(self, records: SuccessColumns | FailureColumns) -> None:
        # One msgspec call for the block: each record a Struct whose fields are the record's keys, in order.
        record_type = _record_struct(tuple(records.columns))
        lines = self._encode_lines(list(map(record_type, *records.columns.values())))
        self.count += len(records)
        if self._buffer:
            self._flush()
        self._file.write(lines)  # a block's lines are large enough to go out as they are, not copied first

    def add_line(self, line: bytes) -> None:
        """Append one line as it is (plus a newline)."""
        self._buffer += line
        self._buffer += b"\n"
        if len(self._buffer) >= _WRITE_BYTES:
            self._flush()

    def add_lines(self, lines: list[bytes]) -> None:
        """Append lines as they are (each plus a newline)."""
        self._buffer += b"\n".join(lines)
        self._buffer += b"\n"
        if len(self._buffer) >= _WRITE_BYTES:
            self._flush()

    def _flush(self) -> None:
        self._file.write(self._buffer)
        self._buffer = bytearray()

    def _finish(self) -> None:
        self._flush()
        self._file.close()

    def _discard(self) -> None:
        self._file.close()


@functools.cache
def _record_struct(names: tuple[str, ...]) -> type[msgspec.Struct]:
    """A Struct type whose JSON is a record with these keys, in this order (``None`` values kept)."""
    return msgspec.defstruct("Record", names, gc=False)


def _usage_column(usage: Any) -> tuple[int | None, int | None, int | None] | None:
    """A record's ``usage`` as the ``usage`` struct column holds it."""
    counts = usage_fields(usage)
    return None if counts is None else counts[:3]


def _request_column(request: Any) -> bytes | None:
    """A failure's request as JSON text: the line as submitted, when the writer was given it."""
    return request if request is None or type(request) is bytes else _json_text(request)


#: How record values become column values, per column (the others are taken as they are).
_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "body": _json_text,
    "usage": _usage_column,
    "request": _request_column,
}


class _ParquetFile(_PartialFile):
    """Records as Parquet, in row groups of at most ``rows_limit`` rows or about ``bytes_limit`` bytes.

    Records are buffered as they come and turned into the schema's columns (a field a record lacks is
    null): one C-level pass per column rather than Python per value. A block of records given as columns
    (:meth:`add_block`) is buffered as it is.
    """

    def __init__(self, path: Path, schema: Any, rows_limit: int, bytes_limit: int) -> None:
        super().__init__(path)
        self._pa = _pyarrow()
        self.schema = schema
        self._rows_limit = rows_limit
        self._bytes_limit = bytes_limit
        #: Records added one by one since the last piece.
        self._records: list[dict[str, Any]] = []
        #: Buffered rows, in order, as ``(rows, {column: Arrow array})`` (a column left out is null).
        self._pieces: list[tuple[int, dict[str, Any]]] = []
        self._rows = 0
        self._bytes = 0
        #: The JSON Schema typing the ``parsed`` column (``None``: JSON text).
        self.parsed: Mapping[str, Any] | None = None
        # Opened at the first row group: until then the ``parsed`` column's type may still be learned.
        self._writer: Any = None

    @property
    def opened(self) -> bool:
        return self._writer is not None

    def type_parsed(self, parsed: Mapping[str, Any] | None) -> None:
        """Type the ``parsed`` column by this JSON Schema (``None``: JSON text); only before it is opened."""
        assert self._writer is None
        self.parsed = parsed
        self.schema = successes_schema(parsed)

    def open(self) -> None:
        """Start the file (done by the first row group at the latest; the schema is final then)."""
        # zstd: several times smaller than snappy on JSON text and no slower to write. Dictionary encoding
        # and min/max statistics only where they help (ids, codes): on unique JSON bodies they are cost.
        small = [
            f.name
            for f in self.schema
            if f.name in ("batch_id", "status_code", "error_code", "attempts", "finish_reason")
        ]
        self._writer = _parquet().ParquetWriter(
            str(self.partial),
            self.schema,
            compression="zstd",
            use_dictionary=small,
            write_statistics=[*small, "custom_id"],
        )

    def add(self, record: dict[str, Any], request_line: bytes = b"") -> None:
        if request_line:  # stored as submitted, byte for byte
            record = {**record, "request": request_line}
        self._records.append(record)
        body = record.get("body")
        # Body and request line are most of a row (content and vectors are in the body too).
        self._added(1, _ROW_OVERHEAD + len(request_line) + (len(body) if type(body) is _Raw else 0))

    def add_block(self, records: SuccessColumns | FailureColumns) -> None:
        """Buffered as Arrow arrays at once (its columns need no conversion per value)."""
        self._take_records()
        pa = self._pa
        schema = self.schema
        rows = len(records)
        arrays = {}
        size = 0
        for name, values in records.columns.items():
            if name == "body":
                # A block's result lines were checked to be UTF-8 when it was decoded.
                arrays[name] = _joined_text(pa, values)
                size += arrays[name].nbytes
            elif name == "request":
                # The request lines as submitted (also where the record says None: not JSON).
                assert isinstance(records, FailureColumns)
                arrays[name] = _request_array(pa, records.request_lines)
                size += arrays[name].nbytes
            elif name == "usage":
                assert isinstance(records, SuccessColumns)
                usage_type = schema.field(name).type
                counts = [
                    pa.array(column, usage_type.field(i).type)
                    for i, column in enumerate(records.usage.counts[:3])
                ]
                missing = records.usage.missing
                arrays[name] = pa.StructArray.from_arrays(
                    counts, fields=list(usage_type), mask=None if missing is None else pa.array(missing)
                )
            elif name == "parsed" and values.count(None) != rows:
                arrays[name] = values  # JSON texts: read at the flush, a row group's at once
            elif name not in _ANSWER_COLUMNS or values.count(None) != rows:
                arrays[name] = self._array(schema.field(name), values)
        self._pieces.append((rows, arrays))
        self._added(rows, _ROW_OVERHEAD * rows + size)

    def _added(self, rows: int, size: int) -> None:
        self.count += rows
        self._rows += rows
        self._bytes += size
        if self._rows >= self._rows_limit or self._bytes >= self._bytes_limit:
            self._flush()

    def _take_records(self) -> None:
        """The records added one by one so far, made a piece of Arrow arrays."""
        records = self._records
        if not records:
            return
        self._records = []
        arrays = {}
        for f in self.schema:
            values = list(map(operator.methodcaller("get", f.name), records))
            if f.name in _ANSWER_COLUMNS and values.count(None) == len(values):
                continue  # fields plain answers lack: nothing to convert (null, see _flush)
            convert = _CONVERTERS.get(f.name)
            arrays[f.name] = self._array(f, values if convert is None else list(map(convert, values)))
        self._pieces.append((len(records), arrays))

    def _array(self, f: Any, values: list[Any]) -> Any:
        """The Arrow array of field ``f`` from its records' values."""
        if f.name == "parsed":
            return _parsed_array(values, self.parsed)
        if f.name == "tool_calls":
            return tool_calls_array(values)
        return _arrow_array(self._pa, values, f.type)

    def _flush(self) -> None:
        if self._writer is None:
            self.open()
        self._take_records()
        if not self._pieces:
            return
        pa = self._pa
        pieces = self._pieces
        self._pieces = []
        self._rows = self._bytes = 0
        rows = sum(count for count, _ in pieces)
        columns = [
            self._parsed_column(pieces, f.type)
            if f.name == "parsed"
            else pa.chunked_array(
                [
                    pa.nulls(count, f.type) if f.name not in arrays else arrays[f.name]
                    for count, arrays in pieces
                ],
                f.type,
            )
            for f in self.schema
        ]
        # The pieces' arrays as chunks of one row group (no copy into one array per column).
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self.schema), row_group_size=rows)

    def _parsed_column(self, pieces: list[tuple[int, dict[str, Any]]], arrow_type: Any) -> Any:
        """The ``parsed`` column of a row group: the JSON texts of neighbouring blocks read in one go (the
        reader's cost per call is not small next to a block's answers)."""
        pa = self._pa
        chunks = []
        texts: list[Any] = []
        for count, arrays in pieces:
            column = arrays.get("parsed")
            if isinstance(column, list):
                texts += column
                continue
            if texts:
                chunks.append(_parsed_array(texts, self.parsed))
                texts = []
            chunks.append(pa.nulls(count, arrow_type) if column is None else column)
        if texts:
            chunks.append(_parsed_array(texts, self.parsed))
        return pa.chunked_array(chunks, arrow_type)

    def _finish(self) -> None:
        self._flush()
        self._writer.close()

    def _discard(self) -> None:
        self._records = []
        self._pieces = []
        if self._writer is not None:
            self._writer.close()


#: Columns of answers' extra fields (absent from most records of plain text or embeddings batches).
_ANSWER_COLUMNS = frozenset({"finish_reason", "tool_calls", "parsed", "images", "output", "embeddings"})


def _parsed_array(values: list[Any], schema: Mapping[str, Any] | None) -> Any:
    """The ``parsed`` column of a row group: typed by ``schema`` (read by Arrow's JSON reader from the
    values' JSON text), or the JSON text itself."""
    column = ParsedColumn(schema)
    column.add_texts(
        [value if value is None or type(value) is _Raw else orjson.dumps(value) for value in values]
    )
    return column.finish()


def _joined_text(pa: Any, values: list[Any]) -> Any:
    """A string array of UTF-8 texts (bytes or raw JSON) laid end to end in one copy and cut by offsets:
    no Python object per value."""
    offsets = pa.array(itertools.accumulate(map(len, values), initial=0), pa.int32())
    return pa.StringArray.from_buffers(len(values), offsets.buffers()[1], pa.py_buffer(b"".join(values)))


def _request_array(pa: Any, lines: list[bytes]) -> Any:
    """Failed requests' lines as a string array (see :func:`_arrow_array` for lines that are not UTF-8)."""
    try:
        for line in lines:
            if not line.isascii():
                line.decode()
    except UnicodeDecodeError:
        return _arrow_array(pa, lines, pa.string())
    return _joined_text(pa, lines)


def _arrow_array(pa: Any, values: list[Any], arrow_type: Any) -> Any:
    try:
        first = values[0] if values else None
        if type(first) in (str, int) and values[-1] == first and values.count(first) == len(values):
            # One value in every row (batch_id, attempts, most status codes): converted once, not per row.
            return pa.repeat(pa.scalar(first, arrow_type), len(values))
        return pa.array(values, type=arrow_type)
    except pa.ArrowInvalid:
        if arrow_type != pa.string():
            raise
        # Text that is not UTF-8 (a request line OpenAI would have rejected): kept, readable.
        return pa.array(
            [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values],
            type=arrow_type,
        )


# -- the collect operator's sink -------------------------------------------------------------------------


class ResultWriter(RecordSink):
    """A :class:`RecordSink` writing local result files.

    Writes ``successes.<ext>``, ``failures.<ext>`` and ``retry_requests.jsonl`` (the failed request
    lines exactly as submitted: a valid input for a new submit) into ``staging_dir``. Each is written as
    ``<name>.partial`` and gets its final name only in :meth:`close`.

    JSONL records keep ``body``/``request`` as nested objects. Parquet files have fixed schemas
    (:func:`successes_schema`, :func:`failures_schema`) with ``body``/``request`` as JSON text, and are
    written in row groups so memory stays flat.

    :param staging_dir: a local folder (created if needed).
    :param output_format: ``"jsonl"`` or ``"parquet"``.
    :param row_group_rows: Parquet rows buffered per row group.
    :param row_group_bytes: Parquet estimated bytes buffered per row group.
    """

    takes_raw_json = True

    def __init__(
        self,
        staging_dir: Path,
        output_format: Literal["jsonl", "parquet"] | str = "jsonl",
        row_group_rows: int = PARQUET_ROW_GROUP_ROWS,
        row_group_bytes: int = PARQUET_ROW_GROUP_BYTES,
    ) -> None:
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, not {output_format!r}")
        self.staging_dir = Path(staging_dir)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.output_format = output_format
        #: Failure records written so far.
        self.failed = 0
        self.closed = False
        self._paths = {
            "successes": self.staging_dir / f"successes.{output_format}",
            "failures": self.staging_dir / f"failures.{output_format}",
            "retry_requests": self.staging_dir / RETRY_NAME,
        }
        self._successes: _PartialFile
        self._failures: _PartialFile
        # Parquet's usage column is made of the counts.
        self.takes_usage_counts = output_format == "parquet"
        if output_format == "parquet":
            success_schema, failure_schema = _schemas()
            limits = (row_group_rows, row_group_bytes)
            self._successes = _ParquetFile(self._paths["successes"], success_schema, *limits)
            self._failures = _ParquetFile(self._paths["failures"], failure_schema, *limits)
            self._failures.open()  # its schema is final; the successes' opens at its first row group
        else:
            self._successes = _JsonlFile(self._paths["successes"])
            self._failures = _JsonlFile(self._paths["failures"])
        self._retry = _JsonlFile(self._paths["retry_requests"])
        #: The ``parsed`` schema told so far: ``_UNSET``, one schema, or ``_MIXED``.
        self._parsed_told: Any = _UNSET
        #: The current batch's answers do not fit the typed ``parsed`` column (kept in content and
        #: tool_calls; ``parsed`` null).
        self._parsed_misfit = False

    def parsed_schema(self, schema: Mapping[str, Any] | None) -> None:
        """Types Parquet's ``parsed`` column by the first schema told, if every batch told before the
        first row group is written agrees (else it is JSON text). A later batch with another schema gets
        a null ``parsed`` (its answers are in ``content`` / ``tool_calls``)."""
        successes = self._successes
        if not isinstance(successes, _ParquetFile):
            return
        if successes.opened:
            self._parsed_misfit = successes.parsed is not None and schema != successes.parsed
            return
        if self._parsed_told is _UNSET:
            self._parsed_told = schema
        elif self._parsed_told != schema:
            self._parsed_told = _MIXED
        successes.type_parsed(None if self._parsed_told is _MIXED else self._parsed_told)

    def _files(self) -> tuple[_PartialFile, ...]:
        return (self._successes, self._failures, self._retry)

    @property
    def succeeded(self) -> int:
        """Success records written so far."""
        return self._successes.count

    def write_success(self, record: dict[str, Any]) -> None:
        """Append one success record.

        :param record: a success record (see :class:`~airflow_openai_batch.core.records.RecordBuilder`).
        """
        if self._parsed_misfit and record.get("parsed") is not None:
            record = {**record, "parsed": None}
        self._successes.add(record)

    def write_successes(self, successes: SuccessColumns) -> None:
        """Append a block of success records."""
        if self._parsed_misfit and "parsed" in successes.columns:
            columns = {**successes.columns, "parsed": [None] * len(successes)}
            successes = dataclasses.replace(successes, columns=columns)
        self._successes.add_block(successes)

    def write_failure(self, record: dict[str, Any], request_line: bytes) -> None:
        """Append one failure record, and its request line to the retry file.

        :param record: a failure record.
        :param request_line: the original request line, exactly as in the input file (no newline).
        """
        self._failures.add(record, request_line)
        request = record.get("request")
        if request_line:
            self._retry.add_line(request_line)
        elif isinstance(request, dict | _Raw):
            self._retry.add_line(_json_text(request))
        self.failed += 1

    def write_failures(self, failures: FailureColumns) -> None:
        """Append many failure records, and their request lines to the retry file."""
        self._failures.add_block(failures)
        self._retry.add_lines(failures.request_lines)
        self.failed += len(failures)

    def close(self) -> None:
        """Flush everything and give each file its final name (idempotent)."""
        if self.closed:
            return
        for handle in self._files():
            handle.close()
        self.closed = True

    def abort(self) -> None:
        """Close the files and delete the ``.partial`` ones: nothing is published."""
        if self.closed:
            return
        for handle in self._files():
            handle.abort()
        self.closed = True

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def paths(self) -> dict[str, Path]:
        """The final paths: ``{"successes", "failures", "retry_requests"}`` (exist after :meth:`close`)."""
        return dict(self._paths)


def write_manifest(staging_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (temp file + rename); call it after everything else.

    :param staging_dir: the folder holding the result files.
    :param summary: a JSON-safe summary (e.g. ``ReconcileSummary.to_dict()`` plus the URIs).
    :return: the manifest's path.
    """
    staging_dir = Path(staging_dir)
    path = staging_dir / MANIFEST_NAME
    tmp = staging_dir / f"{MANIFEST_NAME}{PARTIAL_SUFFIX}"
    tmp.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
    os.replace(tmp, path)
    return path


def read_records(path: Path | str, batch_size: int = 10_000) -> Iterator[dict[str, Any]]:
    """Iterate the records of a result file written by :class:`ResultWriter` (JSONL or Parquet).

    Parquet's JSON-text ``body``/``request`` columns come back as objects, so both formats read alike.

    :param path: a ``.jsonl`` or ``.parquet`` file.
    :param batch_size: Parquet rows decoded at a time.
    """
    path = Path(path)
    if path.suffix == ".parquet" or path.name.endswith(".parquet" + PARTIAL_SUFFIX):
        yield from _read_parquet(path, batch_size)
        return
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if line:
                yield orjson.loads(line)


def _read_parquet(path: Path, batch_size: int) -> Iterator[dict[str, Any]]:
    parquet_file = _parquet().ParquetFile(str(path))
    for batch in parquet_file.iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            for key in ("body", "request"):
                text = row.get(key)
                if isinstance(text, str):
                    try:
                        row[key] = orjson.loads(text)
                    except orjson.JSONDecodeError:
                        # An input line that was never JSON: JSONL records say None for it too.
                        row[key] = None
            yield row
