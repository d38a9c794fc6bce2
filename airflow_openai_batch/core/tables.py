"""Tables in, tables out: rows of a Parquet or CSV table become request lines, and answers come back
joined to their rows (plain Python and pyarrow, no Airflow import). Importing it needs pyarrow (the
``parquet`` extra): import it where a table is used.

Submit side. :class:`TableInput` opens a table (one file or a folder of them, on any filesystem: a local
path, or an fsspec filesystem such as the one behind an ``ObjectStoragePath``) and reads it in record
batches, so memory stays flat at any size. :class:`TableRequests` turns each row into one request line:
``custom_id`` from ``id_column``, the prompt from a Python format template over the row's columns (filled
into the endpoint's prompt field), ``model`` and ``body`` merged in. Its :meth:`TableRequests.lines` are
what :func:`~airflow_openai_batch.core.prepare.prepare_from_lines` takes from a JSONL file, so the one
validator checks them like any other line. Lines are built a batch at a time in Arrow: the constant parts
of a line are encoded once, and only the row values are escaped (vectorised; a Python fallback per value
for what Arrow cannot say) and spliced in by one Arrow kernel.

Row numbers in errors are 1-based data rows (a CSV header is not a row; a folder's files count in path
order). A table's request line *n* is its row *n*, so a problem the line validator finds (a duplicate
``custom_id``, a body too large) names the row by that number too.

Collect side. :class:`TableSource` says where the table is (URI, format, id column, row count); it is
small and JSON-safe, so it travels from submit to collect (see :meth:`TableSource.to_metadata`).
:func:`join_answers` reads the table again and the collect's success and failure files, and writes
``answers.parquet`` (or ``.jsonl``): one row per input row, in input order, with the input's columns kept
with their types and the answer columns (:data:`ANSWER_COLUMNS`) after them. The join runs in Arrow: the
answers are indexed once by ``custom_id`` (held in memory up to a budget, else spilled to local Arrow IPC
partitions by input row range), and the input is streamed once in record batches.
"""

from __future__ import annotations

import bisect
import contextlib
import operator
import os
import re
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from airflow_openai_batch.core.jsonl import DEFAULT_CHUNK_SIZE, LineIterator, lines_from_raw_blocks
from airflow_openai_batch.core.prepare import (
    BuiltLines,
    PreparedInput,
    normalize_endpoint,
    prepare_from_built,
)
from airflow_openai_batch.core.requests import RequestRules
from airflow_openai_batch.core.table_format import TABLE_FORMATS, TABLE_SUFFIXES, table_format
from airflow_openai_batch.exceptions import InputProblem, OpenAIBatchInputError, OpenAIBatchJoinError

__all__ = [
    "ANSWER_COLUMNS",
    "NULL_POLICIES",
    "PROMPT_FIELDS",
    "TABLE_FORMATS",
    "JoinSummary",
    "TableInput",
    "TableRequests",
    "TableSource",
    "join_answers",
    "prepare_from_table",
    "table_format",
]


#: The body field each endpoint's prompt template fills.
PROMPT_FIELDS: dict[str, str] = {
    "/v1/chat/completions": "messages",
    "/v1/responses": "input",
    "/v1/embeddings": "input",
    "/v1/completions": "prompt",
    "/v1/moderations": "input",
    "/v1/images/generations": "prompt",
    "/v1/images/edits": "prompt",
    "/v1/videos": "prompt",
}
#: Where a system prompt goes: a system message (chat) or ``instructions`` (responses). Other endpoints
#: have no system prompt.
_SYSTEM_FIELDS = {"/v1/chat/completions": "messages", "/v1/responses": "instructions"}

#: What a null value in a prompt column does: ``"error"`` (a problem naming the row and column, nothing
#: is uploaded) or ``"empty"`` (it reads as an empty string).
NULL_POLICIES: tuple[str, ...] = ("error", "empty")

#: Answer columns of ``answers.<ext>``, in order. ``content`` is left out for embeddings, ``embedding``
#: for every other endpoint; ``parsed``, ``tool_calls`` and ``finish_reason`` appear when the success
#: records carry them (structured answers).
ANSWER_COLUMNS: tuple[str, ...] = (
    "status",
    "content",
    "embedding",
    "parsed",
    "tool_calls",
    "finish_reason",
    "error_code",
    "error_message",
    "usage",
)
_OPTIONAL_ANSWERS = ("parsed", "tool_calls", "finish_reason")
SUCCEEDED = "succeeded"
FAILED = "failed"

#: Rows per record batch read from the table. Lines are built a batch at a time: large enough that the
#: dozen Arrow calls per batch cost little per row, small enough that a batch's lines are about two MB
#: (16k rows, ~9 MB of lines, made the prep of a 1M-row table ~1.3x slower: measured, not understood).
_BATCH_ROWS = 4096
#: Rows per record batch read when joining (no lines are built, only columns taken).
_JOIN_BATCH_ROWS = 65_536
#: Rows turned into Python objects at a time when writing ``answers.jsonl``.
_JSONL_ROWS = 4096
#: Bytes of answers held in memory for the join before they are spilled to row-range partitions on disk
#: (while they are indexed they are held twice: ~200 MB at peak, with pyarrow's own ~70 MB).
JOIN_MEMORY_BUDGET = 96 << 20
#: Bytes that need escaping in a JSON string: every control character, the quote and the backslash.
_SPECIAL_BYTES = bytes(range(0x20)) + b'"\\'
_PLAIN_BYTES = bytes(b for b in range(256) if b not in _SPECIAL_BYTES)
#: The specials Arrow escapes by substring replacement, in a safe order (the backslash first).
_SIMPLE_ESCAPES = ((b"\\", "\\\\"), (b'"', '\\"'), (b"\n", "\\n"), (b"\r", "\\r"), (b"\t", "\\t"))
_SIMPLE_SPECIALS = frozenset(b[0] for b, _ in _SIMPLE_ESCAPES)
_FIELD_ROOT = re.compile(r"[^.\[]*")
_PARTIAL = ".partial"


def _problem(reason: str, field: str | None = "requests") -> OpenAIBatchInputError:
    return OpenAIBatchInputError([InputProblem(None, field, reason)])


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- reading a table -------------------------------------------------------------------------------------


class TableInput:
    """A Parquet or CSV table, one file or a folder of them, read in record batches.

    A folder's files are read in path order (hidden ``.``/``_`` files skipped; when some files have the
    format's suffix, only those), so row numbers are the same at submit and at collect. CSV columns named
    in ``string_columns`` of :meth:`batches` are read as text exactly as written (an id ``007`` stays
    ``007``); other CSV columns get pyarrow's inferred types.

    :param path: the table's path as ``filesystem`` spells it (for an ``ObjectStoragePath`` ``p``:
        ``p.path``), or a local path when ``filesystem`` is ``None``.
    :param filesystem: an fsspec filesystem (e.g. ``ObjectStoragePath.fs``) or a ``pyarrow.fs``
        filesystem; ``None`` for the local one.
    :param format: ``"parquet"`` or ``"csv"``; ``None`` to tell from the file names.
    :param uri: the table's location as the user gave it (``s3://bucket/tickets.parquet``), for messages
        and for :class:`TableSource`; defaults to ``path``.
    :raises OpenAIBatchInputError: nothing is at ``path``, or its format cannot be told or read.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        filesystem: Any = None,
        format: str | None = None,
        uri: str | None = None,
    ) -> None:

        self.path = os.fspath(path)
        self.uri = uri if uri is not None else self.path
        if filesystem is None:
            self._fs = pafs.LocalFileSystem()
            self.path = os.path.abspath(self.path)
        elif isinstance(filesystem, pafs.FileSystem):
            self._fs = filesystem
        else:  # an fsspec filesystem
            self._fs = pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))
        if format is not None and format not in TABLE_FORMATS:
            raise _problem(f"table format must be one of {TABLE_FORMATS}, not {format!r}")
        try:
            info = self._fs.get_file_info(self.path)
            if info.type == pafs.FileType.File:
                files = [self.path]
            elif info.type == pafs.FileType.Directory:
                files = self._folder_files(format)
            else:
                raise _problem(f"no table at {self.uri}")
        except (OSError, pa.ArrowException) as err:
            raise _problem(f"cannot open the table at {self.uri}: {err}") from err
        self.format = format or self._format_of(files)
        self.files: list[str] = files
        self._schemas: dict[tuple[str, ...], Any] = {}

    def _folder_files(self, format: str | None) -> list[str]:
        selector = pafs.FileSelector(self.path, recursive=True)
        root = self.path.rstrip("/") + "/"
        files = []
        for info in self._fs.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            relative = info.path[len(root) :] if info.path.startswith(root) else info.base_name
            if any(part.startswith((".", "_")) for part in relative.split("/")):
                continue
            files.append(info.path)
        if format is not None:
            matching = [f for f in files if table_format(f) == format]
        else:
            matching = [f for f in files if table_format(f) is not None]
        if matching:
            files = matching
        if not files:
            raise _problem(f"the folder {self.uri} holds no table files")
        return sorted(files)

    def _format_of(self, files: list[str]) -> str:
        formats = {table_format(f) for f in files}
        if len(formats) == 1 and None not in formats:
            return formats.pop()  # type: ignore[return-value]
        raise _problem(
            f"cannot tell the table format of {self.uri} from its file names "
            f"(expected {', '.join(sorted(TABLE_SUFFIXES))}); pass the format explicitly"
        )

    def _csv_options(self, key: tuple[str, ...], columns: Sequence[str] | None = None) -> Any:
        return pacsv.ConvertOptions(
            column_types=dict.fromkeys(key, pa.string()),
            include_columns=list(columns) if columns is not None else None,
        )

    def _key(self, string_columns: Sequence[str]) -> tuple[str, ...]:
        return tuple(sorted(set(string_columns))) if self.format == "csv" else ()

    def schema(self, string_columns: Sequence[str] = ()) -> Any:
        """The table's Arrow schema: its first file's (reads a Parquet footer, or a CSV's first block).

        :param string_columns: CSV columns read as text (see :meth:`batches`).
        :raises OpenAIBatchInputError: the file cannot be read as the format.
        """
        key = self._key(string_columns)
        if key not in self._schemas:
            path = self.files[0]
            try:
                if self.format == "parquet":
                    with self._fs.open_input_file(path) as file:
                        schema = pq.ParquetFile(file).schema_arrow
                else:
                    with self._fs.open_input_stream(path) as stream:
                        schema = pacsv.open_csv(stream, convert_options=self._csv_options(key)).schema
            except (OSError, pa.ArrowException) as err:
                raise _problem(f"cannot read {path} as {self.format}: {err}") from err
            self._schemas[key] = schema
        return self._schemas[key]

    def batches(
        self,
        columns: Sequence[str] | None = None,
        *,
        string_columns: Sequence[str] = (),
        batch_rows: int = _BATCH_ROWS,
    ) -> Iterator[Any]:
        """The table's rows as Arrow record batches, in order, file after file.

        Every batch has the first file's types (later files' batches are cast to them).

        :param columns: the columns to read (``None``: all), in this order.
        :param string_columns: CSV columns read as text exactly as written, not type-inferred.
        :param batch_rows: rows per batch, at most (CSV: about a megabyte of text per batch).
        :raises OpenAIBatchInputError: a file cannot be read (corrupt, not of the format, a column missing).
        """
        key = self._key(string_columns)
        schema = self.schema(string_columns)
        names = list(columns) if columns is not None else schema.names
        target = pa.schema([schema.field(name) for name in names])
        for path in self.files:
            try:
                for batch in self._file_batches(path, key, names, batch_rows):
                    yield batch if batch.schema == target else batch.select(names).cast(target)
            except (OSError, KeyError, pa.ArrowException) as err:
                raise _problem(f"cannot read {path} as {self.format}: {err}") from err

    def _file_batches(
        self, path: str, key: tuple[str, ...], names: list[str], batch_rows: int
    ) -> Iterator[Any]:
        if self.format == "parquet":
            with self._fs.open_input_file(path) as file:
                yield from pq.ParquetFile(file).iter_batches(batch_size=batch_rows, columns=names)
        else:
            with self._fs.open_input_stream(path) as stream:
                yield from pacsv.open_csv(stream, convert_options=self._csv_options(key, names))


# -- rows -> request lines -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    """One ``{...}`` of a template: a column, and what Python formatting does to its value."""

    column: str
    text: str  # the whole field as written, e.g. "meta[lang]!r:>10"
    name: str  # "meta[lang]"
    conversion: str | None
    spec: str

    @property
    def plain(self) -> bool:
        """``{column}`` alone: the value's text as it is, which Arrow can make for whole columns."""
        return self.name == self.column and not self.conversion and not self.spec


#: The id's place in a line's layout (its values come from the id column, not from a template).
_ID = _Field("", "\x00id", "\x00id", None, "")


def _parse_template(text: Any, param: str) -> list[str | _Field]:
    """A format template as literal text and fields (parsed once, with :class:`string.Formatter`)."""
    if not isinstance(text, str):
        raise _problem(f"must be a string, got {type(text).__name__}", param)
    pieces: list[str | _Field] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as err:
        raise _problem(f"is not a valid format template ({err}): {_short(text)}", param) from err
    for literal, name, spec, conversion in parsed:
        if literal:
            pieces.append(literal)
        if name is None:
            continue
        column = _FIELD_ROOT.match(name).group(0)  # type: ignore[union-attr]
        if not column or column.isdigit():
            raise _problem(
                f"fields must name a column ({{text}}), not a position ({{{name}}}): {_short(text)}", param
            )
        if spec and "{" in spec:
            raise _problem(f"nested fields in a format spec are not supported: {{{name}:{spec}}}", param)
        whole = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
        pieces.append(_Field(column, whole, name, conversion, spec or ""))
    return pieces


def _json_text(value: str) -> str:
    """The inside of a JSON string holding ``value`` (escaped, without the quotes)."""
    return orjson.dumps(value).decode()[1:-1]


def _escaped(array: Any) -> tuple[Any, bool]:
    """A string column made JSON-string-safe, doing only the work its values need, and whether its
    values are all printable ASCII (then they are valid UTF-8 without a check of their own)."""
    buffers = array.buffers()
    if not len(array) or buffers[2] is None:
        return array, True
    offsets = memoryview(buffers[1]).cast("i")
    start, stop = offsets[array.offset], offsets[array.offset + len(array)]
    if start == stop:
        return array, True
    # Printable ASCII (the common case) from the values' lowest and highest byte: one vectorized pass
    # over the buffer, about 4x faster than the ascii_is_printable kernel value by value.
    span = pc.min_max(pa.Array.from_buffers(pa.uint8(), stop - start, [None, buffers[2]], offset=start))
    printable = span["min"].as_py() >= 0x20 and span["max"].as_py() <= 0x7E
    # bytes(memoryview) copies about 3x faster than Buffer.to_pybytes (pyarrow 26).
    data = bytes(memoryview(buffers[2])[start:stop])
    # Printable ASCII can only need its quotes and backslashes escaped.
    present = {c for c in b'"\\' if c in data} if printable else set(data.translate(None, _PLAIN_BYTES))
    if not present:
        return array, printable
    if present <= _SIMPLE_SPECIALS:
        for special, escaped in _SIMPLE_ESCAPES:
            if special[0] in present:
                array = pc.replace_substring(array, special.decode(), escaped)
        return array, printable
    # Other control characters (rare): orjson writes them as \u00XX, one value at a time.
    return pa.array([None if v is None else _json_text(v) for v in array.to_pylist()], pa.string()), False


def _is_text(type_: Any) -> bool:
    t = pa.types
    if t.is_dictionary(type_):
        return _is_text(type_.value_type)
    return t.is_string(type_) or t.is_large_string(type_) or t.is_string_view(type_)


def _as_text(array: Any) -> Any:
    """A text or integer column as ``string`` values (integers as Python writes them)."""
    return array if array.type == pa.string() else array.cast(pa.string())


class _Problems:
    """Row problems found while reading: the first ``limit`` kept, all counted."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.listed: list[InputProblem] = []
        self.count = 0

    def add(self, row: int, column: str | None, reason: str) -> None:
        self.count += 1
        if len(self.listed) < self.limit:
            self.listed.append(InputProblem(row, column, reason, unit="row"))

    def error(self) -> OpenAIBatchInputError:
        return OpenAIBatchInputError(self.listed, self.count)


class TableRequests:
    """The request lines of a table: one per row, from a prompt template or a ``request_builder``.

    Everything that can be checked without reading a row is checked here, in the constructor: the
    template's columns exist, the id column has a usable type, ``body`` does not set what the template
    fills, the endpoint has a prompt field. Rows are checked as they are read (an empty or null id, a
    null in a prompt column); all problems are reported together, at the end of the input, as one
    :class:`~airflow_openai_batch.exceptions.OpenAIBatchInputError` naming each row and column (like the
    line validator does for JSONL). Duplicate ids are left to the line validator, which names both rows.

    Typical use (the submit operator)::

        table = TableInput(path.path, filesystem=path.fs, uri=str(path))
        requests = TableRequests(table, endpoint=endpoint, id_column="ticket_id",
                                 prompt="Label this ticket:\\n{text}", model=model)
        prepared = prepare_from_lines(requests.lines(), endpoint=endpoint, work_dir=work_dir, model=model)
        source = requests.source()  # after the lines were read: where the table is, and its row count

    :param table: the table.
    :param endpoint: the batch endpoint (``/v1/chat/completions``...); decides the prompt's field (see
        :data:`PROMPT_FIELDS`).
    :param id_column: the column whose values become ``custom_id`` (text or integers; unique, non-empty).
    :param prompt: a Python format template over the row's columns, e.g. ``"Label this ticket:\\n{text}"``
        (``{{``/``}}`` for literal braces). Chat: the user message; responses: ``input``; embeddings and
        moderations: ``input``; completions, images and videos: ``prompt``.
    :param system_prompt: a template too: chat's system message, responses' ``instructions``.
    :param body: merged into every request body (``temperature``, ``max_completion_tokens``, a
        ``response_format``...); must not set the field the template fills.
    :param model: ``body.model`` of every request (``None``: from ``body``, or filled in later by
        ``prepare_from_lines(model=...)``).
    :param request_builder: instead of a template, ``row -> body`` for anything a template cannot say:
        called with each row as a dict of all columns; ``model`` and ``body`` are defaults under its keys.
    :param on_null: a null in a prompt column: ``"error"`` (the default: a problem naming the row and
        column) or ``"empty"`` (an empty string). CSV cells are text, so an empty cell is ``""``, not null.
    :param max_problems: how many problems the error lists (all are counted).
    :param batch_rows: rows read and turned into lines at a time.
    :raises OpenAIBatchInputError: the parameters do not fit the table or the endpoint.
    """

    def __init__(
        self,
        table: TableInput,
        *,
        endpoint: str,
        id_column: str,
        prompt: str | None = None,
        system_prompt: str | None = None,
        body: Mapping[str, Any] | None = None,
        model: str | None = None,
        request_builder: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
        on_null: str = "error",
        max_problems: int = 50,
        batch_rows: int = _BATCH_ROWS,
    ) -> None:
        self.table = table
        self.endpoint = normalize_endpoint(endpoint)
        self.id_column = id_column
        self.request_builder = request_builder
        self.model = model or None
        self.max_problems = max_problems
        self.batch_rows = batch_rows
        #: Rows read so far (all of them once :meth:`lines` or :meth:`blocks` was read to the end).
        self.rows = 0
        self._finished = False
        if on_null not in NULL_POLICIES:
            raise _problem(f"must be one of {NULL_POLICIES}, not {on_null!r}", "on_null")
        self.on_null = on_null
        if not isinstance(id_column, str) or not id_column:
            raise _problem(
                "a table input needs id_column= (the column whose values become custom_id)", "id_column"
            )
        base = self._base_body(body)
        self._base = base
        self._templates = (prompt, system_prompt)
        if request_builder is not None:
            if prompt is not None or system_prompt is not None:
                raise _problem(
                    "give either prompt= (and system_prompt=) or request_builder=, not both", "prompt"
                )
            if not callable(request_builder):
                raise _problem(f"must be callable, got {type(request_builder).__name__}", "request_builder")
            self._layout: list[str | _Field] = []
        else:
            if prompt is None:
                raise _problem(
                    "a table input needs prompt= (a template over its columns) or request_builder=", "prompt"
                )
            self._layout = self._compile(prompt, system_prompt, base)
        #: The template's fields by their text (each is formatted and escaped once per batch).
        self._fields = {p.text: p for p in self._layout if isinstance(p, _Field) and p is not _ID}
        # CSV: the id and the columns a template reads as they are were written, not as inferred numbers.
        self._string_columns = [
            id_column,
            *dict.fromkeys(f.column for f in self._fields.values() if f.plain and f.column != id_column),
        ]
        schema = table.schema(self._string_columns)
        #: The columns lines are made of (a request_builder gets every column).
        self._read_columns = list(dict.fromkeys([id_column, *(f.column for f in self._fields.values())]))
        missing = [c for c in self._read_columns if c not in schema.names]
        if missing:
            names = ", ".join(schema.names)
            problems = [
                InputProblem(
                    None,
                    "id_column" if c == id_column else "prompt",
                    f"names column {c!r}, which the table lacks (columns: {names})",
                )
                for c in missing
            ]
            raise OpenAIBatchInputError(problems)
        id_type = schema.field(id_column).type
        if not (_is_text(id_type) or pa.types.is_integer(id_type)):
            raise _problem(
                f"column {id_column!r} has type {id_type}; ids must be text or integers", "id_column"
            )
        self._schema = schema

    # -- configuration ---------------------------------------------------------------------------------

    def _base_body(self, body: Mapping[str, Any] | None) -> dict[str, Any]:
        if body is not None and not isinstance(body, Mapping):
            raise _problem(f"must be a dict, got {type(body).__name__}", "body")
        extra = dict(body or {})
        if self.model is not None:
            if extra.get("model") not in (None, self.model):
                raise _problem(f"sets model {extra['model']!r} but model= is {self.model!r}", "body")
            extra.pop("model", None)
            extra = {"model": self.model, **extra}
        try:
            orjson.dumps(extra)
        except TypeError as err:
            raise _problem(f"is not JSON-serializable: {err}", "body") from err
        return extra

    def _compile(self, prompt: str, system_prompt: str | None, base: dict[str, Any]) -> list[str | _Field]:
        """The line as constant text and fields: the body serialized once around placeholders."""
        endpoint = self.endpoint
        target = PROMPT_FIELDS.get(endpoint)
        if target is None:
            raise _problem(
                f"{endpoint} has no prompt field a template can fill; use request_builder=", "prompt"
            )
        user = _parse_template(prompt, "prompt")
        system = _parse_template(system_prompt, "system_prompt") if system_prompt is not None else None
        if system is not None and endpoint not in _SYSTEM_FIELDS:
            raise _problem(f"{endpoint} takes no system prompt", "system_prompt")
        filled = {target} | ({_SYSTEM_FIELDS[endpoint]} if system is not None else set())
        clash = sorted(filled & set(base))
        if clash:
            raise _problem(f"sets {', '.join(clash)}, which the prompt template fills", "body")
        # Placeholders: unique strings, serialized by orjson with everything else, then cut out.
        token = os.urandom(8).hex()
        marks = {name: f"\x00{token}:{name}\x00" for name in ("id", "user", "system")}
        body = dict(base)
        if endpoint == "/v1/chat/completions":
            messages = [{"role": "user", "content": marks["user"]}]
            if system is not None:
                messages.insert(0, {"role": "system", "content": marks["system"]})
            body["messages"] = messages
        else:
            body[target] = marks["user"]
            if system is not None:
                body[_SYSTEM_FIELDS[endpoint]] = marks["system"]
        line = orjson.dumps(
            {"custom_id": marks["id"], "method": "POST", "url": endpoint, "body": body}
        ).decode()
        parts = {"id": [_ID], "user": user, "system": system or []}
        layout: list[str | _Field] = []
        pattern = re.compile(
            '"' + re.escape(_json_text(f"\x00{token}:")) + r"(\w+)" + re.escape(_json_text("\x00")) + '"'
        )
        pos = 0
        for match in pattern.finditer(line):
            layout.append(line[pos : match.start()] + '"')
            for piece in parts[match.group(1)]:
                layout.append(_json_text(piece) if isinstance(piece, str) else piece)
            layout.append('"')
            pos = match.end()
        layout.append(line[pos:] + "\n")
        # Adjacent constant text is one piece: fewer arguments to the kernel that splices the line.
        merged: list[str | _Field] = []
        for piece in layout:
            if isinstance(piece, str) and merged and isinstance(merged[-1], str):
                merged[-1] += piece
            elif piece != "":
                merged.append(piece)
        return merged

    # -- reading ---------------------------------------------------------------------------------------

    def lines(self) -> LineIterator:
        """The request lines (``bytes``, no newline), one per row, in row order.

        A consumer may take them as newline-terminated blocks instead (``take_raw_blocks()``), as
        :func:`~airflow_openai_batch.core.prepare.prepare_from_lines` does with a JSONL file's lines.

        :raises OpenAIBatchInputError: at the end of the input, if any row had a problem.
        """
        return lines_from_raw_blocks(self.blocks())

    def blocks(self) -> Iterator[bytes]:
        """The request lines as newline-terminated blocks of whole lines, about a megabyte each.

        :raises OpenAIBatchInputError: at the end of the input, if any row had a problem.
        """
        if self.request_builder is not None:
            yield from self._builder_blocks()
            return
        for escaped, _, _ in self._escaped_batches():
            yield from _cut_array(_joined(self._layout, escaped))

    def built_blocks(self, rules: RequestRules) -> Iterator[BuiltLines | bytes]:
        """The request lines as :func:`~airflow_openai_batch.core.prepare.prepare_from_built` takes them:
        a batch of rows at a time, built with ``rules``' model and response schema in the template's body
        and checked against ``rules`` (see :meth:`_built`), with what the template says of every line.

        A batch the check does not clear, and the lines of a ``request_builder`` (arbitrary bodies) or of
        a submission that counts every prompt, are handed over as raw blocks (:meth:`blocks`' lines), for
        the line validator to check one by one and name every problem.

        :param rules: the submission's request rules.
        :raises OpenAIBatchInputError: at the end of the input, if any row had a problem.
        """
        if self.request_builder is not None or rules.prompt_tokens is not None:
            yield from self.blocks()
            return
        base = dict(self._base)
        if not base.get("model") and rules.fill_model is not None:
            base["model"] = rules.fill_model  # what the validator fills in, put in once
        # The schema's format goes into the template's body once; a body with its own keeps it.
        own_format = rules.schema is not None and not rules.schema.inject_body(base)
        layout = self._compile(*self._templates, base)  # type: ignore[arg-type]
        for escaped, ids, ascii_values in self._escaped_batches():
            built = self._built(rules, _joined(layout, escaped), ids, own_format, ascii_values)
            if built is not None:
                yield from _cut_built(*built)
            else:
                yield from _cut_array(_joined(self._layout, escaped))

    def _built(
        self, rules: RequestRules, lines: Any, ids: Any, own_format: bool, ascii_values: bool
    ) -> tuple[BuiltLines, Any] | None:
        """A batch's lines as :class:`BuiltLines` with each line's size (an Arrow array), or ``None`` when
        the line validator must see them.

        The lines differ only in their id and the template's values, which are JSON strings by
        construction; the rest of a line (method, url, the body's fields, model, caps) is the template's,
        the same on every line. So the validator checks the batch's first line (all the rules, the one
        statement of them), and what a row's values can still get wrong is checked for the batch here:
        ids non-empty (read with the rows), their repeats (by prepare), the longest line against the
        size limit, the text valid UTF-8.
        """
        count = len(lines)
        buffers = lines.buffers()
        offsets = memoryview(buffers[1]).cast("i")[lines.offset : lines.offset + count + 1]
        start = offsets[0]
        ends = offsets.tolist() if not start else [end - start for end in offsets.tolist()]
        data = memoryview(buffers[2])[start : start + ends[-1]]
        first = bytes(data[: ends[1] - 1])
        checked = rules.check_line(first)
        if checked is None or checked.problems or checked.line != first:
            return None
        sizes = pc.binary_length(lines)
        longest = pc.max(sizes).as_py()
        if rules.limit_problem(longest, checked.inputs, checked.tokens) is not None:
            return None
        if not ascii_values:
            # UTF-8, as the validator checks every line's (values all printable ASCII need no check: the
            # rest of a line is the template's text, valid by construction).
            try:
                lines.validate(full=True)
            except pa.ArrowInvalid:
                return None
        return BuiltLines(
            data,
            ends,
            ids.to_pylist(),
            checked.model,
            checked.cap,
            [checked.inputs] * count if rules.counts_inputs else None,
            own_formats=count if own_format else 0,
            longest=longest,
            ascending_ids=_ascending_ids(ids),
        ), sizes

    def _escaped_batches(self) -> Iterator[tuple[dict[str, Any], Any, bool]]:
        """Each batch's template values and ids, escaped for a JSON string, by field text (the id's
        under ``_ID.text``); its ids as they are; and whether all those values are printable ASCII.

        :raises OpenAIBatchInputError: at the end of the input, if any row had a problem.
        """
        problems = _Problems(self.max_problems)
        for batch, first_row, ids in self._rows(self._read_columns, problems):
            texts = self._field_texts(batch, first_row, problems)
            if problems.count:
                continue  # only checking from here on: nothing more is handed on
            texts[_ID.text] = ids
            escaped: dict[str, Any] = {}
            ascii_values = True
            for key, text in texts.items():
                escaped[key], printable = _escaped(text)
                ascii_values = ascii_values and printable
            yield escaped, ids, ascii_values

    def _builder_blocks(self) -> Iterator[bytes]:
        """The lines of a ``request_builder``, a batch of rows at a time."""
        problems = _Problems(self.max_problems)
        for batch, first_row, ids in self._rows(None, problems):
            data = self._built_lines(batch, ids, first_row, problems)
            if data and not problems.count:
                yield from _cut(data)

    def _rows(self, columns: list[str] | None, problems: _Problems) -> Iterator[tuple[Any, int, Any]]:
        """Each non-empty batch of rows with its first row's number and its ids (problems noted).

        :raises OpenAIBatchInputError: at the end of the input, if any row had a problem.
        """
        self.rows = 0
        for batch in self.table.batches(
            columns, string_columns=self._string_columns, batch_rows=self.batch_rows
        ):
            first_row = self.rows + 1
            self.rows += batch.num_rows
            if batch.num_rows:
                yield batch, first_row, self._ids(batch, first_row, problems)
        if problems.count:
            raise problems.error()
        self._finished = True

    def _ids(self, batch: Any, first_row: int, problems: _Problems) -> Any:
        ids = _as_text(batch.column(self.id_column))
        # The usual batch at a glance: no null, and the shortest id is not empty.
        if ids.null_count or pc.min(pc.binary_length(ids)).as_py() == 0:
            empty = pc.equal(pc.binary_length(pc.fill_null(ids, "")), 0)
            for index in pc.indices_nonzero(empty).to_pylist():
                value = ids[index].as_py()
                what = "null" if value is None else "an empty string"
                problems.add(
                    first_row + index,
                    self.id_column,
                    f"the id is {what}; every row needs a non-empty id",
                )
        return ids

    def _field_texts(self, batch: Any, first_row: int, problems: _Problems) -> dict[str, Any]:
        """Each template field's text for the batch's rows (nulls reported, or made empty)."""
        texts: dict[str, Any] = {}
        for key, fld in self._fields.items():
            column = batch.column(fld.column)
            if fld.plain and (_is_text(column.type) or pa.types.is_integer(column.type)):
                text = _as_text(column)
            else:
                text = self._python_text(fld, column, first_row, problems)
            if text.null_count:
                if self.on_null == "empty":
                    text = pc.fill_null(text, "")
                else:
                    for index in pc.indices_nonzero(pc.is_null(text)).to_pylist():
                        problems.add(
                            first_row + index,
                            fld.column,
                            f"null in a prompt column (field {{{fld.text}}}); on_null='empty' reads it as ''",
                        )
            texts[key] = text
        return texts

    def _python_text(self, fld: _Field, column: Any, first_row: int, problems: _Problems) -> Any:
        """Python formatting, value by value: format specs, conversions, ``{col[key]}``, floats, dates."""
        formatter = string.Formatter()
        nested = fld.name != fld.column
        out: list[str | None] = []
        for index, value in enumerate(column.to_pylist()):
            try:
                if nested and value is not None:
                    value = formatter.get_field(fld.name, (), {fld.column: value})[0]
                out.append(
                    None
                    if value is None
                    else formatter.format_field(formatter.convert_field(value, fld.conversion), fld.spec)
                )
            except (KeyError, IndexError, AttributeError, TypeError, ValueError) as err:
                problems.add(
                    first_row + index,
                    fld.column,
                    f"cannot format {{{fld.text}}} with value {_short(value)}: {type(err).__name__}: {err}",
                )
                out.append("")
        return pa.array(out, pa.string())

    def _built_lines(self, batch: Any, ids: Any, first_row: int, problems: _Problems) -> bytes:
        builder = self.request_builder
        assert builder is not None
        base = self._base
        url = self.endpoint
        dumps = orjson.dumps
        out: list[bytes] = []
        for index, (cid, row) in enumerate(zip(ids.to_pylist(), batch.to_pylist(), strict=True)):
            row_no = first_row + index
            try:
                built = builder(row)
            except Exception as err:  # the user's code: any error is this row's problem
                problems.add(row_no, None, f"request_builder raised {type(err).__name__}: {err}")
                continue
            if not isinstance(built, Mapping):
                problems.add(
                    row_no,
                    None,
                    f"request_builder returned {type(built).__name__}, not a dict (the request body)",
                )
                continue
            if cid is None or cid == "":
                continue  # already reported
            try:
                out.append(dumps({"custom_id": cid, "method": "POST", "url": url, "body": {**base, **built}}))
            except TypeError as err:
                problems.add(
                    row_no,
                    None,
                    f"the body request_builder returned is not JSON-serializable: {err}",
                )
        if not out:
            return b""
        return b"\n".join(out) + b"\n"

    def source(self) -> TableSource:
        """Where the table is and how many rows it had, for collect to join the answers back.

        :raises RuntimeError: the lines were not read to the end yet.
        """
        if not self._finished:
            raise RuntimeError("TableRequests.source() needs the lines read to the end first")
        return TableSource(
            uri=self.table.uri,
            format=self.table.format,
            id_column=self.id_column,
            row_count=self.rows,
            endpoint=self.endpoint,
        )


def _ascending_ids(ids: Any) -> bool | None:
    """Whether ids of one length strictly ascend (then they hold no repeat), told by two Arrow kernels;
    ``None`` for ids of several lengths (the duplicate finder orders those by length first)."""
    if len(ids) < 2:
        return True
    lengths = pc.min_max(pc.binary_length(ids))
    if lengths["min"].as_py() != lengths["max"].as_py():
        return None
    return pc.all(pc.less(ids.slice(0, len(ids) - 1), ids.slice(1))).as_py() is True


def _cut_built(built: BuiltLines, sizes: Any, size: int = DEFAULT_CHUNK_SIZE) -> Iterator[BuiltLines]:
    """A batch's lines in pieces of about ``size`` bytes (whole lines), as :func:`_cut_array` cuts raw
    blocks: chunk files written a few megabytes at a time were measured several times slower here.
    (``sizes``: each line's bytes, an Arrow array: a piece's longest line is one kernel call away.)"""
    ends, count = built.ends, len(built.ids)
    row = 0
    while row < count:
        start = ends[row]
        if ends[count] - start <= size + (size >> 1):
            stop = count
        else:
            stop = max(row + 1, bisect.bisect_right(ends, start + size, row + 1, count + 1) - 1)
        yield BuiltLines(
            built.data[start : ends[stop]],
            [end - start for end in ends[row : stop + 1]] if start else ends[: stop + 1],
            built.ids[row:stop],
            built.model,
            built.cap,
            built.inputs[row:stop] if built.inputs is not None else None,
            None,
            built.own_formats and stop - row,
            built.longest if row == 0 and stop == count else pc.max(sizes.slice(row, stop - row)).as_py(),
            built.ascending_ids,
        )
        row = stop


def _joined(layout: list[str | _Field], escaped: dict[str, Any]) -> Any:
    """A batch's lines: the layout's constant text and escaped values spliced by one Arrow kernel."""
    parts = [p if isinstance(p, str) else escaped[p.text] for p in layout]
    return pc.binary_join_element_wise(*parts, "")


def prepare_from_table(requests: TableRequests, **prepare_args: Any) -> tuple[PreparedInput, TableSource]:
    """A table's rows validated and split into chunk files: what the submit operator does with a table.

    The rows' lines go through :func:`~airflow_openai_batch.core.prepare.prepare_from_lines`, the
    validator and splitter a JSONL file goes through. Problems the line validator finds (a duplicate
    id, a body too large) are named by row: a table's line *n* is its row *n*.

    :param requests: the table's request lines.
    :param prepare_args: ``prepare_from_lines``'s keyword arguments (``endpoint``, ``work_dir``,
        ``model``, the limits...): the same as for a JSONL file.
    :return: the prepared chunks, and where the table is (for collect to join the answers back).
    :raises OpenAIBatchInputError: rows are invalid; nothing is kept in ``work_dir`` then.
    """
    try:
        prepared = prepare_from_built(requests, **prepare_args)
    except OpenAIBatchInputError as err:
        if all(p.unit == "row" for p in err.problems):
            raise
        raise OpenAIBatchInputError([_as_row_problem(p) for p in err.problems], err.total) from None
    return prepared, requests.source()


_LINE_REFERENCE = re.compile(r"\bline (\d+)\b")


def _as_row_problem(problem: InputProblem) -> InputProblem:
    """A line validator's problem as the table's: its line numbers are row numbers."""
    if problem.line is None or problem.unit == "row":
        return problem
    return InputProblem(
        problem.line, problem.field, _LINE_REFERENCE.sub(r"row \1", problem.reason), unit="row"
    )


def _cut(data: bytes, size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    """``data`` (whole lines) as blocks of about ``size`` bytes, each ending at a line's end."""
    if len(data) <= size + (size >> 1):
        yield data
        return
    pos = 0
    while pos < len(data):
        cut = data.find(b"\n", pos + size) + 1
        if cut <= 0:
            cut = len(data)
        yield data[pos:cut]
        pos = cut


def _cut_array(lines: Any, size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    """The bytes of a string array of newline-terminated lines as blocks of about ``size`` bytes; each
    block is copied once, straight from the Arrow buffer."""
    buffers = lines.buffers()
    data = memoryview(buffers[2])
    offsets = memoryview(buffers[1]).cast("i")[lines.offset : lines.offset + len(lines) + 1]
    row, end_row = 0, len(lines)
    end = offsets[end_row]
    while row < end_row:
        start = offsets[row]
        if end - start <= size + (size >> 1):
            stop = end_row  # the rest, rather than a small tail block
        else:
            # The last line ending within ``size`` bytes, or the first line if it alone is longer.
            stop = max(row + 1, bisect.bisect_right(offsets, start + size, row + 1, end_row + 1) - 1)
        yield bytes(data[start : offsets[stop]])
        row = stop


# -- the table's location, from submit to collect -------------------------------------------------------

#: Batch metadata keys of :meth:`TableSource.to_metadata`.
METADATA_TABLE = "aob_table"
METADATA_TABLE_URI = "aob_table_uri"
_METADATA_VALUE_CHARS = 512


@dataclass(frozen=True)
class TableSource:
    """Where a submitted table is, so collect can join the answers back without the user repeating it.

    JSON-safe (:meth:`to_dict` / :meth:`from_dict`), small enough to ride in each batch's metadata
    (:meth:`to_metadata` / :meth:`from_metadata`) or in an XCom.

    :param uri: the table's location as the user gave it (a local path or an object store URI).
    :param format: ``"parquet"`` or ``"csv"``.
    :param id_column: the column whose values became ``custom_id``.
    :param row_count: the table's rows at submit (a different count at collect means it changed).
    :param endpoint: the batch endpoint, which decides the answer columns (``embedding`` or ``content``).
    """

    uri: str
    format: str
    id_column: str
    row_count: int
    endpoint: str | None = None
    version: int = field(default=1, repr=False)

    def __post_init__(self) -> None:
        if self.format not in TABLE_FORMATS:
            raise ValueError(f"TableSource.format must be one of {TABLE_FORMATS}, not {self.format!r}")
        if not isinstance(self.row_count, int) or self.row_count < 0:
            raise ValueError(f"TableSource.row_count must be a non-negative integer, not {self.row_count!r}")
        if re.match(r"^[a-z][a-z0-9+.-]*://[^/@]*:[^/@]*@", self.uri, re.I) or "?" in self.uri:
            # It travels in batch metadata and XCom, and lands in logs: no password, no signed URL. (A
            # connection id as the user part, s3://aws_default@bucket/..., is how Airflow names one.)
            raise ValueError(
                "the table's location must not carry a password or a query string (user:pass@, ?...); "
                "use a connection for the credentials"
            )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe form (an XCom value, or a ``table_source.json`` beside other state)."""
        return {
            "version": self.version,
            "uri": self.uri,
            "format": self.format,
            "id_column": self.id_column,
            "row_count": self.row_count,
            "endpoint": self.endpoint,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TableSource:
        """Read :meth:`to_dict`'s form back.

        :raises ValueError: a key is missing or the version is unknown.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a table source is a dict, not {type(data).__name__}")
        if data.get("version", 1) != 1:
            raise ValueError(f"unknown table source version {data.get('version')!r}")
        try:
            return cls(
                uri=str(data["uri"]),
                format=str(data["format"]),
                id_column=str(data["id_column"]),
                row_count=int(data["row_count"]),
                endpoint=data.get("endpoint"),
            )
        except KeyError as err:
            raise ValueError(f"table source lacks {err.args[0]!r}") from err

    def to_metadata(self) -> dict[str, str]:
        """Two batch metadata pairs (values of at most 512 characters, as the Batch API allows).

        :raises ValueError: the URI or the id column is too long for batch metadata.
        """
        rest = orjson.dumps(
            {
                "v": self.version,
                "f": self.format,
                "i": self.id_column,
                "n": self.row_count,
                "e": self.endpoint,
            }
        ).decode()
        if len(self.uri) > _METADATA_VALUE_CHARS or len(rest) > _METADATA_VALUE_CHARS:
            raise ValueError(
                f"the table's location or id column is too long for batch metadata "
                f"({_METADATA_VALUE_CHARS} characters at most)"
            )
        return {METADATA_TABLE: rest, METADATA_TABLE_URI: self.uri}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str] | None) -> TableSource | None:
        """Read :meth:`to_metadata`'s pairs back from a batch's metadata; ``None`` when it has none."""
        if not metadata or METADATA_TABLE not in metadata or METADATA_TABLE_URI not in metadata:
            return None
        rest = orjson.loads(metadata[METADATA_TABLE])
        return cls.from_dict(
            {
                "version": rest.get("v", 1),
                "uri": metadata[METADATA_TABLE_URI],
                "format": rest["f"],
                "id_column": rest["i"],
                "row_count": rest["n"],
                "endpoint": rest.get("e"),
            }
        )


# -- answers joined back to their rows --------------------------------------------------------------------


@dataclass(frozen=True)
class JoinSummary:
    """What :func:`join_answers` wrote.

    :param path: the answers file (``answers.parquet`` or ``answers.jsonl``).
    :param rows: rows written: the input's rows, in input order.
    :param succeeded: rows whose request succeeded.
    :param failed: rows whose request failed.
    :param unanswered: rows that no success or failure record mentions (``status`` null): batches left
        out of the collect.
    :param columns: the file's columns, input columns first.
    :param partitions: answer partitions spilled to disk (0: the answers were held in memory).
    """

    path: Path
    rows: int
    succeeded: int
    failed: int
    unanswered: int
    columns: list[str]
    partitions: int = 0


class _UsageView(msgspec.Struct):
    input_tokens: Any = None
    output_tokens: Any = None
    total_tokens: Any = None
    prompt_tokens: Any = None
    completion_tokens: Any = None


class _SuccessView(msgspec.Struct):
    """What the join reads of a JSONL success record (decoding skips the rest, ``body`` included)."""

    custom_id: Any = None
    content: Any = None
    embedding: Any = None
    usage: _UsageView | None = None
    parsed: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    tool_calls: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    finish_reason: Any = msgspec.UNSET


class _FailureView(msgspec.Struct):
    custom_id: Any = None
    error_code: Any = None
    error_message: Any = None


class _AnswerReader:
    """The success and failure records of a collect as Arrow batches of one shape (:meth:`schema`).

    Parquet columns are read as they are (a structured answer's ``parsed`` keeps its struct type), a row
    group at a time. JSONL records are decoded a block at a time with typed views that skip the rest of a
    record (its ``body`` above all); ``parsed`` and ``tool_calls`` are kept as their JSON text. An
    optional answer column reaches the answers file when some record has a value in it, or when it is
    typed by a response schema.
    """

    def __init__(self, successes: Path | None, failures: Path | None, embeddings: bool) -> None:
        self.successes = successes
        self.failures = failures
        self.embeddings = embeddings
        self.usage_type = pa.struct(
            [(k, pa.int64()) for k in ("input_tokens", "output_tokens", "total_tokens")]
        )
        self.answer = "embedding" if embeddings else "content"
        self.types: dict[str, Any] = {
            "custom_id": pa.string(),
            "status": pa.string(),
            self.answer: pa.list_(pa.float32()) if embeddings else pa.string(),
        }
        #: Answer columns the answers file gets: the fixed ones, and optional ones the records carry.
        self.present = {"status", self.answer, "error_code", "error_message", "usage"}
        #: Optional columns that hold JSON text (from JSONL records).
        self.json_text: set[str] = set()
        if successes is not None and _is_parquet(successes):
            schema = pq.ParquetFile(str(successes)).schema_arrow
            for name in _OPTIONAL_ANSWERS:
                if name in schema.names:
                    kind = schema.field(name).type
                    self.types[name] = kind
                    if pa.types.is_struct(kind):
                        self.present.add(name)  # typed by a response schema: kept even if all null
                    elif pa.types.is_string(kind) and name != "finish_reason":
                        self.json_text.add(name)
            # The others are kept when some record has a value (see _parquet_successes).
        elif successes is not None:
            # Which of them the records carry is known once they were read (see _jsonl_successes).
            for name in _OPTIONAL_ANSWERS:
                self.types[name] = pa.string()
                if name != "finish_reason":
                    self.json_text.add(name)
        self.types.update(error_code=pa.string(), error_message=pa.string(), usage=self.usage_type)

    def schema(self) -> Any:
        return pa.schema(list(self.types.items()))

    def batches(self) -> Iterator[Any]:
        """All answers (successes, then failures), as batches of :meth:`schema`."""
        if self.successes is not None:
            if _is_parquet(self.successes):
                yield from self._parquet_successes(self.successes)
            else:
                yield from self._jsonl_successes(self.successes)
        if self.failures is not None:
            columns = ["custom_id", "error_code", "error_message"]
            if _is_parquet(self.failures):
                for batch in _row_groups(self.failures, columns):
                    yield self._shaped(batch.num_rows, FAILED, dict(zip(columns, batch.columns, strict=True)))
            else:
                decoder = msgspec.json.Decoder(_FailureView)
                for data in _jsonl_blocks(self.failures):
                    views = decoder.decode_lines(data)
                    values = {
                        "custom_id": [v.custom_id for v in views],
                        "error_code": [v.error_code for v in views],
                        "error_message": [v.error_message for v in views],
                    }
                    yield self._shaped(len(views), FAILED, values)

    def ids(self) -> Iterator[Any]:
        """The answers' ``custom_id`` values only, in the order of :meth:`batches`."""
        decoder = msgspec.json.Decoder(_IdView)
        for path in (self.successes, self.failures):
            if path is None:
                continue
            if _is_parquet(path):
                for batch in _row_groups(path, ["custom_id"]):
                    yield batch.column(0)
            else:
                for data in _jsonl_blocks(path):
                    yield pa.array([v.custom_id for v in decoder.decode_lines(data)], pa.string())

    def _shaped(self, rows: int, status: str, columns: Mapping[str, Any]) -> Any:
        """A batch of the common shape: the given columns, nulls for the others."""
        arrays = []
        for name, type_ in self.types.items():
            value = columns.get(name)
            if name == "status":
                arrays.append(pa.array([status] * rows, pa.string()))
            elif value is None:
                arrays.append(pa.nulls(rows, type_))
            elif isinstance(value, list):
                arrays.append(pa.array(value, type_))
            else:
                arrays.append(value if value.type == type_ else value.cast(type_))
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema())

    def _parquet_successes(self, path: Path) -> Iterator[Any]:
        names = pq.ParquetFile(str(path)).schema_arrow.names
        wanted = [n for n in self.types if n in names and n not in ("status", "error_code", "error_message")]
        for batch in _row_groups(path, wanted):
            columns = dict(zip(wanted, batch.columns, strict=True))
            for name in _OPTIONAL_ANSWERS:
                if name in columns and columns[name].null_count < batch.num_rows:
                    self.present.add(name)
            usage = columns.get("usage")
            if usage is not None and usage.type != self.usage_type:
                columns["usage"] = self._usage_struct(usage)
            yield self._shaped(batch.num_rows, SUCCEEDED, columns)

    def _usage_struct(self, usage: Any) -> Any:
        """A usage struct of another shape (e.g. with more counts) as the three counts answers keep."""
        names = [f.name for f in usage.type]
        fields = []
        for name, alias in (
            ("input_tokens", "prompt_tokens"),
            ("output_tokens", "completion_tokens"),
            ("total_tokens", None),
        ):
            source = name if name in names else alias if alias in names else None
            if source is None:
                fields.append(pa.nulls(len(usage), pa.int64()))
            else:
                fields.append(pc.struct_field(usage, source).cast(pa.int64()))
        return pa.StructArray.from_arrays(fields, fields=list(self.usage_type), mask=usage.is_null())

    def _jsonl_successes(self, path: Path) -> Iterator[Any]:
        decoder = msgspec.json.Decoder(_SuccessView)
        optional = [n for n in _OPTIONAL_ANSWERS if n in self.types]
        unset = msgspec.UNSET
        for data in _jsonl_blocks(path):
            views = decoder.decode_lines(data)
            usages = [_NO_USAGE if u is None else u for u in map(_get_usage, views)]
            counts = (
                [u.input_tokens if u.input_tokens is not None else u.prompt_tokens for u in usages],
                [u.output_tokens if u.output_tokens is not None else u.completion_tokens for u in usages],
                [u.total_tokens for u in usages],
            )
            columns: dict[str, Any] = {
                "custom_id": list(map(_get_id, views)),
                self.answer: list(map(operator.attrgetter(self.answer), views)),
                "usage": pa.StructArray.from_arrays(
                    [_int64_array(c) for c in counts],
                    fields=list(self.usage_type),
                    mask=pa.array([u is _NO_USAGE for u in usages], pa.bool_()),
                ),
            }
            for name in optional:
                values = list(map(operator.attrgetter(name), views))
                if values.count(unset) == len(values):
                    continue
                self.present.add(name)
                if name in self.json_text:
                    columns[name] = [None if v is unset else bytes(v).decode() for v in values]
                else:
                    columns[name] = [None if v is unset else v for v in values]
            yield self._shaped(len(views), SUCCEEDED, columns)


_NO_USAGE = _UsageView()
_get_usage = operator.attrgetter("usage")
_get_id = operator.attrgetter("custom_id")


def _int64_array(values: list[Any]) -> Any:
    """Token counts as int64; a count that is not an integer (never seen, but not ours to trust) is null."""
    try:
        return pa.array(values, pa.int64())
    except (TypeError, ValueError, pa.ArrowException):
        return pa.array([v if type(v) is int else None for v in values], pa.int64())


class _IdView(msgspec.Struct):
    custom_id: Any = None


def _row_groups(path: Path, columns: list[str]) -> Iterator[Any]:
    """A Parquet file's columns a row group at a time (batches that span row groups cost a copy)."""
    reader = pq.ParquetFile(str(path))
    for index in range(reader.num_row_groups):
        yield from reader.read_row_group(index, columns=columns).to_batches()


def _is_parquet(path: Path) -> bool:
    return path.name.endswith((".parquet", ".parquet" + _PARTIAL))


def _jsonl_blocks(path: Path, size: int = 8 << 20) -> Iterator[bytes]:
    """A JSONL file as blocks of whole lines (blank lines dropped by the decoder)."""
    from airflow_openai_batch.core.jsonl import iter_raw_blocks

    with open(path, "rb") as stream:
        yield from iter_raw_blocks(stream, size)


class _Spill:
    """Answers too large to hold, in Arrow IPC files in ``work_dir``: one per range of input rows, each
    small enough to be held on its own while its rows are written."""

    def __init__(self, schema: Any, work_dir: Path, rows: int, count: int) -> None:
        self.part_rows = max(1, -(-rows // count))
        self.paths = [work_dir / f"answers-{i:04d}.arrow" for i in range(-(-max(rows, 1) // self.part_rows))]
        work_dir.mkdir(parents=True, exist_ok=True)
        schema = schema.append(pa.field("__row", pa.int64()))
        self._writers = [pa.ipc.new_file(str(path), schema) for path in self.paths]

    def add(self, batch: Any, rows: Any) -> None:
        """Append answers with the input row each one answers (answers of no row are dropped)."""
        part = pc.divide(rows, self.part_rows)
        batch = batch.append_column("__row", rows)
        for index in pc.unique(part).drop_null().to_pylist():
            self._writers[index].write_batch(batch.filter(pc.equal(part, index)))

    def close(self) -> None:
        for writer in self._writers:
            writer.close()

    def partition(self, index: int) -> Any:
        """The answers of the ``index``-th row range, as one table."""
        with pa.memory_map(str(self.paths[index])) as source:
            return pa.ipc.open_file(source).read_all()

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
        for path in self.paths:
            path.unlink(missing_ok=True)


def join_answers(
    table: TableInput,
    source: TableSource,
    *,
    successes: Path | str | None,
    failures: Path | str | None,
    destination: Path | str,
    keep_columns: Sequence[str] | None = None,
    memory_budget: int = JOIN_MEMORY_BUDGET,
    work_dir: Path | str | None = None,
) -> JoinSummary:
    """Write the answers joined back to their input rows: ``answers.parquet`` or ``answers.jsonl``.

    One row per input row, in input order: the input's columns (all, or ``keep_columns``, in that order)
    with their types, then the answer columns (see :data:`ANSWER_COLUMNS`): ``status`` (``succeeded`` /
    ``failed``), ``content`` (``embedding`` for embeddings), ``parsed`` / ``tool_calls`` /
    ``finish_reason`` when the success records carry them, ``error_code``, ``error_message`` and ``usage``
    (``input_tokens``, ``output_tokens``, ``total_tokens``).

    The file is written as ``<destination>.partial`` and renamed when complete.

    :param table: the input table, opened again at its :class:`TableSource` location.
    :param source: what submit recorded about the table (id column, row count, endpoint).
    :param successes: the collect's ``successes.jsonl`` / ``.parquet`` (local), or ``None``.
    :param failures: the collect's ``failures.jsonl`` / ``.parquet`` (local), or ``None``.
    :param destination: the local file to write; its suffix (``.parquet`` / ``.jsonl``) is the format.
    :param keep_columns: the input columns to keep (``None``: all).
    :param memory_budget: bytes of answers held in memory before they are spilled to ``work_dir``.
    :param work_dir: where spilled partitions go (default: a temporary folder beside ``destination``).
    :raises ValueError: ``keep_columns`` names a column the table lacks, or a kept column has the name of
        an answer column.
    :raises OpenAIBatchJoinError: the table changed since submit (another row count, or answers whose
        ``custom_id`` is no row's id).
    """
    destination = Path(destination)
    fmt = (
        "parquet" if destination.suffix == ".parquet" else "jsonl" if destination.suffix == ".jsonl" else None
    )
    if fmt is None:
        raise ValueError(f"the answers file must end in .parquet or .jsonl, not {destination.name!r}")
    id_column = source.id_column
    schema = table.schema([id_column])
    columns = list(schema.names if keep_columns is None else keep_columns)
    unknown = [c for c in columns if c not in schema.names]
    if unknown:
        raise ValueError(f"keep_columns names {unknown}, which the table lacks (columns: {schema.names})")
    clash = [c for c in columns if c in ANSWER_COLUMNS]
    if clash:
        raise ValueError(
            f"the table's column(s) {clash} have the names of answer columns; "
            "leave them out with keep_columns"
        )
    answers = _AnswerReader(_opt_path(successes), _opt_path(failures), source.endpoint == "/v1/embeddings")
    # The input's ids first (one pass over one column): the row count is checked before anything is
    # written, and the answers are found by row with one hash lookup over all of them.
    chunks = table.batches([id_column], string_columns=[id_column], batch_rows=_JOIN_BATCH_ROWS)
    ids = pa.chunked_array([_as_text(b.column(0)) for b in chunks], pa.string()).combine_chunks()
    if len(ids) != source.row_count:
        raise _changed(table, source, f"it has {len(ids):,} rows, {source.row_count:,} at submit")
    held: list[Any] | None = []
    nbytes = 0
    for batch in answers.batches():
        held.append(batch)  # type: ignore[union-attr]
        nbytes += batch.nbytes
        if nbytes > memory_budget:
            held = None  # too large to hold: read again below, into row-range partitions on disk
            break
    answer_schema = answers.schema()
    scratch = Path(work_dir) if work_dir is not None else destination.parent / f".{destination.name}.work"
    partial = destination.with_name(destination.name + _PARTIAL)
    spill: _Spill | None = None
    writer: _AnswersWriter | None = None
    counts = {"rows": 0, SUCCEEDED: 0, FAILED: 0, "unanswered": 0}
    try:
        if held is None:
            # Where each answer goes: all custom_ids first (a cheap read), one lookup for all of them.
            answer_ids = pa.chunked_array(list(answers.ids()), pa.string()).combine_chunks()
            rows = pc.index_in(answer_ids, value_set=ids).cast(pa.int64())
            unmatched = rows.null_count
            del answer_ids
            spill = _Spill(answer_schema, scratch, len(ids), _partition_count(answers, memory_budget))
            done = 0
            for batch in answers.batches():
                spill.add(batch, rows.slice(done, batch.num_rows))
                done += batch.num_rows
            spill.close()
            del rows
        else:
            held_table = pa.Table.from_batches(held, schema=answer_schema).combine_chunks()
            held = None
            positions = pc.index_in(ids, value_set=held_table.column("custom_id"))
            # Ids are unique on both sides (submit checked the input's), so each found row is one answer.
            unmatched = held_table.num_rows - (len(positions) - positions.null_count)
            values = held_table.drop_columns(["custom_id"])
            del held_table
        del ids
        if unmatched:
            raise _changed(
                table, source, f"{unmatched:,} answers have a custom_id that is no row's {id_column!r}"
            )
        out_schema = pa.schema(
            [schema.field(c) for c in columns]
            + [answer_schema.field(n) for n in answer_schema.names[1:] if n in answers.present]
        )
        writer = _AnswersWriter(partial, out_schema, fmt, answers.json_text)
        read = columns or [id_column]  # some column, so that batches count rows
        stream = _RowStream(table.batches(read, string_columns=[id_column], batch_rows=_JOIN_BATCH_ROWS))
        if spill is None:
            values = values.select([n for n in values.column_names if n in answers.present])
            for batch, first in stream.take(source.row_count):
                taken = positions.slice(first, batch.num_rows)
                _write_joined(writer, batch, columns, values.take(taken), taken, counts)
        else:
            for part in range(len(spill.paths)):
                start = part * spill.part_rows
                stop = min(source.row_count, start + spill.part_rows)
                held_part = spill.partition(part)
                row_numbers = held_part.column("__row")
                values = held_part.select([n for n in answer_schema.names[1:] if n in answers.present])
                del held_part
                for batch, first in stream.take(stop - start):
                    wanted = pa.array(range(start + first, start + first + batch.num_rows), pa.int64())
                    taken = pc.index_in(wanted, value_set=row_numbers)
                    _write_joined(writer, batch, columns, values.take(taken), taken, counts)
                del values, row_numbers
        if counts["rows"] != source.row_count or stream.more():
            raise _changed(table, source, "its row count changed while it was read")
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if spill is not None:
            spill.cleanup()
            with contextlib.suppress(OSError):
                scratch.rmdir()
    os.replace(partial, destination)
    return JoinSummary(
        path=destination,
        rows=counts["rows"],
        succeeded=counts[SUCCEEDED],
        failed=counts[FAILED],
        unanswered=counts["unanswered"],
        columns=out_schema.names,
        partitions=len(spill.paths) if spill is not None else 0,
    )


def _partition_count(answers: _AnswerReader, budget: int) -> int:
    """Row-range partitions for answers too large to hold, each about half the budget (by file size)."""
    size = sum(p.stat().st_size for p in (answers.successes, answers.failures) if p is not None)
    # Arrow holds a Parquet file's answers in a few times its (compressed) size, JSONL's in less.
    factor = 4 if answers.successes is not None and _is_parquet(answers.successes) else 1
    return max(2, -(-size * factor // max(1, budget // 2)))


def _opt_path(path: Path | str | None) -> Path | None:
    return Path(path) if path is not None else None


def _changed(table: TableInput, source: TableSource, detail: str) -> OpenAIBatchJoinError:
    return OpenAIBatchJoinError(
        f"cannot join the answers back to {table.uri}: the table changed since submit ({detail})"
    )


class _RowStream:
    """Record batches taken a number of rows at a time, cutting batches where a range ends."""

    def __init__(self, batches: Iterator[Any]) -> None:
        self.batches = batches
        self.pending: Any = None

    def take(self, rows: int) -> Iterator[tuple[Any, int]]:
        """Batches holding the next ``rows`` rows, each with its first row's offset in the range."""
        done = 0
        while done < rows:
            batch = self.pending
            self.pending = None
            if batch is None:
                batch = next(self.batches, None)
                if batch is None:
                    return
            if batch.num_rows > rows - done:
                self.pending = batch.slice(rows - done)
                batch = batch.slice(0, rows - done)
            yield batch, done
            done += batch.num_rows

    def more(self) -> bool:
        """Whether rows are left after those taken."""
        if self.pending is None:
            self.pending = next(self.batches, None)
        return self.pending is not None


def _write_joined(
    writer: _AnswersWriter,
    batch: Any,
    columns: list[str],
    taken: Any,
    positions: Any,
    counts: dict[str, int],
) -> None:
    arrays = [batch.column(c) for c in columns] + [
        taken.column(i).combine_chunks() for i in range(taken.num_columns)
    ]
    writer.write(pa.RecordBatch.from_arrays(arrays, schema=writer.schema))
    status = taken.column("status")
    counts["rows"] += batch.num_rows
    counts["unanswered"] += positions.null_count
    for value, n in zip(*_value_counts(status), strict=True):
        if value in (SUCCEEDED, FAILED):
            counts[value] += n


def _value_counts(array: Any) -> tuple[list[Any], list[int]]:
    counted = pc.value_counts(array)
    return counted.field("values").to_pylist(), counted.field("counts").to_pylist()


def _json_default(value: Any) -> Any:
    """Values of Arrow types JSON has no word for: decimals as text, binary as base64."""
    import base64
    from decimal import Decimal

    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"type {type(value).__name__} is not JSON-serializable")


class _AnswersWriter:
    """``answers.parquet`` (zstd, a row group per batch) or ``answers.jsonl`` (a line per row)."""

    def __init__(self, path: Path, schema: Any, fmt: str, json_text: set[str]) -> None:
        self.path = path
        self.schema = schema
        self.fmt = fmt
        self.json_text = [n for n in json_text if n in schema.names]
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "parquet":
            self._parquet = pq.ParquetWriter(str(path), schema, compression="zstd")
        else:
            self._file = open(path, "wb")  # noqa: SIM115 - closed by close() / abort()

    def write(self, batch: Any) -> None:
        if self.fmt == "parquet":
            self._parquet.write_batch(batch)
            return
        dumps = orjson.dumps
        option = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS
        # A few thousand rows as Python objects at a time: a whole batch of them would hold hundreds of MB.
        for start in range(0, batch.num_rows, _JSONL_ROWS):
            rows = batch.slice(start, _JSONL_ROWS).to_pylist()
            for name in self.json_text:
                # Answers kept as JSON text are written as the JSON they are, not as a string.
                for row in rows:
                    text = row[name]
                    if text is not None:
                        row[name] = orjson.Fragment(text)
            self._file.write(b"".join([dumps(row, default=_json_default, option=option) for row in rows]))

    def close(self) -> None:
        if self.fmt == "parquet":
            self._parquet.close()
        else:
            self._file.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
        self.path.unlink(missing_ok=True)
