"""One trigger that waits on any number of OpenAI batches without holding a worker slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from functools import cached_property
from typing import Any, Protocol

from airflow_openai_batch.compat import BaseTrigger, TriggerEvent
from airflow_openai_batch.core.job import Job, read_job
from airflow_openai_batch.core.progress import (
    CANCEL_ATTEMPTS,
    batch_summary,
    classify_api_error,
    describe_api_error,
    format_duration,
    progress_line,
    retry_after_seconds,
)
from airflow_openai_batch.core.waiting import Fault, Finish, GiveUp, Timeout, Wait, Waiting, Work
from airflow_openai_batch.hooks.batch import OpenAIBatchHook
from airflow_openai_batch.statuses import DEFAULT_FAIL_ON_STATUSES
from airflow_openai_batch.triggers import _poll_board

__all__ = ["EVENT_STATUSES", "Clock", "OpenAIBatchTrigger", "polling_hook"]

#: Event statuses the trigger emits (exactly one event per run). ``resubmit`` hands the job back to the
#: worker for work that does not belong on the triggerer's event loop: re-creating chunks held back by
#: the enqueued-token limit, and retry rounds (download, filter, upload, create).
EVENT_STATUSES: tuple[str, ...] = ("success", "error", "timeout", "resubmit")

_LOG_LEVELS = {"info": 20, "warning": 30, "error": 40}


class Clock(Protocol):
    """Where a trigger reads the time and waits between polls: the system's in a triggerer; a simulated
    one in tests and benchmarks (e.g. the emulator's ``SimulatedTime``), which runs a day of polling in
    milliseconds."""

    def time(self) -> float:
        """Now, in epoch seconds."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return after ``seconds``."""
        ...


class _SystemClock:
    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def polling_hook(conn_id: str) -> OpenAIBatchHook:
    """The hook a trigger makes for its calls and its poll board's, unless it is given one."""
    # max_retries=0: the SDK's hidden retries would hide faults from the fault budget and ignore
    # Retry-After values above 120 s; the trigger retries by itself.
    return OpenAIBatchHook(conn_id=conn_id, client_overrides={"max_retries": 0})


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="seconds")


class OpenAIBatchTrigger(BaseTrigger):
    """Polls a job's batches until there is something for the worker, or everything is final.

    Yields exactly one event, ``{"status": "success" | "error" | "timeout" | "resubmit", "batches":
    {id: summary}, "message": str, "job": {...}}``. ``success`` means every batch is final (whether a
    final status fails the task is the sensor's decision); ``resubmit`` means a chunk is to be re-created
    or retried, which the worker does before deferring again. What to do after each poll is decided by
    :class:`~airflow_openai_batch.core.waiting.Waiting`, the same object the sensor's poke path uses.

    Only the async client is used, with the SDK's own retries off so that every fault reaches the fault
    budget. The polls go through the process's poll board for the connection
    (``triggers/_poll_board.py``): triggers of one triggerer share one client, and polls due at the same
    moment are served together (one ``batches.list`` page covers up to 100 batches).

    :param batch_ids: the batches to wait for (or give ``job``).
    :param conn_id: the Airflow connection; the only connection detail that is serialized.
    :param poll_interval: the shortest wait between polls, seconds.
    :param max_poll_interval: the longest wait between polls, seconds.
    :param deadline: with ``batch_ids``: absolute unix time at which the wait ends with ``timeout``
        (batches cancelled first when ``cancel_on_kill``); ``None`` waits without limit.
    :param fail_on_statuses: final statuses the sensor fails on (flagged in the log as soon as seen).
    :param cancel_on_kill: cancel the batches that are not final when the task is killed or the deadline
        passes.
    :param fault_budget: consecutive transient faults tolerated on one batch's polls.
    :param started_at: with ``batch_ids``: when the wait began (unix seconds), for the log.
    :param max_resubmits: create calls per chunk after the enqueued-token limit.
    :param retry_failed_requests: retry rounds per request.
    :param job: the job (its dict form), as the sensor hands it over; it holds the deadline.
    :param clock: where the time is read and the waits are spent (default: the system's).
    :param hook: the hook for this trigger's calls, and its poll board's when it is the first trigger on
        its connection (default: one made from ``conn_id``, with the SDK's retries off).
        ``clock`` and ``hook`` are never serialized: a triggerer always runs on the system's clock and
        makes its own hooks.
    """

    def __init__(
        self,
        batch_ids: Sequence[str] | str | None = None,
        conn_id: str = OpenAIBatchHook.default_conn_name,
        poll_interval: float = 60.0,
        max_poll_interval: float = 600.0,
        deadline: float | None = None,
        fail_on_statuses: Iterable[str] = DEFAULT_FAIL_ON_STATUSES,
        cancel_on_kill: bool = True,
        fault_budget: int = 10,
        started_at: float | None = None,
        max_resubmits: int = 10,
        retry_failed_requests: int = 2,
        job: Mapping[str, Any] | None = None,
        clock: Clock | None = None,
        hook: OpenAIBatchHook | None = None,
    ) -> None:
        super().__init__()
        if job is not None:
            self.job = Job.from_dict(job)
        elif batch_ids is not None:
            self.job = read_job(batch_ids)
            self.job.deadline = float(deadline) if deadline is not None else None
            self.job.started_at = float(started_at) if started_at is not None else None
        else:
            raise ValueError("OpenAIBatchTrigger needs batch_ids or a job")
        self.conn_id = conn_id
        self.fail_on_statuses = list(fail_on_statuses)
        # Validates every setting here, in the worker, rather than later in the triggerer.
        self.waiting = Waiting(
            poll_interval=poll_interval,
            max_poll_interval=max_poll_interval,
            fail_on_statuses=self.fail_on_statuses,
            max_resubmits=max_resubmits,
            retry_failed_requests=retry_failed_requests,
            fault_budget=fault_budget,
            cancel_on_kill=cancel_on_kill,
        )
        self.clock: Clock = clock if clock is not None else _SystemClock()
        self._given_hook = hook
        #: Every wait between polls as ``(seconds, reason)``, for the log and for tests.
        self._waits: list[tuple[float, str]] = []
        #: The poll board while the wait runs (shared with the other triggers of this event loop).
        self._board: _poll_board.PollBoard | None = None
        self.polls = 0

    @property
    def batch_ids(self) -> list[str]:
        """Every batch of the job, in chunk order."""
        return [a.batch_id for _, a in self.job.attempts() if a.batch_id is not None]

    @property
    def deadline(self) -> float | None:
        return self.job.deadline

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Class path and JSON-safe kwargs. Only the connection id travels, never the key."""
        waiting = self.waiting
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "conn_id": self.conn_id,
                "poll_interval": waiting.poll_interval,
                "max_poll_interval": waiting.max_poll_interval,
                "fail_on_statuses": list(self.fail_on_statuses),
                "cancel_on_kill": waiting.cancel_on_kill,
                "fault_budget": waiting.fault_budget,
                "max_resubmits": waiting.max_resubmits,
                "retry_failed_requests": waiting.retry_failed_requests,
                "job": self.job.to_dict(),
            },
        )

    @cached_property
    def hook(self) -> OpenAIBatchHook:
        """This trigger's own hook, for cancel calls (polls go through the shared poll board)."""
        return self._make_hook()

    def _make_hook(self) -> OpenAIBatchHook:
        """The given hook, or a new one: for :attr:`hook`, and for a new poll board when this trigger is
        the first on its connection."""
        return self._given_hook if self._given_hook is not None else polling_hook(self.conn_id)

    # -- the wait --------------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            payload = await self._wait()
        except Exception as err:
            # An event, not a crashed trigger: the task then fails with a clear message instead of
            # waiting for the backstop timeout.
            self.log.exception("Unexpected error while waiting for batches %s", ", ".join(self.batch_ids))
            payload = self._payload("error", f"Unexpected error while polling: {describe_api_error(err)}")
        await self._close_client()
        yield TriggerEvent(payload)

    async def _wait(self) -> dict[str, Any]:
        board = self._board = _poll_board.join(self.conn_id, self._make_hook)
        try:
            # The shared client before the first poll, so a bad connection ends the wait at once.
            await board.ready()
            return await self._poll(board)
        finally:
            await self._leave_board()

    async def _leave_board(self) -> None:
        board, self._board = self._board, None
        if board is not None:
            await board.leave(self.batch_ids)

    async def _poll(self, board: _poll_board.PollBoard) -> dict[str, Any]:
        waiting = self.waiting
        log = self.log  # looked up once: the loop below runs every poll of a long wait
        deadline = self.job.deadline
        self.log.info(
            "Waiting for %d batch(es) %s; polling every %s to %s%s",
            len(self.job.live_batch_ids()),
            ", ".join(self.job.live_batch_ids()),
            format_duration(waiting.poll_interval),
            format_duration(waiting.max_poll_interval),
            f", deadline {_iso(deadline)}" if deadline is not None else "",
        )
        poll: Sequence[str] = self.job.live_batch_ids()
        while True:
            results: dict[str, Mapping[str, Any] | Fault] = {}
            polled_at = self.clock.time()
            if poll:
                self.polls += 1
                # The board answers every batch: its state, or the exception of the call that asked for it.
                fetched = await board.fetch(poll)
                for batch_id, result in fetched.items():
                    results[batch_id] = (
                        Fault.of(result) if isinstance(result, BaseException) else batch_summary(result)
                    )
            decision = waiting.step(self.job, results, self.clock.time(), polled_at)
            for level, text in decision.notes:
                log.log(_LOG_LEVELS[level], "%s", text)
            if isinstance(decision, Wait):
                self._waits.append((decision.after, decision.reason))
                # Debug: the progress lines above say what matters on every poll; this is for diagnosis.
                log.debug("%s", decision)
                await self.clock.sleep(decision.after)
                poll = decision.poll
                continue
            if isinstance(decision, Work):
                return self._payload("resubmit", decision.message)
            if isinstance(decision, Finish):
                message = decision.message
                if decision.warnings:
                    message += ". Warnings: " + "; ".join(decision.warnings)
                return self._payload("success", message, batches=decision.result)
            if isinstance(decision, GiveUp):
                return self._payload("error", str(decision.error))
            assert isinstance(decision, Timeout)
            return await self._on_deadline(decision)

    async def _on_deadline(self, decision: Timeout) -> dict[str, Any]:
        message = decision.message
        if decision.cancel:
            cancelled = await self._cancel(decision.cancel)
            message += f"; cancel requested for {len(cancelled)} of them so nothing more is spent"
            if len(cancelled) < len(decision.cancel):
                message += (
                    f" (could not cancel: {', '.join(b for b in decision.cancel if b not in cancelled)})"
                )
        self.log.error("%s", message)
        return self._payload("timeout", message)

    def _payload(self, status: str, message: str, batches: Mapping[str, Any] | None = None) -> dict[str, Any]:
        if batches is None:
            batches = {a.batch_id: a.summary for _, a in self.job.attempts() if a.batch_id and a.summary}
        return {"status": status, "batches": dict(batches), "message": message, "job": self.job.to_dict()}

    # -- cancel and clean-up ---------------------------------------------------------------------

    async def _cancel(self, batch_ids: Sequence[str]) -> list[str]:
        """Request cancellation of each batch (a few attempts on transient faults); return the ids done."""

        async def cancel_one(batch_id: str) -> bool:
            for attempt in range(1, CANCEL_ATTEMPTS + 1):
                try:
                    batch = await self.hook.acancel_batch(batch_id)
                except Exception as err:
                    transient = classify_api_error(err) == "transient"
                    if transient and attempt < CANCEL_ATTEMPTS:
                        # Short waits only: on_kill() has a bounded time, and a cancel matters more
                        # than politeness to the rate limiter.
                        await asyncio.sleep(min(retry_after_seconds(err) or 0.5 * attempt, 5.0))
                        continue
                    # Typically the batch went final meanwhile (cancel of a final batch is refused).
                    self.log.warning("%s: cancel failed: %s", batch_id, describe_api_error(err))
                    return False
                summary = batch_summary(batch)
                found = self.job.find(batch_id)
                if found is not None:
                    found[1].see(summary)
                self.log.info("%s", progress_line(batch_id, summary))
                return True
            return False

        await self.hook.aget_async_client()
        done = await asyncio.gather(*(cancel_one(b) for b in batch_ids))
        return [b for b, ok in zip(batch_ids, done, strict=True) if ok]

    async def on_kill(self) -> None:
        """Cancel the batches that are not final when the deferred task is killed, cleared or marked.

        Airflow (>= 3.3) calls this only for a user action, never for a triggerer restart.
        """
        live = self.job.live_batch_ids()
        if not self.waiting.cancel_on_kill:
            self.log.info("Task killed; leaving %d batch(es) running (cancel_on_kill=False)", len(live))
            return
        if not live:
            return
        self.log.info("Task killed: cancelling %d batch(es) %s", len(live), ", ".join(live))
        cancelled = await self._cancel(live)
        self.log.info("Cancel requested for %d of %d batch(es)", len(cancelled), len(live))

    async def cleanup(self) -> None:
        # The wait leaves the board itself; this covers a run() that was dropped without unwinding.
        await self._leave_board()
        await self._close_client()

    async def _close_client(self) -> None:
        if "hook" not in self.__dict__:
            return  # never made (only cancels need it): nothing to close
        try:
            await self.hook.aclose()
        except Exception:
            # Closing a client must never turn a finished wait into a failure.
            self.log.debug("Closing the OpenAI client failed", exc_info=True)
