"""The poll board: triggers in one event loop share their polls (list walks), and align their waits.

Against the emulator over loopback with the real openai SDK. Many triggers run in one loop on one
simulated clock (:class:`~airflow_openai_batch.emulator.simulated_time.SimulatedTime`), as deferred
tasks do in a triggerer.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from airflow_openai_batch.core.progress import GRID_KEEPS, AdaptivePollSchedule, align_to_grid, batch_summary
from airflow_openai_batch.emulator.simulated_time import SimulatedTime
from airflow_openai_batch.triggers import _poll_board
from airflow_openai_batch.triggers.batch import OpenAIBatchTrigger, polling_hook
from tests.support.triggers import (
    T0,
    ScriptedHook,
    first_event_async,
    make_batch,
    make_trigger,
)
from tests.support.triggers import create_sized_batches as create_batches


def frozen_clock(server: Any) -> SimulatedTime:
    """Freeze the emulator's clock and return a virtual clock that moves it."""
    server.configure(time_scale=0.0)
    return SimulatedTime(server.stats()["now"], server.advance)


def per_batch_triggers(clock: SimulatedTime, ids: list[str], **kwargs: Any) -> list[OpenAIBatchTrigger]:
    kwargs.setdefault("poll_interval", 10.0)
    kwargs.setdefault("max_poll_interval", 60.0)
    kwargs.setdefault("deadline", clock.now + 86_400)
    return [make_trigger(clock, batch_ids=[b], **kwargs) for b in ids]


@pytest.fixture
def boards(monkeypatch) -> list[_poll_board.PollBoard]:
    """Every poll board created during the test, in order."""
    created: list[_poll_board.PollBoard] = []
    real_join = _poll_board.join

    def join(conn_id: str, make_hook: Any) -> _poll_board.PollBoard:
        board = real_join(conn_id, make_hook)
        if board not in created:
            created.append(board)
        return board

    monkeypatch.setattr(_poll_board, "join", join)
    return created


def calls(server: Any) -> tuple[int, int]:
    stats = server.stats()
    return stats["batches.list"], stats["batches.retrieve"]


# -- sharing ---------------------------------------------------------------------------------------


def test_many_triggers_in_one_loop_share_list_walks(emulator, boards, monkeypatch):
    # The virtual clock wakes every trigger due at one instant in the same loop pass, so the board's
    # event-loop turns alone gather them: no need to spend 20 ms of real time on each of ~700 rounds.
    monkeypatch.setattr(_poll_board, "COALESCE_SECONDS", 0.0)
    emulator.configure(rate=1.0)
    lines = [180 * (i + 1) for i in range(40)]  # finishing every 3 min over 2 h
    ids = create_batches(emulator, lines)
    clock = frozen_clock(emulator)
    triggers = per_batch_triggers(clock, ids)
    ended_at: dict[str, float] = {}

    async def wait(trigger: OpenAIBatchTrigger) -> dict[str, Any]:
        payload = await first_event_async(trigger)
        ended_at[trigger.batch_ids[0]] = clock.now
        return payload

    payloads = asyncio.run(clock.run(*(wait(t) for t in triggers)))

    client = emulator.client()
    for batch_id, count, payload in zip(ids, lines, payloads, strict=True):
        assert payload["status"] == "success", payload["message"]
        assert list(payload["batches"]) == [batch_id]
        summary = payload["batches"][batch_id]
        assert summary["status"] == "completed"
        assert summary["request_counts"] == {"total": count, "completed": count, "failed": 0}
        # Seen no later than one max_poll_interval after it completed (completed_at is whole seconds).
        completed_at = client.batches.retrieve(batch_id).completed_at
        assert 0 <= ended_at[batch_id] - completed_at <= 60.0 + 1.0
    listed, retrieved = calls(emulator)
    polls = sum(t.polls for t in triggers)
    print(f"\n{len(ids)} triggers, {polls} polls: {listed} list + {retrieved} retrieve calls")
    assert listed > 0
    # One call per batch per poll without sharing; far fewer with it.
    assert listed + retrieved < polls / 5
    assert len(boards) == 1 and boards[0].list_calls == listed


def test_triggers_started_at_different_times_meet_on_the_grid(emulator):
    emulator.configure(rate=1.0)
    ids = create_batches(emulator, [1800] * 30)  # all finish after 30 min
    clock = frozen_clock(emulator)
    rng = random.Random(7)
    triggers = per_batch_triggers(clock, ids, max_poll_interval=120.0)

    async def start_later(trigger: OpenAIBatchTrigger) -> dict[str, Any]:
        await clock.sleep(rng.uniform(0, 600))  # DAG runs that deferred at different moments
        return await first_event_async(trigger)

    payloads = asyncio.run(clock.run(*(start_later(t) for t in triggers)))
    assert all(p["status"] == "success" for p in payloads)
    listed, retrieved = calls(emulator)
    polls = sum(t.polls for t in triggers)
    print(f"\n{len(ids)} staggered triggers, {polls} polls: {listed} list + {retrieved} retrieve calls")
    assert listed + retrieved < polls / 3


def test_a_lonely_trigger_polls_by_retrieves_only(emulator, boards):
    emulator.configure(rate=1.0)
    ids = create_batches(emulator, [300])
    clock = frozen_clock(emulator)
    (trigger,) = per_batch_triggers(clock, ids)
    (payload,) = asyncio.run(clock.run(first_event_async(trigger)))
    assert payload["batches"][ids[0]]["status"] == "completed"
    assert trigger.polls > 3
    # Exactly one retrieve per poll, as before the board: no list call, nothing coalesced away.
    assert calls(emulator) == (0, trigger.polls)
    assert boards[0].rounds == trigger.polls


def test_a_list_fault_reaches_every_trigger_it_served(emulator):
    emulator.configure(
        rate=0.0, fault_rate=1.0, fault_routes=("batches.list",), fault_kinds=("429",), retry_after=5.0
    )
    ids = create_batches(emulator, [3] * 10)
    clock = frozen_clock(emulator)
    triggers = per_batch_triggers(clock, ids, poll_interval=1.0, max_poll_interval=60.0, fault_budget=2)
    payloads = asyncio.run(clock.run(*(first_event_async(t) for t in triggers)))
    for trigger, payload in zip(triggers, payloads, strict=True):
        # Each walk's 429 counted once against every trigger it served: budget 2, so the third ends it.
        assert payload["status"] == "error"
        assert (
            f"Gave up polling batch {trigger.batch_ids[0]} after 3 consecutive transient faults"
            in (payload["message"])
        )
        assert "HTTP 429" in payload["message"]
        # And every trigger honoured the walk's Retry-After (5 s, above its 1-2 s backoff).
        assert trigger._waits == [(5.0, "retry-after"), (5.0, "retry-after")]
    assert calls(emulator) == (3, 0)


def test_a_batch_the_walk_does_not_find_is_still_retrieved(emulator, boards, monkeypatch):
    monkeypatch.setattr(_poll_board, "LIST_PAGE_SIZE", 10)  # pages of 10: a few batches fill pages
    emulator.configure(rate=1.0)
    wanted = create_batches(emulator, [60 * (i + 1) for i in range(10)])
    create_batches(emulator, [1] * 15)  # newer, unrelated batches fill the first page and a half
    clock = frozen_clock(emulator)
    triggers = per_batch_triggers(clock, wanted)
    first_round: list[tuple[int, int]] = []
    real_collect = _poll_board.PollBoard._collect

    async def collect(self: Any, ids: list[str]) -> Any:
        result = await real_collect(self, ids)
        if not first_round:
            first_round.append(calls(emulator))
        return result

    monkeypatch.setattr(_poll_board.PollBoard, "_collect", collect)
    payloads = asyncio.run(clock.run(*(first_event_async(t) for t in triggers)))
    for batch_id, payload in zip(wanted, payloads, strict=True):
        assert payload["status"] == "success", payload["message"]
        assert payload["batches"][batch_id]["status"] == "completed"
    # The first walk read one page of unrelated batches, stopped (it found nothing), and the ten were
    # retrieved; later walks knew to go deeper.
    assert first_round == [(1, 10)]
    listed, retrieved = calls(emulator)
    assert boards[0].list_calls == listed > 1
    assert boards[0].retrieve_calls == retrieved


def test_a_walk_that_stops_short_of_the_wanted_batches_retrieves_them(emulator, boards, monkeypatch):
    # Eight wanted batches behind 60 newer ones (pages of 10: they are on the seventh page). The board
    # believes them on the fifth page (as if a walk had found them there): it plans a five-page walk,
    # which stops there without them; they are retrieved, and the next round does not walk again.
    monkeypatch.setattr(_poll_board, "LIST_PAGE_SIZE", 10)
    emulator.configure(rate=0.0)
    wanted = create_batches(emulator, [3] * 8)
    create_batches(emulator, [1] * 60)
    clock = frozen_clock(emulator)
    triggers = per_batch_triggers(clock, wanted, deadline=clock.now + 5, cancel_on_kill=False)

    async def scenario() -> list[dict[str, Any]]:
        board = _poll_board.join("openai_default", lambda: polling_hook("openai_default"))
        board._page_hint.update(dict.fromkeys(wanted, 4))
        try:
            return await clock.run(*(first_event_async(t) for t in triggers))
        finally:
            await board.leave()

    payloads = asyncio.run(scenario())
    for batch_id, payload in zip(wanted, payloads, strict=True):
        assert payload["status"] == "timeout"
        assert payload["batches"][batch_id]["status"] == "in_progress"
    assert [t.polls for t in triggers] == [2] * 8  # at the start, and at the deadline
    assert calls(emulator) == (5, 16)


def test_a_walk_reads_its_pages_at_once_and_reads_on_past_new_batches(emulator, boards, monkeypatch):
    # Pages of 10: thirty wanted batches fill three pages. The first walk learns where each page ends;
    # the next ones read all three at once from those cursors; when new batches come in front, the
    # ones they pushed past the first page are read on from it. Nothing is left for retrieves.
    monkeypatch.setattr(_poll_board, "LIST_PAGE_SIZE", 10)
    emulator.configure(rate=0.0)
    wanted = create_batches(emulator, [3] * 30)
    in_flight, most = [0], [0]
    real_page = _poll_board.PollBoard._list_page

    async def counted(self: Any, after: Any) -> Any:
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        try:
            return await real_page(self, after)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(_poll_board.PollBoard, "_list_page", counted)

    async def scenario() -> list[tuple[int, int, int]]:
        board = _poll_board.join("openai_default", lambda: polling_hook("openai_default"))
        rounds = []
        try:
            for new in (0, 0, 5):
                create_batches(emulator, [1] * new)
                before, most[0] = board.list_calls, 0
                states = await board.fetch(wanted)
                assert set(states) == set(wanted)
                assert {_poll_board._field(s, "status") for s in states.values()} == {"in_progress"}
                rounds.append((board.list_calls - before, most[0], board.retrieve_calls))
        finally:
            await board.leave()
        return rounds

    assert asyncio.run(scenario()) == [(3, 1, 0), (3, 3, 0), (4, 3, 0)]
    assert calls(emulator) == (10, 0)


# -- the shared client -----------------------------------------------------------------------------


def test_the_boards_client_is_closed_once_the_last_trigger_leaves(emulator, boards):
    emulator.configure(rate=1.0)
    ids = create_batches(emulator, [20, 200, 400])
    clock = frozen_clock(emulator)
    triggers = per_batch_triggers(clock, ids)
    open_after_first: list[bool] = []

    async def first(trigger: OpenAIBatchTrigger) -> dict[str, Any]:
        payload = await first_event_async(trigger)
        board = boards[0]
        open_after_first.append(not board.closed and not board.client.is_closed())
        return payload

    async def scenario() -> None:
        await clock.run(first(triggers[0]), *(first_event_async(t) for t in triggers[1:]))
        # A trigger joining after the board closed gets a fresh board (and client), never the closed one.
        late = make_trigger(clock, batch_ids=[ids[0]], poll_interval=10.0, max_poll_interval=60)
        assert (await first_event_async(late))["status"] == "success"

    asyncio.run(scenario())
    assert open_after_first == [True], "the board closed under the triggers still waiting"
    assert len(boards) == 2 and boards[0] is not boards[1]
    for board in boards:
        assert board.closed and board.refs == 0
        assert board.client is not None and board.client.is_closed()
    assert _poll_board.open_boards() == []


def test_a_trigger_cancelled_mid_round_closes_the_client_after_the_call(emulator, boards, monkeypatch):
    # The last trigger is cancelled while its round is open: the round is cancelled first, then the client
    # is closed, and nothing is left behind.
    monkeypatch.setattr(_poll_board, "COALESCE_SECONDS", 30.0)  # the round stays open until cancelled
    ids = create_batches(emulator, [3])
    asked = asyncio.Event()
    real_fetch = _poll_board.PollBoard.fetch

    async def fetch(self: Any, batch_ids: Any) -> Any:
        asked.set()
        return await real_fetch(self, batch_ids)

    monkeypatch.setattr(_poll_board.PollBoard, "fetch", fetch)

    async def scenario() -> None:
        trigger = make_trigger(None, batch_ids=ids)
        task = asyncio.ensure_future(first_event_async(trigger))
        await asked.wait()
        assert boards[0]._open is not None and boards[0]._tasks
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await trigger.cleanup()

    asyncio.run(scenario())
    (board,) = boards
    assert board.closed and board.client.is_closed() and not board._tasks
    assert _poll_board.open_boards() == []
    assert calls(emulator) == (0, 0)


# -- alignment -------------------------------------------------------------------------------------


def test_align_to_grid_never_lengthens_and_keeps_most_of_the_wait():
    rng = random.Random(3)
    for _ in range(20_000):
        poll, top = rng.choice([(60.0, 600.0), (0.05, 0.5), (7.0, 100.0), (1.0, 1.0)])
        now = T0 + rng.uniform(0, 10_000)
        wait = rng.uniform(poll, top * 1.5)
        aligned, grid = align_to_grid(now, wait, poll, top)
        assert grid is not None
        assert wait * GRID_KEEPS <= aligned <= wait
        expected_grid = top if wait >= top else poll
        assert grid in (expected_grid, expected_grid / 2)
        phase = (now + aligned) % grid
        assert min(phase, grid - phase) < 1e-6 * max(1.0, grid)


def test_align_to_grid_reaches_the_coarse_grid_in_two_waits():
    now = 600_000.0 + 400.0  # 400 s into a 600 s grid: the first wait goes to the half grid
    first, grid = align_to_grid(now, 600.0, 60.0, 600.0)
    assert (first, grid) == (500.0, 300.0)
    second, grid = align_to_grid(now + first, 600.0, 60.0, 600.0)
    assert (second, grid) == (300.0, 600.0)
    third, grid = align_to_grid(now + first + second, 600.0, 60.0, 600.0)
    assert (third, grid) == (600.0, 600.0)


def test_a_waiter_a_moment_past_a_half_grid_point_moves_to_the_full_grid():
    # Polled at 1 s past a 2 s grid point plus the 30 ms the poll took: the full grid keeps 0.97 s of
    # the 2 s wait (more than GRID_KEEPS), so the waiter joins the full grid instead of staying apart.
    wait, grid = align_to_grid(T0 + 1.03, 2.0, 2.0, 2.0)
    assert grid == 2.0 and wait == pytest.approx(0.97)
    assert align_to_grid(T0 + 2.0, 2.0, 2.0, 2.0) == (2.0, 2.0)


def test_alignment_never_makes_a_wait_longer_than_the_schedules(monkeypatch):
    totals = [100, 100, 100, 100, 100, 100, 100]
    done = [0, 0, 5, 20, 60, 95, 100]
    states = [
        make_batch("b", "validating", total=0),
        *(make_batch("b", "in_progress", total=t, completed=c) for t, c in zip(totals, done, strict=True)),
        make_batch("b", "finalizing", total=100, completed=100),
        make_batch("b", "completed", total=100, completed=100),
    ]
    hook = ScriptedHook({"b": list(states)})
    clock = SimulatedTime(T0 + 123.4)  # an odd phase: every first wait needs shortening
    trigger = make_trigger(clock, hook, batch_ids=["b"], poll_interval=60.0, max_poll_interval=600)
    poll_times: list[float] = []
    real_fetch = _poll_board.PollBoard.fetch

    async def fetch(self: Any, batch_ids: Any) -> Any:
        poll_times.append(clock.now)
        return await real_fetch(self, batch_ids)

    monkeypatch.setattr(_poll_board.PollBoard, "fetch", fetch)
    (payload,) = asyncio.run(clock.run(first_event_async(trigger)))
    assert payload["status"] == "success"

    # The same observations through an unaligned schedule: what it would have asked for each time.
    schedule = AdaptivePollSchedule(60.0, 600.0)
    assert len(trigger._waits) == len(states) - 1
    shortened = 0
    for state, at, (wait, reason) in zip(states, poll_times, trigger._waits, strict=False):
        schedule.observe({"b": batch_summary(state)}, at)
        asked = schedule.next_interval()
        assert reason == "adaptive"
        assert asked / 2 <= wait <= asked, (at, wait, asked)
        grid = 600.0 if asked >= 600.0 else 60.0
        assert any(abs((at + wait) / g - round((at + wait) / g)) < 1e-9 for g in (grid, grid / 2))
        shortened += wait < asked
    assert shortened >= 1
