"""iter_lines and iter_raw_blocks: block reads, newline/CR/BOM handling, blank and unterminated lines."""

from __future__ import annotations

import io

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from airflow_openai_batch.core.jsonl import (
    iter_lines,
    iter_raw_blocks,
    line_starts,
    unix_line_ends,
)

BOM = b"\xef\xbb\xbf"


class ReadOnly:
    """A file-like object with nothing but read(), like some remote stream wrappers."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)
        self.calls: list[int] = []

    def read(self, size: int = -1) -> bytes:
        self.calls.append(size)
        return self._buf.read(size)


def lines_of(data: bytes, chunk_size: int = 1 << 20) -> list[bytes]:
    return list(iter_lines(io.BytesIO(data), chunk_size))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 64, 1 << 20])
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", []),
        (b"a", [b"a"]),
        (b"a\n", [b"a"]),
        (b"a\nb", [b"a", b"b"]),
        (b"a\r\nb\r\n", [b"a", b"b"]),
        (b"\n\na\n\n", [b"", b"", b"a", b""]),
        (BOM + b'{"x":1}\n', [b'{"x":1}']),
        (BOM + b"a\r\nb", [b"a", b"b"]),
        (BOM, [b""]),
        (b"a\r", [b"a"]),
        (b"x" + BOM + b"\n", [b"x" + BOM]),  # a BOM is only special at the very start
        (b"a\n" + BOM + b"b\n", [b"a", BOM + b"b"]),
    ],
)
def test_iter_lines_cases(data: bytes, expected: list[bytes], chunk_size: int) -> None:
    assert lines_of(data, chunk_size) == expected


def test_reads_in_large_blocks_without_readline() -> None:
    data = b"".join(b'{"i":%d}\n' % i for i in range(10_000))
    stream = ReadOnly(data)
    out = list(iter_lines(stream, 1 << 16))  # type: ignore[arg-type]
    assert out == data.splitlines()
    assert set(stream.calls) == {1 << 16}
    assert len(stream.calls) == len(data) // (1 << 16) + 2


def test_line_longer_than_many_blocks() -> None:
    long = b"x" * 100_000
    assert lines_of(b"a\n" + long + b"\r\nb", 1000) == [b"a", long, b"b"]


def test_raw_blocks_are_whole_lines_and_give_the_same_lines() -> None:
    data = BOM + b"a\r\nbb\n\r\nccc\r"
    blocks = list(iter_raw_blocks(io.BytesIO(data), 2))
    assert all(block.endswith(b"\n") for block in blocks)
    lines = b"".join(map(unix_line_ends, blocks)).split(b"\n")[:-1]
    assert lines == lines_of(data) == [b"a", b"bb", b"", b"ccc"]


@settings(max_examples=150, deadline=None)
@given(
    lines=st.lists(
        st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")), max_size=30
    ),
    crlf=st.lists(st.booleans(), min_size=30, max_size=30),
    bom=st.booleans(),
    final_newline=st.booleans(),
    chunk_size=st.integers(1, 40),
)
def test_iter_lines_property(
    lines: list[bytes], crlf: list[bool], bom: bool, final_newline: bool, chunk_size: int
) -> None:
    ends = [b"\r\n" if c else b"\n" for c in crlf[: len(lines)]]
    expected = lines
    if lines and not final_newline:
        ends[-1] = b""
        # An unterminated empty last line is no line at all.
        expected = lines[:-1] if lines[-1] == b"" else lines
    data = (BOM if bom else b"") + b"".join(line + end for line, end in zip(lines, ends, strict=True))
    # Bytes EF BB BF at the very start are a BOM whether or not the case meant one: it is stripped.
    assume(bom or not data.startswith(BOM))
    if bom and not expected:
        expected = [b""]  # the BOM alone is one (blank) line
    assert lines_of(data, chunk_size) == expected


@given(st.binary(max_size=300) | st.lists(st.sampled_from([b"\n", b"{}", b"\r", b"x" * 40])).map(b"".join))
def test_line_starts_are_as_many_as_the_newlines(data: bytes) -> None:
    assert len(line_starts(data)) == data.count(b"\n")


@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))), st.integers(0, 10**9))
def test_line_starts_are_where_each_line_begins(lines: list[bytes], base: int) -> None:
    block = b"".join(line + b"\n" for line in lines)
    starts = line_starts(block, base)
    assert len(starts) == len(lines)
    assert [block[start - base :].split(b"\n", 1)[0] for start in starts] == lines
