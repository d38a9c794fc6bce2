"""Stream batch requests, validate every line and split them into upload-ready JSONL chunk files.

No Airflow import and no network: this is the hot path for multi-gigabyte inputs. Each line is parsed
once with orjson, valid lines are written byte-for-byte to per-model chunk files as they stream past
(hashed and written by a helper thread), and the only memory that grows with the input is the list of
custom_ids needed to find duplicates.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from airflow_openai_batch.core.jsonl import iter_lines
from airflow_openai_batch.core.tokens import count_embedding_inputs, request_token_estimator
from airflow_openai_batch.exceptions import InputProblem, OpenAIBatchInputError
from airflow_openai_batch.limits import (
    BATCH_ENDPOINTS,
    EMBEDDINGS_ENDPOINT,
    MAX_BYTES_PER_BATCH,
    MAX_EMBEDDING_INPUTS_PER_BATCH,
    MAX_REQUESTS_PER_BATCH,
)

__all__ = [
    "Chunk",
    "PreparedInput",
    "normalize_endpoint",
    "prepare_from_lines",
    "prepare_from_records",
]

#: Pending bytes per open chunk before they are written out: big enough to make writes and hashing
#: cheap per line, small enough to keep memory flat even with several models open at once.
_FLUSH_BYTES = 1 << 19
#: Bytes that all open chunks together may buffer; with many interleaved models each buffers less.
_BUFFER_BUDGET = 64 << 20
#: Smallest per-chunk buffer, so that even thousands of models write in reasonable blocks.
_MIN_FLUSH_BYTES = 1 << 16
#: Blocks that may wait for the writer thread (bounds memory at ~_QUEUE_BLOCKS * _FLUSH_BYTES).
_QUEUE_BLOCKS = 8


@dataclass(frozen=True)
class Chunk:
    """One upload-ready JSONL file: one model, within every per-batch limit.

    :param index: 0-based position in output order (models by first appearance, then sequence).
    :param path: the local JSONL file holding exactly the lines to upload.
    :param model: the model of every request in the file.
    :param request_count: number of request lines.
    :param byte_count: size of the file in bytes (lines plus their newlines).
    :param embedding_inputs: embedding inputs across the file's requests (0 for other endpoints).
    :param estimated_tokens: estimated prompt tokens (0 unless ``max_enqueued_tokens`` was set).
    :param sha256: hex digest of the file content, for retry-safe idempotency keys.
    :param first_custom_id: the ``custom_id`` of the file's first line.
    """

    index: int
    path: Path
    model: str
    request_count: int
    byte_count: int
    embedding_inputs: int
    estimated_tokens: int
    sha256: str
    first_custom_id: str


@dataclass
class PreparedInput:
    """The validated, split input.

    :param chunks: the chunk files, in output order.
    :param total_requests: requests across all chunks.
    :param total_bytes: bytes across all chunk files.
    :param work_dir: the directory holding the chunk files.
    :param endpoint: the normalized endpoint every line's ``url`` equals.
    """

    chunks: list[Chunk]
    total_requests: int
    total_bytes: int
    work_dir: Path
    endpoint: str = ""

    def cleanup(self) -> None:
        """Delete the chunk files (missing ones are ignored)."""
        for chunk in self.chunks:
            chunk.path.unlink(missing_ok=True)

    def __enter__(self) -> PreparedInput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def normalize_endpoint(endpoint: str) -> str:
    """Return the Batch API spelling of an endpoint.

    :param endpoint: e.g. ``/v1/chat/completions``, ``/chat/completions``, ``v1/chat/completions``.
    :return: the endpoint with its ``/v1`` prefix, e.g. ``/v1/chat/completions``.
    :raises OpenAIBatchInputError: the endpoint is not one the Batch API accepts.
    """
    text = endpoint.strip() if isinstance(endpoint, str) else ""
    path = "/" + text.strip("/")
    if not path.startswith("/v1/"):
        path = "/v1" + path
    if path not in BATCH_ENDPOINTS:
        raise OpenAIBatchInputError(
            [
                InputProblem(
                    None,
                    "endpoint",
                    f"{endpoint!r} is not a Batch API endpoint (allowed: {', '.join(BATCH_ENDPOINTS)})",
                )
            ]
        )
    return path


class _Unserializable:
    """Stands in for a record orjson cannot serialize, so it fails parsing like an invalid line."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _OpenChunk:
    """A chunk file being filled for one model. Its counters are only synced when the hot loop
    switches away from it (the loop keeps the current chunk's counters in local variables)."""

    __slots__ = (
        "buf",
        "byte_count",
        "emb",
        "first_custom_id",
        "flush_at",
        "hasher",
        "model",
        "model_order",
        "path",
        "requests",
        "seq",
        "tokens",
        "written",
    )

    def __init__(self, model: str, model_order: int, seq: int, path: Path, first_custom_id: str) -> None:
        self.model = model
        self.model_order = model_order
        self.seq = seq
        self.path = path
        self.first_custom_id = first_custom_id
        self.buf: list[bytes] = []
        self.requests = 0
        self.byte_count = 0
        self.emb = 0
        self.tokens = 0
        #: byte_count at which the buffer is next handed to the writer.
        self.flush_at = _FLUSH_BYTES
        self.hasher = hashlib.sha256()
        self.written = False


class _ChunkWriter:
    """Hashes and writes chunk data on a background thread.

    sha256 and file writes release the GIL, so moving them off the parsing thread overlaps them with
    parsing on a second core instead of adding them to it. The bounded queue keeps memory flat: at most
    ``_QUEUE_BLOCKS`` blocks of ~``_FLUSH_BYTES`` wait at any time.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[_OpenChunk, bytes] | None] = queue.Queue(_QUEUE_BLOCKS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="openai-batch-chunk-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain without writing, so the producer never blocks on a full queue
            chunk, data = item
            try:
                chunk.hasher.update(data)
                # Reopening per block (every ~512 KiB) never holds more than one descriptor, however
                # many models are interleaved. "wb" first: never append to a stale file.
                with open(chunk.path, "ab" if chunk.written else "wb") as fh:
                    fh.write(data)
                chunk.written = True
            except BaseException as exc:
                self._error = exc

    def submit(self, chunk: _OpenChunk, lines: list[bytes]) -> None:
        if self._error is not None:
            raise self._error
        if lines:
            # The empty tail element gives the block its final newline without another copy.
            lines.append(b"")
            self._queue.put((chunk, b"\n".join(lines)))

    def close(self) -> None:
        """Wait until everything submitted is on disk; re-raise a write error."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _short(value: Any, limit: int = 60) -> str:
    """The value as JSON (what the user wrote), cut to ``limit`` characters."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _report_duplicates(ids: list[str | None], add: Callable[[int, str, str], None]) -> None:
    """Report every repeated custom_id with its line and the line that used it first."""
    first_line: dict[str, int] = {}
    for line_no, cid in enumerate(ids, 1):
        if cid is not None:
            first = first_line.setdefault(cid, line_no)
            if first != line_no:
                add(line_no, "custom_id", f"duplicate custom_id {_short(cid)}, first used on line {first}")


def _check_limits(**limits: int | None) -> None:
    for name, value in limits.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _prepare(
    lines: Iterable[Any],
    *,
    endpoint: str,
    work_dir: Path | str,
    model: str | None,
    max_requests_per_batch: int,
    max_bytes_per_batch: int,
    max_embedding_inputs: int,
    max_enqueued_tokens: int | None,
    max_problems: int,
) -> PreparedInput:
    """The one validation and splitting path behind both public entry points."""
    _check_limits(
        max_requests_per_batch=max_requests_per_batch,
        max_bytes_per_batch=max_bytes_per_batch,
        max_embedding_inputs=max_embedding_inputs,
        max_enqueued_tokens=max_enqueued_tokens,
    )
    if not isinstance(max_problems, int) or max_problems < 1:
        raise ValueError(f"max_problems must be a positive integer, got {max_problems!r}")
    endpoint = normalize_endpoint(endpoint)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    fill_model = model or None
    is_embeddings = endpoint == EMBEDDINGS_ENDPOINT
    count_tokens = max_enqueued_tokens is not None
    max_requests = max_requests_per_batch
    max_bytes = max_bytes_per_batch
    # Sentinels that make the disabled limits never bind.
    max_emb = max_embedding_inputs if is_embeddings else 1 << 62
    max_tokens = max_enqueued_tokens if max_enqueued_tokens is not None else 1 << 62
    # Embedding-input and token limits are off for most inputs: one flag skips both per line.
    extra = is_embeddings or count_tokens
    estimate_tokens = request_token_estimator(endpoint)

    problems: list[InputProblem] = []
    total_problems = 0
    # The custom_id of every line (None where a line has no usable one), so index + 1 = line number.
    # The only state that grows with the input. Appending here and finding duplicates with one C-level
    # set() at the end costs a fraction of a per-line dict lookup + insert into a table far larger than
    # the CPU caches; line numbers for the error are only worked out when a duplicate exists.
    ids: list[str | None] = []
    append_id = ids.append
    open_chunks: dict[str, _OpenChunk] = {}
    model_order: dict[str, int] = {}
    done: list[_OpenChunk] = []

    def add(line_no: int | None, field: str | None, reason: str) -> None:
        nonlocal total_problems
        total_problems += 1
        if len(problems) < max_problems:
            problems.append(InputProblem(line_no, field, reason))

    def start_chunk(m: str, first_custom_id: str) -> _OpenChunk:
        """Open the next chunk of model ``m``; its previous chunk (if any) must be closed already."""
        previous = open_chunks.get(m)
        if previous is None:
            order = model_order[m] = len(model_order)
            seq = 0
        else:
            order, seq = previous.model_order, previous.seq + 1
        path = work_dir / f"m{order:04d}-s{seq:06d}.jsonl.part"
        chunk = open_chunks[m] = _OpenChunk(m, order, seq, path, first_custom_id)
        return chunk

    def diagnose(n: int, obj: Any, line: bytes) -> tuple[bytes, str, dict[str, Any], str] | None:
        """Slow path for lines the inline check rejected: report every problem, or fill the model."""
        before = total_problems
        if type(obj) is not dict:
            append_id(None)
            add(n, None, f"not a JSON object (got {_json_type(obj)})")
            return None
        cid = obj.get("custom_id")
        # Registered even when the line has other problems, so its duplicates are reported too.
        append_id(cid if type(cid) is str and cid else None)
        if "custom_id" not in obj:
            add(n, "custom_id", "missing")
        elif type(cid) is not str:
            add(n, "custom_id", f"must be a non-empty string, got {_json_type(cid)}")
        elif not cid:
            add(n, "custom_id", "empty")
        method = obj.get("method")
        if method != "POST":
            add(
                n,
                "method",
                'missing; must be "POST"' if "method" not in obj else f'{_short(method)}, must be "POST"',
            )
        url = obj.get("url")
        if url != endpoint:
            add(
                n,
                "url",
                f'missing; must be "{endpoint}"'
                if "url" not in obj
                else f'{_short(url)} does not match the endpoint "{endpoint}"',
            )
        body = obj.get("body")
        m: Any = None
        if type(body) is not dict:
            add(n, "body", "missing" if "body" not in obj else f"must be an object, got {_json_type(body)}")
        else:
            m = body.get("model")
            if m is None or m == "":
                if fill_model is None:
                    add(n, "body.model", "missing or empty, and no model argument was given")
                else:
                    m = fill_model
            elif type(m) is not str:
                add(n, "body.model", f"must be a string, got {_json_type(m)}")
            if body.get("stream"):
                add(n, "body.stream", "streaming is not supported in a batch")
        if total_problems != before:
            return None
        if m is not body.get("model"):
            # obj was parsed here (records are serialized first), so filling it in place is safe.
            body["model"] = m
            line = orjson.dumps(obj)
        return line, m, body, cid

    writer = _ChunkWriter()
    n = 0
    blank = 0
    k = t = 0
    # The current chunk (that of the previous line's model) lives in local variables: inputs are
    # mostly single-model, so the per-line cost is one string compare and a few local updates.
    # Before the first line, cur is a placeholder that is never parked or written (cur_model is None).
    cur_model: str | None = None
    cur = _OpenChunk("", -1, -1, work_dir, "")
    flush_step = _FLUSH_BYTES
    c_req = c_bytes = c_emb = c_tok = 0
    c_flush = _FLUSH_BYTES
    c_buf: list[bytes] = []
    append = c_buf.append
    loads = orjson.loads
    dumps = orjson.dumps
    decode_error = orjson.JSONDecodeError
    try:
        for line in lines:
            n += 1
            try:
                obj = loads(line)
                # Subscripts: the cheapest lookups; a non-object or a missing key raises into the
                # diagnosing path.
                body = obj["body"]
                cid = obj["custom_id"]
                # A missing model takes the `model` argument, if any. A body that is not an object
                # raises (TypeError / AttributeError) into the diagnosing path.
                m = body["model"] if fill_model is None else body.get("model", fill_model)
                # `x > ""` is True only for a non-empty str and raises TypeError for any other JSON
                # type: one comparison instead of a type check plus a truth test.
                valid = (
                    cid > ""
                    and m > ""
                    and obj["url"] == endpoint
                    and obj["method"] == "POST"
                    and "stream" not in body
                )
            except decode_error as exc:
                append_id(None)
                if isinstance(line, _Unserializable):
                    add(n, None, f"not JSON-serializable: {line.reason}")
                elif isinstance(line, (bytes, bytearray, str)) and not line.strip():
                    blank += 1
                else:
                    add(n, None, f"invalid JSON: {exc.msg} (at byte {exc.pos + 1})")
                continue
            except (KeyError, TypeError, AttributeError):
                valid = False
            if valid:
                append_id(cid)
                if m is fill_model:
                    # Only the argument object itself is filled: a parsed "model" is always a new str.
                    body["model"] = m
                    line = dumps(obj)
            else:
                fixed = diagnose(n, obj, line)
                if fixed is None:
                    continue
                line, m, body, cid = fixed

            size = len(line) + 1
            # One test on the common path; the per-line limit checks and the "already rejected" case
            # are all behind it.
            if extra or total_problems or size > max_bytes:
                if size > max_bytes:
                    add(
                        n,
                        None,
                        f"the line is {size} bytes with its newline, above max_bytes_per_batch={max_bytes}",
                    )
                    continue
                if is_embeddings:
                    k = count_embedding_inputs(body)
                    if k > max_emb:
                        add(n, "body.input", f"{k} embedding inputs, above the {max_emb} allowed per batch")
                        continue
                if count_tokens:
                    t = estimate_tokens(body)
                    if t > max_tokens:
                        add(
                            n, "body", f"~{t} estimated prompt tokens, above max_enqueued_tokens={max_tokens}"
                        )
                        continue
                if total_problems:
                    # The input is already rejected: keep validating, stop writing.
                    continue

            if m != cur_model:
                if cur_model is not None:
                    cur.requests, cur.byte_count, cur.emb, cur.tokens = c_req, c_bytes, c_emb, c_tok
                    cur.buf, cur.flush_at = c_buf, c_flush
                cur_model = m
                cur = open_chunks.get(m) or start_chunk(m, cid)
                flush_step = max(_MIN_FLUSH_BYTES, min(_FLUSH_BYTES, _BUFFER_BUDGET // len(open_chunks)))
                c_req, c_bytes, c_emb, c_tok = cur.requests, cur.byte_count, cur.emb, cur.tokens
                c_buf, c_flush = cur.buf, cur.flush_at
                append = c_buf.append
            if (
                c_req == max_requests
                or c_bytes + size > max_bytes
                or (extra and (c_emb + k > max_emb or c_tok + t > max_tokens))
            ):
                # Greedy cut: this line does not fit, so the chunk is final and the model starts a new one.
                writer.submit(cur, c_buf)
                cur.requests, cur.byte_count, cur.emb, cur.tokens = c_req, c_bytes, c_emb, c_tok
                done.append(cur)
                cur = start_chunk(m, cid)
                c_req = c_bytes = c_emb = c_tok = 0
                c_flush = flush_step
                c_buf = cur.buf
                append = c_buf.append
            append(line)
            c_req += 1
            c_bytes += size
            if extra:
                c_emb += k
                c_tok += t
            if c_bytes >= c_flush:
                writer.submit(cur, c_buf)
                c_buf = []
                append = c_buf.append
                c_flush = c_bytes + flush_step

        if n == blank and not total_problems:
            add(None, None, "the input is empty")
        distinct = set(ids)
        distinct.discard(None)
        if len(distinct) != len(ids) - ids.count(None):
            del distinct
            stream_problems = problems[:]
            del problems[:]
            _report_duplicates(ids, add)
            # Both lists are in line order and capped: merging them keeps the earliest problems. The
            # stable sort puts a line's duplicate first, where custom_id problems go.
            problems[:] = sorted(problems + stream_problems, key=lambda p: p.line or 0)[:max_problems]
        if total_problems:
            raise OpenAIBatchInputError(problems, total_problems)

        if cur_model is not None:
            cur.requests, cur.byte_count, cur.emb, cur.tokens = c_req, c_bytes, c_emb, c_tok
            cur.buf = c_buf
        for chunk in open_chunks.values():
            writer.submit(chunk, chunk.buf)
            done.append(chunk)
        writer.close()
        done.sort(key=lambda c: (c.model_order, c.seq))
        chunks: list[Chunk] = []
        for index, oc in enumerate(done):
            final = work_dir / f"chunk-{index:05d}.jsonl"
            os.replace(oc.path, final)
            oc.path = final
            chunks.append(
                Chunk(
                    index=index,
                    path=final,
                    model=oc.model,
                    request_count=oc.requests,
                    byte_count=oc.byte_count,
                    embedding_inputs=oc.emb,
                    estimated_tokens=oc.tokens,
                    sha256=oc.hasher.hexdigest(),
                    first_custom_id=oc.first_custom_id,
                )
            )
    except BaseException:
        # Nothing half-written may be mistaken for an upload-ready chunk.
        with contextlib.suppress(BaseException):
            writer.close()
        for oc in [*done, *open_chunks.values()]:
            oc.path.unlink(missing_ok=True)
        raise
    return PreparedInput(
        chunks=chunks,
        total_requests=sum(c.request_count for c in chunks),
        total_bytes=sum(c.byte_count for c in chunks),
        work_dir=work_dir,
        endpoint=endpoint,
    )


def prepare_from_lines(
    lines: Iterable[bytes],
    *,
    endpoint: str,
    work_dir: Path | str,
    model: str | None = None,
    max_requests_per_batch: int = MAX_REQUESTS_PER_BATCH,
    max_bytes_per_batch: int = MAX_BYTES_PER_BATCH,
    max_embedding_inputs: int = MAX_EMBEDDING_INPUTS_PER_BATCH,
    max_enqueued_tokens: int | None = None,
    max_problems: int = 50,
) -> PreparedInput:
    """Validate JSONL request lines and split them into chunk files, streaming.

    Every line is validated before this returns; on any problem the partial chunk files are deleted and
    one :class:`OpenAIBatchInputError` lists the problems (1-based line numbers; blank lines are skipped
    but counted). Lines that need no change are written byte-for-byte.

    :param lines: the raw lines without their newline, e.g. ``iter_lines(stream)``. A binary file object
        is accepted too and read with :func:`~airflow_openai_batch.core.jsonl.iter_lines`.
    :param endpoint: the batch endpoint; every line's ``url`` must equal its normalized form.
    :param work_dir: where the chunk files are written (created if missing).
    :param model: fills ``body.model`` where a line has none (or an empty one).
    :param max_requests_per_batch: requests per chunk.
    :param max_bytes_per_batch: bytes per chunk file, newlines included.
    :param max_embedding_inputs: embedding inputs per chunk (``/v1/embeddings`` only).
    :param max_enqueued_tokens: if set, estimated prompt tokens per chunk (see
        :mod:`airflow_openai_batch.core.tokens`).
    :param max_problems: how many problems the error lists (all are counted).
    :return: the chunks, in order: models by first appearance, then sequence within the model.
    :raises OpenAIBatchInputError: the input is invalid, empty, or the endpoint unknown.
    """
    if isinstance(lines, io.IOBase):
        # A file object iterates lines *with* their newline; read it the streaming way instead.
        lines = iter_lines(lines)  # type: ignore[arg-type]
    return _prepare(
        lines,
        endpoint=endpoint,
        work_dir=work_dir,
        model=model,
        max_requests_per_batch=max_requests_per_batch,
        max_bytes_per_batch=max_bytes_per_batch,
        max_embedding_inputs=max_embedding_inputs,
        max_enqueued_tokens=max_enqueued_tokens,
        max_problems=max_problems,
    )


def _default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"type {type(value).__name__} is not JSON-serializable")


def _record_lines(
    records: Iterable[Any], endpoint: str, dumps: Callable[..., bytes] = orjson.dumps
) -> Iterator[Any]:
    """Serialize records to request lines, filling a missing method/url, in the usual key order."""
    for record in records:
        if isinstance(record, Mapping):
            obj: Any = {}
            if "custom_id" in record:
                obj["custom_id"] = record["custom_id"]
            obj["method"] = record.get("method", "POST")
            obj["url"] = record.get("url", endpoint)
            if "body" in record:
                obj["body"] = record["body"]
            for key, value in record.items():
                if key not in obj:
                    obj[key] = value
        else:
            obj = record
        try:
            yield dumps(obj, default=_default)
        except TypeError as exc:
            yield _Unserializable(str(exc))


def prepare_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    endpoint: str,
    work_dir: Path | str,
    model: str | None = None,
    max_requests_per_batch: int = MAX_REQUESTS_PER_BATCH,
    max_bytes_per_batch: int = MAX_BYTES_PER_BATCH,
    max_embedding_inputs: int = MAX_EMBEDDING_INPUTS_PER_BATCH,
    max_enqueued_tokens: int | None = None,
    max_problems: int = 50,
) -> PreparedInput:
    """Validate request records (e.g. from XCom) and split them into chunk files.

    Each item is a full request line ``{custom_id, method, url, body}`` or just ``{custom_id, body}``
    (``method`` "POST" and ``url`` = the endpoint are filled in). Items are serialized and go through
    the same validation and splitting as :func:`prepare_from_lines`; problems are numbered by 1-based
    item index.

    :param records: the request items.
    :param endpoint: the batch endpoint.
    :param work_dir: where the chunk files are written (created if missing).
    :param model: fills ``body.model`` where an item has none.
    :param max_requests_per_batch: requests per chunk.
    :param max_bytes_per_batch: bytes per chunk file, newlines included.
    :param max_embedding_inputs: embedding inputs per chunk (``/v1/embeddings`` only).
    :param max_enqueued_tokens: if set, estimated prompt tokens per chunk.
    :param max_problems: how many problems the error lists (all are counted).
    :return: the chunks, in order.
    :raises OpenAIBatchInputError: the input is invalid, empty, or the endpoint unknown.
    """
    normalized = normalize_endpoint(endpoint)
    return _prepare(
        _record_lines(records, normalized),
        endpoint=normalized,
        work_dir=work_dir,
        model=model,
        max_requests_per_batch=max_requests_per_batch,
        max_bytes_per_batch=max_bytes_per_batch,
        max_embedding_inputs=max_embedding_inputs,
        max_enqueued_tokens=max_enqueued_tokens,
        max_problems=max_problems,
    )
