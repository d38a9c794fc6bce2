"""The job: its chunks, and each chunk's chain of attempts (plain Python, no Airflow import).

A job is what one submit task made: one chunk per batch input file. A chunk's first attempt is the batch
the submit task created (or, when the create call was refused for enqueued-token capacity, the input
file it uploaded, waiting to be created). Later attempts are made by the sensor: a batch re-created
after the enqueued-token limit (reason ``capacity``, same attempt number: the same requests, which never
ran) or a retry round of the previous batch's retryable failed requests (reason ``retry``, the next
attempt number, holding just those request lines).

The job is one typed structure that serializes to a small JSON-safe dict with a ``version`` field. It
travels in the submit task's XCom (key ``job``), the trigger's kwargs and events, and the sensor's task
state; the sensor's XCom (``{batch_id: summary}`` with ``attempt``, ``retry_of`` and ``replaces``) and a
plain list of batch ids read back into it through :func:`read_job`, the one reader collect, the sensor
and the trigger use.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import msgspec

from airflow_openai_batch.statuses import is_final

__all__ = [
    "JOB_VERSION",
    "Attempt",
    "Chunk",
    "CreateSpec",
    "Job",
    "Reason",
    "read_job",
]

#: Version of the serialized form. A newer form is refused with a clear error, never half-read.
JOB_VERSION = 1

#: Why an attempt's batch was made: by the submit task (or given as an id), re-created after the
#: enqueued-token limit, or a retry round of the previous attempt's failed requests.
Reason = Literal["submitted", "capacity", "retry"]


class CreateSpec(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What ``batches.create`` needs for an attempt whose create call was refused (to try again later).

    :param input_file_id: the uploaded input file.
    :param endpoint: the batch endpoint.
    :param completion_window: ``24h``.
    :param metadata: the batch metadata, as it was sent.
    :param output_expires_after: seconds, or ``None``.
    """

    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] = {}
    output_expires_after: int | None = None


class Attempt(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One batch of a chunk (or one create call that was refused).

    :param number: 1 for the chunk's requests as submitted, one more per retry round.
    :param reason: why this batch was made.
    :param batch_id: the batch, or ``None`` when its create call was refused for capacity.
    :param input_file_id: the batch's input file, when known.
    :param retry_of: for a retry round (and its re-creations): the batch whose failures it retries.
    :param status: the batch's status when last seen (``None``: not seen yet).
    :param summary: the batch's latest summary.
    :param retried: requests of this batch's failures resubmitted by a retry round (0: none was
        retryable); ``None`` while no round has looked at them.
    """

    number: int = 1
    reason: Reason = "submitted"
    batch_id: str | None = None
    input_file_id: str | None = None
    retry_of: str | None = None
    status: str | None = None
    summary: dict[str, Any] | None = None
    retried: int | None = None

    @property
    def created(self) -> bool:
        return self.batch_id is not None

    @property
    def final(self) -> bool:
        return self.status is not None and is_final(self.status)

    def see(self, summary: Mapping[str, Any]) -> str | None:
        """Record the batch's latest summary; returns the status seen before (``None``: first sight)."""
        before = self.status
        self.status = str(summary["status"])
        self.summary = summary if isinstance(summary, dict) else dict(summary)
        return before


class Chunk(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One batch input file of the job and its attempts, oldest first.

    :param attempts: never empty; the last one is the chunk's current attempt.
    :param key: the submit task's idempotency key (``aob_key`` metadata), when known.
    :param create: how to create the current attempt when its create call was refused.
    """

    attempts: list[Attempt]
    key: str | None = None
    create: CreateSpec | None = None

    @property
    def current(self) -> Attempt:
        return self.attempts[-1]

    @property
    def recreations(self) -> int:
        """Create calls made after the enqueued-token limit (refused ones included)."""
        return sum(1 for attempt in self.attempts if attempt.reason == "capacity")

    @property
    def last_batch_id(self) -> str | None:
        """The newest batch of the chunk (the one a new attempt follows)."""
        for attempt in reversed(self.attempts):
            if attempt.batch_id is not None:
                return attempt.batch_id
        return None

    def outcome_attempts(self) -> list[Attempt]:
        """The batches that hold answers: every created attempt not replaced by a re-creation.

        An attempt is replaced when a later attempt has the same number (the same requests were
        created again after the enqueued-token limit).
        """
        kept: list[Attempt] = []
        for i, attempt in enumerate(self.attempts):
            replaced = any(later.number == attempt.number for later in self.attempts[i + 1 :])
            if attempt.created and not replaced:
                kept.append(attempt)
        return kept

    def replaced_by(self, attempt: Attempt) -> list[str]:
        """Batch ids of earlier attempts with the same number as ``attempt`` (the ones it replaces)."""
        index = self.attempts.index(attempt)
        return [
            a.batch_id for a in self.attempts[:index] if a.number == attempt.number and a.batch_id is not None
        ]


class Job(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A submit task's chunks and what the sensor has made of them.

    :param chunks: in chunk order.
    :param version: :data:`JOB_VERSION`.
    :param deadline: absolute unix time at which the wait ends (set by the sensor).
    :param started_at: unix time at which the wait began.
    :param capacity_credits: our batches that finished while chunks waited for enqueued-token capacity
        and that no re-creation has used yet (each frees room for one chunk).
    :param idle_since: unix time since which chunks wait for capacity with nothing of the job running.
    :param idle_rounds: re-creation rounds made in a row with nothing of the job running (for backoff).
    """

    chunks: list[Chunk]
    version: int = JOB_VERSION
    deadline: float | None = None
    started_at: float | None = None
    capacity_credits: int = 0
    idle_since: float | None = None
    idle_rounds: int = 0

    # -- building and the wire ------------------------------------------------------------------

    @classmethod
    def of_batches(cls, batch_ids: Iterable[str]) -> Job:
        """One chunk per batch id, each at its first attempt."""
        return cls(chunks=[Chunk(attempts=[Attempt(batch_id=batch_id)]) for batch_id in batch_ids])

    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe form (plain dicts, lists, str, int, float, bool, None); defaults are left out,
        except the version."""
        return {"version": self.version, **msgspec.to_builtins(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        """Read the form :meth:`to_dict` wrote.

        :raises ValueError: a version this package does not know, or a malformed structure.
        """
        version = data.get("version")
        if version != JOB_VERSION:
            raise ValueError(
                f"job state has version {version!r}; this airflow-openai-batch reads version {JOB_VERSION} "
                "(was it written by a newer release?)"
            )
        try:
            job = msgspec.convert(dict(data), cls)
        except msgspec.ValidationError as err:
            raise ValueError(f"job state is malformed: {err}") from None
        empty = [i for i, chunk in enumerate(job.chunks) if not chunk.attempts]
        if empty or not job.chunks:
            raise ValueError("job state is malformed: a job needs chunks, and every chunk an attempt")
        return job

    # -- views ----------------------------------------------------------------------------------

    def attempts(self) -> Iterator[tuple[Chunk, Attempt]]:
        for chunk in self.chunks:
            for attempt in chunk.attempts:
                yield chunk, attempt

    def first_batch_ids(self) -> list[str]:
        """The batches of the chunks' first attempts that were created: what the submit task returns."""
        return [c.attempts[0].batch_id for c in self.chunks if c.attempts[0].batch_id is not None]

    def live_batch_ids(self) -> list[str]:
        """The batches still worth polling: each chunk's current attempt, when created and not final."""
        return [
            chunk.current.batch_id
            for chunk in self.chunks
            if chunk.current.batch_id is not None and not chunk.current.final
        ]

    def find(self, batch_id: str) -> tuple[Chunk, Attempt] | None:
        for chunk in self.chunks:
            for attempt in chunk.attempts:
                if attempt.batch_id == batch_id:
                    return chunk, attempt
        return None

    def outcome(self) -> dict[str, dict[str, Any]]:
        """The sensor's XCom: ``{batch_id: summary}`` of every batch that holds answers, in chunk order.

        Each summary gains ``attempt`` (1 for the first), ``retry_of`` (the batch whose failures it
        retries, or ``None``) and ``replaces`` (earlier batches of the same attempt that failed on the
        enqueued-token limit). Only final batches with a kept summary appear.
        """
        result: dict[str, dict[str, Any]] = {}
        for chunk in self.chunks:
            for attempt in chunk.outcome_attempts():
                if attempt.summary is None or attempt.batch_id is None or not attempt.final:
                    continue
                result[attempt.batch_id] = {
                    **attempt.summary,
                    "replaces": chunk.replaced_by(attempt),
                    "attempt": attempt.number,
                    "retry_of": attempt.retry_of,
                }
        return result


# -- the one reader --------------------------------------------------------------------------------


def read_job(value: Any, *, upstream: Iterable[Any] = ()) -> Job:
    """The job from what an upstream task passed as ``batch_ids``.

    :param value: a :class:`Job` or its dict form (the submit task's XCom ``job``); the sensor's result
        ``{batch_id: summary}`` (its ``attempt`` / ``retry_of`` / ``replaces`` rebuild the chains); a
        list of batch ids (the submit task's ``return_value``); or one batch id.
    :param upstream: job dicts the upstream tasks pushed (XCom ``job``). When ``value`` is a list of ids
        and one of them made exactly those batches, that job is returned: it also knows the chunks whose
        create call was refused, which a list of ids cannot name.
    :raises ValueError: nothing to wait for, or something that is not one of the above (the message
        says what was given).
    """
    if isinstance(value, Job):
        return value
    if isinstance(value, Mapping):
        if "chunks" in value and "version" in value:
            return Job.from_dict(value)
        return _from_outcome(value)
    if isinstance(value, str):
        ids = [_one_id(value)]
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        ids = [_one_id(item) for item in value]
    else:
        raise ValueError(
            "batch_ids must be a batch id, a list of ids, the sensor's result or a job; "
            f"got {type(value).__name__}: {value!r:.200}"
        )
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise ValueError("batch_ids is empty: there is no batch to wait for")
    for candidate in upstream:
        if not isinstance(candidate, Mapping) or "chunks" not in candidate or "version" not in candidate:
            continue  # an XCom "job" of some other task
        job = Job.from_dict(candidate)
        if job.first_batch_ids() == ids:
            return job
    return Job.of_batches(ids)


def _one_id(item: Any) -> str:
    if not isinstance(item, str) or not item.strip():
        raise ValueError(f"batch ids must be non-empty strings; got {item!r:.200}")
    text = item.strip()
    if text[:1] in "[{(" or any(ch in text for ch in " ,'\""):
        # A template rendered to text ("['batch_1', 'batch_2']"): the list itself is wanted.
        raise ValueError(
            f"batch_ids holds the text {text!r:.200}, not batch ids: pass the upstream task's output "
            "(e.g. submit.output) or set render_template_as_native_obj=True on the DAG"
        )
    return text


def _from_outcome(result: Mapping[str, Any]) -> Job:
    """Rebuild the chains of a sensor result: a batch with ``retry_of`` joins the chunk of that batch."""
    links: dict[str, tuple[int, str | None, list[str]]] = {}
    for raw_id, summary in result.items():
        summary = summary if isinstance(summary, Mapping) else {}
        number = int(summary.get("attempt") or 1)
        retry_of = summary.get("retry_of") if number > 1 else None
        replaces = [_one_id(b) for b in summary.get("replaces") or ()]
        links[_one_id(raw_id)] = (number, retry_of if isinstance(retry_of, str) else None, replaces)
    if not links:
        raise ValueError("batch_ids is empty: there is no batch to wait for")

    def root(batch_id: str) -> str:
        seen = {batch_id}
        parent = links[batch_id][1]
        while parent in links and parent not in seen:
            batch_id = parent
            seen.add(batch_id)
            parent = links[batch_id][1]
        return batch_id

    chunks: dict[str, Chunk] = {}
    for batch_id, (number, retry_of, replaces) in links.items():
        chunk = chunks.setdefault(root(batch_id), Chunk(attempts=[]))
        reason: Reason = "retry" if number > 1 else "submitted"
        for replaced in replaces:
            chunk.attempts.append(Attempt(number=number, reason=reason, batch_id=replaced, retry_of=retry_of))
            reason = "capacity"
        chunk.attempts.append(Attempt(number=number, reason=reason, batch_id=batch_id, retry_of=retry_of))
    for chunk in chunks.values():
        chunk.attempts.sort(key=lambda attempt: attempt.number)  # stable: replacements keep their order
    return Job(chunks=list(chunks.values()))
