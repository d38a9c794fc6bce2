"""The emulator's state: files, batches, stats, the virtual clock and the batch lifecycle.

The lifecycle is evaluated lazily: nothing runs in the background. Every access first "ticks" the
state to the virtual clock's ``now``, applying the due lifecycle events of every batch in time
order (a small discrete-event simulation), so tests can move time with :meth:`advance` and get
exactly the same result on every run.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import random
import secrets
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .answers import AnswerFaults, shape_answer
from .config import ROUTE_NAMES, EmulatorConfig
from .responses import (
    BATCH_ENDPOINTS,
    EXPIRED_ERROR,
    NON_HTTP,
    NON_HTTP_ERROR,
    SUCCESS,
    canonical_endpoint,
    error_body,
    line_outcome,
    line_usage,
    response_body,
    stable_hex,
    unit_float,
)
from .validation import ScanResult

DAY = 24 * 3600
#: Default lifetime of batch input and output files at OpenAI.
FILE_TTL = 30 * DAY
#: The purposes a file may be uploaded with (those the File object can report back).
UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data")
#: Largest accepted upload, as at OpenAI.
MAX_UPLOAD_BYTES = 512 * 1024 * 1024
FINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
TIMESTAMP_FIELDS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


class ApiError(Exception):
    """An error answered to the client with OpenAI's error body shape.

    :param status: HTTP status code.
    :param message: human-readable message.
    :param type: OpenAI error type (``invalid_request_error``, ``server_error``...).
    :param param: the offending parameter, if any.
    :param code: machine-readable code, if any.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class VirtualClock:
    """Virtual seconds since ``epoch`` (an integer unix time taken at start):
    ``real elapsed * time_scale + advanced offset``.

    Times are kept relative to ``epoch`` so they stay small floats: progress computed as
    ``elapsed * rate`` would lose precision on raw unix times (~1e-7 s resolution).

    :param time_scale: virtual seconds per real second (0 freezes the clock).
    :param monotonic: the real clock (injectable for tests).
    """

    def __init__(self, time_scale: float = 1.0, monotonic: Callable[[], float] = time.monotonic) -> None:
        # Starting on a whole second makes a frozen clock's timestamps exact: an event 5 s after
        # creation is always reported exactly 5 s later (the lag behind wall time is < 1 s).
        self.epoch = int(time.time())
        self._monotonic = monotonic
        self._start = 0.0
        self._mono0 = monotonic()
        self._scale = time_scale
        self._offset = 0.0

    def now(self) -> float:
        """Virtual seconds since ``epoch``."""
        return self._start + (self._monotonic() - self._mono0) * self._scale + self._offset

    def unix(self, t: float) -> int:
        """The unix timestamp (whole seconds) of virtual time ``t``."""
        return self.epoch + math.floor(t)

    def set_scale(self, time_scale: float) -> None:
        # Rebase first so that changing the scale never makes the clock jump.
        self._start = self.now() - self._offset
        self._mono0 = self._monotonic()
        self._scale = time_scale

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self._offset += seconds


@dataclass
class FileRecord:
    """One stored file; its bytes live at ``path``."""

    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    expires_at: int | None
    path: Path

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


@dataclass
class BatchRecord:
    """One batch and where it is in its lifecycle (times are virtual seconds, as floats)."""

    id: str
    seq: int
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    output_expires_after: int | None
    created: float
    scan: ScanResult
    input_path: Path
    seed: int
    failure_rate: float
    missing_rate: float = 0.0
    #: The kinds failing lines pick from (``None``: the default mix).
    failure_kinds: tuple[str, ...] | None = None
    #: Expire once this many requests are processed (``expire_next_batches``), if set.
    expire_at: int | None = None
    status: str = "validating"
    # Time up to which the state is known; progress is linear from (checkpoint, base_processed).
    checkpoint: float = 0.0
    base_processed: float = 0.0
    validated: bool = False
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def model(self) -> str | None:
        return self.scan.model if self.validated else None


def _new_stats() -> dict[str, Any]:
    return {
        "calls": Counter(),
        "faults": Counter(),
        "faults_by_kind": Counter(),
        "faults_after_create": 0,
        "auth": Counter(),
        "api_versions": Counter(),
        "last_api_version": None,
        "last_auth": None,
        "last_credential_sha256": None,
        "azure_calls": 0,
    }


class EmulatorState:
    """Everything the emulator knows. All public methods are thread-safe (one re-entrant lock):
    the uvicorn event loop and a test thread (``EmulatorServer.configure``...) may both call in.

    :param config: the starting knobs.
    """

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self.initial_config = self.config
        self.lock = threading.RLock()
        self.clock = VirtualClock(self.config.time_scale)
        self._own_data_dir = self.config.data_dir is None
        self.data_dir = Path(self.config.data_dir or tempfile.mkdtemp(prefix="openai-batch-emulator-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, FileRecord] = {}
        self.batches: dict[str, BatchRecord] = {}
        self._active: set[str] = set()
        self._seq = itertools.count()
        self._stats = _new_stats()
        self._rng = random.Random(self.config.seed)
        #: Transient failures so far per custom_id: a line's attempt is one more (see ``line_attempt``).
        self._transient_failures: dict[str, int] = {}
        #: Batches still to create that expire part-way (``expire_next_batches``).
        self._expiring_left = self.config.expire_next_batches
        self._paths: set[Path] = set()  # every path this state created, removed on reset/close

    # ------------------------------------------------------------------ knobs, clock, stats

    def now(self) -> float:
        return self.clock.now()

    def configure(self, **knobs: Any) -> EmulatorConfig:
        """Change knobs at runtime. Batches are first brought up to ``now`` under the old knobs,
        so a change never applies retroactively."""
        with self.lock:
            new = self.config.replace(**knobs)
            if new.data_dir != self.config.data_dir:
                raise ValueError("data_dir cannot be changed at runtime")
            now = self.now()
            self._tick(now)
            for batch_id in self._active:
                batch = self.batches[batch_id]
                batch.base_processed = self._processed_exact(batch, now)
                batch.checkpoint = now
            if new.time_scale != self.config.time_scale:
                self.clock.set_scale(new.time_scale)
            if new.seed != self.config.seed:
                self._rng = random.Random(new.seed)
            if "expire_next_batches" in knobs:
                self._expiring_left = new.expire_next_batches
            self.config = new
            return new

    def advance(self, seconds: float) -> float:
        """Move the virtual clock forward by ``seconds``; returns the new virtual unix time."""
        with self.lock:
            self.clock.advance(float(seconds))
            return self.clock.epoch + self.now()

    def reset(self, restore_config: bool = False) -> None:
        """Drop every file, batch and stat (and, with ``restore_config``, the runtime knob changes)."""
        with self.lock:
            for path in list(self._paths):
                self._unlink(path)
            self.files.clear()
            self.batches.clear()
            self._active.clear()
            self._stats = _new_stats()
            self._transient_failures.clear()
            if restore_config:
                self.configure(**{k: v for k, v in self.initial_config.to_dict().items() if k != "data_dir"})
            self._rng = random.Random(self.config.seed)

    def close(self) -> None:
        """Delete the stored bytes (and the data dir, when the emulator created it)."""
        with self.lock:
            self.reset()
            if self._own_data_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)

    def record_call(
        self,
        route: str,
        api_version: str | None,
        auth: str | None,
        azure: bool,
        credential_sha256: str | None = None,
    ) -> None:
        with self.lock:
            stats = self._stats
            stats["calls"][route] += 1
            if auth:
                stats["auth"][auth] += 1
                stats["last_auth"] = auth
                stats["last_credential_sha256"] = credential_sha256
            if api_version:
                stats["api_versions"][api_version] += 1
                stats["last_api_version"] = api_version
            if azure:
                stats["azure_calls"] += 1

    def stats(self) -> dict[str, Any]:
        """Call counts per route name (top level and under ``calls``), ``faults`` per route, and more."""
        with self.lock:
            self._tick(self.now())
            stats = self._stats
            out: dict[str, Any] = {name: stats["calls"].get(name, 0) for name in ROUTE_NAMES}
            out.update(
                {
                    "calls": {name: stats["calls"].get(name, 0) for name in ROUTE_NAMES},
                    "faults": {name: stats["faults"].get(name, 0) for name in ROUTE_NAMES},
                    "faults_total": sum(stats["faults"].values()),
                    "faults_by_kind": dict(stats["faults_by_kind"]),
                    "faults_after_create": stats["faults_after_create"],
                    "files": len(self.files),
                    "batches": len(self.batches),
                    "batches_by_status": dict(Counter(b.status for b in self.batches.values())),
                    "auth": dict(stats["auth"]),
                    "last_auth": stats["last_auth"],
                    "last_credential_sha256": stats["last_credential_sha256"],
                    "api_versions": dict(stats["api_versions"]),
                    "last_api_version": stats["last_api_version"],
                    "azure_calls": stats["azure_calls"],
                    "now": self.clock.epoch + self.now(),
                }
            )
            return out

    def decide_fault(self, route: str) -> str | None:
        """Whether this call gets an injected fault, and which kind (seeded, in call order)."""
        with self.lock:
            cfg = self.config
            if cfg.fault_rate <= 0 or not cfg.fault_kinds:
                return None
            if cfg.fault_routes is not None and route not in cfg.fault_routes:
                return None
            if self._rng.random() >= cfg.fault_rate:
                return None
            kind = self._rng.choice(cfg.fault_kinds)
            self._stats["faults"][route] += 1
            self._stats["faults_by_kind"][kind] += 1
            return kind

    def decide_fault_after_create(self) -> str | None:
        """For a batch just created: whether its response is replaced by a 500 or a drop."""
        with self.lock:
            cfg = self.config
            if cfg.fault_after_create_rate <= 0 or self._rng.random() >= cfg.fault_after_create_rate:
                return None
            kinds = [k for k in cfg.fault_kinds if k != "429"] or ["500"]
            kind = self._rng.choice(kinds)
            self._stats["faults_after_create"] += 1
            self._stats["faults_by_kind"][kind] += 1
            return kind

    # ------------------------------------------------------------------ files

    def _unlink(self, path: Path) -> None:
        self._paths.discard(path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def new_path(self, stem: str) -> Path:
        """A fresh path inside the data dir, removed again by ``reset``."""
        with self.lock:
            path = self.data_dir / f"{stem}-{secrets.token_hex(8)}"
            self._paths.add(path)
            return path

    def discard_path(self, path: Path) -> None:
        with self.lock:
            self._unlink(path)

    def add_file(
        self, path: Path, filename: str, purpose: str, size: int, expires_after: int | None = None
    ) -> dict[str, Any]:
        """Register the bytes already written at ``path`` as a new file."""
        with self.lock:
            now = self.clock.unix(self.now())
            if expires_after is None and purpose == "batch":
                expires_after = FILE_TTL  # OpenAI's default for batch files
            record = self._store_file(path, filename, purpose, size, now, expires_after)
            return record.to_api()

    def _store_file(
        self, path: Path, filename: str, purpose: str, size: int, created: int, ttl: int | None
    ) -> FileRecord:
        file_id = "file-" + secrets.token_hex(12)
        final = self.data_dir / file_id
        os.replace(path, final)
        self._paths.discard(path)
        self._paths.add(final)
        record = FileRecord(file_id, filename, purpose, size, created, created + ttl if ttl else None, final)
        self.files[file_id] = record
        return record

    def _purge_expired_files(self, now: float) -> None:
        unix_now = self.clock.epoch + now
        expired = [f for f in self.files.values() if f.expires_at is not None and f.expires_at <= unix_now]
        for record in expired:
            del self.files[record.id]
            self._unlink(record.path)

    def _file(self, file_id: str, param: str = "file_id") -> FileRecord:
        self._tick(self.now())
        record = self.files.get(file_id)
        if record is None:
            raise ApiError(404, f"No such File object: {file_id}", param=param)
        return record

    def get_file(self, file_id: str) -> dict[str, Any]:
        with self.lock:
            return self._file(file_id).to_api()

    def open_file(self, file_id: str) -> tuple[Any, int]:
        """An open binary handle on a file's bytes and its size (the handle outlives a delete)."""
        with self.lock:
            record = self._file(file_id)
            return open(record.path, "rb"), record.bytes

    def delete_file(self, file_id: str) -> dict[str, Any]:
        with self.lock:
            record = self._file(file_id)
            del self.files[file_id]
            self._unlink(record.path)
            return {"id": file_id, "object": "file", "deleted": True}

    def list_files(self, *, purpose: str | None, limit: int, after: str | None, order: str) -> dict[str, Any]:
        with self.lock:
            self._tick(self.now())
            records = [f for f in self.files.values() if purpose is None or f.purpose == purpose]
            # Insertion order is creation order; it breaks ties between equal created_at seconds.
            if order == "desc":
                records.reverse()
            if after is not None:
                ids = [r.id for r in records]
                records = records[ids.index(after) + 1 :] if after in ids else []
            page = records[:limit]
            return {
                "object": "list",
                "data": [r.to_api() for r in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(records) > limit,
            }

    # ------------------------------------------------------------------ batches: create / read

    def prepare_batch_input(self, input_file_id: str) -> tuple[str, Path]:
        """Check the input file and pin its bytes for a new batch: a hard link (no copy) that
        survives the user deleting the file while the batch runs, as OpenAI's copy does."""
        with self.lock:
            record = self._file(input_file_id, param="input_file_id")
            if record.purpose != "batch":
                raise ApiError(
                    400,
                    f"The input file {input_file_id} has purpose {record.purpose!r}; "
                    "a batch input file must be uploaded with purpose 'batch'.",
                    param="input_file_id",
                    code="invalid_value",
                )
            batch_id = "batch_" + secrets.token_hex(16)
            link = self.data_dir / f"{batch_id}.input"
            try:
                os.link(record.path, link)
            except OSError:
                shutil.copyfile(record.path, link)
            self._paths.add(link)
            return batch_id, link

    def _enqueued_requests(self, model: str | None, statuses: frozenset[str]) -> int:
        return sum(
            b.scan.total
            for b in self.batches.values()
            if b.status in statuses and b.scan.ok and b.scan.model == model
        )

    def _enqueued_tokens(self, model: str | None, statuses: frozenset[str]) -> int:
        return sum(
            b.scan.prompt_tokens
            for b in self.batches.values()
            if b.status in statuses and b.scan.ok and b.scan.model == model
        )

    def create_batch(
        self,
        batch_id: str,
        input_path: Path,
        scan: ScanResult,
        *,
        endpoint: str,
        input_file_id: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        output_expires_after: int | None,
        seed: int,
        failure_rate: float,
        missing_rate: float = 0.0,
    ) -> dict[str, Any]:
        """Register a new batch (status ``validating``); returns it as the create call answers it."""
        with self.lock:
            now = self.now()
            self._tick(now)
            cfg = self.config
            limit = cfg.enqueued_token_limit
            if limit is not None and cfg.token_limit_mode == "reject" and scan.ok:
                queued = self._enqueued_tokens(
                    scan.model, frozenset({"validating", "in_progress", "finalizing"})
                )
                if queued + scan.prompt_tokens > limit:
                    self._unlink(input_path)
                    raise ApiError(400, _token_limit_message(scan.model, limit), code="token_limit_exceeded")
            request_limit = cfg.enqueued_request_limit
            if (
                request_limit is not None
                and cfg.token_limit_mode == "reject"
                and scan.ok
                and self._enqueued_requests(
                    scan.model, frozenset({"validating", "in_progress", "finalizing"})
                )
                + scan.total
                > request_limit
            ):
                self._unlink(input_path)
                raise ApiError(
                    400, _request_limit_message(scan.model, request_limit), code="request_limit_exceeded"
                )
            batch = BatchRecord(
                id=batch_id,
                seq=next(self._seq),
                endpoint=endpoint,
                input_file_id=input_file_id,
                completion_window=completion_window,
                metadata=metadata,
                output_expires_after=output_expires_after,
                created=now,
                scan=scan,
                input_path=input_path,
                seed=seed,
                failure_rate=failure_rate,
                missing_rate=missing_rate,
                failure_kinds=cfg.failure_kinds,
                checkpoint=now,
            )
            if self._expiring_left > 0 and scan.ok:
                self._expiring_left -= 1
                batch.expire_at = scan.total // 2
            for custom_id in scan.transient_failures:
                self._transient_failures[custom_id] = self._transient_failures.get(custom_id, 0) + 1
            self.batches[batch_id] = batch
            self._active.add(batch_id)
            # Rendered before any tick: the create call always answers "validating", as OpenAI does.
            return self._render(batch, now)

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        with self.lock:
            now = self.now()
            self._tick(now)
            return self._render(self._batch(batch_id), now)

    def _batch(self, batch_id: str) -> BatchRecord:
        batch = self.batches.get(batch_id)
        if batch is None:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return batch

    def list_batches(self, *, limit: int, after: str | None) -> dict[str, Any]:
        with self.lock:
            now = self.now()
            self._tick(now)
            ordered = sorted(self.batches.values(), key=lambda b: b.seq, reverse=True)  # newest first
            if after is not None:
                ids = [b.id for b in ordered]
                ordered = ordered[ids.index(after) + 1 :] if after in ids else []
            page = ordered[:limit]
            return {
                "object": "list",
                "data": [self._render(b, now) for b in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(ordered) > limit,
            }

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """validating/in_progress -> cancelling; cancelling/cancelled answer as they are
        (idempotent, so a retried cancel is harmless); any other status is a 409."""
        with self.lock:
            now = self.now()
            self._tick(now)
            batch = self._batch(batch_id)
            if batch.status in ("validating", "in_progress"):
                batch.base_processed = float(self._processed(batch, now))
                batch.checkpoint = now
                batch.status = "cancelling"
                batch.cancelling_at = now
            elif batch.status not in ("cancelling", "cancelled"):
                raise ApiError(409, f"Cannot cancel a batch with status '{batch.status}'.")
            return self._render(batch, now)

    # ------------------------------------------------------------------ lifecycle

    def _processed_exact(self, batch: BatchRecord, t: float) -> float:
        if batch.status != "in_progress":
            return batch.base_processed
        done = batch.base_processed + max(0.0, t - batch.checkpoint) * self.config.rate
        return min(float(batch.scan.total), done)

    def _processed(self, batch: BatchRecord, t: float) -> int:
        # The epsilon absorbs float error so that exactly-due lines count as done.
        return min(batch.scan.total, math.floor(self._processed_exact(batch, t) + 1e-9))

    def line_attempt(self, custom_id: str) -> int:
        """The attempt a new batch makes at a request: one more than its transient failures so far.

        Read without the lock from the scan's thread: a dict lookup is atomic.
        """
        return 1 + self._transient_failures.get(custom_id, 0)

    def _deadline(self, batch: BatchRecord) -> float:
        expire_after = self.config.expire_after
        if expire_after is None or batch.in_progress_at is None:
            deadline = batch.created + DAY
        else:
            deadline = batch.in_progress_at + expire_after
        rate = self.config.rate
        if batch.expire_at is not None and batch.status == "in_progress" and rate > 0:
            # Expires part-way: when the processed count reaches expire_at.
            deadline = min(deadline, batch.checkpoint + (batch.expire_at - batch.base_processed) / rate)
        return deadline

    def _finish_time(self, batch: BatchRecord) -> float:
        rate = self.config.rate
        if rate <= 0:
            return math.inf
        return batch.checkpoint + (batch.scan.total - batch.base_processed) / rate

    def _next_event(self, batch: BatchRecord) -> float:
        cfg = self.config
        if batch.status == "validating":
            due = batch.created + cfg.validation_seconds
        elif batch.status == "in_progress":
            due = min(self._finish_time(batch), self._deadline(batch))
        elif batch.status == "finalizing":
            due = (batch.finalizing_at or batch.checkpoint) + cfg.finalizing_seconds
        elif batch.status == "cancelling":
            due = (batch.cancelling_at or batch.checkpoint) + cfg.cancel_seconds
        else:
            return math.inf
        # Never before the last known state: a knob changed at runtime does not rewrite the past.
        return max(due, batch.checkpoint)

    def _tick(self, now: float) -> None:
        """Apply every lifecycle event due by ``now``, in time order across all batches (the
        token limit of one batch depends on the others' state at that moment)."""
        self._purge_expired_files(now)
        heap = []
        for batch_id in self._active:
            batch = self.batches[batch_id]
            due = self._next_event(batch)
            if due <= now:
                heap.append((due, batch.seq, batch_id))
        heapq.heapify(heap)
        while heap:
            due, _seq, batch_id = heapq.heappop(heap)
            batch = self.batches[batch_id]
            self._apply_event(batch, due)
            if batch.final:
                self._active.discard(batch_id)
                self._unlink(batch.input_path)
                continue
            following = self._next_event(batch)
            if following <= now:
                heapq.heappush(heap, (following, batch.seq, batch_id))

    def _apply_event(self, batch: BatchRecord, t: float) -> None:
        if batch.status == "validating":
            batch.validated = True
            limit = self.config.enqueued_token_limit
            if not batch.scan.ok:
                batch.status, batch.failed_at, batch.errors = "failed", t, batch.scan.errors
            elif (
                limit is not None
                and self.config.token_limit_mode == "fail"
                and self._enqueued_tokens(batch.scan.model, frozenset({"in_progress", "finalizing"}))
                + batch.scan.prompt_tokens
                > limit
            ):
                batch.status, batch.failed_at = "failed", t
                batch.errors = [
                    {
                        "code": "token_limit_exceeded",
                        "message": _token_limit_message(batch.scan.model, limit),
                        "param": None,
                        "line": None,
                    }
                ]
            elif (
                self.config.enqueued_request_limit is not None
                and self.config.token_limit_mode == "fail"
                and self._enqueued_requests(batch.scan.model, frozenset({"in_progress", "finalizing"}))
                + batch.scan.total
                > self.config.enqueued_request_limit
            ):
                batch.status, batch.failed_at = "failed", t
                batch.errors = [
                    {
                        "code": "request_limit_exceeded",
                        "message": _request_limit_message(
                            batch.scan.model, self.config.enqueued_request_limit
                        ),
                        "param": None,
                        "line": None,
                    }
                ]
            else:
                batch.status, batch.in_progress_at = "in_progress", t
                batch.base_processed = 0.0
            batch.checkpoint = t
        elif batch.status == "in_progress":
            # Decide by which event fell due: recomputing the count from floats could land a
            # hair short of the total at the very moment processing finishes.
            if self._finish_time(batch) <= self._deadline(batch):
                batch.base_processed, batch.checkpoint = float(batch.scan.total), t
                batch.status, batch.finalizing_at = "finalizing", t
            else:
                processed = self._processed(batch, t)
                batch.base_processed, batch.checkpoint = float(processed), t
                self._write_results(batch, processed, t, expired=True)
                batch.status, batch.expired_at = "expired", t
        elif batch.status == "finalizing":
            batch.checkpoint = t
            self._write_results(batch, batch.scan.total, t, expired=False)
            batch.status, batch.completed_at = "completed", t
        elif batch.status == "cancelling":
            batch.checkpoint = t
            self._write_results(batch, int(batch.base_processed), t, expired=False)
            batch.status, batch.cancelled_at = "cancelled", t

    # ------------------------------------------------------------------ result files

    def _write_results(self, batch: BatchRecord, processed: int, t: float, *, expired: bool) -> None:
        """Write the output and error files: one line per processed request (and, for an expired
        batch, a ``batch_expired`` error line per unprocessed one), in a seeded shuffled order.

        Records are spilled to a scratch file and only their offsets kept, so memory stays flat
        however large the batch is.
        """
        if processed == 0 and not expired:
            return
        endpoint = canonical_endpoint(batch.endpoint)
        rate = self.config.rate
        start = batch.in_progress_at if batch.in_progress_at is not None else t
        failure_rate = batch.failure_rate
        answer_faults = AnswerFaults.from_config(self.config)
        spill_path = self.new_path(f"{batch.id}.spill")
        offsets: list[tuple[int, int, bool]] = []
        with open(batch.input_path, "rb") as source, open(spill_path, "w+b") as spill:
            index = 0
            for raw in source:
                if not raw.strip():
                    continue
                if index >= batch.scan.total or (index >= processed and not expired):
                    break
                line = orjson.loads(raw)
                custom_id = line["custom_id"]
                if (
                    index < processed
                    and batch.missing_rate > 0
                    and unit_float(batch.seed, custom_id, "missing") < batch.missing_rate
                ):
                    index += 1  # processed, but its result is never written (a "missing" request)
                    continue
                request_id = stable_hex(32, batch.id, custom_id, "request")
                record: dict[str, Any] = {
                    "id": "batch_req_" + stable_hex(32, batch.id, custom_id),
                    "custom_id": custom_id,
                    "response": None,
                    "error": None,
                }
                if index >= processed:
                    record["error"] = EXPIRED_ERROR
                    is_error = True
                else:
                    attempt = batch.scan.attempts.get(custom_id, 1)
                    outcome = line_outcome(batch.seed, custom_id, failure_rate, attempt, batch.failure_kinds)
                    is_error = outcome != SUCCESS
                    if outcome == SUCCESS:
                        created = self.clock.unix(start + (index + 1) / rate if rate > 0 else t)
                        usage = line_usage(
                            endpoint, line["body"], custom_id, batch.seed, batch.scan.cached_prompt_rate
                        )
                        body = response_body(endpoint, line["body"], custom_id, batch.seed, usage, created)
                        shape_answer(endpoint, line["body"], body, custom_id, batch.seed, answer_faults)
                        record["response"] = {"status_code": 200, "request_id": request_id, "body": body}
                    elif outcome == NON_HTTP:
                        record["error"] = NON_HTTP_ERROR
                    else:
                        status_code, err = error_body(outcome)
                        record["response"] = {
                            "status_code": status_code,
                            "request_id": request_id,
                            "body": err,
                        }
                data = orjson.dumps(record) + b"\n"
                offsets.append((spill.tell(), len(data), is_error))
                spill.write(data)
                index += 1
            order = list(range(len(offsets)))
            random.Random(f"{batch.seed}:{batch.id}").shuffle(order)
            out_path = self.new_path(f"{batch.id}.output")
            err_path = self.new_path(f"{batch.id}.error")
            sizes = {False: 0, True: 0}
            with open(out_path, "wb") as out, open(err_path, "wb") as err_file:
                for i in order:
                    offset, length, is_error = offsets[i]
                    spill.seek(offset)
                    (err_file if is_error else out).write(spill.read(length))
                    sizes[is_error] += length
        self._unlink(spill_path)
        created = self.clock.unix(t)
        ttl = batch.output_expires_after or FILE_TTL
        # A file only when it has lines: OpenAI leaves output_file_id / error_file_id null otherwise.
        stored: dict[bool, str | None] = {}
        for is_error, path, name in ((False, out_path, "output"), (True, err_path, "error")):
            if sizes[is_error]:
                record = self._store_file(
                    path, f"{batch.id}_{name}.jsonl", "batch_output", sizes[is_error], created, ttl
                )
                stored[is_error] = record.id
            else:
                self._unlink(path)
                stored[is_error] = None
        batch.output_file_id = stored[False] or batch.output_file_id
        batch.error_file_id = stored[True] or batch.error_file_id

    # ------------------------------------------------------------------ rendering

    def _render(self, batch: BatchRecord, now: float) -> dict[str, Any]:
        scan = batch.scan
        counted = batch.validated and batch.status != "failed"
        processed = self._processed(batch, now) if counted else 0
        failed = scan.cum_failed[processed] if counted else 0
        input_tokens = scan.cum_input[processed] if counted else 0
        output_tokens = scan.cum_output[processed] if counted else 0
        out: dict[str, Any] = {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "model": batch.model,
            "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
            "input_file_id": batch.input_file_id,
            "completion_window": batch.completion_window,
            "status": batch.status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": self.clock.unix(batch.created),
            "expires_at": self.clock.unix(batch.created + DAY),
        }
        for name in TIMESTAMP_FIELDS:
            value = getattr(batch, name)
            out[name] = self.clock.unix(value) if value is not None else None
        out["request_counts"] = {
            "total": scan.total if counted else 0,
            "completed": processed - failed,
            "failed": failed,
        }
        out["usage"] = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": scan.cum_cached[processed] if counted else 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": scan.cum_reasoning[processed] if counted else 0},
            "total_tokens": input_tokens + output_tokens,
        }
        out["metadata"] = batch.metadata
        return out


def _token_limit_message(model: str | None, limit: int) -> str:
    return (
        f"Enqueued token limit reached for {model} in organization org-emulator. Limit: {limit:,} enqueued "
        "tokens. Please try again once some in_progress batches have been completed."
    )


def _request_limit_message(model: str | None, limit: int) -> str:
    return (
        f"Enqueued request limit reached for {model} in organization org-emulator. Limit: {limit:,} enqueued "
        "requests. Please try again once some in_progress batches have been completed."
    )


def allowed_endpoints(azure: bool) -> tuple[str, ...]:
    """Endpoints ``batches.create`` accepts; Azure's older API versions name them without ``/v1``."""
    if azure:
        return BATCH_ENDPOINTS + tuple(e[3:] for e in BATCH_ENDPOINTS)
    return BATCH_ENDPOINTS
