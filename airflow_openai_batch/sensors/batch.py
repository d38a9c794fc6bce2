"""Sensor that waits for OpenAI batches to be final: deferred (no worker slot) or classic poke/reschedule."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow_openai_batch.compat import AirflowSensorTimeout, BaseSensorOperator, PokeReturnValue
from airflow_openai_batch.core.progress import (
    CANCEL_ATTEMPTS,
    AdaptivePollSchedule,
    batch_summary,
    check_outcome,
    classify_api_error,
    describe_api_error,
    describe_batch_errors,
    format_duration,
    normalize_batch_ids,
    progress_line,
    retry_after_seconds,
)
from airflow_openai_batch.core.resubmit import (
    METADATA_ATTEMPT,
    METADATA_ORIGIN,
    Chain,
    CreateSpec,
    JobState,
    decode_pending,
    encode_pending,
    exhausted_chains,
    idle_backoff,
    is_capacity_error,
    is_capacity_failure,
    may_create,
    waiting_chains,
)
from airflow_openai_batch.exceptions import (
    OpenAIBatchEventError,
    OpenAIBatchFailedError,
    OpenAIBatchPollingError,
    OpenAIBatchTimeoutError,
)
from airflow_openai_batch.hooks.batch import OpenAIBatchHook
from airflow_openai_batch.limits import MAX_METADATA_PAIRS
from airflow_openai_batch.statuses import DEFAULT_FAIL_ON_STATUSES, FINAL_STATUSES, BatchStatus, is_final
from airflow_openai_batch.triggers.batch import EVENT_STATUSES, OpenAIBatchTrigger

if TYPE_CHECKING:
    from airflow_openai_batch.compat import Context

__all__ = ["OpenAIBatchEventError", "OpenAIBatchSensor"]

#: The defer timeout is only a backstop: the trigger ends the wait itself at the deadline (and cancels
#: the batches, which a trigger timeout would not do), so the backstop fires a little later.
_DEFER_TIMEOUT_GRACE = timedelta(minutes=5)
_BATCH_STATUSES = frozenset(s.value for s in BatchStatus)


class OpenAIBatchSensor(BaseSensorOperator):
    """Waits until every OpenAI batch is final; returns ``{batch_id: summary}`` (the XCom).

    Deferrable by default: one :class:`~airflow_openai_batch.triggers.batch.OpenAIBatchTrigger` waits on
    all batches in the triggerer, with adaptive polling, fault tolerance and an absolute deadline.
    With ``deferrable=False`` it pokes (``mode="poke"`` or ``"reschedule"``) with the same outcome rules.

    A summary is ``{"status", "request_counts": {"total", "completed", "failed"}, "output_file_id",
    "error_file_id", "replaces", "model"}`` plus ``"errors"`` and ``"warnings"`` when there are any.

    :param batch_ids: templated; a batch id, a list of ids, or a ``{batch_id: summary}`` dict as this
        sensor returns.
    :param conn_id: the ``openai_batch`` connection.
    :param deferrable: wait in the triggerer (no worker slot); ``False`` = classic poke/reschedule.
    :param poll_interval: shortest wait between polls, seconds; the poke interval when not deferred.
    :param max_poll_interval: longest wait between polls, seconds; the interval stretches toward it
        while batches are far from done.
    :param fail_on_statuses: final statuses that fail the task (``failed``, ``cancelled`` by default).
        ``expired`` is not among them by default: it passes with a warning, its partial results are
        collectable. ``cancelling`` is not final and is refused here.
    :param cancel_on_kill: when the task is killed, cleared, marked, or times out, cancel the batches
        that are not final so nothing more is spent.
    :param max_resubmits: re-creations allowed per chunk whose batch failed with
        ``token_limit_exceeded`` (the enqueued-token limit). Such a batch is re-created from the same
        input file once another batch of the job finishes (or after a backoff when none is running);
        the result is keyed by the final batch ids, each with the ids it ``replaces``.
    :param fault_budget: consecutive transient API faults tolerated on one batch's polls before the
        task fails with :class:`~airflow_openai_batch.exceptions.OpenAIBatchPollingError`.
    :param timeout: seconds (or timedelta) to wait in all before the batches are cancelled (if
        ``cancel_on_kill``) and the task fails with ``OpenAIBatchTimeoutError``.
    """

    template_fields: Sequence[str] = ("batch_ids",)
    template_fields_renderers = {"batch_ids": "json"}
    ui_color = "#d9f2e6"

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
        AdaptivePollSchedule(self.poll_interval, self.max_poll_interval)  # validates the pair
        if isinstance(fail_on_statuses, str):
            fail_on_statuses = (fail_on_statuses,)
        self.fail_on_statuses: tuple[str, ...] = tuple(str(s) for s in fail_on_statuses)
        not_final = [s for s in self.fail_on_statuses if s not in FINAL_STATUSES]
        if not_final:
            raise ValueError(
                f"fail_on_statuses may only hold final statuses {sorted(FINAL_STATUSES)}; got {not_final}"
            )
        self.cancel_on_kill = cancel_on_kill
        if max_resubmits < 0:
            raise ValueError(f"max_resubmits must be >= 0, got {max_resubmits}")
        self.max_resubmits = max_resubmits
        self.fault_budget = fault_budget
        # Poke-mode state; reset per process (reschedule mode starts afresh on every poke).
        self._summaries: dict[str, dict[str, Any]] = {}
        self._faults: dict[str, int] = {}
        self._schedule: AdaptivePollSchedule | None = None
        self._state: JobState | None = None
        self._live_last_poke: list[str] = []

    @cached_property
    def hook(self) -> OpenAIBatchHook:
        # No SDK retries: a transient fault just waits for the next poke (counted against
        # fault_budget), rather than blocking the worker in the SDK's hidden backoff.
        return OpenAIBatchHook(conn_id=self.conn_id, client_overrides={"max_retries": 0})

    def _resolve(self) -> tuple[list[str], dict[str, list[str]]]:
        # After templating, batch_ids is whatever the upstream task pushed; normalise it every time so
        # execute_complete (a fresh operator instance after deferral) sees the same ids.
        return normalize_batch_ids(self.batch_ids)

    # -- execute ---------------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        ids, replaces = self._resolve()
        if not self.deferrable:
            try:
                return super().execute(context)
            except AirflowSensorTimeout as err:
                raise self._timeout_error(ids, str(err)) from err

        started_at = time.time()
        # Absolute and computed once: a restarted triggerer (and every re-deferral after a
        # re-creation) resumes against the same deadline.
        state = JobState.start(ids, replaces, deadline=started_at + self.timeout, started_at=started_at)
        # One cheap look first: a rerun over finished batches should not park in the triggerer.
        summaries = self._poll_once(state.batch_ids, raise_transient=False)
        if self._follow_recreated(state, summaries):
            summaries = self._poll_once(state.batch_ids, raise_transient=False)
        return self._proceed(state, summaries, freed=0)

    def execute_complete(self, context: Context, event: Any = None) -> dict[str, dict[str, Any]]:
        """Turn a trigger event into the task's outcome: the summaries, a distinct error, or (after a
        ``resubmit`` event) re-created batches and another deferral."""
        job = event.get("job") if isinstance(event, Mapping) else None
        if isinstance(job, Mapping):
            state = JobState.from_dict(job)
        else:
            ids, replaces = self._resolve()
            state = JobState.start(ids, replaces, deadline=time.time(), started_at=time.time())
        status, batches, message = self._validate_event(event, state.batch_ids)
        for batch_id, summary in batches.items():
            self.log.info("%s", progress_line(batch_id, summary))
        if status == "error":
            raise OpenAIBatchPollingError(self._explain(message, batches), batches)
        if status == "timeout":
            raise OpenAIBatchTimeoutError(self._explain(message, batches), batches)
        self.log.info("%s", message)
        self._summaries.update(batches)
        if status == "resubmit":
            return self._proceed(state, batches, freed=int(event.get("freed") or 0))
        return self._complete(batches, state)

    def _proceed(
        self, state: JobState, summaries: Mapping[str, dict[str, Any]], *, freed: int
    ) -> dict[str, dict[str, Any]]:
        """Re-create what capacity allows, then finish if everything is final, else defer (again)."""
        summaries = dict(summaries)
        live = [b for b in state.batch_ids if not is_final(summaries.get(b, {}).get("status", ""))]
        waiting = waiting_chains(state, summaries, self.max_resubmits)
        if waiting and (freed or not live):
            # Capacity frees as our batches finish: re-create one chunk per finished batch. With
            # nothing of ours running, the holder is unknown: try them all (extras fail fast).
            chosen = waiting if not live else waiting[:freed]
            state.idle_rounds = state.idle_rounds + 1 if not live else 0
            summaries.update(self._recreate(state, chosen))
            live = [b for b in state.batch_ids if not is_final(summaries.get(b, {}).get("status", ""))]
            waiting = waiting_chains(state, summaries, self.max_resubmits)
        if not live and not waiting:
            return self._complete(summaries, state)
        self._defer(state, summaries)
        raise AssertionError("defer() raises")

    def _defer(self, state: JobState, summaries: Mapping[str, dict[str, Any]]) -> None:
        ids = state.batch_ids
        known_final = {b: dict(summaries[b]) for b in ids if is_final(summaries.get(b, {}).get("status", ""))}
        pending = [c for c in state.pending if may_create(c, self.max_resubmits)]
        self.log.info(
            "Deferring: waiting for %d batch(es)%s until %s at the latest",
            len(ids) - len(known_final),
            f" and capacity for {len(pending)} chunk(s) not created yet" if pending else "",
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(state.deadline)),
        )
        self.defer(
            trigger=OpenAIBatchTrigger(
                batch_ids=ids,
                conn_id=self.conn_id,
                poll_interval=self.poll_interval,
                max_poll_interval=self.max_poll_interval,
                deadline=state.deadline,
                fail_on_statuses=self.fail_on_statuses,
                cancel_on_kill=self.cancel_on_kill,
                fault_budget=self.fault_budget,
                started_at=state.started_at,
                resubmittable=[
                    c.current for c in state.chains if not c.pending and may_create(c, self.max_resubmits)
                ],
                pending_count=len(pending),
                idle_backoff=idle_backoff(state.idle_rounds, self.poll_interval, self.max_poll_interval),
                job=state.to_dict(),
                known_final=known_final,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=max(0.0, state.deadline - time.time())) + _DEFER_TIMEOUT_GRACE,
        )

    # -- enqueued-token limit --------------------------------------------------------------------

    def _recreate(self, state: JobState, chains: Sequence[Chain]) -> dict[str, dict[str, Any]]:
        """(Re-)create the batch of each chain, idempotently (a rerun finds the same attempt again)."""
        existing = self._recreated_batches(cutoff=state.started_at - 3600)
        summaries: dict[str, dict[str, Any]] = {}
        for chain in chains:
            before = chain.current
            attempt = chain.attempts + 1
            spec = self._create_spec(chain)
            metadata = self._chain_metadata(spec.metadata, chain.origin, attempt)
            found = existing.get((chain.origin, str(attempt)))
            if found is not None:
                batch = found
            else:
                try:
                    batch = self.hook.create_batch_reconciled(
                        lookup=(METADATA_ORIGIN, chain.origin),
                        input_file_id=spec.input_file_id,
                        endpoint=spec.endpoint,
                        completion_window=spec.completion_window,
                        metadata=metadata,
                        output_expires_after=spec.output_expires_after,
                        is_reusable=lambda b, a=attempt: (b.metadata or {}).get(METADATA_ATTEMPT) == str(a),
                    )
                except Exception as err:
                    if not is_capacity_error(getattr(err, "code", None), getattr(err, "message", "")):
                        raise
                    chain.advance(encode_pending(spec))
                    self.log.warning(
                        "Chunk %s: create refused again for enqueued-token capacity (attempt %d of %d): %s",
                        chain.origin,
                        attempt,
                        self.max_resubmits,
                        describe_api_error(err),
                    )
                    continue
            chain.advance(batch.id)
            summaries[batch.id] = self._summaries[batch.id] = batch_summary(batch, replaces=chain.replaces)
            self.log.info(
                "Re-created chunk %s as batch %s (attempt %d of %d): %s",
                chain.origin,
                batch.id,
                attempt,
                self.max_resubmits,
                "its create call had been refused for capacity"
                if before.startswith("pending:")
                else f"batch {before} failed with token_limit_exceeded",
            )
        return summaries

    def _create_spec(self, chain: Chain) -> CreateSpec:
        if chain.pending:
            return decode_pending(chain.current)
        batch = self.hook.get_batch(chain.current)
        metadata = {
            k: v for k, v in (batch.metadata or {}).items() if k not in (METADATA_ORIGIN, METADATA_ATTEMPT)
        }
        return CreateSpec(
            input_file_id=batch.input_file_id,
            endpoint=batch.endpoint,
            completion_window=batch.completion_window,
            metadata=metadata,
        )

    def _chain_metadata(self, metadata: Mapping[str, str], origin: str, attempt: int) -> dict[str, str]:
        base = dict(metadata)
        # The chain keys must fit OpenAI's 16 pairs; batches made by the submit operator keep room for
        # them, foreign ones may not: their last user keys give way.
        while len(base) + 2 > MAX_METADATA_PAIRS:
            dropped = base.popitem()
            self.log.warning(
                "Metadata %s dropped from the re-created batch to fit the chain keys", dropped[0]
            )
        return {**base, METADATA_ORIGIN: origin, METADATA_ATTEMPT: str(attempt)}

    def _recreated_batches(self, cutoff: float) -> dict[tuple[str, str], Any]:
        """Batches this sensor re-created, by ``(origin, attempt)`` (one list walk, newest first)."""
        found: dict[tuple[str, str], Any] = {}
        for batch in self.hook.list_batches(created_after=int(cutoff)):
            meta = batch.metadata or {}
            if METADATA_ORIGIN in meta and METADATA_ATTEMPT in meta:
                found.setdefault((meta[METADATA_ORIGIN], meta[METADATA_ATTEMPT]), batch)
        return found

    def _follow_recreated(self, state: JobState, summaries: Mapping[str, dict[str, Any]]) -> bool:
        """On a rerun, move each capacity-limited chain to the newest batch re-created for it earlier.

        :return: whether any chain moved (its new batches need a poll).
        """
        stuck = [c for c in state.chains if c.pending or is_capacity_failure(summaries.get(c.current, {}))]
        if not stuck:
            return False
        existing = self._recreated_batches(cutoff=time.time() - self.timeout - 86400)
        moved = False
        for chain in stuck:
            attempts = sorted(
                (int(attempt), batch)
                for (origin, attempt), batch in existing.items()
                if origin == chain.origin
            )
            for _, batch in attempts:
                chain.advance(batch.id)
                moved = True
            if attempts:
                self.log.info(
                    "Chunk %s: following batch %s re-created by an earlier try (attempt %d)",
                    chain.origin,
                    chain.current,
                    chain.attempts,
                )
        return moved

    # -- poke mode -------------------------------------------------------------------------------

    def poke(self, context: Context) -> PokeReturnValue:
        first_poke = self._state is None
        if self._state is None:
            ids, replaces = self._resolve()
            self._state = JobState.start(ids, replaces, deadline=0.0, started_at=time.time())
        state = self._state
        summaries = self._poll_once(state.batch_ids, raise_transient=True)
        # Reschedule mode starts every poke afresh: the chains are found again from batch metadata.
        if first_poke and self._follow_recreated(state, summaries):
            summaries = self._poll_once(state.batch_ids, raise_transient=True)
        live = [b for b in state.batch_ids if not is_final(summaries.get(b, {}).get("status", ""))]
        waiting = waiting_chains(state, summaries, self.max_resubmits)
        if waiting:
            freed = [
                b
                for b in self._live_last_poke
                if is_final(summaries.get(b, {}).get("status", "")) and not is_capacity_failure(summaries[b])
            ]
            if freed or not live:
                self._recreate(state, waiting if not live else waiting[: len(freed)])
                live = [
                    b for b in state.batch_ids if not is_final(self._summaries.get(b, {}).get("status", ""))
                ]
        self._live_last_poke = live
        if live or waiting_chains(state, self._summaries, self.max_resubmits):
            self.log.info("%d of %d batch(es) not final yet", len(live), len(state.batch_ids))
            return PokeReturnValue(is_done=False)
        return PokeReturnValue(is_done=True, xcom_value=self._complete(self._summaries, state))

    def _poll_once(self, ids: Sequence[str], *, raise_transient: bool) -> dict[str, dict[str, Any]]:
        """Retrieve each batch not known to be final; return the summaries known so far.

        A non-transient API error (bad key, unknown batch) raises at once. A transient one counts
        against ``fault_budget`` when ``raise_transient`` (poke mode), else is left to the trigger.
        """
        if self._schedule is None:
            self._schedule = AdaptivePollSchedule(self.poll_interval, self.max_poll_interval)
        polled: dict[str, dict[str, Any]] = {}
        for batch_id in ids:
            if is_final(self._summaries.get(batch_id, {}).get("status", "")):
                continue
            try:
                batch = self.hook.get_batch(batch_id)
            except Exception as err:
                description = describe_api_error(err)
                if classify_api_error(err) == "fatal":
                    raise OpenAIBatchPollingError(
                        f"Polling batch {batch_id} failed with an error that waiting will not fix: "
                        f"{description}",
                        self._summaries,
                    ) from err
                if not raise_transient:
                    self.log.warning("%s: poll failed (%s); the trigger will retry", batch_id, description)
                    continue
                self._faults[batch_id] = self._faults.get(batch_id, 0) + 1
                if self._faults[batch_id] > self.fault_budget:
                    raise OpenAIBatchPollingError(
                        f"Gave up polling batch {batch_id} after {self._faults[batch_id]} consecutive "
                        f"transient faults (fault_budget={self.fault_budget}); last: {description}",
                        self._summaries,
                    ) from err
                self.log.warning(
                    "%s: poll failed (%s); transient fault %d of %d allowed in a row",
                    batch_id,
                    description,
                    self._faults[batch_id],
                    self.fault_budget,
                )
                continue
            self._faults.pop(batch_id, None)
            polled[batch_id] = self._summaries[batch_id] = batch_summary(batch)
        now = time.time()
        self._schedule.observe(polled, now)
        for batch_id, summary in polled.items():
            eta = self._schedule.eta(batch_id, summary, now)
            self.log.info("%s", progress_line(batch_id, summary, eta_seconds=eta))
        return {b: self._summaries[b] for b in ids if b in self._summaries}

    def _get_next_poke_interval(self, started_at: Any, run_duration: Any, poke_count: int) -> float:
        # Poke mode keeps its schedule in memory, so it adapts like the trigger; reschedule mode starts
        # each poke in a fresh process and keeps the base interval.
        if self._schedule is None or self.reschedule:
            return super()._get_next_poke_interval(started_at, run_duration, poke_count)
        remaining = max(0.0, self.timeout - run_duration())
        interval = min(self._schedule.next_interval(), remaining)
        self.log.info("Next poll in %s", format_duration(interval))
        return interval

    def on_kill(self) -> None:
        """Cancel the batches that are not final (poke/reschedule mode, or a kill during the first look)."""
        if not self.cancel_on_kill:
            return
        if self._state is not None:
            ids = self._state.batch_ids
        else:
            try:
                ids, _ = self._resolve()
            except ValueError:
                return
        self._cancel([b for b in ids if not is_final(self._summaries.get(b, {}).get("status", ""))])

    def _cancel(self, ids: Sequence[str]) -> list[str]:
        cancelled = []
        for batch_id in ids:
            for attempt in range(1, CANCEL_ATTEMPTS + 1):
                try:
                    self._summaries[batch_id] = batch_summary(self.hook.cancel_batch(batch_id))
                except Exception as err:
                    if classify_api_error(err) == "transient" and attempt < CANCEL_ATTEMPTS:
                        # Short waits: on_kill has a bounded time, and a cancel matters more than
                        # politeness to the rate limiter.
                        time.sleep(min(retry_after_seconds(err) or 0.5 * attempt, 5.0))
                        continue
                    # Typically the batch went final meanwhile; keep cancelling the others.
                    self.log.warning("%s: cancel failed: %s", batch_id, describe_api_error(err))
                    break
                cancelled.append(batch_id)
                self.log.info("%s", progress_line(batch_id, self._summaries[batch_id]))
                break
        return cancelled

    def _timeout_error(self, ids: Sequence[str], reason: str) -> OpenAIBatchTimeoutError:
        live = [b for b in ids if not is_final(self._summaries.get(b, {}).get("status", ""))]
        message = f"Timed out with {len(live)} batch(es) not final: {', '.join(live)} ({reason})"
        if self.cancel_on_kill and live:
            cancelled = self._cancel(live)
            message += f"; cancel requested for {len(cancelled)} of them"
        batches = {b: self._summaries[b] for b in ids if b in self._summaries}
        return OpenAIBatchTimeoutError(self._explain(message, batches), batches)

    # -- outcome ---------------------------------------------------------------------------------

    def _complete(
        self, summaries: Mapping[str, Mapping[str, Any]], state: JobState | None = None
    ) -> dict[str, dict[str, Any]]:
        """Apply ``fail_on_statuses`` (raising the distinct errors) and build the XCom result."""
        if state is None:
            ids, replaces = self._resolve()
            state = JobState.start(ids, replaces, deadline=0.0, started_at=0.0)
        stuck = exhausted_chains(state, summaries, self.max_resubmits)
        never_created = [c for c in stuck if c.pending]
        if never_created:
            raise OpenAIBatchFailedError(
                f"{len(never_created)} chunk(s) could not be created within max_resubmits="
                f"{self.max_resubmits} (enqueued-token limit): "
                + ", ".join(
                    f"{c.origin} (file {decode_pending(c.current).input_file_id})" for c in never_created
                ),
                {b: dict(summaries[b]) for b in state.batch_ids if b in summaries},
            )
        for chain in stuck:
            self.log.error(
                "%s: still failed with token_limit_exceeded after %d re-creation(s) (max_resubmits=%d)",
                chain.current,
                chain.attempts,
                self.max_resubmits,
            )
        replaces = state.replaces()
        result = {b: {**summaries[b], "replaces": list(replaces.get(b, []))} for b in state.batch_ids}
        for warning in check_outcome(result, self.fail_on_statuses):
            self.log.warning("%s", warning)
        return result

    @staticmethod
    def _explain(message: str, batches: Mapping[str, Mapping[str, Any]]) -> str:
        details = []
        for batch_id, summary in batches.items():
            errors = describe_batch_errors(summary)
            details.append(f"{batch_id}: {summary['status']}" + (f" ({errors})" if errors else ""))
        return message + (". Batches: " + "; ".join(details) if details else "")

    @staticmethod
    def _validate_event(event: Any, ids: Sequence[str]) -> tuple[str, dict[str, dict[str, Any]], str]:
        def reject(reason: str) -> OpenAIBatchEventError:
            return OpenAIBatchEventError(
                f"Malformed event from OpenAIBatchTrigger: {reason}; event={event!r}"
            )

        if not isinstance(event, Mapping):
            raise reject(f"expected a dict, got {type(event).__name__}")
        missing = [key for key in ("status", "batches", "message") if key not in event]
        if missing:
            raise reject(f"missing key(s) {missing}")
        status, batches, message = event["status"], event["batches"], event["message"]
        if status not in EVENT_STATUSES:
            raise reject(f"unknown status {status!r} (expected one of {list(EVENT_STATUSES)})")
        if not isinstance(message, str):
            raise reject("'message' is not a string")
        if not isinstance(batches, Mapping):
            raise reject("'batches' is not a dict")
        unknown = [b for b in batches if b not in ids]
        if unknown:
            raise reject(f"batches {unknown} were not asked for (waiting for {list(ids)})")
        for batch_id, summary in batches.items():
            if (
                not isinstance(summary, Mapping)
                or summary.get("status") not in _BATCH_STATUSES
                or not isinstance(summary.get("request_counts"), Mapping)
            ):
                raise reject(f"summary of {batch_id} lacks a known status or request_counts")
        if status == "success":
            absent = [b for b in ids if b not in batches]
            not_final = [b for b in batches if not is_final(batches[b]["status"])]
            if absent or not_final:
                raise reject(f"'success' but batches {absent + not_final} are missing or not final")
        return status, {b: dict(s) for b, s in batches.items()}, message
