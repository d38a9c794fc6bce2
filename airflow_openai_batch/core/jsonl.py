"""Small JSONL helpers shared by the preparation and reconciliation hot paths (no Airflow import)."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from typing import Any, BinaryIO

import orjson

__all__ = ["DEFAULT_CHUNK_SIZE", "dumps_line", "iter_line_blocks", "iter_lines", "loads"]

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


def iter_line_blocks(stream: BinaryIO, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[list[bytes]]:
    """Yield the lines of a binary stream in lists, one list per block read (see :func:`iter_lines`).

    :param stream: a binary file object; only ``read`` is used.
    :param chunk_size: bytes per ``read`` call.
    :return: an iterator of non-empty lists of lines (newline, CR and a leading BOM removed).
    """
    read = stream.read
    # Pieces of a line that spans several blocks; joined once, when its end arrives, so a very long
    # line costs one copy instead of quadratic re-concatenation.
    pending: list[bytes] = []
    first = True
    while True:
        block = read(chunk_size)
        if not block:
            break
        if b"\n" not in block:
            pending.append(block)
            continue
        if pending:
            pending.append(block)
            block = b"".join(pending)
        lines = block.split(b"\n")
        tail = lines.pop()
        pending = [tail] if tail else []
        if b"\r" in block:
            lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
        if first:
            first = False
            if lines[0].startswith(_BOM):
                lines[0] = lines[0][3:]
        yield lines
    if pending:
        last = b"".join(pending)
        if last.endswith(b"\r"):
            last = last[:-1]
        if first and last.startswith(_BOM):
            last = last[3:]
        yield [last]


def iter_lines(stream: BinaryIO, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    """Yield the raw lines of a binary stream, reading it in large blocks.

    The trailing ``\\n`` and ``\\r`` of each line are removed, a UTF-8 BOM at the very start of the
    stream is dropped, a final line without a newline is kept and blank lines are yielded too (so callers
    can keep 1-based line numbers aligned with the file while skipping them).

    :param stream: a binary file object (local file, fsspec/S3 file, ``io.BytesIO``...). Only ``read`` is
        used, in ``chunk_size`` blocks: remote file objects are slow per call and fast per byte.
    :param chunk_size: bytes per ``read`` call.
    :return: an iterator of ``bytes`` lines.
    """
    # chain's C-level iteration over each block's list is cheaper per line than resuming a generator.
    return chain.from_iterable(iter_line_blocks(stream, chunk_size))
