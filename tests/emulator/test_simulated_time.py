"""SimulatedTime: waiters sleep in simulated time; the clock jumps once every one of them sleeps."""

from __future__ import annotations

import asyncio

from airflow_openai_batch.emulator.simulated_time import SimulatedTime


def test_the_clock_jumps_to_each_wake_up_and_moves_the_emulator_by_as_much() -> None:
    advanced: list[float] = []
    clock = SimulatedTime(1000.0, advanced.append)
    woke: list[tuple[str, float]] = []

    async def waiter(name: str, *sleeps: float) -> str:
        for seconds in sleeps:
            await clock.sleep(seconds)
            woke.append((name, clock.time()))
        return name

    results = asyncio.run(clock.run(waiter("a", 600, 600), waiter("b", 900), waiter("c", 600)))
    assert results == ["a", "b", "c"]
    # a and c are due at the same instant: one jump wakes both.
    assert woke == [("a", 1600.0), ("c", 1600.0), ("b", 1900.0), ("a", 2200.0)]
    assert advanced == [600.0, 300.0, 300.0] and clock.steps == 3
