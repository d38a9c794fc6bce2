"""The one decision object of the wait (no I/O, no Airflow import).

Given the job, the latest poll results and the clock, :class:`Waiting` says what to do next: poll these
batches after so many seconds, re-create these chunks, run a retry round for these chunks, cancel and
time out, finish with this outcome, or give up with this error. The trigger (deferred mode) and the
sensor's poke path (poke and reschedule modes) only do the I/O around it, so the three modes behave
the same.

The job carries what must survive between looks (statuses, summaries, capacity credits, idle time), so a
decision depends on the job, the results and the clock only; the object itself keeps just the polling
schedule and the consecutive-fault counts of one process, which are fine to lose.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from airflow_openai_batch.core.job import Chunk, Job
from airflow_openai_batch.core.progress import (
    AdaptivePollSchedule,
    align_to_grid,
    backoff_delay,
    check_outcome,
    classify_api_error,
    describe_api_error,
    format_duration,
    progress_line,
    retry_after_seconds,
)
from airflow_openai_batch.core.resubmit import capacity_error_code, is_capacity_failure
from airflow_openai_batch.exceptions import (
    OpenAIBatchError,
    OpenAIBatchFailedError,
    OpenAIBatchOutcomeError,
    OpenAIBatchPollingError,
)
from airflow_openai_batch.statuses import DEFAULT_FAIL_ON_STATUSES, FINAL_STATUSES, BatchStatus, is_final

__all__ = [
    "PROGRESS_LOG_EVERY",
    "Decision",
    "Fault",
    "Finish",
    "GiveUp",
    "Note",
    "Timeout",
    "Wait",
    "Waiting",
    "Work",
]

#: A batch whose status has not changed gets a progress line at most this often (seconds): a job of
#: hundreds of batches polled every few seconds near their end would otherwise flood the triggerer's log
#: (and spend most of its CPU formatting lines).
PROGRESS_LOG_EVERY = 60.0
#: A line for the log: ``(level, text)``; the wiring logs it, the decision only says it.
Note = tuple[Literal["info", "warning", "error"], str]


@dataclass(frozen=True)
class Fault:
    """A poll that failed: what the API said and whether waiting may fix it.

    :param description: a short, key-free description of the error.
    :param transient: 429, 408, 5xx, timeouts, dropped connections; else waiting will not fix it.
    :param retry_after: seconds the server asked us to wait, if it said so.
    """

    description: str
    transient: bool
    retry_after: float | None = None

    @classmethod
    def of(cls, err: BaseException) -> Fault:
        return cls(describe_api_error(err), classify_api_error(err) == "transient", retry_after_seconds(err))


@dataclass(frozen=True, kw_only=True)
class _Decision:
    #: Lines to log, in order (progress lines, faults, what is about to happen).
    notes: tuple[Note, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Wait(_Decision):
    """Poll ``poll`` after ``after`` seconds (no batch to poll: only time must pass, for capacity).

    :param reason: ``adaptive``, ``backoff``, ``retry-after``, ``deadline`` or ``capacity``.
    :param batches: the job's batches (for the message).
    :param grid: the grid the wait is aligned to, if any.
    :param asked: the wait the schedule asked for, before alignment.
    """

    poll: tuple[str, ...]
    after: float
    reason: str
    batches: int = 0
    grid: float | None = None
    asked: float | None = None

    @property
    def message(self) -> str:
        """What the wait is for, in a line (built only when someone logs it)."""
        after = format_duration(self.after)
        if not self.poll:
            return (
                f"Chunks wait for enqueued-token capacity and none of this job runs; re-creating in {after}"
            )
        detail = ""
        if self.grid is not None:
            detail = f", aligned to the {format_duration(self.grid)} grid"
            if self.asked is not None and self.after < self.asked * 0.999:
                detail += f"; the schedule asked {format_duration(self.asked)}"
        return (
            f"{len(self.poll)} of {self.batches} batch(es) not final yet; next poll in {after} "
            f"({self.reason}{detail})"
        )

    def __str__(self) -> str:
        # So a logger formats the message only when the line is emitted ("%s", wait).
        return self.message


@dataclass(frozen=True, kw_only=True)
class Work(_Decision):
    """Work for the worker: (re-)create the current attempt of the chunks ``recreate`` (indexes into
    ``job.chunks``), and run a retry round on the current batch of the chunks ``retry``.

    :param idle: the re-creations are made because nothing of the job runs (not for freed capacity).
    """

    recreate: tuple[int, ...] = ()
    retry: tuple[int, ...] = ()
    idle: bool = False
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class Finish(_Decision):
    """Every batch is final: the outcome.

    :param result: the sensor's XCom, ``{batch_id: summary}``.
    :param warnings: lines to log as warnings.
    :param error: when ``fail_on_statuses`` (or a chunk never created) fails the task, the error to raise.
    """

    result: dict[str, dict[str, Any]]
    warnings: tuple[str, ...] = ()
    error: OpenAIBatchOutcomeError | None = None
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class GiveUp(_Decision):
    """Polling failed in a way waiting will not fix, or beyond the fault budget: raise ``error``."""

    error: OpenAIBatchError


@dataclass(frozen=True, kw_only=True)
class Timeout(_Decision):
    """The deadline passed with batches not final: cancel ``cancel`` (empty without ``cancel_on_kill``),
    then fail with a timeout saying ``message``."""

    cancel: tuple[str, ...]
    message: str


Decision = Wait | Work | Finish | GiveUp | Timeout


@dataclass
class _ChunkStates:
    live: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    exhausted: list[int] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)


class Waiting:
    """Decides the next step of a wait. One per process: the trigger, a poke-mode sensor, one poke.

    :param poll_interval: the shortest wait between polls, seconds.
    :param max_poll_interval: the longest wait between polls, seconds.
    :param fail_on_statuses: final statuses that fail the task, judged on each chunk's last batch (an
        earlier batch whose failures were retried does not fail it).
    :param max_resubmits: create calls allowed per chunk after the enqueued-token limit.
    :param retry_failed_requests: retry rounds per request (0: none).
    :param fault_budget: consecutive transient faults tolerated on one batch's polls.
    :param cancel_on_kill: cancel the batches that are not final when the deadline passes.
    """

    def __init__(
        self,
        *,
        poll_interval: float = 60.0,
        max_poll_interval: float = 600.0,
        fail_on_statuses: Iterable[str] = DEFAULT_FAIL_ON_STATUSES,
        max_resubmits: int = 10,
        retry_failed_requests: int = 2,
        fault_budget: int = 10,
        cancel_on_kill: bool = True,
    ) -> None:
        self.schedule = AdaptivePollSchedule(float(poll_interval), float(max_poll_interval))
        self.fail_on_statuses = tuple(str(s) for s in fail_on_statuses)
        not_final = [s for s in self.fail_on_statuses if s not in FINAL_STATUSES]
        if not_final:
            raise ValueError(
                f"fail_on_statuses may only hold final statuses {sorted(FINAL_STATUSES)}; got {not_final}"
            )
        for name, value in (
            ("max_resubmits", max_resubmits),
            ("retry_failed_requests", retry_failed_requests),
            ("fault_budget", fault_budget),
        ):
            if int(value) < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.max_resubmits = int(max_resubmits)
        self.retry_failed_requests = int(retry_failed_requests)
        self.fault_budget = int(fault_budget)
        self.cancel_on_kill = bool(cancel_on_kill)
        #: Consecutive transient faults per batch (this process only).
        self.faults: dict[str, int] = {}
        #: When each batch's progress was last logged, and its status then (this process only).
        self._progress_logged: dict[str, tuple[float, str]] = {}
        self._worst_fault = 0
        self._retry_after: float | None = None
        self._polled = False

    @property
    def poll_interval(self) -> float:
        return self.schedule.poll_interval

    @property
    def max_poll_interval(self) -> float:
        return self.schedule.max_poll_interval

    # -- the step --------------------------------------------------------------------------------

    def step(
        self,
        job: Job,
        results: Mapping[str, Mapping[str, Any] | Fault],
        now: float,
        polled_at: float | None = None,
    ) -> Decision:
        """Record the poll ``results`` (``{batch_id: summary or Fault}``) in ``job``, then decide.

        :param job: updated in place: statuses, summaries, capacity credits, idle time.
        :param now: the clock, unix seconds.
        :param polled_at: when the results were asked for; the next poll is due from then, not from
            ``now``, so the time a poll takes does not push the next one later and later.
        """
        notes: list[Note] = []
        observed = self._observe(job, results, now, notes)
        if isinstance(observed, OpenAIBatchError):
            return GiveUp(error=observed, notes=tuple(notes))
        return self._decide(job, now, polled_at, tuple(notes), observed)

    def decide(self, job: Job, now: float, polled_at: float | None = None) -> Decision:
        """What to do next, from the job as it is (no new results). Pure: ``job`` is not changed."""
        return self._decide(job, now, polled_at, ())

    def _decide(
        self,
        job: Job,
        now: float,
        polled_at: float | None,
        notes: tuple[Note, ...],
        states: _ChunkStates | None = None,
    ) -> Decision:
        states = states if states is not None else self._states(job)
        deadline_passed = job.deadline is not None and now >= job.deadline
        live_ids = tuple(job.chunks[i].current.batch_id or "" for i in states.live)
        if deadline_passed and live_ids:
            return self._timeout(job, live_ids, notes)
        capacity_wait: float | None = None
        if not deadline_passed:
            recreate: list[int] = []
            idle = False
            if states.waiting:
                if job.capacity_credits > 0:
                    recreate = states.waiting[: job.capacity_credits]
                elif not live_ids:
                    since = job.idle_since if job.idle_since is not None else now
                    capacity_wait = since + self._idle_backoff(job.idle_rounds) - now
                    if capacity_wait <= 0:
                        recreate, idle, capacity_wait = list(states.waiting), True, None
            if recreate or states.retry:
                return Work(
                    recreate=tuple(recreate),
                    retry=tuple(states.retry),
                    idle=idle,
                    message=self._work_message(job, recreate, states.retry, idle),
                    notes=notes,
                )
        if live_ids:
            return self._wait(job, live_ids, now, now if polled_at is None else min(polled_at, now), notes)
        if capacity_wait is not None:
            if job.deadline is not None:
                capacity_wait = min(capacity_wait, job.deadline - now)
            return Wait(poll=(), after=max(0.0, capacity_wait), reason="capacity", notes=notes)
        return self._finish(job, states, deadline_passed, notes)

    def done(self, job: Job, work: Work) -> None:
        """Book the work the worker did for ``work`` (capacity credits spent, idle rounds counted)."""
        if work.recreate:
            if work.idle:
                job.idle_rounds += 1
            else:
                job.capacity_credits = max(0, job.capacity_credits - len(work.recreate))
                job.idle_rounds = 0
            job.idle_since = None

    # -- observing -------------------------------------------------------------------------------

    def _observe(
        self, job: Job, results: Mapping[str, Mapping[str, Any] | Fault], now: float, notes: list[Note]
    ) -> OpenAIBatchError | _ChunkStates:
        """Record the results in the job; an error to give up with, or the chunks' states after them."""
        polled: dict[str, Mapping[str, Any]] = {}
        freed = 0
        self._worst_fault, self._retry_after = 0, None
        for batch_id, result in results.items():
            found = job.find(batch_id)
            if found is None:
                continue
            chunk, attempt = found
            if isinstance(result, Fault):
                if not result.transient:
                    return OpenAIBatchPollingError(
                        f"Polling batch {batch_id} failed with an error that waiting will not fix: "
                        f"{result.description}",
                        self._summaries(job),
                    )
                count = self.faults[batch_id] = self.faults.get(batch_id, 0) + 1
                if count > self.fault_budget:
                    return OpenAIBatchPollingError(
                        f"Gave up polling batch {batch_id} after {count} consecutive transient faults "
                        f"(fault_budget={self.fault_budget}); last: {result.description}. "
                        "The batches were left running.",
                        self._summaries(job),
                    )
                self._worst_fault = max(self._worst_fault, count)
                if result.retry_after is not None:
                    self._retry_after = max(self._retry_after or 0.0, result.retry_after)
                notes.append(
                    (
                        "warning",
                        f"{batch_id}: poll failed ({result.description}); transient fault {count} of "
                        f"{self.fault_budget} allowed in a row",
                    )
                )
                continue
            self.faults.pop(batch_id, None)
            before = attempt.see(result)
            polled[batch_id] = result
            status = result["status"]
            if before == status:
                continue
            capacity_code = capacity_error_code(result)
            if capacity_code is not None:
                notes.append(("info", f"{batch_id} failed with {capacity_code}: it will be re-created"))
                continue
            if before is not None and not is_final(before) and is_final(status):
                freed += 1
            if status in self.fail_on_statuses and chunk.current is attempt:
                notes.append(("warning", f"{batch_id} ended {status}: the task will fail once all are final"))
        self._polled = bool(polled)
        if polled:
            self.schedule.observe(polled, now)
            for batch_id, summary in polled.items():
                status = summary["status"]
                last = self._progress_logged.get(batch_id)
                if last is None or last[1] != status or now - last[0] >= PROGRESS_LOG_EVERY:
                    self._progress_logged[batch_id] = (now, status)
                    eta = self.schedule.last_eta(batch_id)
                    notes.append(("info", progress_line(batch_id, summary, eta_seconds=eta)))
        states = self._states(job)
        if states.waiting:
            job.capacity_credits += freed
        else:
            job.capacity_credits = 0
        if states.waiting and not states.live:
            job.idle_since = job.idle_since if job.idle_since is not None else now
        else:
            job.idle_since = None
        return states

    # -- states ----------------------------------------------------------------------------------

    def _states(self, job: Job) -> _ChunkStates:
        states = _ChunkStates()
        for index, chunk in enumerate(job.chunks):
            current = chunk.current
            if current.created and not current.final:
                states.live.append(index)
            elif not current.created or is_capacity_failure(current.summary or {}):
                (states.waiting if self._may_recreate(chunk) else states.exhausted).append(index)
            elif self._wants_retry(chunk):
                states.retry.append(index)
        return states

    def _may_recreate(self, chunk: Chunk) -> bool:
        # The first creation of a chunk the submit task could not create is not a re-creation.
        first_creation = len(chunk.attempts) == 1 and not chunk.current.created
        return first_creation or chunk.recreations < self.max_resubmits

    def _wants_retry(self, chunk: Chunk) -> bool:
        """The current batch is final with failures a retry round may pick up, and rounds are left.

        Only the summary is known here; the round itself decides which failures are retryable.
        """
        current = chunk.current
        summary = current.summary
        if summary is None or current.retried is not None or current.number > self.retry_failed_requests:
            return False
        if summary["status"] == BatchStatus.EXPIRED:
            return True
        return summary["status"] == BatchStatus.COMPLETED and summary["request_counts"]["failed"] > 0

    def _idle_backoff(self, rounds: int) -> float:
        """Wait before re-creating when nothing of the job runs (other jobs may hold the capacity)."""
        return min(self.max_poll_interval, self.poll_interval * (2 ** max(0, min(rounds, 30))))

    # -- decisions -------------------------------------------------------------------------------

    def _wait(
        self, job: Job, live_ids: tuple[str, ...], now: float, polled_at: float, notes: tuple[Note, ...]
    ) -> Wait:
        wait = self.schedule.next_interval() if self._polled else self.schedule.interval
        asked, grid, reason = wait, None, "adaptive"
        if self._worst_fault:
            # Slow down while the API is failing; never call again before the Retry-After it asked for.
            wait = max(wait, backoff_delay(self._worst_fault, self.poll_interval, self.max_poll_interval))
            reason = "backoff"
            if self._retry_after is not None and self._retry_after >= wait:
                wait, reason = self._retry_after, "retry-after"
        else:
            # On the grid, waits that started at different moments poll together and can share calls.
            # Only shortened, so a finished batch is seen no later than the schedule promised.
            wait, grid = align_to_grid(polled_at, wait, self.poll_interval, self.max_poll_interval)
            # Due from when the poll began: what the poll itself took is not waited again.
            wait = max(0.0, wait - (now - polled_at))
        if job.deadline is not None and job.deadline - now < wait:
            wait, reason, grid = max(0.0, job.deadline - now), "deadline", None
        batches = sum(1 for chunk in job.chunks for a in chunk.attempts if a.batch_id is not None)
        return Wait(
            poll=live_ids, after=wait, reason=reason, batches=batches, grid=grid, asked=asked, notes=notes
        )

    def _timeout(self, job: Job, live_ids: tuple[str, ...], notes: tuple[Note, ...] = ()) -> Timeout:
        states = ", ".join(f"{b} ({self._status(job, b)})" for b in live_ids)
        message = f"Deadline passed with {len(live_ids)} batch(es) not final: {states}"
        if not self.cancel_on_kill:
            message += "; left running (cancel_on_kill=False)"
        return Timeout(cancel=live_ids if self.cancel_on_kill else (), message=message, notes=notes)

    def _finish(
        self, job: Job, states: _ChunkStates, deadline_passed: bool, polled_notes: tuple[Note, ...]
    ) -> Finish:
        notes: list[Note] = list(polled_notes)
        warnings: list[str] = []
        stuck = [job.chunks[i] for i in (*states.waiting, *states.exhausted)]
        never_created = [c for c in stuck if not c.current.created]
        for chunk in stuck:
            if chunk.current.created:
                notes.append(
                    (
                        "error",
                        f"{chunk.current.batch_id}: still failed with token_limit_exceeded after "
                        f"{chunk.recreations} re-creation(s) (max_resubmits={self.max_resubmits})",
                    )
                )
        for index in states.retry:
            current = job.chunks[index].current
            warnings.append(
                f"{current.batch_id}: the deadline passed before its failed requests could be retried"
            )
        result = job.outcome()
        error: OpenAIBatchOutcomeError | None = None
        if never_created:
            why = "before the deadline" if deadline_passed else f"within max_resubmits={self.max_resubmits}"
            error = OpenAIBatchFailedError(
                f"{len(never_created)} chunk(s) could not be created {why} (enqueued-token limit): "
                + ", ".join(f"{c.key or 'chunk'} (file {_input_file(c)})" for c in never_created),
                result,
            )
        else:
            last = {
                c.current.batch_id: c.current.summary
                for c in job.chunks
                if c.current.batch_id is not None and c.current.summary is not None
            }
            try:
                warnings.extend(check_outcome(last, self.fail_on_statuses))
            except OpenAIBatchOutcomeError as err:
                error = err
        retried = sum(a.retried or 0 for _, a in job.attempts())
        rescued = sum(
            (a.summary or {}).get("request_counts", {}).get("completed", 0)
            for chunk in job.chunks
            for a in chunk.outcome_attempts()
            if a.number > 1
        )
        rounds = sum(1 for _, a in job.attempts() if a.reason == "retry")
        message = f"All {len(result)} batch(es) are final: {_status_counts(result)}"
        if rounds:
            message += (
                f"; {retried:,} failed request(s) resubmitted in {rounds} retry batch(es), "
                f"{rescued:,} of them rescued (answered on a later attempt)"
            )
        return Finish(
            result=result, warnings=tuple(warnings), error=error, message=message, notes=tuple(notes)
        )

    def _work_message(self, job: Job, recreate: list[int], retry: list[int], idle: bool) -> str:
        parts = []
        if recreate:
            why = (
                "nothing of the job runs"
                if idle
                else f"{job.capacity_credits} batch(es) of the job finished and freed capacity"
            )
            parts.append(
                f"re-creating {len(recreate)} chunk(s) held back by the enqueued-token limit ({why})"
            )
        if retry:
            ids = ", ".join(job.chunks[i].current.batch_id or "" for i in retry)
            parts.append(f"retry round for the failed requests of {ids}")
        return "; ".join(parts)

    @staticmethod
    def _status(job: Job, batch_id: str) -> str:
        found = job.find(batch_id)
        return (found[1].status if found else None) or "unknown"

    @staticmethod
    def _summaries(job: Job) -> dict[str, dict[str, Any]]:
        return {a.batch_id: dict(a.summary) for _, a in job.attempts() if a.batch_id and a.summary}


def _status_counts(result: Mapping[str, Mapping[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for summary in result.values():
        counts[summary["status"]] = counts.get(summary["status"], 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none"


def _input_file(chunk: Chunk) -> str | None:
    return chunk.create.input_file_id if chunk.create is not None else chunk.current.input_file_id
