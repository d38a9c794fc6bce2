"""DuplicateFinder: every repeated custom_id found with its line and the line of first use, whether the ids
ascend (nothing kept) or not (hashes partitioned and spilled to disk), with a few megabytes at any size."""

from __future__ import annotations

import random
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_openai_batch.core.duplicates import DuplicateFinder


def reference(ids: list[str | None]) -> list[tuple[int, str, int]]:
    first: dict[str, int] = {}
    found = []
    for line, cid in enumerate(ids, 1):
        if cid is None:
            continue
        used = first.setdefault(cid, line)
        if used != line:
            found.append((line, cid, used))
    return found


def find(
    ids: list[str | None], work_dir: Path, block: int, limit: int = 10**9, **small: int
) -> DuplicateFinder:
    finder = DuplicateFinder(work_dir, **small)
    for start in range(0, len(ids), block):
        finder.add(start + 1, ids[start : start + block])
    return finder


def test_ascending_ids_keep_nothing(tmp_path: Path) -> None:
    ids: list[str | None] = [f"row-{i}" for i in range(5000)]  # unpadded numbers ascend by length, then text
    ids[10] = None
    finder = find(ids, tmp_path, 300)
    assert finder.ordered and finder.duplicates(50) == (0, [])


def test_ids_out_of_order_are_hashed_and_spilled_and_every_duplicate_is_found(tmp_path: Path) -> None:
    rng = random.Random(3)
    ids: list[str | None] = [f"{rng.getrandbits(40):x}" for _ in range(20_000)]
    for _ in range(300):
        ids[rng.randrange(len(ids))] = ids[rng.randrange(len(ids))]
    ids[7] = None
    small = {"partitions": 8, "spill_hashes": 1000, "log_bytes": 4096, "group_hashes": 16}
    finder = find(ids, tmp_path, 700, **small)
    assert not finder.ordered
    assert {p.suffix for p in tmp_path.iterdir()} == {".log", ".bin"}  # both went to disk
    expected = reference(ids)
    assert finder.duplicates(len(expected) + 5) == (len(expected), expected)
    total, first = finder.duplicates(50)
    assert (total, first) == (len(expected), expected[:50])
    finder.cleanup()
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=100, deadline=None)
@given(
    ids=st.lists(st.one_of(st.none(), st.text(alphabet='ab\t\n"é', min_size=1, max_size=3)), max_size=60),
    block=st.integers(1, 9),
)
def test_any_ids_in_any_blocks(tmp_path_factory, ids: list[str | None], block: int) -> None:  # type: ignore[no-untyped-def]
    work_dir = tmp_path_factory.mktemp("ids")
    finder = find(ids, work_dir, block, partitions=2, spill_hashes=5, log_bytes=64, group_hashes=2)
    expected = reference(ids)
    assert finder.duplicates(7) == (len(expected), expected[:7])
    finder.cleanup()
