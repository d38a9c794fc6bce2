"""Repeated custom_ids across any number of lines, with a bounded amount of memory (no Airflow import)."""

from __future__ import annotations

import array
import contextlib
import heapq
import itertools
import operator
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson

__all__ = ["DuplicateFinder"]


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
    # One length (the usual zero-padded numbering): a set of the lengths tells it in one pass, with no
    # list of them.
    if len(set(map(len, ids))) == 1:
        return all(map(operator.lt, ids, itertools.islice(ids, 1, None)))
    keys = list(zip(map(len, ids), ids, strict=True))
    return all(map(operator.lt, keys, itertools.islice(keys, 1, None)))


class DuplicateFinder:
    """Finds the lines whose custom_id an earlier line has, holding a few megabytes at any input size.

    Every call's ids go, with the number of their first line, to a log (in memory, then in ``work_dir``).
    While the ids keep ascending (see :func:`_id_key`: row numbers, sorted keys...) that is all: they are
    all different. From the first id that does not ascend, each id costs 8 bytes: its 64-bit hash, kept
    in one of ``partitions`` arrays chosen by the hash's low bits and spilled to a file in ``work_dir``
    once ``spill_hashes`` are held; at the end each partition is checked with a (small) set. Only when
    a hash repeats is the log read back, for the exact lines and to tell a duplicate from a collision.

    :param work_dir: where the log and the spilled hashes go (removed by :meth:`cleanup`).
    :param partitions: hash partitions, a power of two.
    :param spill_hashes: hashes held in memory before they are spilled.
    :param log_bytes: log bytes held in memory before they are written out.
    :param group_hashes: repeated hashes looked up per pass over the log (the rare duplicate path).
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        partitions: int = 256,
        spill_hashes: int = 1 << 21,
        log_bytes: int = 4 << 20,
        group_hashes: int = 1 << 18,
    ) -> None:
        self._work_dir = work_dir
        self._tag = uuid.uuid4().hex[:12]
        self._partition_count = partitions
        self._spill_hashes = spill_hashes
        self._log_bytes = log_bytes
        self._group_hashes = group_hashes
        self._log = bytearray()
        self._log_path: Path | None = None
        self._last: tuple[int, str] | None = None
        #: Whether every id so far ascended (then nothing else is kept).
        self.ordered = True
        self._parts: list[array.array[int]] = []
        self._appends: list[Callable[[int], None]] = []
        self._held = 0
        self._spill_path: Path | None = None
        self._spill_size = 0
        #: Per spill: the (offset, count) of each partition in the spill file.
        self._spills: list[list[tuple[int, int]]] = []

    def add(self, first_line: int, ids: list[str | None], *, ascending: bool | None = None) -> None:
        """Register the custom_ids of consecutive lines.

        :param first_line: the 1-based line number of the first id.
        :param ids: one entry per line, ``None`` where a line has no usable custom_id.
        :param ascending: the caller knows whether the ids ascend in :func:`_id_key` order (all of them
            present); ``None``: they are checked here.
        """
        log = self._log
        log += b"%d\t" % first_line
        log += orjson.dumps(ids)
        log += b"\n"
        if len(log) >= self._log_bytes:
            self._flush_log()
        present = ids if all(ids) else [cid for cid in ids if cid is not None]  # ids are never ""
        if not self.ordered:
            self._hash(present)
        elif (
            present
            and (_ascending(present) if ascending is None else ascending)
            and (self._last is None or _id_key(present[0]) > self._last)
        ):
            self._last = _id_key(present[-1])
        elif present:
            # Out of order: from now on every id is hashed, those logged so far (these too) first.
            self.ordered = False
            self._parts = [array.array("q") for _ in range(self._partition_count)]
            self._appends = [part.append for part in self._parts]
            for _, logged in self._log_records():
                self._hash([cid for cid in logged if cid is not None])

    def _hash(self, ids: list[str]) -> None:
        appends = self._appends
        mask = self._partition_count - 1
        for h in map(hash, ids):
            appends[h & mask](h)
        self._held += len(ids)
        if self._held >= self._spill_hashes:
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
        self._held = 0

    def _partition(self, index: int, spill: object) -> array.array[int]:
        hashes = array.array("q")
        for table in self._spills:
            offset, count = table[index]
            spill.seek(offset)  # type: ignore[attr-defined]
            hashes.fromfile(spill, count)  # type: ignore[arg-type]
        hashes.extend(self._parts[index])
        return hashes

    def _log_records(self) -> Iterator[tuple[int, list[str | None]]]:
        with contextlib.ExitStack() as stack:
            records: Iterator[bytes] = iter(())
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
            for index in range(self._partition_count):
                hashes = self._partition(index, spill)
                if len(set(hashes)) == len(hashes):
                    continue
                seen: set[int] = set()
                current.update(h for h in hashes if h in seen or seen.add(h))  # type: ignore[func-returns-value]
                if len(current) >= self._group_hashes:
                    groups.append(current)
                    current = set()
        if current:
            groups.append(current)
        total = 0
        first: list[tuple[int, str, int]] = []
        # Read the log once per group of repeated hashes (one group unless the input is mostly
        # duplicates), so that memory stays bounded even then.
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
        """Remove the files in ``work_dir``."""
        for path in (self._spill_path, self._log_path):
            if path is not None:
                path.unlink(missing_ok=True)
