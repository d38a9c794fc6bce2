"""Stream batch requests, validate every line and split them into upload-ready JSONL chunk files.

No Airflow import and no network: this is the hot path for multi-gigabyte inputs. Each line is parsed
once with orjson and valid lines are written byte-for-byte to per-model chunk files as they stream past
(hashed and written by a helper thread). Lines are taken in blocks of about a megabyte: a block of valid
requests of one model (the usual case) is checked in one tight loop and added to its chunk in one piece,
any other block goes line by line through the path that diagnoses every problem. Large inputs have their
blocks checked by a helper process too, so parsing uses two cores. Memory stays flat at any input size:
custom_ids that ascend need no index, others are kept as 8-byte hashes, partitioned and spilled to
``work_dir`` (see ``_Ids``).
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import heapq
import io
import itertools
import operator
import os
import queue
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from airflow_openai_batch.core.jsonl import (
    BlockHelper,
    LineBlock,
    LineIterator,
    gc_paused,
    iter_lines,
    lines_of,
    split_block,
)
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
#: Input lines are taken in blocks of about this many bytes (and between these many lines).
_BLOCK_BYTES = 1 << 20
_BLOCK_MIN_LINES = 16
_BLOCK_MAX_LINES = 8192
#: Input bytes checked in this process before a helper process is started: small inputs never start one.
_HELPER_MIN_BYTES = 32 << 20
_WAITING = object()
_HELPER_FACTORY = "airflow_openai_batch.core.prepare:_helper_handler"
#: Blocks sent to the helper and not answered yet; and blocks checked, not yet applied, at most.
_HELPER_INFLIGHT = 3
_MAX_PENDING = 6
#: Seconds to wait for one answer of the helper before checking its blocks here instead.
_HELPER_TIMEOUT = 300.0
#: custom_id hashes: partitions, how many are held in memory before spilling to disk (8 bytes each),
#: and how many repeated hashes are looked up per pass over the id log (the rare duplicate path).
_ID_PARTITIONS = 256
_ID_SPILL_HASHES = 1 << 21
_ID_LOG_BYTES = 4 << 20
_DUP_GROUP_HASHES = 1 << 18


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

    def submit(self, chunk: _OpenChunk, pieces: list[bytes]) -> None:
        """Queue a chunk's buffered data: newline-terminated pieces (lines and their newlines, blocks)."""
        if self._error is not None:
            raise self._error
        if pieces:
            data = b"".join(pieces)
            # Emptied, so that a chunk's first buffer is not kept alive by the chunk until the end.
            pieces.clear()
            self._queue.put((chunk, data))

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


def _check_limits(**limits: int | None) -> None:
    for name, value in limits.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


# -- duplicate custom_ids with flat memory -------------------------------------------------------------


def _id_key(cid: str) -> tuple[int, str]:
    """The order in which ascending custom_ids need no index: by length, then by text.

    Strictly ascending in this order means all different, and it covers both ``row-0000123`` and
    unpadded ``row-123`` numbering.
    """
    return len(cid), cid


def _ascending(ids: list[str]) -> bool:
    """Whether ``ids`` strictly ascend in :func:`_id_key` order (C-level loops, about 30 ns an id)."""
    if len(ids) < 2:
        return True
    lengths = list(map(len, ids))
    if min(lengths) == max(lengths):
        return all(map(operator.lt, ids, itertools.islice(ids, 1, None)))
    keys = list(zip(lengths, ids, strict=True))
    return all(map(operator.lt, keys, itertools.islice(keys, 1, None)))


class _Ids:
    """Finds repeated custom_ids in any number of lines with a bounded amount of memory.

    Every block's ids go, in line order and as compact JSON, to a log (in memory, then in ``work_dir``).
    While the ids keep ascending (see :func:`_id_key`: row numbers, sorted keys...) that is all: they are
    all different. From the first id that does not ascend, each id costs 8 bytes instead: its 64-bit
    hash, in one of :data:`_ID_PARTITIONS` arrays chosen by the hash's low bits, spilled to a file in
    ``work_dir`` once :data:`_ID_SPILL_HASHES` are held; at the end each partition is checked with a
    (small) set. Only when a hash repeats is the log read back, for the exact lines and to tell a real
    duplicate from a hash collision.
    """

    def __init__(self, work_dir: Path) -> None:
        self._work_dir = work_dir
        self._tag = uuid.uuid4().hex[:12]
        self._log = bytearray()
        self._log_path: Path | None = None
        self._last: tuple[int, str] | None = None
        self.ordered = True
        self._parts: list[array.array[int]] = []
        self._appends: list[Callable[[int], None]] = []
        self._buffered = 0
        self._spill_path: Path | None = None
        self._spill_size = 0
        #: Per spill: the (offset, count) of each partition in the spill file.
        self._spills: list[list[tuple[int, int]]] = []

    def add(
        self,
        first_line: int,
        ids: list[Any] | None,
        ids_json: bytes | None = None,
        span: tuple[str, str, bool] | None = None,
    ) -> None:
        """Register the custom_ids of consecutive lines.

        :param first_line: the 1-based line number of the first id.
        :param ids: one entry per line, ``None`` where a line has no usable custom_id; may be omitted
            (``None``) when ``ids_json`` and ``span`` are given.
        :param ids_json: ``ids`` as JSON, when the caller has it already.
        :param span: ``(first id, last id, ascending)`` of an ``ids`` without ``None``, when known.
        """
        log = self._log
        log += b"%d\t" % first_line
        # Copied into one buffer: orjson's output keeps a large allocation behind a small result.
        log += ids_json if ids_json is not None else orjson.dumps(ids)
        log += b"\n"
        if len(log) >= _ID_LOG_BYTES:
            self._flush_log()
        if self.ordered:
            if span is None:
                assert ids is not None
                present = [c for c in ids if c is not None]
                if not present:
                    return
                span = (present[0], present[-1], _ascending(present))
            first, last, ascending = span
            if ascending and (self._last is None or _id_key(first) > self._last):
                self._last = _id_key(last)
                return
            # Out of order: from now on every id is hashed, those logged so far (this block too) first.
            self._start_hashing()
            return
        if ids is None:
            assert ids_json is not None
            ids = orjson.loads(ids_json)
        self._hash([c for c in ids if c is not None] if span is None else ids)

    def _start_hashing(self) -> None:
        self.ordered = False
        self._parts = [array.array("q") for _ in range(_ID_PARTITIONS)]
        self._appends = [part.append for part in self._parts]
        for _, ids in self._log_records():
            self._hash([c for c in ids if c is not None])

    def _hash(self, ids: list[str]) -> None:
        appends = self._appends
        mask = _ID_PARTITIONS - 1
        for h in map(hash, ids):
            appends[h & mask](h)
        self._buffered += len(ids)
        if self._buffered >= _ID_SPILL_HASHES:
            self._spill()

    def _flush_log(self) -> None:
        if self._log_path is None:
            self._log_path = self._work_dir / f".aob-ids-{self._tag}.log"
        with open(self._log_path, "ab") as fh:
            fh.write(self._log)
        self._log.clear()

    def _spill(self) -> None:
        if self._spill_path is None:
            self._spill_path = self._work_dir / f".aob-ids-{self._tag}.bin"
        table: list[tuple[int, int]] = []
        with open(self._spill_path, "ab") as fh:
            for part in self._parts:
                table.append((self._spill_size, len(part)))
                part.tofile(fh)
                self._spill_size += len(part) * part.itemsize
                del part[:]
        self._spills.append(table)
        self._buffered = 0

    def _partition(self, index: int, spill: Any) -> array.array[int]:
        hashes = array.array("q")
        for table in self._spills:
            offset, count = table[index]
            spill.seek(offset)
            hashes.fromfile(spill, count)
        hashes.extend(self._parts[index])
        return hashes

    def _log_records(self) -> Iterator[tuple[int, list[Any]]]:
        with contextlib.ExitStack() as stack:
            records: Iterable[bytes] = ()
            if self._log_path is not None:
                records = stack.enter_context(open(self._log_path, "rb"))
            for record in itertools.chain(records, bytes(self._log).splitlines()):
                head, _, ids = record.partition(b"\t")
                yield int(head), orjson.loads(ids)

    def duplicates(self, limit: int) -> tuple[int, list[tuple[int, str, int]]]:
        """Lines whose custom_id an earlier line already has.

        :param limit: how many of them to return.
        :return: ``(how many, the first `limit` as (line, custom_id, line of first use))``, in line order.
        """
        if self.ordered:
            return 0, []
        groups: list[set[int]] = []
        current: set[int] = set()
        with contextlib.ExitStack() as stack:
            spill = stack.enter_context(open(self._spill_path, "rb")) if self._spill_path else None
            for index in range(_ID_PARTITIONS):
                hashes = self._partition(index, spill)
                if len(set(hashes)) == len(hashes):
                    continue
                seen: set[int] = set()
                current.update(h for h in hashes if h in seen or seen.add(h))  # type: ignore[func-returns-value]
                if len(current) >= _DUP_GROUP_HASHES:
                    groups.append(current)
                    current = set()
        if current:
            groups.append(current)
        total = 0
        first: list[tuple[int, str, int]] = []
        # The rare path: read the log once per group of repeated hashes (one group unless the input is
        # mostly duplicates), so memory stays bounded even then.
        for group in groups:
            first_use: dict[str, int] = {}
            found: list[tuple[int, str, int]] = []
            for line, ids in self._log_records():
                for cid in ids:
                    if cid is not None and hash(cid) in group:
                        earlier = first_use.setdefault(cid, line)
                        if earlier != line:
                            found.append((line, cid, earlier))
                    line += 1
            total += len(found)
            first = heapq.nsmallest(limit, first + found)
        return total, first

    def cleanup(self) -> None:
        for path in (self._spill_path, self._log_path):
            if path is not None:
                path.unlink(missing_ok=True)


# -- the per-line checks, shared by the main process and the helper process ----------------------------


class _Checked:
    """What the fast check learned of a block whose every line is a valid request of one model.

    :param model: the model of every line.
    :param count: the number of lines.
    :param ids: the custom_ids (``None``: only ``ids_json`` is there, decoded when needed).
    :param ids_json: the custom_ids as JSON (``None``: encoded when needed).
    :param span: ``(first id, last id, ascending)`` (see :func:`_ascending`).
    :param filled: the block with ``body.model`` filled in where a line had none, as newline-terminated
        bytes; ``None`` when no line needed it.
    :param emb: embedding inputs per line (embeddings endpoint only).
    :param toks: estimated prompt tokens per line (with ``max_enqueued_tokens`` only).
    """

    __slots__ = ("count", "emb", "filled", "ids", "ids_json", "model", "span", "toks")

    def __init__(
        self,
        model: str,
        count: int,
        ids: list[str] | None,
        ids_json: bytes | None,
        span: tuple[str, str, bool],
        filled: bytes | None,
        emb: list[int] | None,
        toks: list[int] | None,
    ) -> None:
        self.model = model
        self.count = count
        self.ids = ids
        self.ids_json = ids_json
        self.span = span
        self.filled = filled
        self.emb = emb
        self.toks = toks

    def get_ids(self) -> list[str]:
        if self.ids is None:
            assert self.ids_json is not None
            self.ids = orjson.loads(self.ids_json)
        return self.ids

    def encode(self) -> bytes:
        """``<[model, count, first, last, ascending, filled, emb, toks]>\\n<ids JSON>[\\n<filled>]``."""
        first, last, ascending = self.span
        meta = [self.model, self.count, first, last, ascending, self.filled is not None, self.emb, self.toks]
        out = orjson.dumps(meta) + b"\n" + (self.ids_json or orjson.dumps(self.ids))
        if self.filled is not None:
            out += b"\n" + self.filled
        return out

    @classmethod
    def decode(cls, answer: bytes) -> _Checked | None:
        if not answer:
            return None
        meta, ids_json, *rest = answer.split(b"\n", 2)
        model, count, first, last, ascending, filled, emb, toks = orjson.loads(meta)
        return cls(
            model, count, None, ids_json, (first, last, ascending), rest[0] if filled else None, emb, toks
        )


def _block_checker(
    endpoint: str,
    fill_model: str | None,
    max_emb: int | None,
    max_tokens: int | None,
) -> Callable[[list[bytes]], _Checked | None]:
    """The fast check of a whole block of lines.

    The returned function answers a :class:`_Checked` when every line of the block is a valid request of
    one model, and ``None`` otherwise: the block then takes the line-by-line path, which reports every
    problem. Both paths accept exactly the same lines.
    """
    loads = orjson.loads
    dumps = orjson.dumps
    estimate_tokens = request_token_estimator(endpoint)

    def check(lines: list[bytes]) -> _Checked | None:
        ids: list[str] = []
        add_id = ids.append
        model: Any = None
        new_lines: list[bytes] | None = None
        emb: list[int] | None = [] if max_emb is not None else None
        toks: list[int] | None = [] if max_tokens is not None else None
        try:
            for i, line in enumerate(lines):
                obj = loads(line)
                body = obj["body"]
                cid = obj["custom_id"]
                m = body["model"] if fill_model is None else body.get("model", fill_model)
                # The same test as the line-by-line path: a non-str id or model raises TypeError.
                if not (
                    cid > ""
                    and m > ""
                    and obj["url"] == endpoint
                    and obj["method"] == "POST"
                    and "stream" not in body
                ):
                    return None
                if m != model:
                    if model is not None:
                        return None  # a second model: the line-by-line path groups them
                    model = m
                if m is fill_model:
                    if new_lines is None:
                        new_lines = list(lines)
                    body["model"] = m
                    new_lines[i] = dumps(obj)
                if emb is not None:
                    k = count_embedding_inputs(body)
                    if k > max_emb:  # type: ignore[operator]
                        return None
                    emb.append(k)
                if toks is not None:
                    t = estimate_tokens(body)
                    if t > max_tokens:  # type: ignore[operator]
                        return None
                    toks.append(t)
                add_id(cid)
        except Exception:
            return None  # invalid JSON, a non-object, a missing key...: the careful path says what
        if not ids:
            return None
        filled = None
        if new_lines is not None:
            new_lines.append(b"")
            filled = b"\n".join(new_lines)
        return _Checked(model, len(ids), ids, None, (ids[0], ids[-1], _ascending(ids)), filled, emb, toks)

    return check


# -- the helper process ---------------------------------------------------------------------------------


def _helper_handler(config: bytes) -> Callable[[bytes], bytes]:
    """In the helper process (see :class:`~airflow_openai_batch.core.jsonl.BlockHelper`): check blocks.

    Request: newline-terminated lines. Answer: empty (take the careful path) or :meth:`_Checked.encode`.
    """
    settings = orjson.loads(config)
    check = _block_checker(
        settings["endpoint"], settings["model"], settings["max_emb"], settings["max_tokens"]
    )

    def handle(data: bytes) -> bytes:
        result = check(lines_of(data))
        return b"" if result is None else result.encode()

    return handle


class _Block(LineBlock):
    """Consecutive input lines (see :class:`LineBlock`) and the outcome of their fast check."""

    __slots__ = ("checked", "done")

    def __init__(self, lines: list[Any] | None = None, data: bytes | None = None) -> None:
        super().__init__(lines, data)
        self.checked: _Checked | None = None
        self.done = False  # checked (``checked`` None: the fast check refused it)


# -- validation and splitting -----------------------------------------------------------------------------


class _Preparer:
    """The one validation and splitting path behind both public entry points.

    Lines are taken in blocks of about a megabyte. A block whose lines are all valid requests of one model
    (the usual case) is checked in one tight loop and added to its chunk in one step; any other block goes
    through :meth:`_feed_lines`, line by line, which diagnoses every problem. Large inputs have their
    blocks checked by a helper process as well as here (see :class:`BlockHelper`). Blocks are always applied
    in input order, so chunks, line numbers and problems do not depend on who checked what.

    Chunk buffers (``c_buf``) hold newline-terminated pieces: whole blocks, or a line and its newline.
    """

    def __init__(
        self,
        *,
        endpoint: str,
        work_dir: Path,
        model: str | None,
        max_requests_per_batch: int,
        max_bytes_per_batch: int,
        max_embedding_inputs: int,
        max_enqueued_tokens: int | None,
        max_problems: int,
    ) -> None:
        self.endpoint = endpoint
        self.work_dir = work_dir
        self.fill_model = model or None
        self.is_embeddings = endpoint == EMBEDDINGS_ENDPOINT
        self.count_tokens = max_enqueued_tokens is not None
        self.max_requests = max_requests_per_batch
        self.max_bytes = max_bytes_per_batch
        # Sentinels that make the disabled limits never bind.
        self.max_emb = max_embedding_inputs if self.is_embeddings else 1 << 62
        self.max_tokens = max_enqueued_tokens if max_enqueued_tokens is not None else 1 << 62
        # Embedding-input and token limits are off for most inputs: one flag skips both per line.
        self.extra = self.is_embeddings or self.count_tokens
        self.estimate_tokens = request_token_estimator(endpoint)
        checker_emb = max_embedding_inputs if self.is_embeddings else None
        self.check = _block_checker(endpoint, self.fill_model, checker_emb, max_enqueued_tokens)
        self.helper_config = orjson.dumps(
            {
                "endpoint": endpoint,
                "model": self.fill_model,
                "max_emb": checker_emb,
                "max_tokens": max_enqueued_tokens,
            }
        )
        self.max_problems = max_problems
        self.problems: list[InputProblem] = []
        self.total_problems = 0
        self.ids = _Ids(work_dir)
        self.open_chunks: dict[str, _OpenChunk] = {}
        self.model_order: dict[str, int] = {}
        self.done: list[_OpenChunk] = []
        self.writer = _ChunkWriter()
        self.n = 0  # lines consumed (blank ones included, for 1-based line numbers)
        self.blank = 0
        # The current chunk (that of the previous line's model). Before the first line, cur is a
        # placeholder that is never parked or written (cur_model is None).
        self.cur_model: str | None = None
        self.cur = _OpenChunk("", -1, -1, work_dir, "")
        self.flush_step = _FLUSH_BYTES
        self.c_req = self.c_bytes = self.c_emb = self.c_tok = 0
        self.c_flush = _FLUSH_BYTES
        self.c_buf: list[bytes] = []

    # -- problems and chunks ----------------------------------------------------------------------

    def add(self, line_no: int | None, field: str | None, reason: str) -> None:
        self.total_problems += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(InputProblem(line_no, field, reason))

    def start_chunk(self, m: str, first_custom_id: str) -> _OpenChunk:
        """Open the next chunk of model ``m``; its previous chunk (if any) must be closed already."""
        previous = self.open_chunks.get(m)
        if previous is None:
            order = self.model_order[m] = len(self.model_order)
            seq = 0
        else:
            order, seq = previous.model_order, previous.seq + 1
        path = self.work_dir / f"m{order:04d}-s{seq:06d}.jsonl.part"
        chunk = self.open_chunks[m] = _OpenChunk(m, order, seq, path, first_custom_id)
        return chunk

    def diagnose(
        self, n: int, obj: Any, line: bytes, append_id: Callable[[Any], None]
    ) -> tuple[bytes, str, dict[str, Any], str] | None:
        """Slow path for lines the inline check rejected: report every problem, or fill the model."""
        add = self.add
        endpoint = self.endpoint
        before = self.total_problems
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
                if self.fill_model is None:
                    add(n, "body.model", "missing or empty, and no model argument was given")
                else:
                    m = self.fill_model
            elif type(m) is not str:
                add(n, "body.model", f"must be a string, got {_json_type(m)}")
            if body.get("stream"):
                add(n, "body.stream", "streaming is not supported in a batch")
        if self.total_problems != before:
            return None
        if m is not body.get("model"):
            # obj was parsed here (records are serialized first), so filling it in place is safe.
            body["model"] = m
            line = orjson.dumps(obj)
        return line, m, body, cid

    # -- the two paths ----------------------------------------------------------------------------

    def _feed_lines(self, lines: list[Any]) -> None:
        """The careful path: validate and place one line at a time (any block the fast check refused)."""
        fill_model = self.fill_model
        endpoint = self.endpoint
        extra = self.extra
        is_embeddings = self.is_embeddings
        count_tokens = self.count_tokens
        max_requests = self.max_requests
        max_bytes = self.max_bytes
        max_emb = self.max_emb
        max_tokens = self.max_tokens
        estimate_tokens = self.estimate_tokens
        add = self.add
        diagnose = self.diagnose
        writer = self.writer
        open_chunks = self.open_chunks
        done = self.done
        start_chunk = self.start_chunk
        loads = orjson.loads
        dumps = orjson.dumps
        decode_error = orjson.JSONDecodeError
        ids: list[Any] = []
        append_id = ids.append
        first_line = self.n + 1
        n = self.n
        blank = 0
        k = t = 0
        # The current chunk lives in local variables: the per-line cost is one string compare and a few
        # local updates.
        cur_model, cur, flush_step = self.cur_model, self.cur, self.flush_step
        c_req, c_bytes, c_emb, c_tok = self.c_req, self.c_bytes, self.c_emb, self.c_tok
        c_flush, c_buf = self.c_flush, self.c_buf
        append = c_buf.append
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
                    fixed = diagnose(n, obj, line, append_id)
                    if fixed is None:
                        continue
                    line, m, body, cid = fixed

                size = len(line) + 1
                # One test on the common path; the per-line limit checks and the "already rejected" case
                # are all behind it.
                if extra or self.total_problems or size > max_bytes:
                    if size > max_bytes:
                        add(
                            n,
                            None,
                            f"the line is {size} bytes with its newline, "
                            f"above max_bytes_per_batch={max_bytes}",
                        )
                        continue
                    if is_embeddings:
                        k = count_embedding_inputs(body)
                        if k > max_emb:
                            add(
                                n,
                                "body.input",
                                f"{k} embedding inputs, above the {max_emb} allowed per batch",
                            )
                            continue
                    if count_tokens:
                        t = estimate_tokens(body)
                        if t > max_tokens:
                            add(
                                n,
                                "body",
                                f"~{t} estimated prompt tokens, above max_enqueued_tokens={max_tokens}",
                            )
                            continue
                    if self.total_problems:
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
                    # Greedy cut: this line does not fit, so the chunk is final and the model starts a
                    # new one.
                    writer.submit(cur, c_buf)
                    cur.requests, cur.byte_count, cur.emb, cur.tokens = c_req, c_bytes, c_emb, c_tok
                    done.append(cur)
                    cur = start_chunk(m, cid)
                    c_req = c_bytes = c_emb = c_tok = 0
                    c_flush = flush_step
                    c_buf = cur.buf
                    append = c_buf.append
                append(line)
                append(b"\n")
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
        finally:
            # Also on an exception, so that the clean-up sees every chunk opened.
            self.n = n
            self.blank += blank
            self.cur_model, self.cur, self.flush_step = cur_model, cur, flush_step
            self.c_req, self.c_bytes, self.c_emb, self.c_tok = c_req, c_bytes, c_emb, c_tok
            self.c_flush, self.c_buf = c_flush, c_buf
        self.ids.add(first_line, ids)

    def _switch(self, m: str, cid: str) -> None:
        """Make ``m``'s chunk the current one (opening it, with ``cid`` first, if there is none)."""
        if self.cur_model is not None:
            cur = self.cur
            cur.requests, cur.byte_count = self.c_req, self.c_bytes
            cur.emb, cur.tokens = self.c_emb, self.c_tok
            cur.buf, cur.flush_at = self.c_buf, self.c_flush
        self.cur_model = m
        cur = self.cur = self.open_chunks.get(m) or self.start_chunk(m, cid)
        self.flush_step = max(_MIN_FLUSH_BYTES, min(_FLUSH_BYTES, _BUFFER_BUDGET // len(self.open_chunks)))
        self.c_req, self.c_bytes, self.c_emb, self.c_tok = cur.requests, cur.byte_count, cur.emb, cur.tokens
        self.c_buf, self.c_flush = cur.buf, cur.flush_at

    def _feed_block(self, block: _Block, checked: _Checked) -> bool:
        """The fast path: add a block the fast check accepted. ``False``: nothing done, go line by line."""
        count = checked.count
        if block.lines is not None and count != len(block.lines):
            return False  # lines with a newline inside: the careful path sees them as they are
        data = checked.filled if checked.filled is not None else block.get_data()
        max_bytes = self.max_bytes
        nbytes = len(data)
        if nbytes > max_bytes and max(map(len, data.split(b"\n"))) + 1 > max_bytes:
            return False  # a line above the limit: reported by the careful path
        self.ids.add(self.n + 1, checked.ids, checked.ids_json, checked.span)
        self.n += count
        if self.total_problems:
            return True  # the input is already rejected: validate, write nothing more
        model = checked.model
        if model != self.cur_model:
            self._switch(model, checked.span[0])
        e_sum = sum(checked.emb) if checked.emb is not None else 0
        t_sum = sum(checked.toks) if checked.toks is not None else 0
        if (
            self.c_req + count <= self.max_requests
            and self.c_bytes + nbytes <= max_bytes
            and self.c_emb + e_sum <= self.max_emb
            and self.c_tok + t_sum <= self.max_tokens
        ):
            # No cut inside the block (the greedy cut is monotone): the block goes in as one piece.
            self.c_buf.append(data)
            self.c_req += count
            self.c_bytes += nbytes
            self.c_emb += e_sum
            self.c_tok += t_sum
            if self.c_bytes >= self.c_flush:
                self.writer.submit(self.cur, self.c_buf)
                self.c_buf = []
                self.c_flush = self.c_bytes + self.flush_step
            return True
        # A cut falls inside the block: place its lines one by one (no parsing needed).
        lines = lines_of(data) if checked.filled is not None else block.get_lines()
        ids = checked.get_ids()
        max_requests, max_emb, max_tokens = self.max_requests, self.max_emb, self.max_tokens
        writer, done = self.writer, self.done
        cur = self.cur
        c_req, c_bytes, c_emb, c_tok = self.c_req, self.c_bytes, self.c_emb, self.c_tok
        c_flush, c_buf = self.c_flush, self.c_buf
        zeros = itertools.repeat(0)
        for line, cid, k, t in zip(lines, ids, checked.emb or zeros, checked.toks or zeros, strict=False):
            size = len(line) + 1
            if (
                c_req == max_requests
                or c_bytes + size > max_bytes
                or c_emb + k > max_emb
                or c_tok + t > max_tokens
            ):
                writer.submit(cur, c_buf)
                cur.requests, cur.byte_count, cur.emb, cur.tokens = c_req, c_bytes, c_emb, c_tok
                done.append(cur)
                cur = self.start_chunk(model, cid)
                c_req = c_bytes = c_emb = c_tok = 0
                c_flush = self.flush_step
                c_buf = cur.buf
            c_buf.append(line)
            c_buf.append(b"\n")
            c_req += 1
            c_bytes += size
            c_emb += k
            c_tok += t
            if c_bytes >= c_flush:
                writer.submit(cur, c_buf)
                c_buf = []
                c_flush = c_bytes + self.flush_step
        self.cur = cur
        self.c_req, self.c_bytes, self.c_emb, self.c_tok = c_req, c_bytes, c_emb, c_tok
        self.c_flush, self.c_buf = c_flush, c_buf
        return True

    def _apply(self, block: _Block) -> None:
        if block.checked is None or not self._feed_block(block, block.checked):
            self._feed_lines(block.get_lines())

    def _check_here(self, block: _Block) -> None:
        block.checked = self.check(block.get_lines())
        block.done = True

    # -- streaming ----------------------------------------------------------------------------------

    def run(self, lines: Iterable[Any], *, blocks: bool) -> None:
        """Consume the input. ``blocks``: use the fast block check (and a helper for large inputs)."""
        take_raw = getattr(lines, "take_raw_blocks", None) if isinstance(lines, LineIterator) else None
        raw = take_raw() if take_raw is not None else None
        units: Iterator[_Block]
        if raw is not None:
            # Straight from iter_lines: whole blocks, split into lines only where needed.
            units = (_Block(data=data) if b"\r" not in data else _Block(split_block(data)) for data in raw)
        else:
            units = self._line_blocks(iter(lines))
        if not blocks:
            for unit in units:
                self._feed_lines(unit.get_lines())
            return
        seen = 0
        helper: BlockHelper | None = None
        may_start_helper = True
        pending: deque[_Block] = deque()  # in input order
        try:
            for block in units:
                if block.lines is not None and not all(type(line) is bytes for line in block.lines):
                    # Not lines of bytes: only the careful path knows what to say.
                    self._drain(pending, helper, everything=True)
                    self._feed_lines(block.lines)
                    continue
                if helper is not None and helper.alive and len(helper.waiting) < _HELPER_INFLIGHT:
                    helper.send(block.get_data(), block)
                else:
                    self._check_here(block)
                pending.append(block)
                self._drain(pending, helper, wait=len(pending) > _MAX_PENDING)
                if may_start_helper:
                    seen += len(block.data) if block.data is not None else sum(map(len, block.get_lines()))
                    if seen >= _HELPER_MIN_BYTES:
                        may_start_helper = False
                        helper = BlockHelper.start(_HELPER_FACTORY, self.helper_config)
            self._drain(pending, helper, everything=True)
        except BaseException:
            if helper is not None:
                helper.close(kill=True)
                helper = None
            raise
        finally:
            if helper is not None:
                helper.close()

    @staticmethod
    def _line_blocks(source: Iterator[Any]) -> Iterator[_Block]:
        """Blocks of about ``_BLOCK_BYTES`` from an iterator of lines."""
        take = itertools.islice
        size = 256  # lines per block, adapted to the line size
        while True:
            lines = list(take(source, size))
            if not lines:
                return
            try:
                nbytes = sum(map(len, lines))
            except TypeError:
                nbytes = _BLOCK_BYTES
            size = max(_BLOCK_MIN_LINES, min(_BLOCK_MAX_LINES, len(lines) * _BLOCK_BYTES // (nbytes or 1)))
            yield _Block(lines)

    def _drain(
        self,
        pending: deque[_Block],
        helper: BlockHelper | None,
        *,
        wait: bool = False,
        everything: bool = False,
    ) -> None:
        """Apply the blocks at the head of ``pending`` whose check is done, in input order.

        :param wait: wait for the helper's answer for the head block if needed (one block at least).
        :param everything: apply every pending block.
        """
        while pending:
            if helper is not None:
                self._collect(helper, wait=False)
            head = pending[0]
            if not head.done:
                if not (wait or everything):
                    return
                assert helper is not None
                self._collect(helper, wait=True)
                continue
            pending.popleft()
            self._apply(head)
            wait = False

    def _collect(self, helper: BlockHelper, *, wait: bool) -> None:
        """Take the helper's answers that are in (waiting for one with ``wait``)."""
        while True:
            got = helper.next_answer(wait, _HELPER_TIMEOUT)
            if got is None:
                return
            block, answer = got
            checked: Any = _WAITING
            if answer is not None:
                try:
                    checked = _Checked.decode(answer)
                except Exception:
                    helper.close(kill=True)  # an answer that does not decode: stop trusting the helper
            if checked is _WAITING:
                self._check_here(block)  # the helper is gone, stuck or broken: check its blocks here
            else:
                block.checked = checked
                block.done = True
            wait = False

    # -- the end --------------------------------------------------------------------------------------

    def finish(self) -> PreparedInput:
        if self.n == self.blank and not self.total_problems:
            self.add(None, None, "the input is empty")
        repeated, first = self.ids.duplicates(self.max_problems)
        if repeated:
            stream_problems = self.problems
            duplicates = [
                InputProblem(
                    line, "custom_id", f"duplicate custom_id {_short(cid)}, first used on line {used}"
                )
                for line, cid, used in first
            ]
            self.total_problems += repeated
            # Both lists are in line order and capped: merging them keeps the earliest problems. The
            # stable sort puts a line's duplicate first, where custom_id problems go.
            merged = sorted(duplicates + stream_problems, key=lambda p: p.line or 0)
            self.problems = merged[: self.max_problems]
        if self.total_problems:
            raise OpenAIBatchInputError(self.problems, self.total_problems)

        cur = self.cur
        if self.cur_model is not None:
            cur.requests, cur.byte_count = self.c_req, self.c_bytes
            cur.emb, cur.tokens = self.c_emb, self.c_tok
            cur.buf = self.c_buf
        for chunk in self.open_chunks.values():
            self.writer.submit(chunk, chunk.buf)
            self.done.append(chunk)
        self.writer.close()
        self.done.sort(key=lambda c: (c.model_order, c.seq))
        chunks: list[Chunk] = []
        for index, oc in enumerate(self.done):
            final = self.work_dir / f"chunk-{index:05d}.jsonl"
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
        return PreparedInput(
            chunks=chunks,
            total_requests=sum(c.request_count for c in chunks),
            total_bytes=sum(c.byte_count for c in chunks),
            work_dir=self.work_dir,
            endpoint=self.endpoint,
        )

    def abort(self) -> None:
        """Nothing half-written may be mistaken for an upload-ready chunk."""
        with contextlib.suppress(BaseException):
            self.writer.close()
        for oc in [*self.done, *self.open_chunks.values()]:
            oc.path.unlink(missing_ok=True)


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
    blocks: bool,
) -> PreparedInput:
    """Check the arguments, then validate and split (see :class:`_Preparer`)."""
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
    preparer = _Preparer(
        endpoint=endpoint,
        work_dir=work_dir,
        model=model,
        max_requests_per_batch=max_requests_per_batch,
        max_bytes_per_batch=max_bytes_per_batch,
        max_embedding_inputs=max_embedding_inputs,
        max_enqueued_tokens=max_enqueued_tokens,
        max_problems=max_problems,
    )
    try:
        with gc_paused():
            preparer.run(lines, blocks=blocks)
            return preparer.finish()
    except BaseException:
        preparer.abort()
        raise
    finally:
        preparer.ids.cleanup()


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
        blocks=True,
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
        blocks=False,
    )
