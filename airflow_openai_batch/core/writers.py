"""Write reconciled records to local files in a staging folder (no Airflow, no fsspec, no network).

The collect operator reconciles into a local staging folder with :class:`ResultWriter`, then publishes
the finished files to object storage. Keeping this module local-only keeps it fast and testable, and
lets the publish step copy whole files (one multipart upload each) instead of many small writes.

Crash safety: every file is written as ``<name>.partial`` and renamed to its final name only by
:meth:`ResultWriter.close`; :func:`write_manifest` writes ``manifest.json`` last, atomically. So a file
with its final name is always complete, and a folder with a ``manifest.json`` is a finished result.
"""

from __future__ import annotations

import array
import contextlib
import functools
import os
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import orjson

__all__ = [
    "OUTPUT_FORMATS",
    "ResultWriter",
    "failures_schema",
    "read_records",
    "success_block",
    "success_block_jsonl",
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
#: Small on purpose: the Python objects, their Arrow copy and the encoded pages of one row group are all
#: in memory at once, and freed memory is not always returned to the OS (peak RSS, not speed, is what
#: bigger row groups cost here).
PARQUET_ROW_GROUP_BYTES = 4 * 1024 * 1024
#: Python overhead of one buffered row (tuple, small objects), counted in the byte budget.
_ROW_OVERHEAD = 256
#: Write buffer of each JSONL file.
_FILE_BUFFER = 1 << 20

_APPEND_NEWLINE = orjson.OPT_APPEND_NEWLINE


#: Arrow's allocator for a process where this module loads pyarrow first (see :func:`_pyarrow`).
ARROW_POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"


def _pyarrow() -> Any:
    if "pyarrow" not in sys.modules and sys.platform.startswith("linux"):
        # Arrow picks its default allocator once, from this variable, when it loads. Its default,
        # mimalloc, kept ~40 MB more at peak than jemalloc and was ~5% slower for a 200k-result Parquet
        # collect (writer thread, reader and helper each allocating and freeing a row group at a time).
        # Only a default: a value the user set wins, and a process that loaded pyarrow already keeps its
        # allocator. (Linux wheels ship jemalloc; elsewhere Arrow would warn that it is missing.)
        os.environ.setdefault(ARROW_POOL_ENV, "jemalloc")
    try:
        import pyarrow
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "output_format='parquet' needs pyarrow: pip install 'airflow-openai-batch[parquet]'"
        ) from exc
    return pyarrow


def _parquet() -> Any:
    """``pyarrow.parquet``, imported only where files are written or read (a helper process building
    Arrow blocks does without it)."""
    _pyarrow()
    import pyarrow.parquet

    return pyarrow.parquet


@functools.cache
def _memory_pool() -> Any:
    """The Arrow memory pool for everything written here: jemalloc where the build has it, else the system
    allocator.

    pyarrow's default (mimalloc) keeps freed memory per thread, and a collect allocates and frees a row
    group at a time on several threads (reader, writer, helper process): for 200k results into Parquet its
    peak RSS was ~55 MB higher than with jemalloc, for no gain in speed.
    """
    pa = _pyarrow()
    try:
        return pa.jemalloc_memory_pool()
    except NotImplementedError:  # pragma: no cover - depends on how pyarrow was built
        return pa.system_memory_pool()


@functools.cache
def _schemas() -> tuple[Any, Any]:
    pa = _pyarrow()
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
            pa.field("embedding", pa.list_(pa.float32())),
            pa.field("body", pa.string()),
            pa.field("usage", usage),
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
        ]
    )
    return successes, failures


def successes_schema() -> Any:
    """The Parquet schema of ``successes.parquet`` (needs pyarrow)."""
    return _schemas()[0]


def failures_schema() -> Any:
    """The Parquet schema of ``failures.parquet`` (needs pyarrow)."""
    return _schemas()[1]


def _parquet_writer(pa: Any, path: Path, schema: Any) -> Any:
    # zstd: several times smaller than snappy on JSON text and no slower to write. Dictionary encoding and
    # min/max statistics only where they help (ids, codes): on unique JSON bodies they are pure cost.
    small = [f.name for f in schema if f.name in ("batch_id", "status_code", "error_code")]
    return _parquet().ParquetWriter(
        str(path),
        schema,
        memory_pool=_memory_pool(),
        compression="zstd",
        use_dictionary=small,
        write_statistics=[*small, "custom_id"],
    )


class _JsonlFile:
    """One JSONL output, written through a large buffer to ``<path>.partial``.

    Once whole blocks come in (:meth:`add_block`, megabytes at a time), writing moves to a background
    thread: the write system calls then overlap with the work that produces the next block.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.partial = path.with_name(path.name + PARTIAL_SUFFIX)
        self._file = open(self.partial, "wb", buffering=_FILE_BUFFER)  # noqa: SIM115  (closed in close())
        self.write = self._file.write
        self.count = 0
        # Records are joined and written a few hundred at a time: one list append per record is cheaper
        # than one (buffered) write call.
        self._pending: list[bytes] = []
        self._queue: queue.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def add(self, record: dict[str, Any]) -> None:
        """Append one record as a JSON line (use either this or ``write`` on one file, not both)."""
        pending = self._pending
        pending.append(orjson.dumps(record, option=_APPEND_NEWLINE))
        if len(pending) >= 256:
            self._out(b"".join(pending))
            pending.clear()
        self.count += 1

    def add_block(self, data: bytes | memoryview, count: int) -> None:
        """Append ``count`` records already serialized as JSON lines (each ending with a newline)."""
        if self._queue is None:
            self._queue = queue.Queue(4)  # at most a few blocks wait: memory stays flat
            self._thread = threading.Thread(target=self._run, name="openai-batch-jsonl-writer", daemon=True)
            self._thread.start()
        if self._pending:
            self._out(b"".join(self._pending))
            self._pending.clear()
        self._out(data)
        self.count += count

    def _out(self, data: bytes | memoryview) -> None:
        if self._queue is None:
            self.write(data)
            return
        if self._error is not None:
            raise self._error
        self._queue.put(data)

    def _run(self) -> None:
        assert self._queue is not None
        while True:
            data = self._queue.get()
            if data is None:
                return
            if self._error is None:
                try:
                    self.write(data)
                except BaseException as exc:
                    self._error = exc

    def _stop_thread(self) -> None:
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        if self._pending:
            self._out(b"".join(self._pending))
            self._pending.clear()
        self._stop_thread()
        if self._error is not None:
            self._file.close()
            raise self._error
        self._file.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")  # the thread drains without writing
        self._stop_thread()
        self._file.close()
        self.partial.unlink(missing_ok=True)


class _TableWriter:
    """A ParquetWriter fed from a background thread.

    Encoding and compressing a row group happens in Arrow's C++ code with the GIL released, so a thread
    overlaps it with the parsing that produces the next row group. At most one table waits for the
    thread, so memory stays flat.
    """

    def __init__(self, pa: Any, path: Path, schema: Any) -> None:
        self._writer = _parquet_writer(pa, path, schema)
        self._queue: queue.Queue[Any] = queue.Queue()
        # One table in the writer's hands at a time: the caller waits (rarely) rather than pile them up.
        self._free = threading.Semaphore(1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="openai-batch-parquet-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            table = self._queue.get()
            if table is None:
                return
            try:
                if self._error is None:
                    self._writer.write_table(table)
            except BaseException as exc:
                self._error = exc
            finally:
                del table
                self._free.release()

    def write_table(self, table: Any) -> None:
        self._free.acquire()
        if self._error is not None:
            self._free.release()
            raise self._error
        self._queue.put(table)

    def close(self) -> None:
        """Wait for every table to be written, then close the file; re-raise a write error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._writer.close()
        if self._error is not None:
            raise self._error


class _SuccessColumns:
    """Success records buffered as columns for one row group (see :class:`_ParquetSuccesses`).

    The bulky parts never live as per-row Python objects: each body's JSON goes straight into one
    growing byte buffer (which becomes the Arrow string column without a copy or a per-row conversion),
    and embeddings into one flat float32 buffer (4 bytes a value instead of a 24-byte Python float). The
    small fields are kept as one tuple per row, transposed to columns by ``zip`` when the table is built.
    """

    def __init__(self, pa: Any, schema: Any) -> None:
        self._pa = pa
        self.schema = schema
        self._reset()

    def _reset(self) -> None:
        # (custom_id, batch_id, status_code, content, input, output, total, has_usage,
        #  body_end_offset, embedding_end_offset, has_embedding)
        self.rows: list[tuple[Any, ...]] = []
        self.bodies = bytearray()
        self.emb_values = array.array("f")
        self.buffered_bytes = 0

    @property
    def nbytes(self) -> int:
        """Estimated bytes held (what the row-group byte limit is checked against)."""
        return self.buffered_bytes + len(self.bodies) + 4 * len(self.emb_values)

    def add(self, record: dict[str, Any]) -> None:
        try:
            custom_id = record["custom_id"]
            batch_id = record["batch_id"]
            status_code = record["status_code"]
            body = record["body"]
            usage = record["usage"]
        except KeyError:  # a record not made by the Reconciler: missing fields are nulls
            get = record.get
            custom_id, batch_id, status_code = get("custom_id"), get("batch_id"), get("status_code")
            body, usage = get("body"), get("usage")
        self.add_row(
            custom_id, batch_id, status_code, body, usage, record.get("content"), record.get("embedding")
        )

    def add_row(
        self,
        custom_id: Any,
        batch_id: Any,
        status_code: Any,
        body: Any,
        usage: Any,
        content: Any,
        emb: Any,
    ) -> None:
        """:meth:`add` without the record dict (the fields of a success record, in order)."""
        bodies = self.bodies
        bodies += orjson.dumps(body)
        size = _ROW_OVERHEAD
        if content is not None:
            size += len(content)
        values = self.emb_values
        if emb is not None:
            values.extend(emb)
        if type(usage) is dict:
            inp = usage.get("input_tokens")
            if inp is None:
                inp = usage.get("prompt_tokens")
            out = usage.get("output_tokens")
            if out is None:
                out = usage.get("completion_tokens")
            total = usage.get("total_tokens")
            row = (
                custom_id,
                batch_id,
                status_code,
                content,
                inp,
                out,
                total,
                True,
                len(bodies),
                len(values),
                emb is not None,
            )
        else:
            row = (
                custom_id,
                batch_id,
                status_code,
                content,
                None,
                None,
                None,
                False,
                len(bodies),
                len(values),
                emb is not None,
            )
        self.rows.append(row)
        self.buffered_bytes += size

    def take_table(self) -> Any:
        """The buffered rows as an Arrow table (and the buffers emptied); ``None`` when there are none."""
        if not self.rows:
            return None
        pa = self._pa
        pool = _memory_pool()
        rows, bodies, values = self.rows, self.bodies, self.emb_values
        self._reset()
        columns: list[Any] = list(zip(*rows, strict=True))
        del rows
        n = len(columns[0])
        # orjson writes valid UTF-8, so the buffer is the string column's data as is.
        body = pa.StringArray.from_buffers(
            n,
            pa.array((0, *columns[8]), type=pa.int32(), memory_pool=pool).buffers()[1],
            pa.py_buffer(bodies),
        )
        # The nested columns are assembled from their buffers, the validity bitmaps being the has_usage and
        # has_embedding flags as Arrow booleans (bit-packed the same way): a missing vector is a null list,
        # not an empty one. (The from_arrays constructors would invert a mask with pyarrow.compute, whose
        # import alone costs a helper process ~0.1 s.)
        embedding = pa.Array.from_buffers(
            self.schema.field("embedding").type,
            n,
            [
                _bitmap(pa, columns[10]),
                pa.array((0, *columns[9]), type=pa.int32(), memory_pool=pool).buffers()[1],
            ],
            children=[pa.array(values, type=pa.float32(), memory_pool=pool)],
        )
        usage = pa.Array.from_buffers(
            self.schema.field("usage").type,
            n,
            [_bitmap(pa, columns[7])],
            children=[_int64_array(pa, columns[i]) for i in (4, 5, 6)],
        )
        return pa.Table.from_arrays(
            [
                pa.array(columns[0], type=pa.string(), memory_pool=pool),
                pa.array(columns[1], type=pa.string(), memory_pool=pool),
                pa.array(columns[2], type=pa.int32(), memory_pool=pool),
                pa.array(columns[3], type=pa.string(), memory_pool=pool),
                embedding,
                body,
                usage,
            ],
            schema=self.schema,
        )


def success_block_jsonl(records: Iterable[dict[str, Any]]) -> bytes:
    """Success records as JSON lines, exactly as :class:`ResultWriter` writes them one by one."""
    return b"".join([orjson.dumps(record, option=_APPEND_NEWLINE) for record in records])


def success_columns() -> _SuccessColumns:
    """An empty buffer of success rows; :func:`success_block` turns it into a block."""
    return _SuccessColumns(_pyarrow(), _schemas()[0])


def success_block(records: Iterable[dict[str, Any]] | _SuccessColumns) -> Any:
    """Success records as one Arrow IPC record batch, for :meth:`ResultWriter.write_success_block`.

    This is how a helper process hands a whole block of Parquet rows over at once (see
    :mod:`airflow_openai_batch.core.reconcile`).

    :param records: success records, or rows already buffered with :func:`success_columns`.
    """
    if isinstance(records, _SuccessColumns):
        columns = records
    else:
        columns = success_columns()
        for record in records:
            columns.add(record)
    table = columns.take_table()
    if table is None:
        return b""
    pool = _memory_pool()
    (batch,) = table.combine_chunks(memory_pool=pool).to_batches()
    # The Arrow buffer itself (bytes-like): written to a pipe or read back as it is, without a copy.
    return batch.serialize(memory_pool=pool)


class _ParquetFile:
    """One Parquet output written as ``<path>.partial`` in row groups of at most ``row_group_rows`` rows
    or about ``row_group_bytes`` bytes; subclasses buffer the rows and say how to :meth:`flush` them."""

    def __init__(self, path: Path, schema: Any, row_group_rows: int, row_group_bytes: int) -> None:
        pa = _pyarrow()
        self._pa = pa
        self.path = path
        self.partial = path.with_name(path.name + PARTIAL_SUFFIX)
        self.schema = schema
        self._writer = _TableWriter(pa, self.partial, schema)
        self._rows_limit = row_group_rows
        self._bytes_limit = row_group_bytes

    def flush(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.flush()
        self._writer.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        self.partial.unlink(missing_ok=True)


class _ParquetSuccesses(_ParquetFile):
    """Success records buffered for one row group (:class:`_SuccessColumns`), then written as Parquet."""

    def __init__(self, path: Path, schema: Any, row_group_rows: int, row_group_bytes: int) -> None:
        super().__init__(path, schema, row_group_rows, row_group_bytes)
        self.count = 0
        self._columns = _SuccessColumns(self._pa, schema)
        #: Record batches received whole (write_block), waiting to fill a row group.
        self._batches: list[Any] = []
        self._batch_rows = 0
        self._batch_bytes = 0

    def add(self, record: dict[str, Any]) -> None:
        """Buffer one success record (a row group is written when the buffer is full)."""
        if self._batches:
            self._flush_batches()
        columns = self._columns
        columns.add(record)
        self.count += 1
        if len(columns.rows) >= self._rows_limit or columns.nbytes >= self._bytes_limit:
            self.flush()

    def add_block(self, payload: bytes, count: int) -> None:
        """Buffer a block of rows made by :func:`success_block`."""
        if not count:
            return
        if self._columns.rows:
            self.flush()
        pa = self._pa
        batch = pa.ipc.read_record_batch(pa.py_buffer(payload), self.schema)
        self._batches.append(batch)
        self._batch_rows += batch.num_rows
        self._batch_bytes += batch.nbytes
        self.count += batch.num_rows
        if self._batch_rows >= self._rows_limit or self._batch_bytes >= self._bytes_limit:
            self._flush_batches()

    def _flush_batches(self) -> None:
        table = self._pa.Table.from_batches(self._batches, schema=self.schema)
        self._batches = []
        self._batch_rows = self._batch_bytes = 0
        self._writer.write_table(table)

    def flush(self) -> None:
        if self._batches:
            self._flush_batches()
        table = self._columns.take_table()
        if table is not None:
            self._writer.write_table(table)


def _bitmap(pa: Any, flags: tuple[bool, ...]) -> Any:
    """An Arrow validity bitmap: bit i set where ``flags[i]`` is true."""
    return pa.array(flags, type=pa.bool_(), memory_pool=_memory_pool()).buffers()[1]


def _int64_array(pa: Any, values: tuple[Any, ...]) -> Any:
    try:
        return pa.array(values, type=pa.int64(), memory_pool=_memory_pool())
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        # A token count that is not an integer: keep the row, drop the odd value.
        return pa.array(
            [v if type(v) is int else None for v in values], type=pa.int64(), memory_pool=_memory_pool()
        )


class _ParquetFailures(_ParquetFile):
    """Failure records buffered as columns and written as Parquet row groups."""

    def __init__(self, path: Path, schema: Any, row_group_rows: int, row_group_bytes: int) -> None:
        super().__init__(path, schema, row_group_rows, row_group_bytes)
        self._columns: list[list[Any]] = [[] for _ in schema]
        self.buffered_bytes = 0

    def add(self, record: dict[str, Any], request_line: bytes) -> None:
        cols = self._columns
        cols[0].append(record.get("custom_id"))
        cols[1].append(record.get("batch_id"))
        cols[2].append(record.get("status_code"))
        cols[3].append(record.get("error_code"))
        cols[4].append(record.get("error_message"))
        # The request as submitted, byte for byte: no re-serialization, key order kept.
        if request_line:
            cols[5].append(request_line)
        else:
            request = record.get("request")
            cols[5].append(None if request is None else orjson.dumps(request))
        self.buffered_bytes += len(request_line or b"") + 64
        if len(cols[0]) >= self._rows_limit or self.buffered_bytes >= self._bytes_limit:
            self.flush()

    def flush(self) -> None:
        if not self._columns[0]:
            return
        pa = self._pa
        pool = _memory_pool()
        columns = self._columns
        try:
            arrays = [
                pa.array(col, type=f.type, memory_pool=pool)
                for col, f in zip(columns, self.schema, strict=True)
            ]
        except pa.ArrowInvalid:
            # A request line that is not UTF-8 (an input OpenAI would have rejected): keep it, readable.
            columns[5] = [
                line.decode("utf-8", "replace") if isinstance(line, bytes) else line for line in columns[5]
            ]
            arrays = [
                pa.array(col, type=f.type, memory_pool=pool)
                for col, f in zip(columns, self.schema, strict=True)
            ]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self._columns = [[] for _ in self.schema]
        self.buffered_bytes = 0


class ResultWriter:
    """A :class:`~airflow_openai_batch.core.reconcile.RecordSink` writing local result files.

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
        self.failed = 0
        self.closed = False
        ext = output_format
        self._paths = {
            "successes": self.staging_dir / f"successes.{ext}",
            "failures": self.staging_dir / f"failures.{ext}",
            "retry_requests": self.staging_dir / RETRY_NAME,
        }
        self._files: list[Any] = []
        self._retry = self._open_jsonl(self._paths["retry_requests"])
        if output_format == "parquet":
            success_schema, failure_schema = _schemas()
            self._pq_success = _ParquetSuccesses(
                self._paths["successes"], success_schema, row_group_rows, row_group_bytes
            )
            self._pq_failure = _ParquetFailures(
                self._paths["failures"], failure_schema, row_group_rows, row_group_bytes
            )
            self._files += [self._pq_success, self._pq_failure]
            self._successes: _JsonlFile | _ParquetSuccesses = self._pq_success
            self.write_failure = self._parquet_failure  # type: ignore[method-assign]
        else:
            self._successes = self._open_jsonl(self._paths["successes"])
            self._jsonl_failures = self._open_jsonl(self._paths["failures"])
        # The hot path: one call per success, straight into the format's buffer.
        self.write_success = self._successes.add  # type: ignore[method-assign]
        #: The form :meth:`write_success_block` takes: what :func:`success_block_jsonl` or
        #: :func:`success_block` make.
        self.success_block_format = output_format

    def _open_jsonl(self, path: Path) -> _JsonlFile:
        handle = _JsonlFile(path)
        self._files.append(handle)
        return handle

    # -- RecordSink -------------------------------------------------------------------------------

    def write_success(self, record: dict[str, Any]) -> None:
        """Append one success record (replaced per instance by the format's own ``add``).

        :param record: a success record (see :mod:`airflow_openai_batch.core.reconcile`).
        """
        self._successes.add(record)

    def takes_success_blocks(self) -> bool:
        """Whether :meth:`write_success_block` may stand in for :meth:`write_success` calls.

        ``False`` once ``write_success`` was replaced on the instance (e.g. wrapped to count or filter
        records): every success then goes through it, one record at a time.
        """
        return not self.closed and self.write_success == self._successes.add

    def write_success_block(self, payload: bytes, count: int) -> None:
        """Append ``count`` success records made ready elsewhere (e.g. in a helper process).

        :param payload: JSONL: the records as JSON lines (:func:`success_block_jsonl`); Parquet: one Arrow
            IPC record batch (:func:`success_block`).
        :param count: the number of records in ``payload``.
        """
        self._successes.add_block(payload, count)

    def needs_parsed_requests(self) -> bool:
        """Whether failure records must carry the parsed ``request``: not into Parquet, which stores the
        request line as it is (unless ``write_failure`` was replaced on the instance, e.g. wrapped)."""
        return self.write_failure != self._parquet_failure  # type: ignore[comparison-overlap]

    @property
    def succeeded(self) -> int:
        """Success records written so far."""
        return self._successes.count

    def write_failure(self, record: dict[str, Any], request_line: bytes) -> None:
        """Append one failure record and its request line to the retry file.

        :param record: a failure record.
        :param request_line: the original request line, exactly as in the input file (no newline).
        """
        self._jsonl_failures.add(record)
        self._write_retry(record, request_line)
        self.failed += 1

    def _parquet_failure(self, record: dict[str, Any], request_line: bytes) -> None:
        self._pq_failure.add(record, request_line)
        self._write_retry(record, request_line)
        self.failed += 1

    def _write_retry(self, record: dict[str, Any], request_line: bytes) -> None:
        if request_line:
            self._retry.write(request_line)
            self._retry.write(b"\n")
        elif isinstance(record.get("request"), dict):
            self._retry.write(orjson.dumps(record["request"], option=_APPEND_NEWLINE))

    def close(self) -> None:
        """Flush everything and give each file its final name (idempotent)."""
        if self.closed:
            return
        for handle in self._files:
            handle.close()
        self.closed = True

    def abort(self) -> None:
        """Close the files and delete the ``.partial`` ones: nothing is published."""
        if self.closed:
            return
        for handle in self._files:
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
