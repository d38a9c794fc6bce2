"""WriteBehind: writes run in order on one background thread, errors reach the caller, memory is bounded."""

from __future__ import annotations

import threading

import pytest

from airflow_openai_batch.core.background import WriteBehind


def test_writes_run_in_order_on_another_thread() -> None:
    done: list[tuple[int, str]] = []
    writes = WriteBehind(depth=3)  # deeper than the default: order must hold with several waiting
    for i in range(200):
        writes.run(lambda i=i: done.append((i, threading.current_thread().name)))
    writes.close()
    assert [i for i, _ in done] == list(range(200))
    assert {name for _, name in done} != {threading.current_thread().name}
    assert all(name.startswith("openai-batch-write") for _, name in done)


def test_without_background_each_write_runs_at_once_in_the_callers_thread() -> None:
    done: list[str] = []
    writes = WriteBehind(background=False)
    writes.run(lambda: done.append(threading.current_thread().name))
    assert done == [threading.current_thread().name]
    writes.close()


def test_no_more_than_depth_writes_wait() -> None:
    release = threading.Event()
    started = threading.Event()
    done: list[int] = []

    def blocked() -> None:
        started.set()
        release.wait()
        done.append(0)

    writes = WriteBehind(depth=2)
    writes.run(blocked)
    started.wait()
    writes.run(done.append, 1)  # queued behind the blocked write: two waiting now
    caller = threading.Thread(target=writes.run, args=(done.append, 2))
    caller.start()
    # The third run waits for the first write to finish before queueing: it cannot return yet.
    assert caller.is_alive() and done == []
    release.set()
    caller.join()
    writes.close()
    assert done == [0, 1, 2]


def test_a_failed_write_is_raised_to_the_caller() -> None:
    def broken() -> None:
        raise OSError("disk full")

    writes = WriteBehind(depth=1)
    writes.run(broken)
    with pytest.raises(OSError, match="disk full"):
        writes.run(lambda: None)  # waits for the failed one, which raises
    writes.run(broken)
    with pytest.raises(OSError, match="disk full"):
        writes.close()


def test_closing_a_failed_run_drops_the_writes_errors() -> None:
    done: list[int] = []

    def broken() -> None:
        raise OSError("disk full")

    writes = WriteBehind(depth=2)  # room for both: the broken one is not waited for by the second
    writes.run(broken)
    writes.run(done.append, 1)
    writes.close(failed=True)  # no error raised: the caller is failing already
    assert done == [1]
