"""JSONL helpers shared by the preparation and reconciliation hot paths (no Airflow import): block reads,
line iteration, and a helper process that lets their parsing use a second core."""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import os
import queue
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any, BinaryIO

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

import orjson

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "HELPER_ENV",
    "BlockHelper",
    "BlockPipeline",
    "LineIterator",
    "dumps_line",
    "iter_line_blocks",
    "iter_lines",
    "iter_raw_blocks",
    "lines_from_raw_blocks",
    "loads",
    "split_block",
]

#: Bytes read per ``stream.read`` call. Remote (fsspec/S3) file objects are slow per call and fast per
#: byte, so one large read beats many ``readline`` round trips.
DEFAULT_CHUNK_SIZE = 1 << 20

_BOM = b"\xef\xbb\xbf"

#: Parse one JSON document from bytes (orjson: several times faster than ``json``).
loads = orjson.loads


def dumps_line(obj: Any) -> bytes:
    """Serialize ``obj`` as one compact JSONL line, without the trailing newline.

    :param obj: a JSON-serializable value.
    :return: the UTF-8 encoded JSON.
    """
    return orjson.dumps(obj)


def iter_raw_blocks(stream: BinaryIO, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    """Yield a binary stream as blocks of whole lines, about ``chunk_size`` bytes each.

    Each block ends with ``\\n`` (one is added after an unterminated last line) and a UTF-8 BOM at the
    very start of the stream is dropped; ``\\r`` is left in place (see :func:`split_block`). This is the
    form in which a consumer that does not need every line as an object (e.g. to copy or count them)
    reads fastest.

    :param stream: a binary file object; only ``read`` is used, in ``chunk_size`` blocks.
    :param chunk_size: bytes per ``read`` call.
    :return: an iterator of non-empty, newline-terminated ``bytes``.
    """
    read = stream.read
    # Pieces of a line that spans several reads; joined once, when its end arrives, so a very long
    # line costs one copy instead of quadratic re-concatenation.
    pending: list[bytes] = []
    first = True
    while True:
        block = read(chunk_size)
        if not block:
            break
        cut = block.rfind(b"\n") + 1
        if not cut:
            pending.append(block)
            continue
        if cut == len(block):
            data, tail = block, b""
        else:
            data, tail = block[:cut], block[cut:]
        if pending:
            pending.append(data)
            data = b"".join(pending)
        pending = [tail] if tail else []
        if first:
            first = False
            if data.startswith(_BOM):
                data = data[3:]
        yield data
    if pending:
        pending.append(b"\n")
        data = b"".join(pending)
        if first and data.startswith(_BOM):
            data = data[3:]
        yield data


def split_block(block: bytes) -> list[bytes]:
    """The lines of a block from :func:`iter_raw_blocks`, without their ``\\n`` or ``\\r``."""
    lines = lines_of(block)
    if b"\r" in block:
        lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    return lines


def iter_line_blocks(stream: BinaryIO, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[list[bytes]]:
    """Yield the lines of a binary stream in lists, one list per block read (see :func:`iter_lines`).

    :param stream: a binary file object; only ``read`` is used.
    :param chunk_size: bytes per ``read`` call.
    :return: an iterator of non-empty lists of lines (newline, CR and a leading BOM removed).
    """
    return map(split_block, iter_raw_blocks(stream, chunk_size))


class LineIterator(chain):  # type: ignore[type-arg]
    """The lines of a stream (a C-level iterator), which can be read as raw blocks instead.

    A consumer that has not taken any line yet may call :meth:`take_raw_blocks` and read the same data
    as :func:`iter_raw_blocks` blocks (newline-terminated, ``\\r`` not removed).
    """

    __slots__ = ("_raw", "_state")

    def take_raw_blocks(self) -> Iterator[bytes] | None:
        """The raw blocks, or ``None`` once lines have been taken (the two views cannot be mixed)."""
        if self._state[0]:
            return None
        self._state[0] = True
        return self._raw


def _split_blocks(raw: Iterator[bytes], state: list[bool]) -> Iterator[list[bytes]]:
    for block in raw:
        state[0] = True
        yield split_block(block)


def iter_lines(stream: BinaryIO, chunk_size: int = DEFAULT_CHUNK_SIZE) -> LineIterator:
    """Yield the raw lines of a binary stream, reading it in large blocks.

    The trailing ``\\n`` and ``\\r`` of each line are removed, a UTF-8 BOM at the very start of the
    stream is dropped, a final line without a newline is kept and blank lines are yielded too (so callers
    can keep 1-based line numbers aligned with the file while skipping them).

    :param stream: a binary file object (local file, fsspec/S3 file, ``io.BytesIO``...). Only ``read`` is
        used, in ``chunk_size`` blocks: remote file objects are slow per call and fast per byte.
    :param chunk_size: bytes per ``read`` call.
    :return: an iterator of ``bytes`` lines (a :class:`LineIterator`).
    """
    return lines_from_raw_blocks(iter_raw_blocks(stream, chunk_size))


def lines_from_raw_blocks(raw: Iterator[bytes]) -> LineIterator:
    """The lines of blocks shaped like :func:`iter_raw_blocks` makes them, as :func:`iter_lines` yields
    them, while a consumer can still take the blocks themselves (:meth:`LineIterator.take_raw_blocks`).

    For sources that have to do something before the first read (e.g. download a file): pass a generator
    that does it and then yields ``iter_raw_blocks(...)``; nothing runs until the lines or blocks are read.

    :param raw: newline-terminated blocks of whole lines.
    """
    state = [False]
    # chain's C-level iteration over each block's list is cheaper per line than resuming a generator.
    lines = LineIterator.from_iterable(_split_blocks(raw, state))
    lines._raw = raw
    lines._state = state
    return lines


# -- a helper process for CPU-bound work on blocks of lines ---------------------------------------------

#: Set to 0 to never start a helper process (the work is then done in the calling process only).
HELPER_ENV = "OPENAI_BATCH_HELPER_PROCESS"
_FRAME = struct.Struct("<Q")
#: Larger frames are never sent: a header announcing one means the stream is broken.
_MAX_FRAME = 1 << 32
#: Wanted pipe buffer size (capped by the system's limit).
_PIPE_BYTES = 1 << 20
#: The GIL switch interval while a helper runs: the caller's main thread holds the GIL almost all the
#: time, and the threads feeding the helper must get it quickly (the default 5 ms would starve it).
_SWITCH_INTERVAL = 0.0005
#: glibc malloc settings for the helper (ignored by other C libraries; a user's own values win). Each
#: block's answer is built from a few hundred fresh kilobyte-sized objects and freed a moment later; by
#: default glibc hands that memory back to the kernel and faults it in again for the next block, which
#: costs the helper about a fifth of its time. Keeping up to 256 MB of freed memory avoids it; the
#: helper's peak memory is unchanged (it holds a few blocks at a time).
_HELPER_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
    # Arrow's default allocator (mimalloc) holds tens of megabytes more at peak than jemalloc for the same
    # row groups, and is no faster here. Read once, when Arrow first allocates: only a new process can
    # choose, so the helper does.
    "ARROW_DEFAULT_MEMORY_POOL": "jemalloc",
}
# Once the caller closes the pipe, the helper leaves at once: everything it owes was written and flushed,
# and a normal interpreter exit (freeing every module, Arrow's included) keeps the caller waiting ~50 ms.
_HELPER_CODE = (
    "import os; from airflow_openai_batch.core.jsonl import _helper_main; _helper_main(); os._exit(0)"
)


def _read_frame(stream: Any) -> bytes | None:
    """One length-prefixed frame from a buffered binary stream, ``None`` at the end."""
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    (size,) = _FRAME.unpack(head)
    if size > _MAX_FRAME:
        return None  # not a frame of ours: treat the stream as broken
    data = stream.read(size)
    return data if len(data) == size else None


def _helper_main() -> None:
    """Entry point of a helper process: answer each frame read from stdin on stdout, in order.

    The command line names ``<module>:<factory>`` and modules to import ahead: all are imported before
    anything is read, so a helper started early is ready when its first block comes. The first frame
    is the config: ``factory(config)`` returns the function that turns each following frame into its
    answer: bytes, or a sequence of bytes-like parts sent as one answer.
    """
    _serve(sys.argv[1], sys.argv[2:], sys.stdin.buffer, sys.stdout.buffer)


def _serve(target: str, preload: Iterable[str], stdin: Any, stdout: Any) -> None:
    """The loop of :func:`_helper_main`, on the given streams."""
    module, _, name = target.partition(":")
    factory = getattr(importlib.import_module(module), name)
    for extra in preload:
        importlib.import_module(extra)
    config = _read_frame(stdin)
    if config is None:
        return
    handle = factory(config)
    # What the handlers build are trees freed by reference counting: the cyclic collector only costs.
    gc.disable()
    while True:
        frame = _read_frame(stdin)
        if frame is None:
            return
        answer = handle(frame)
        # An answer may come in parts (bytes-like): written one after the other, never joined, since
        # joining would copy a megabyte-sized answer once more.
        parts = (answer,) if isinstance(answer, bytes) else answer
        stdout.write(_FRAME.pack(sum(map(len, parts))))
        for part in parts:
            stdout.write(part)
        stdout.flush()


def _enlarge_pipe(pipe: Any) -> None:
    """Give a pipe a megabyte of buffer (Linux; the default is 64 KiB) when allowed.

    Each filled buffer costs the thread reading it one wait for the GIL, which the caller's main thread
    holds almost all the time: with a megabyte, a block crosses in one or two waits instead of twenty.
    """
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if setsize is None or pipe is None:
        return
    try:
        with open("/proc/sys/fs/pipe-max-size") as limit:
            size = min(_PIPE_BYTES, int(limit.read()))
        fcntl.fcntl(pipe.fileno(), setsize, size)
    except (OSError, ValueError):
        pass


class BlockHelper:
    """A second process that turns blocks of bytes into answers, in order, so that work which holds the
    GIL (parsing JSON) can use a second core.

    Blocks go out and answers come back through pipes, each served by a thread of this process (they wait
    on the pipes without holding the GIL), so the caller never blocks on the helper unless the answer it
    needs next is not in yet. Callers must be able to do a block's work themselves: anything going wrong
    with the helper (it cannot start, dies, hangs) only means they do.

    :param factory: ``"module:function"``; the helper calls ``function(config)`` once and the returned
        callable with each block.
    :param config: bytes handed to the factory; ``None`` to send them later with :meth:`configure`
        (the process starts, and imports, meanwhile).
    :param preload: more modules for the helper to import before the config comes.
    """

    def __init__(self, factory: str, config: bytes | None, preload: Iterable[str] = ()) -> None:
        env = dict(os.environ)
        # The child must import this very package, wherever it was imported from here.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        for name, value in _HELPER_MALLOC_ENV.items():
            env.setdefault(name, value)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _HELPER_CODE, factory, *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            bufsize=0,
        )
        for pipe in (self._proc.stdin, self._proc.stdout):
            _enlarge_pipe(pipe)
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.answers: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        #: What the caller attached to each block sent and not answered yet, oldest first.
        self.waiting: deque[Any] = deque()
        self.alive = True
        self._switch_interval: float | None = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, _SWITCH_INTERVAL))
        self._threads = [
            threading.Thread(target=self._send_loop, name="openai-batch-helper-send", daemon=True),
            threading.Thread(target=self._receive_loop, name="openai-batch-helper-receive", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        #: Whether the config was sent (blocks may follow).
        self.configured = False
        if config is not None:
            self.configure(config)

    @classmethod
    def start(cls, factory: str, config: bytes | None, preload: Iterable[str] = ()) -> BlockHelper | None:
        """A running helper, or ``None`` if helpers are disabled (:data:`HELPER_ENV`) or cannot start."""
        if os.environ.get(HELPER_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
            return None
        if not sys.executable:
            return None
        try:
            return cls(factory, config, preload)
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def configure(self, config: bytes) -> None:
        """Send the factory's config (once, before any block)."""
        if self.configured:
            raise RuntimeError("the helper was configured already")
        self.configured = True
        self._outbox.put(config)

    def send(self, data: bytes, tag: Any) -> None:
        """Queue a block; its answer comes back in order on :attr:`answers`, ``tag`` on :attr:`waiting`."""
        if not self.configured:
            raise RuntimeError("configure() the helper before sending blocks")
        self.waiting.append(tag)
        self._outbox.put(data)

    def _send_loop(self) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            while True:
                data = self._outbox.get()
                if data is None:
                    break
                for part in (_FRAME.pack(len(data)), data):
                    view = memoryview(part)
                    while view:
                        view = view[stdin.write(view) :]
        except (OSError, ValueError):
            pass  # the helper is gone: the receiving side reports it
        finally:
            with contextlib.suppress(OSError, ValueError):
                stdin.close()

    def _receive_loop(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        try:
            reader = io.BufferedReader(stdout, 1 << 16)  # type: ignore[arg-type]
            while True:
                frame = _read_frame(reader)
                if frame is None:
                    break
                self.answers.put(frame)
        except Exception:
            pass  # whatever broke, the caller does the remaining work itself
        finally:
            self.answers.put(None)  # the end: no more answers will come

    def next_answer(self, wait: bool, timeout: float) -> tuple[Any, bytes | None] | None:
        """The oldest block's ``(tag, answer)``; ``None`` if none is in yet (``wait=False``).

        An answer of ``None`` means the helper is gone (or stuck for ``timeout`` seconds, then killed):
        the caller does the block's work itself. Every later call returns ``(tag, None)`` too.
        """
        if not self.waiting:
            return None
        if not self.alive:
            return self.waiting.popleft(), None
        try:
            answer = self.answers.get(timeout=timeout) if wait else self.answers.get_nowait()
        except queue.Empty:
            if not wait:
                return None
            self.close(kill=True)
            answer = None
        if answer is None:
            self.alive = False
        return self.waiting.popleft(), answer

    def close(self, kill: bool = False) -> None:
        """Stop the helper (at once with ``kill``) and reap it. Safe to call more than once."""
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None
        self.alive = False
        self._outbox.put(None)
        if kill:
            with contextlib.suppress(OSError):
                self._proc.kill()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10)
        with contextlib.suppress(OSError, ValueError):
            assert self._proc.stdout is not None
            self._proc.stdout.close()


_WAITING = object()


class BlockPipeline:
    """Blocks worked on here or in a :class:`BlockHelper` (whichever is free), applied in order.

    :param helper: the helper process, or ``None`` to do all the work here.
    :param work: does a block's work here (what the helper does with the block's bytes).
    :param decode: turns the helper's answer for a block into what ``work`` returns.
    :param apply: receives each block and its result, in the order the blocks were fed.
    :param inflight: blocks sent to the helper and not answered yet, at most (at first: see
        ``max_inflight``).
    :param max_inflight: when larger than ``inflight``, the limit adapts between 1 and this so that
        neither process waits for the other: it grows when the helper is found with nothing to do, and
        shrinks when this process has to wait for an answer.
    :param max_pending: blocks worked on and not applied yet, at most (memory stays flat); at least
        one more than the limit of blocks in flight.
    :param timeout: seconds to wait for one answer before giving up on the helper.

    Blocks can also be sent ahead, before they can be applied (:meth:`send_ahead`, e.g. result blocks
    while the input they are joined with is still being read): their answers are kept, and applied once
    :meth:`release` says how.
    """

    def __init__(
        self,
        helper: BlockHelper | None,
        work: Any,
        decode: Any,
        apply: Any,
        *,
        inflight: int = 3,
        max_inflight: int | None = None,
        max_pending: int = 8,
        timeout: float = 300.0,
    ) -> None:
        self.helper = helper
        self._work = work
        self._decode = decode
        self._apply = apply
        self._inflight = inflight
        self._max_inflight = max(inflight, max_inflight or inflight)
        self._min_inflight = inflight if self._max_inflight == inflight else 1
        self._max_pending = max(max_pending, self._max_inflight + 1)
        self._timeout = timeout
        self._pending: deque[list[Any]] = deque()  # [data, result], result _WAITING at the helper
        self._sent: deque[list[Any]] = deque()
        #: While True, blocks are only sent ahead and nothing is applied (see :meth:`send_ahead`).
        self.held = False

    @property
    def inflight_limit(self) -> int:
        """How many blocks may be at the helper now (adapts when ``max_inflight`` allows)."""
        return self._inflight

    def feed(self, block: Any, data: bytes | None) -> None:
        """Queue ``block``; ``data`` is what the helper gets for it (``None``: do it here)."""
        entry: list[Any] = [block, _WAITING]
        helper = self.helper
        if helper is not None and not self._sent and self._inflight < self._max_inflight:
            self._inflight += 1  # every answer is in: the helper has been idle, give it more
        if data is not None and helper is not None and helper.alive and len(self._sent) < self._inflight:
            self._sent.append(entry)
            helper.send(data, entry)
        else:
            entry[1] = self._work(block)
        self._pending.append(entry)
        self._drain(wait=len(self._pending) > self._max_pending)

    def send_ahead(self, block: Any, data: bytes | None, limit: int) -> bool:
        """Send ``block`` to the helper now and keep its answer until :meth:`release`; ``False`` (nothing
        done) when the helper cannot take it: none, gone, busy with its limit of blocks, or ``limit``
        blocks already held."""
        helper = self.helper
        # Answers in since the last call free their places at the helper.
        self._collect(wait=False)
        if (
            data is None
            or helper is None
            or not helper.alive
            or len(self._sent) >= self._max_inflight
            or len(self._pending) >= limit
        ):
            return False
        self.held = True
        entry: list[Any] = [block, _WAITING]
        self._sent.append(entry)
        helper.send(data, entry)
        self._pending.append(entry)
        return True

    def release(self, apply: Any) -> None:
        """Apply the blocks sent ahead (and every later one) with ``apply`` from now on."""
        self._apply = apply
        self.held = False
        self._drain(wait=False)

    def finish(self) -> None:
        """Apply every block fed (waiting for the helper as needed)."""
        self._drain(wait=True, everything=True)

    def _drain(self, *, wait: bool, everything: bool = False) -> None:
        pending = self._pending
        while pending and not self.held:
            self._collect(wait=False)
            head = pending[0]
            if head[1] is _WAITING:
                if not (wait or everything):
                    return
                if not everything and self._inflight > self._min_inflight:
                    self._inflight -= 1  # this process waits for the helper: keep more work here
                self._collect(wait=True)
                continue
            pending.popleft()
            self._apply(head[0], head[1])
            wait = False

    def _collect(self, *, wait: bool) -> None:
        helper = self.helper
        if helper is None:
            return
        while self._sent:
            got = helper.next_answer(wait, self._timeout)
            if got is None:
                return
            entry, answer = got
            self._sent.popleft()
            result = _WAITING
            if answer is not None:
                try:
                    result = self._decode(answer)
                except Exception:
                    helper.close(kill=True)  # an answer that does not decode: stop trusting the helper
            # No usable answer (the helper is gone, stuck or broken): do the block's work here.
            entry[1] = self._work(entry[0]) if result is _WAITING else result
            wait = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while lines stream past (one batch, one input).

    Parsing creates a few container objects per line, which triggers a young-generation collection every
    hundred lines or so: ~20% of the time, for nothing, since what is built here are trees freed by
    reference counting. Collection resumes (and catches up) on exit.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def lines_of(data: bytes) -> list[bytes]:
    """The lines of newline-terminated data, exactly as they are (a ``\\r`` is kept)."""
    lines = data.split(b"\n")
    lines.pop()  # after the final newline
    return lines


class LineBlock:
    """Consecutive lines: as a list (``lines``), as newline-terminated bytes (``data``), or both (each
    made from the other when first needed)."""

    __slots__ = ("data", "lines")

    def __init__(self, lines: list[Any] | None = None, data: bytes | None = None) -> None:
        self.lines = lines
        self.data = data

    def get_lines(self) -> list[Any]:
        if self.lines is None:
            assert self.data is not None
            self.lines = lines_of(self.data)
        return self.lines

    def get_data(self) -> bytes:
        if self.data is None:
            lines = self.get_lines()
            lines.append(b"")
            try:
                self.data = b"\n".join(lines)
            finally:
                lines.pop()
        return self.data
