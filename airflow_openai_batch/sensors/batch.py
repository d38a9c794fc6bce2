"""Sensor that waits for OpenAI batches to be final: deferred (no worker slot) or classic poke/reschedule.

The decisions are :class:`~airflow_openai_batch.core.waiting.Waiting`'s; this module does the I/O around
them: polls, deferral, re-creations, retry rounds, cancels, the task state, and the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from airflow_openai_batch.compat import (
    AirflowSensorTimeout,
    BaseSensorOperator,
    PokeReturnValue,
    task_state_store,
)
from airflow_openai_batch.core.job import Attempt, Chunk, CreateSpec, Job, read_job
from airflow_openai_batch.core.progress import (
    CANCEL_ATTEMPTS,
    batch_summary,
    classify_api_error,
    describe_api_error,
    describe_batch_errors,
    progress_line,
    retry_after_seconds,
)
from airflow_openai_batch.core.resubmit import (
    METADATA_ATTEMPT,
    METADATA_FOLLOWS,
    METADATA_KEY,
    FoundBatch,
    RetryLines,
    RetryPolicy,
    adopt_follow_ups,
    capacity_error_code,
    follow_up_metadata,
    may_have_follow_up,
    refused_for_capacity,
)
from airflow_openai_batch.core.waiting import Decision, Fault, Finish, GiveUp, Timeout, Wait, Waiting, Work
from airflow_openai_batch.exceptions import (
    OpenAIBatchEventError,
    OpenAIBatchOutcomeError,
    OpenAIBatchPollingError,
    OpenAIBatchTimeoutError,
)
from airflow_openai_batch.hooks.batch import OpenAIBatchHook
from airflow_openai_batch.operators._workdir import task_work_dir
from airflow_openai_batch.statuses import DEFAULT_FAIL_ON_STATUSES, BatchStatus
from airflow_openai_batch.triggers.batch import EVENT_STATUSES, OpenAIBatchTrigger

if TYPE_CHECKING:
    from openai.types import Batch

    from airflow_openai_batch.compat import Context

__all__ = ["OpenAIBatchEventError", "OpenAIBatchSensor"]

#: The defer timeout is only a backstop: the trigger ends the wait itself at the deadline (and cancels
#: the batches, which a trigger timeout would not do), so the backstop fires a little later.
_DEFER_TIMEOUT_GRACE = timedelta(minutes=5)
_BATCH_STATUSES = frozenset(s.value for s in BatchStatus)
_LOG_LEVELS = {"info": 20, "warning": 30, "error": 40}
E = TypeVar("E", bound=OpenAIBatchOutcomeError)
#: The task state key under which the job is kept between pokes (reschedule mode) and tries.
STATE_KEY = "openai_batch_job"
#: Slack when walking the batch list for follow-ups an earlier try made (server and worker clocks).
_LOOKUP_SLACK_SECONDS = 86_400


class OpenAIBatchSensor(BaseSensorOperator):
    """Waits until every OpenAI batch of a job is final; returns ``{batch_id: summary}`` (the XCom).

    Deferrable by default: one :class:`~airflow_openai_batch.triggers.batch.OpenAIBatchTrigger` waits on
    all batches in the triggerer. With ``deferrable=False`` it pokes (``mode="poke"`` or
    ``"reschedule"``). Both ask the same decision object what to do next, so they behave the same.

    A summary is ``{"status", "request_counts": {"total", "completed", "failed"}, "output_file_id",
    "error_file_id", "replaces", "attempt", "retry_of", "model"}`` plus ``"errors"`` and ``"warnings"``
    when there are any.

    **Retry rounds.** When a batch is final and some of its requests failed for a retryable reason
    (``retry_error_codes``), the worker downloads its results, keeps just those request lines (byte for
    byte from the input file) and uploads them as a new batch (``attempt`` + 1, ``retry_of`` the batch),
    at most ``retry_failed_requests`` times per request and only before the deadline; then the wait goes
    on. Each round is found again by its metadata, so a retried or restarted task never makes it twice.

    :param batch_ids: templated; the submit task's output (a list of ids: its job, pushed as XCom
        ``job``, is found through the upstream task), a batch id, a list of ids, or a sensor result.
    :param conn_id: the ``openai_batch`` connection.
    :param deferrable: wait in the triggerer (no worker slot); ``False`` = classic poke/reschedule.
    :param poll_interval: shortest wait between polls, seconds; the poke interval when not deferred.
    :param max_poll_interval: longest wait between polls, seconds; the interval stretches toward it
        while batches are far from done.
    :param fail_on_statuses: final statuses of a chunk's last batch that fail the task (``failed``,
        ``cancelled`` by default). ``expired`` is not among them by default: it passes with a warning,
        its partial results are collectable. ``cancelling`` is not final and is refused here.
    :param cancel_on_kill: when the task is killed, cleared, marked, or times out, cancel the batches
        that are not final so nothing more is spent.
    :param max_resubmits: re-creations allowed per chunk whose batch failed with
        ``token_limit_exceeded`` (the enqueued-token limit) or whose create was refused for it. Such a
        chunk is re-created from the same input file once another batch of the job finishes (or after a
        backoff when none runs); the result is keyed by the final batch ids, each with the ids it
        ``replaces``.
    :param retry_failed_requests: retry rounds per request (0: none).
    :param retry_error_codes: error codes (str) and HTTP statuses (int) of failed request lines that a
        retry round resubmits; ``None``: ``batch_expired``, ``rate_limit_exceeded``, ``server_error``,
        ``timeout`` and HTTP 429/500/502/503/504. A 4xx other than 408/429 is never retried.
    :param fault_budget: consecutive transient API faults tolerated on one batch's polls before the
        task fails with :class:`~airflow_openai_batch.exceptions.OpenAIBatchPollingError`.
    :param timeout: seconds (or timedelta) to wait in all before the batches are cancelled (if
        ``cancel_on_kill``) and the task fails with ``OpenAIBatchTimeoutError``.
    """

    template_fields: Sequence[str] = ("batch_ids",)
    template_fields_renderers = {"batch_ids": "json"}
    ui_color = "#d9f2e6"

    #: The clock (unix seconds) the decisions use; a test seam (a subclass may point it elsewhere).
    clock: Callable[[], float] = staticmethod(time.time)

    def __init__(
        self,
        *,
        batch_ids: str | Sequence[str] | Mapping[str, Any] | Any,
        conn_id: str = OpenAIBatchHook.default_conn_name,
        deferrable: bool = True,
        poll_interval: float = 60.0,
        max_poll_interval: float = 600.0,
        fail_on_statuses: Iterable[str] | str = DEFAULT_FAIL_ON_STATUSES,
        cancel_on_kill: bool = True,
        max_resubmits: int = 10,
        retry_failed_requests: int = 2,
        retry_error_codes: Iterable[str | int] | None = None,
        fault_budget: int = 10,
        timeout: float | timedelta = 25 * 3600,
        **kwargs: Any,
    ) -> None:
        poke_interval = kwargs.pop("poke_interval", poll_interval)
        super().__init__(poke_interval=poke_interval, timeout=timeout, **kwargs)
        self.batch_ids = batch_ids
        self.conn_id = conn_id
        self.deferrable = deferrable
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        if isinstance(fail_on_statuses, str):
            fail_on_statuses = (fail_on_statuses,)
        self.fail_on_statuses: tuple[str, ...] = tuple(str(s) for s in fail_on_statuses)
        self.cancel_on_kill = cancel_on_kill
        self.max_resubmits = max_resubmits
        self.retry_failed_requests = retry_failed_requests
        self.retry_error_codes = retry_error_codes
        self.fault_budget = fault_budget
        self.request_retry_policy = RetryPolicy.of(retry_error_codes)
        self._new_waiting()  # validates the settings now, at DAG parse time
        #: The job and the decision object of this process (poke mode keeps them across pokes).
        self._job: Job | None = None
        self._waiting: Waiting | None = None
        #: Whether this process already looked for follow-ups an earlier try made.
        self._adopted = False

    @cached_property
    def hook(self) -> OpenAIBatchHook:
        """For the work (re-creations, retry rounds): the SDK retries transient faults there
        (``batches.create`` excepted: it is never blindly retried)."""
        return OpenAIBatchHook(conn_id=self.conn_id)

    @cached_property
    def poll_hook(self) -> OpenAIBatchHook:
        """For polls and cancels: no SDK retries, so a transient fault waits for the next poll (counted
        against ``fault_budget``) rather than blocking the worker in the SDK's hidden backoff, and a
        cancel keeps to its own few short attempts (``on_kill`` has a bounded time)."""
        return OpenAIBatchHook(conn_id=self.conn_id, client_overrides={"max_retries": 0})

    def _new_waiting(self) -> Waiting:
        return Waiting(
            poll_interval=self.poll_interval,
            max_poll_interval=self.max_poll_interval,
            fail_on_statuses=self.fail_on_statuses,
            max_resubmits=self.max_resubmits,
            retry_failed_requests=self.retry_failed_requests,
            fault_budget=self.fault_budget,
            cancel_on_kill=self.cancel_on_kill,
        )

    # -- the paths -------------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            try:
                return super().execute(context)
            except AirflowSensorTimeout as err:
                raise self._timeout_error(str(err)) from err
        job = self._job = self._start(context)
        # One look first: a rerun over finished batches should not park in the triggerer.
        return self._carry_out(context, job, self._look(job))

    def execute_complete(self, context: Context, event: Any = None) -> dict[str, dict[str, Any]]:
        """Turn a trigger event into the next step: the outcome, an error, or (after a ``resubmit``
        event) the work the trigger handed back and another deferral."""
        status, job, message = self._validate_event(event)
        self._job, self._adopted = job, True  # the event's job holds everything this try made
        if status in ("error", "timeout"):
            self.log.error("%s", message)
            error = OpenAIBatchTimeoutError if status == "timeout" else OpenAIBatchPollingError
            raise _outcome_error(error, message, job)
        # What the trigger saw is decided again here (and logged once, by the decision).
        return self._carry_out(context, job, self._waiting_now().decide(job, self.clock()))

    def poke(self, context: Context) -> PokeReturnValue:
        job = self._job
        if job is None:
            job = self._job = self._restore(context) or self._start(context)
        outcome = self._carry_out(context, job, self._look(job))
        if outcome is None:
            return PokeReturnValue(is_done=False)
        return PokeReturnValue(is_done=True, xcom_value=outcome)

    # -- the job ---------------------------------------------------------------------------------

    def _start(self, context: Context) -> Job:
        """The job from upstream, with this try's deadline (absolute: every deferral keeps it)."""
        job = read_job(self.batch_ids, upstream=self._upstream_jobs(context))
        now = self.clock()
        job.started_at = now
        job.deadline = now + self.timeout
        return job

    def _upstream_jobs(self, context: Context) -> list[Any]:
        """The jobs the upstream tasks pushed (XCom ``job``): the submit task's names the chunks it
        could not create, which its list of batch ids cannot."""
        if not self.upstream_task_ids:
            return []
        pulled = context["ti"].xcom_pull(task_ids=sorted(self.upstream_task_ids), key="job")
        values = [pulled] if isinstance(pulled, Mapping) else list(pulled or ())
        return [value for value in values if isinstance(value, Mapping)]

    def _restore(self, context: Context) -> Job | None:
        """The job an earlier poke of this try kept in the task state (reschedule mode; Airflow 3.3+)."""
        store = task_state_store(context)
        saved = store.get(STATE_KEY) if store is not None else None
        if not isinstance(saved, Mapping) or saved.get("try") != _try_number(context):
            return None
        job = Job.from_dict(saved["job"])
        upstream = read_job(self.batch_ids, upstream=self._upstream_jobs(context))
        return job if job.first_batch_ids() == upstream.first_batch_ids() else None

    def _save(self, context: Context, job: Job) -> None:
        store = task_state_store(context)
        if store is not None:
            store.set(STATE_KEY, {"try": _try_number(context), "job": job.to_dict()})

    def _waiting_now(self) -> Waiting:
        if self._waiting is None:
            self._waiting = self._new_waiting()
        return self._waiting

    # -- one look and what follows ---------------------------------------------------------------

    def _look(self, job: Job) -> Decision:
        """Poll the batches not known to be final, and decide."""
        polled_at = self.clock()
        results = self._poll(job.live_batch_ids())
        return self._waiting_now().step(job, results, self.clock(), polled_at)

    def _poll(self, batch_ids: Sequence[str]) -> dict[str, Mapping[str, Any] | Fault]:
        results: dict[str, Mapping[str, Any] | Fault] = {}
        for batch_id in batch_ids:
            try:
                results[batch_id] = batch_summary(self.poll_hook.get_batch(batch_id))
            except Exception as err:
                results[batch_id] = Fault.of(err)
        return results

    def _carry_out(self, context: Context, job: Job, decision: Decision) -> Any:
        """Do what the decisions say until one needs waiting; return the outcome, or ``None`` (poke mode:
        not done yet). Deferred mode defers; failing outcomes raise."""
        waiting = self._waiting_now()
        if not self._adopted:
            # First decision of this try: an earlier try may have made follow-ups it did not record.
            self._adopted = True
            self._log_notes(decision)
            decision = self._follow_earlier_tries(job) or replace(decision, notes=())
        while True:
            self._log_notes(decision)
            if isinstance(decision, Work):
                self.log.info("%s", decision.message)
                self._work(context, job, decision)
                waiting.done(job, decision)
                decision = waiting.decide(job, self.clock())
                continue
            if isinstance(decision, Wait):
                self._save(context, job)
                self.log.info("%s", decision.message)
                if self.deferrable:
                    self._defer(job)
                # Poke and reschedule modes: the base sensor waits ``poke_interval`` after a poke that is
                # not done, so the decision's wait (adaptive, backoff, Retry-After, capacity, never past
                # the deadline) becomes the next one.
                self.poke_interval = decision.after
                return None
            self._save(context, job)
            if isinstance(decision, Timeout):
                raise self._timeout_error(decision.message, cancel=decision.cancel)
            if isinstance(decision, GiveUp):
                raise decision.error
            assert isinstance(decision, Finish)
            for warning in decision.warnings:
                self.log.warning("%s", warning)
            self.log.info("%s", decision.message)
            if decision.error is not None:
                raise decision.error
            return decision.result

    def _defer(self, job: Job) -> None:
        assert job.deadline is not None
        trigger = OpenAIBatchTrigger(
            conn_id=self.conn_id,
            poll_interval=self.poll_interval,
            max_poll_interval=self.max_poll_interval,
            fail_on_statuses=self.fail_on_statuses,
            cancel_on_kill=self.cancel_on_kill,
            fault_budget=self.fault_budget,
            max_resubmits=self.max_resubmits,
            retry_failed_requests=self.retry_failed_requests,
            job=job.to_dict(),
        )
        self.log.info(
            "Deferring: waiting for %d batch(es) until %s at the latest",
            len(job.live_batch_ids()),
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(job.deadline)),
        )
        self.defer(
            trigger=trigger,
            method_name="execute_complete",
            timeout=timedelta(seconds=max(0.0, job.deadline - self.clock())) + _DEFER_TIMEOUT_GRACE,
        )

    def _log_notes(self, decision: Decision) -> None:
        for level, text in decision.notes:
            self.log.log(_LOG_LEVELS[level], "%s", text)

    # -- work: re-creations and retry rounds -----------------------------------------------------

    def _work(self, context: Context, job: Job, work: Work) -> None:
        for index in work.recreate:
            self._recreate(job.chunks[index])
        if work.retry:
            with task_work_dir(context, "retry") as work_dir:
                for index in work.retry:
                    self._retry_round(job, job.chunks[index], work_dir)

    def _follow_earlier_tries(self, job: Job) -> Decision | None:
        """Follow the batches an earlier try made (re-creations, retry rounds) but did not record; the
        decision after polling them, or ``None`` when there were none."""
        if not any(may_have_follow_up(chunk) for chunk in job.chunks):
            return None
        found = self._found_batches(job)
        decision = None
        while notes := adopt_follow_ups(job, found):
            for note in notes:
                self.log.info("%s", note)
            if decision is not None:
                self._log_notes(decision)
            decision = self._look(job)
        return decision

    def _found_batches(self, job: Job) -> list[FoundBatch]:
        """The batches at the API that may follow the job's (one walk of the list, newest first)."""
        known = {a.batch_id for _, a in job.attempts() if a.batch_id}
        firsts = set(job.first_batch_ids())
        cutoff = (job.started_at or self.clock()) - self.timeout - _LOOKUP_SLACK_SECONDS
        found: list[FoundBatch] = []
        for batch in self.hook.list_batches(created_after=int(cutoff)):
            meta = batch.metadata or {}
            if batch.id not in known and (METADATA_FOLLOWS in meta or METADATA_KEY in meta):
                found.append(FoundBatch(batch.id, batch.input_file_id, dict(meta), batch.created_at))
            firsts.discard(batch.id)
            if not firsts and job.first_batch_ids():
                break  # newest first: nothing of this job is older than its first batches
        return found

    def _recreate(self, chunk: Chunk) -> None:
        """(Re-)create the chunk's current attempt from the same input file, at most once."""
        current = chunk.current
        follows = chunk.last_batch_id
        if current.created:
            spec = self._spec_of(self.hook.get_batch(current.batch_id or ""))
        elif chunk.create is not None:
            spec = chunk.create
        else:
            raise ValueError(f"chunk {chunk.key or follows} has no batch and no create spec to make one")
        metadata, dropped = follow_up_metadata(
            spec.metadata, follows=follows, number=current.number, retry=False
        )
        for key in dropped:
            self.log.warning("Metadata %s dropped from the re-created batch to fit the chain keys", key)
        lookup = (METADATA_FOLLOWS, follows) if follows else (METADATA_KEY, metadata.get(METADATA_KEY, ""))
        try:
            batch = self._create(spec, metadata, lookup, current.number)
        except Exception as err:
            if not refused_for_capacity(err):
                raise
            chunk.attempts.append(
                Attempt(
                    number=current.number,
                    reason="capacity",
                    input_file_id=spec.input_file_id,
                    retry_of=current.retry_of,
                )
            )
            chunk.create = spec
            self.log.warning(
                "Chunk %s: create refused again for enqueued capacity (re-creation %d of %d): %s",
                chunk.key or follows,
                chunk.recreations,
                self.max_resubmits,
                describe_api_error(err),
            )
            return
        attempt = Attempt(
            number=current.number,
            reason="capacity",
            batch_id=batch.id,
            input_file_id=spec.input_file_id,
            retry_of=current.retry_of,
        )
        attempt.see(batch_summary(batch))
        chunk.attempts.append(attempt)
        chunk.create = None
        self.log.info(
            "Re-created chunk %s as batch %s (re-creation %d of %d): %s",
            chunk.key or follows,
            batch.id,
            chunk.recreations,
            self.max_resubmits,
            f"batch {current.batch_id} failed with {capacity_error_code(current.summary or {})}"
            if current.created
            else "its create call had been refused for capacity",
        )

    def _retry_round(self, job: Job, chunk: Chunk, work_dir: Any) -> None:
        """Resubmit the retryable failed requests of the chunk's current batch as a new batch."""
        current = chunk.current
        batch_id = current.batch_id or ""
        # Imported here: the collect side's modules are not needed to parse a DAG or to wait.
        from airflow_openai_batch.core.reconcile import Reconciler
        from airflow_openai_batch.operators.collect import batch_result_files

        batch = self.hook.get_batch(batch_id)
        lines = RetryLines(work_dir / f"retry-{batch_id}.jsonl", self.request_retry_policy)
        try:
            Reconciler(lines, work_dir / "reconcile").add_batch(batch_result_files(self.hook, batch))
        finally:
            lines.close()
        kept = ", ".join(f"{code} {n}" for code, n in lines.kept_by_code.most_common())
        if not lines.retried:
            current.retried = 0
            self.log.info(
                "%s: no failed request is retryable (%s); retryable: %s",
                batch_id,
                kept or "none failed",
                self.request_retry_policy.describe(),
            )
            return
        if self._deadline_passed(job):
            self.log.warning(
                "%s: the deadline passed; %d failed request(s) not retried", batch_id, lines.retried
            )
            return
        upload = self.hook.upload_file(lines.path, filename=lines.path.name)
        if self._deadline_passed(job):
            # Nothing is created after the deadline; the uploaded file would only cost storage.
            self.log.warning(
                "%s: the deadline passed; %d failed request(s) not retried", batch_id, lines.retried
            )
            self._delete_quietly(upload.id)
            return
        number = current.number + 1
        metadata, _ = follow_up_metadata(batch.metadata or {}, follows=batch_id, number=number, retry=True)
        spec = CreateSpec(
            input_file_id=upload.id,
            endpoint=batch.endpoint,
            completion_window=batch.completion_window,
            metadata=metadata,
        )
        current.retried = lines.retried
        by_code = ", ".join(f"{code} {n}" for code, n in lines.retried_by_code.most_common())
        try:
            made = self._create(spec, metadata, (METADATA_FOLLOWS, batch_id), number)
        except Exception as err:
            if not refused_for_capacity(err):
                raise
            chunk.attempts.append(
                Attempt(number=number, reason="retry", input_file_id=upload.id, retry_of=batch_id)
            )
            chunk.create = spec
            self.log.warning(
                "%s: retry round of %d request(s) (%s) uploaded as %s; create refused for enqueued-token "
                "capacity, it is made once capacity frees",
                batch_id,
                lines.retried,
                by_code,
                upload.id,
            )
            return
        attempt = Attempt(
            number=number, reason="retry", batch_id=made.id, input_file_id=upload.id, retry_of=batch_id
        )
        attempt.see(batch_summary(made))
        chunk.attempts.append(attempt)
        self.log.info(
            "%s: retrying %d failed request(s) as batch %s (attempt %d of %d): %s%s",
            batch_id,
            lines.retried,
            made.id,
            number,
            self.retry_failed_requests + 1,
            by_code,
            f"; kept as failed: {kept}" if kept else "",
        )

    def _create(
        self, spec: CreateSpec, metadata: dict[str, str], lookup: tuple[str, str], number: int
    ) -> Batch:
        """Create a batch at most once: a batch found by ``lookup`` after an ambiguous error is it."""
        return self.hook.create_batch_reconciled(
            lookup=lookup,
            input_file_id=spec.input_file_id,
            endpoint=spec.endpoint,
            completion_window=spec.completion_window,
            metadata=metadata,
            output_expires_after=spec.output_expires_after,
            is_reusable=lambda b: (b.metadata or {}).get(METADATA_ATTEMPT, "1") == str(number),
        )

    @staticmethod
    def _spec_of(batch: Batch) -> CreateSpec:
        return CreateSpec(
            input_file_id=batch.input_file_id,
            endpoint=batch.endpoint,
            completion_window=batch.completion_window,
            metadata=dict(batch.metadata or {}),
        )

    def _deadline_passed(self, job: Job) -> bool:
        return job.deadline is not None and self.clock() >= job.deadline

    def _delete_quietly(self, file_id: str) -> None:
        try:
            self.hook.delete_file(file_id)
        except Exception as err:  # a leftover file only costs storage
            self.log.warning("Could not delete file %s: %s", file_id, describe_api_error(err))

    # -- cancel, kill, timeout -------------------------------------------------------------------

    def on_kill(self) -> None:
        """Cancel the batches that are not final (poke/reschedule mode, or a kill during the first look)."""
        if not self.cancel_on_kill or self._job is None:
            return
        self._cancel(self._job, self._job.live_batch_ids())

    def _cancel(self, job: Job, batch_ids: Sequence[str]) -> list[str]:
        cancelled = []
        for batch_id in batch_ids:
            for attempt in range(1, CANCEL_ATTEMPTS + 1):
                try:
                    summary = batch_summary(self.poll_hook.cancel_batch(batch_id))
                except Exception as err:
                    if classify_api_error(err) == "transient" and attempt < CANCEL_ATTEMPTS:
                        # Short waits: on_kill has a bounded time, and a cancel matters more than
                        # politeness to the rate limiter.
                        time.sleep(min(retry_after_seconds(err) or 0.5 * attempt, 5.0))
                        continue
                    # Typically the batch went final meanwhile; keep cancelling the others.
                    self.log.warning("%s: cancel failed: %s", batch_id, describe_api_error(err))
                    break
                found = job.find(batch_id)
                if found is not None:
                    found[1].see(summary)
                cancelled.append(batch_id)
                self.log.info("%s", progress_line(batch_id, summary))
                break
        return cancelled

    def _timeout_error(self, reason: str, cancel: Sequence[str] | None = None) -> OpenAIBatchTimeoutError:
        """Cancel (if asked) and build the timeout error; ``cancel=None``: Airflow's own sensor timeout."""
        job = self._job
        if job is None:
            return OpenAIBatchTimeoutError(reason)
        message = reason
        if cancel is None:
            live = job.live_batch_ids()
            message = f"Timed out with {len(live)} batch(es) not final: {', '.join(live)} ({reason})"
            cancel = live if self.cancel_on_kill else ()
        if cancel:
            cancelled = self._cancel(job, cancel)
            message += f"; cancel requested for {len(cancelled)} of them"
        return _outcome_error(OpenAIBatchTimeoutError, message, job)

    # -- events ----------------------------------------------------------------------------------

    @staticmethod
    def _validate_event(event: Any) -> tuple[str, Job, str]:
        def reject(reason: str) -> OpenAIBatchEventError:
            return OpenAIBatchEventError(
                f"Malformed event from OpenAIBatchTrigger: {reason}; event={event!r:.500}"
            )

        if not isinstance(event, Mapping):
            raise reject(f"expected a dict, got {type(event).__name__}")
        missing = [key for key in ("status", "batches", "message", "job") if key not in event]
        if missing:
            raise reject(f"missing key(s) {missing}")
        status, batches, message = event["status"], event["batches"], event["message"]
        if status not in EVENT_STATUSES:
            raise reject(f"unknown status {status!r} (expected one of {list(EVENT_STATUSES)})")
        if not isinstance(message, str):
            raise reject("'message' is not a string")
        if not isinstance(batches, Mapping):
            raise reject("'batches' is not a dict")
        if not isinstance(event["job"], Mapping):
            raise reject("'job' is not a dict")
        try:
            job = Job.from_dict(event["job"])
        except ValueError as err:
            raise reject(str(err)) from None
        for batch_id, summary in batches.items():
            if (
                not isinstance(summary, Mapping)
                or summary.get("status") not in _BATCH_STATUSES
                or not isinstance(summary.get("request_counts"), Mapping)
            ):
                raise reject(f"summary of {batch_id} lacks a known status or request_counts")
        unknown = [b for b in batches if job.find(b) is None]
        if unknown:
            raise reject(f"batches {unknown} are not in the job")
        if status == "success" and job.live_batch_ids():
            raise reject(f"'success' but batches {job.live_batch_ids()} are not final")
        return status, job, message


def _outcome_error(cls: type[E], message: str, job: Job) -> E:
    """``cls`` with the message followed by each batch's status and errors."""
    batches = {a.batch_id: dict(a.summary) for _, a in job.attempts() if a.batch_id and a.summary}
    details = []
    for batch_id, summary in batches.items():
        errors = describe_batch_errors(summary)
        details.append(f"{batch_id}: {summary['status']}" + (f" ({errors})" if errors else ""))
    return cls(message + (". Batches: " + "; ".join(details) if details else ""), batches)


def _try_number(context: Context) -> int:
    return int(getattr(context["ti"], "try_number", 0) or 0)
