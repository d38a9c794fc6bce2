"""Reading JSONL streams (no Airflow import): blocks of whole lines, and the lines themselves."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from typing import BinaryIO

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "LineIterator",
    "iter_lines",
    "iter_raw_blocks",
    "line_starts",
    "lines_from_raw_blocks",
    "unix_line_ends",
]

#: Bytes read per ``stream.read`` call. Remote (fsspec/S3) file objects are slow per call and fast per
#: byte, so one large read beats many ``readline`` round trips.
DEFAULT_CHUNK_SIZE = 1 << 20

_BOM = b"\xef\xbb\xbf"


def iter_raw_blocks(stream: BinaryIO, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    """Yield a binary stream as blocks of whole lines, about ``chunk_size`` bytes each.

    Each block ends with ``\\n`` (one is added after an unterminated last line) and a UTF-8 BOM at the
    very start of the stream is dropped; ``\\r`` is left in place (see :func:`unix_line_ends`). This is the
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
        tail = block[cut:] if cut < len(block) else b""
        if pending:
            # The earlier pieces and this block's head, copied once (a view: no slice copied first).
            pending.append(memoryview(block)[:cut])
            data = b"".join(pending)
        else:
            data = block if not tail else block[:cut]
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


def line_starts(block: bytes, base: int = 0) -> list[int]:
    """Where each line of a newline-terminated block starts, plus ``base`` (as many as the block has
    newlines), its newlines found one by one.

    For lines of a few hundred bytes or more (result and request lines), cheaper than splitting the block
    to measure its lines, and even than ``block.count(b"\\n")``: CPython finds one byte with ``memchr``
    but counts it with a plain byte loop (2.5x slower on a collect's result files). For short lines the
    loop's cost per line wins over them.
    """
    starts = []
    append = starts.append
    find = block.find
    start = 0
    end = find(b"\n")
    while end >= 0:
        append(base + start)
        start = end + 1
        end = find(b"\n", start)
    return starts


def unix_line_ends(block: bytes) -> bytes:
    """A block from :func:`iter_raw_blocks` with its ``\\r\\n`` line ends made ``\\n``, as
    :func:`iter_lines` yields the lines (a raw ``\\r`` is never inside a valid JSON line)."""
    return block.replace(b"\r\n", b"\n") if b"\r" in block else block


def _lines_of(block: bytes) -> list[bytes]:
    lines = unix_line_ends(block).split(b"\n")
    lines.pop()  # after the final newline
    return lines


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
        yield _lines_of(block)


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
