"""Simulated time for triggers against the emulator: a day of polling in seconds, in one event loop.

For tests and benchmarks of waits (this project's, or a DAG's own deferrable tasks): many triggers run
in one event loop, as they would in one triggerer, with the emulator's clock frozen (``time_scale=0``).

Each trigger is given the clock (its ``time()`` and ``sleep()``; the project's trigger takes it as
``clock=``). Once every trigger is asleep (none is
computing or waiting on an API call), the clock jumps to the earliest wake-up, moves the emulator's
frozen clock by the same amount, and wakes every trigger due at that instant in one loop pass. No real
time passes in sleeps, and nothing waits on wall-clock timing to synchronise.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class SimulatedTime:
    """A clock that jumps to the next wake-up once every waiter sleeps.

    :param start: the simulated time now (epoch seconds).
    :param advance: moves the emulator's clock forward by the given seconds (called with everyone asleep),
        e.g. ``EmulatorServer.advance``.
    """

    def __init__(self, start: float, advance: Callable[[float], Any] | None = None) -> None:
        self.now = start
        self._advance = advance
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._running = 0
        self._idle: asyncio.Event | None = None
        #: Jumps made so far (each wakes every waiter due at that instant).
        self.steps = 0

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (self.now + max(0.0, float(seconds)), next(self._seq), future))
        self._park()
        await future

    def _park(self) -> None:
        self._running -= 1
        if self._running == 0 and self._idle is not None:
            self._idle.set()

    async def run(self, *waiters: Awaitable[T]) -> list[T]:
        """Run the coroutines to completion, moving time whenever all of them sleep; their results."""
        self._idle = asyncio.Event()
        self._running = len(waiters)

        async def wrapped(waiter: Awaitable[T]) -> T:
            try:
                return await waiter
            finally:
                self._park()

        tasks = [asyncio.ensure_future(wrapped(w)) for w in waiters]
        while True:
            await self._idle.wait()
            self._idle.clear()
            if all(task.done() for task in tasks):
                break
            if self._running:
                continue
            if not self._heap:
                raise AssertionError("every waiter is blocked on something other than the clock")
            due = self._heap[0][0]
            if due > self.now:
                if self._advance is not None:
                    self._advance(due - self.now)
                self.now = due
            self.steps += 1
            while self._heap and self._heap[0][0] <= self.now:
                _, _, future = heapq.heappop(self._heap)
                self._running += 1
                future.set_result(None)
        return [task.result() for task in tasks]
