"""Write-behind: writes that release the GIL, done in order on one background thread (no Airflow import).

Used where ``make bench`` shows it pays beside a busy neighbour as well as on an idle machine: the
Parquet row groups of a collect (encoding and zstd compression). Measured and not used: a submit prep's
chunk files (writes and sha256), JSONL result files (writes), where it paid idle and lost beside a busy
neighbour, or did not pay at all.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["WriteBehind"]


class WriteBehind:
    """Runs writes in the order given, on one background thread, while the caller goes on.

    Only for work that spends its time with the GIL released (a file write, hashing a large buffer,
    encoding and compressing a Parquet row group): Python-level work would only take turns with the
    caller. At most ``depth`` writes are waiting, which bounds the memory they hold (one, by default:
    two measured slower, from more memory touched and more hand-overs of the GIL). A write's error is
    raised by the next :meth:`run` or by :meth:`wait`.

    :param background: ``False``: each write runs at once, in the caller's thread (what ``make bench``
        compares it with).
    :param depth: writes queued and not done, at most.
    """

    def __init__(self, background: bool = True, depth: int = 1) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="openai-batch-write") if background else None
        self._depth = depth
        self._pending: deque[Future[Any]] = deque()

    def run(self, write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue ``write(*args, **kwargs)`` after the writes queued before it (``args`` must not change
        until it is done: give it immutable data or data no longer used)."""
        if self._pool is None:
            write(*args, **kwargs)
            return
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(write, *args, **kwargs))

    def wait(self) -> None:
        """Return once every queued write is done; raise the first error among them."""
        while self._pending:
            self._pending.popleft().result()

    def close(self, *, failed: bool = False) -> None:
        """Wait for the queued writes and stop the thread.

        :param failed: the caller is failing already: the writes' errors are dropped, not raised.
        """
        try:
            if failed:
                for pending in self._pending:
                    with contextlib.suppress(Exception):
                        pending.result()
                self._pending.clear()
            else:
                self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
