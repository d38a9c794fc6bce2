"""One trigger that waits on any number of OpenAI batches without holding a worker slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

from airflow_openai_batch.compat import BaseTrigger, TriggerEvent
from airflow_openai_batch.core.progress import (
    CANCEL_ATTEMPTS,
    AdaptivePollSchedule,
    align_to_grid,
    backoff_delay,
    batch_summary,
    classify_api_error,
    describe_api_error,
    format_duration,
    progress_line,
    retry_after_seconds,
)
from airflow_openai_batch.core.resubmit import is_capacity_failure
from airflow_openai_batch.hooks.batch import OpenAIBatchHook
from airflow_openai_batch.statuses import DEFAULT_FAIL_ON_STATUSES, is_final
from airflow_openai_batch.triggers import _poll_board

__all__ = ["OpenAIBatchTrigger"]

#: Event statuses the trigger emits (exactly one event per run). ``resubmit`` hands control back to the
#: worker to re-create batches that failed on the enqueued-token limit, once capacity frees.
EVENT_STATUSES: tuple[str, ...] = ("success", "error", "timeout", "resubmit")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="seconds")


class OpenAIBatchTrigger(BaseTrigger):
    """Polls OpenAI batches until every one is final, the deadline passes, or the API keeps failing.

    Yields exactly one event, ``{"status": "success" | "error" | "timeout", "batches": {id: summary},
    "message": str}``. ``success`` means every batch is final; whether a final status fails the task
    (``fail_on_statuses``) is the sensor's decision. Only the async client is used, with the SDK's own
    retries off so that this trigger sees every fault and applies its own backoff.

    The polls go through the process's poll board for the connection (``triggers/_poll_board.py``):
    triggers of one triggerer share one client, and polls due at the same moment are served together
    (one ``batches.list`` page covers up to 100 batches). Waits are aligned on a grid in absolute time
    (never lengthened) so that triggers started at different moments poll at the same moments.

    :param batch_ids: the batches to wait for.
    :param conn_id: the Airflow connection; the only connection detail that is serialized.
    :param poll_interval: the shortest wait between polls, seconds.
    :param max_poll_interval: the longest wait between polls, seconds; the adaptive schedule stretches
        toward it while progress is slow.
    :param deadline: absolute time (unix epoch seconds) after which the wait ends with ``timeout``
        (batches cancelled first when ``cancel_on_kill``). Absolute, so it survives triggerer restarts.
        ``None`` waits without limit.
    :param fail_on_statuses: final statuses the sensor will fail on; used here to flag them in the log
        as soon as they are seen.
    :param cancel_on_kill: cancel the non-final batches when the task is killed or the deadline passes.
    :param fault_budget: consecutive transient faults (429, 5xx, timeouts, dropped connections)
        tolerated on one batch's polls before giving up with an ``error`` event.
    :param started_at: when the wait began (unix epoch seconds), for the elapsed time in the log.
    :param resubmittable: batches that may be re-created if they fail on the enqueued-token limit;
        when one does, the trigger ends with a ``resubmit`` event as soon as capacity frees.
    :param pending_count: chunks not created yet (refused for capacity) that wait for capacity too.
    :param idle_backoff: seconds to wait before a ``resubmit`` event when nothing of the job is running
        (the capacity is held by other jobs, so it frees at an unknown time).
    :param job: opaque JSON-safe state of the sensor, handed back untouched in the event.
    :param known_final: summaries of batches already final when the wait began (not polled again;
        only batches that finish during this wait count as freed capacity).
    """

    def __init__(
        self,
        batch_ids: Sequence[str],
        conn_id: str = OpenAIBatchHook.default_conn_name,
        poll_interval: float = 60.0,
        max_poll_interval: float = 600.0,
        deadline: float | None = None,
        fail_on_statuses: Iterable[str] = DEFAULT_FAIL_ON_STATUSES,
        cancel_on_kill: bool = True,
        fault_budget: int = 10,
        started_at: float | None = None,
        resubmittable: Sequence[str] = (),
        pending_count: int = 0,
        idle_backoff: float = 0.0,
        job: dict[str, Any] | None = None,
        known_final: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(batch_ids, str):
            batch_ids = [batch_ids]
        self.batch_ids: list[str] = list(dict.fromkeys(batch_ids))
        # No batch at all is fine only while chunks wait for capacity to be created.
        if (not self.batch_ids and not pending_count) or not all(
            isinstance(b, str) and b for b in self.batch_ids
        ):
            raise ValueError(f"batch_ids must be a non-empty list of batch id strings, got {batch_ids!r}")
        self.conn_id = conn_id
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        # Validates the intervals here, in the worker, rather than later in the triggerer.
        AdaptivePollSchedule(self.poll_interval, self.max_poll_interval)
        self.deadline = float(deadline) if deadline is not None else None
        self.fail_on_statuses: list[str] = list(fail_on_statuses)
        self.cancel_on_kill = bool(cancel_on_kill)
        if int(fault_budget) < 0:
            raise ValueError(f"fault_budget must be >= 0, got {fault_budget}")
        self.fault_budget = int(fault_budget)
        self.started_at = float(started_at) if started_at is not None else None
        self.resubmittable: list[str] = list(resubmittable)
        self.pending_count = int(pending_count)
        self.idle_backoff = float(idle_backoff)
        self.job = job
        # Test seams, never serialized: a clock (epoch seconds) and a sleep, so a test can run a
        # simulated day of polling in milliseconds against the emulator's virtual clock.
        self._clock: Callable[[], float] = time.time
        self._sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
        #: Every wait between polls as ``(seconds, reason)``, for the log and for tests. An adaptive wait
        #: is recorded after alignment (shortened to the grid, never lengthened).
        self._waits: list[tuple[float, str]] = []
        #: The poll board while the wait runs (shared with the other triggers of this event loop).
        self._board: _poll_board.PollBoard | None = None
        self.known_final = {b: dict(s) for b, s in (known_final or {}).items() if b in self.batch_ids}
        #: Latest summary per batch, kept so on_kill() knows which batches are still live.
        self._summaries: dict[str, dict[str, Any]] = dict(self.known_final)
        self.polls = 0

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Class path and JSON-safe kwargs. Only the connection id travels, never the key."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "batch_ids": list(self.batch_ids),
                "conn_id": self.conn_id,
                "poll_interval": self.poll_interval,
                "max_poll_interval": self.max_poll_interval,
                "deadline": self.deadline,
                "fail_on_statuses": list(self.fail_on_statuses),
                "cancel_on_kill": self.cancel_on_kill,
                "fault_budget": self.fault_budget,
                "started_at": self.started_at,
                "resubmittable": list(self.resubmittable),
                "pending_count": self.pending_count,
                "idle_backoff": self.idle_backoff,
                "job": self.job,
                "known_final": self.known_final,
            },
        )

    @cached_property
    def hook(self) -> OpenAIBatchHook:
        """This trigger's own hook, for cancel calls (polls go through the shared poll board)."""
        # max_retries=0: the SDK's hidden retries would hide faults from the fault budget and ignore
        # Retry-After values above 120 s; this trigger retries by itself.
        return OpenAIBatchHook(conn_id=self.conn_id, client_overrides={"max_retries": 0})

    def _make_poll_hook(self) -> OpenAIBatchHook:
        """The hook of a new poll board, when this trigger is the first on its connection (a test seam).

        Retries off for the same reason as :attr:`hook`: every fault must reach the fault budgets.
        """
        return OpenAIBatchHook(conn_id=self.conn_id, client_overrides={"max_retries": 0})

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
        board = self._board = _poll_board.join(self.conn_id, self._make_poll_hook)
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
        schedule = AdaptivePollSchedule(self.poll_interval, self.max_poll_interval)
        live = [b for b in self.batch_ids if not is_final(self._summaries.get(b, {}).get("status", ""))]
        faults: dict[str, int] = {}
        self.log.info(
            "Waiting for %d batch(es) %s; polling every %s to %s%s",
            len(self.batch_ids),
            ", ".join(self.batch_ids),
            format_duration(self.poll_interval),
            format_duration(self.max_poll_interval),
            f", deadline {_iso(self.deadline)}" if self.deadline is not None else "",
        )
        started_live = list(live)

        while True:
            self.polls += 1
            # The board answers every batch: its state, or the exception of the call that asked for it.
            results = await board.fetch(live)
            now = self._clock()
            polled: dict[str, dict[str, Any]] = {}
            retry_after: float | None = None
            worst_fault = 0
            for batch_id in live:
                result = results[batch_id]
                if isinstance(result, BaseException):
                    description = describe_api_error(result)
                    if classify_api_error(result) == "fatal":
                        return self._payload(
                            "error",
                            f"Polling batch {batch_id} failed with an error that waiting will not fix: "
                            f"{description}",
                        )
                    faults[batch_id] = faults.get(batch_id, 0) + 1
                    worst_fault = max(worst_fault, faults[batch_id])
                    if faults[batch_id] > self.fault_budget:
                        return self._payload(
                            "error",
                            f"Gave up polling batch {batch_id} after {faults[batch_id]} consecutive "
                            f"transient faults (fault_budget={self.fault_budget}); last: {description}. "
                            "The batches were left running.",
                        )
                    asked = retry_after_seconds(result)
                    if asked is not None:
                        retry_after = max(retry_after or 0.0, asked)
                    self.log.warning(
                        "%s: poll failed (%s); transient fault %d of %d allowed in a row",
                        batch_id,
                        description,
                        faults[batch_id],
                        self.fault_budget,
                    )
                    continue
                faults.pop(batch_id, None)
                summary = batch_summary(result)
                previous = self._summaries.get(batch_id, {}).get("status")
                polled[batch_id] = self._summaries[batch_id] = summary
                if batch_id in self.resubmittable and is_capacity_failure(summary):
                    if previous != summary["status"]:
                        self.log.info(
                            "%s failed on the enqueued-token limit: it will be re-created as capacity frees",
                            batch_id,
                        )
                elif summary["status"] in self.fail_on_statuses and previous != summary["status"]:
                    self.log.warning(
                        "%s ended %s: the task will fail once all batches are final",
                        batch_id,
                        summary["status"],
                    )

            # A poll where every call failed says nothing about progress: it must not stretch the schedule.
            if polled:
                schedule.observe(polled, now)
            for batch_id, summary in polled.items():
                self.log.info(
                    "%s", progress_line(batch_id, summary, eta_seconds=schedule.eta(batch_id, summary, now))
                )
            live = [b for b in live if not is_final(self._summaries.get(b, {}).get("status", ""))]
            resubmit = await self._capacity_check(started_live, live)
            if resubmit is not None:
                return resubmit
            if not live:
                return self._payload("success", self._final_message(now))
            if self.deadline is not None and now >= self.deadline:
                return await self._on_deadline(live)

            wait = schedule.next_interval() if polled else schedule.interval
            reason = "adaptive"
            detail = ""
            if worst_fault:
                # Slow down while the API is failing; never call again before the Retry-After it asked for.
                wait = max(wait, backoff_delay(worst_fault, self.poll_interval, self.max_poll_interval))
                reason = "backoff"
                if retry_after is not None and retry_after >= wait:
                    wait, reason = retry_after, "retry-after"
            else:
                # On the grid, triggers that started at different moments poll together and share calls.
                # Only shortened, so a finished batch is seen no later than the schedule promised.
                asked = wait
                wait, grid = align_to_grid(now, wait, self.poll_interval, self.max_poll_interval)
                if grid is not None:
                    detail = f", aligned to the {format_duration(grid)} grid"
                    if wait < asked * 0.999:
                        detail += f"; the schedule asked {format_duration(asked)}"
            if self.deadline is not None and self.deadline - now < wait:
                wait, reason, detail = max(0.0, self.deadline - now), "deadline", ""
            self._waits.append((wait, reason))
            self.log.info(
                "%d of %d batch(es) not final yet; next poll in %s (%s%s)",
                len(live),
                len(self.batch_ids),
                format_duration(wait),
                reason,
                detail,
            )
            await self._sleep(wait)

    async def _capacity_check(
        self, started_live: Sequence[str], live: Sequence[str]
    ) -> dict[str, Any] | None:
        """A ``resubmit`` payload when chunks wait for enqueued-token capacity and it has freed (or
        nothing of the job runs any more); ``None`` to keep waiting."""
        waiting = self.pending_count + sum(
            1 for b in self.resubmittable if is_capacity_failure(self._summaries.get(b, {}))
        )
        if not waiting:
            return None
        freed = [
            b
            for b in started_live
            if is_final(self._summaries.get(b, {}).get("status", ""))
            and not is_capacity_failure(self._summaries[b])
        ]
        if freed:
            message = f"{len(freed)} batch(es) finished ({', '.join(freed)}): capacity for {waiting} waiting"
            return self._payload("resubmit", message, freed=len(freed))
        if live:
            return None
        wait = self.idle_backoff
        if self.deadline is not None:
            wait = min(wait, max(0.0, self.deadline - self._clock()))
        self.log.info(
            "%d chunk(s) wait for enqueued-token capacity and none of this job runs; re-creating in %s",
            waiting,
            format_duration(wait),
        )
        self._waits.append((wait, "capacity"))
        await self._sleep(wait)
        return self._payload("resubmit", f"nothing running; {waiting} chunk(s) wait for capacity", freed=0)

    def _final_message(self, now: float) -> str:
        counts: dict[str, int] = {}
        for summary in self._summaries.values():
            counts[summary["status"]] = counts.get(summary["status"], 0) + 1
        statuses = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        elapsed = f" after {format_duration(now - self.started_at)}" if self.started_at else ""
        message = f"All {len(self.batch_ids)} batch(es) are final{elapsed}: {statuses}"
        warnings = [f"{bid}: {w}" for bid, s in self._summaries.items() for w in s.get("warnings") or ()]
        if warnings:
            message += ". Warnings: " + "; ".join(warnings)
        return message

    async def _on_deadline(self, live: list[str]) -> dict[str, Any]:
        assert self.deadline is not None
        states = ", ".join(f"{b} ({self._summaries.get(b, {}).get('status', 'unknown')})" for b in live)
        message = f"Deadline {_iso(self.deadline)} passed with {len(live)} batch(es) not final: {states}"
        if self.cancel_on_kill:
            cancelled = await self._cancel(live)
            message += f"; cancel requested for {len(cancelled)} of them so nothing more is spent"
            if len(cancelled) < len(live):
                message += f" (could not cancel: {', '.join(b for b in live if b not in cancelled)})"
        else:
            message += "; left running (cancel_on_kill=False)"
        self.log.error("%s", message)
        return self._payload("timeout", message)

    def _payload(self, status: str, message: str, **extra: Any) -> dict[str, Any]:
        batches = {b: self._summaries[b] for b in self.batch_ids if b in self._summaries}
        payload = {"status": status, "batches": batches, "message": message, **extra}
        if self.job is not None:
            payload["job"] = self.job
        return payload

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
                self._summaries[batch_id] = batch_summary(batch)
                self.log.info("%s", progress_line(batch_id, self._summaries[batch_id]))
                return True
            return False

        await self.hook.aget_async_client()
        done = await asyncio.gather(*(cancel_one(b) for b in batch_ids))
        return [b for b, ok in zip(batch_ids, done, strict=True) if ok]

    async def on_kill(self) -> None:
        """Cancel the batches that are not final when the deferred task is killed, cleared or marked.

        Airflow (>= 3.3) calls this only for a user action, never for a triggerer restart.
        """
        live = [b for b in self.batch_ids if not is_final(self._summaries.get(b, {}).get("status", ""))]
        if not self.cancel_on_kill:
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
        try:
            await self.hook.aclose()
        except Exception:
            # Closing a client must never turn a finished wait into a failure.
            self.log.debug("Closing the OpenAI client failed", exc_info=True)
