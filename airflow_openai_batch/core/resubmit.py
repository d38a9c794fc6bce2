"""What is made again, and how it is found again (no Airflow import).

Two things are resubmitted by the sensor: a chunk whose batch failed on the enqueued-token limit (or
whose create call was refused for it) is re-created from the same input file; and the request lines of a
final batch that failed for a retryable reason (expired, rate limited, server errors) are uploaded as a
new batch, a retry round. This module holds the plain-data side: recognising capacity errors, the retry
policy, the record sink that picks the retryable request lines out of a batch's results, the metadata
that marks a follow-up batch, and adopting follow-ups an earlier try already made.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_openai_batch.core.job import Attempt, Chunk, Job, Reason
from airflow_openai_batch.core.records import FailureColumns
from airflow_openai_batch.core.writers import RecordSink
from airflow_openai_batch.limits import MAX_METADATA_PAIRS

__all__ = [
    "CAPACITY_ERROR_CODES",
    "DEFAULT_RETRY_ERROR_CODES",
    "METADATA_ATTEMPT",
    "METADATA_FOLLOWS",
    "METADATA_KEY",
    "FoundBatch",
    "RetryLines",
    "RetryPolicy",
    "adopt_follow_ups",
    "capacity_error_code",
    "follow_up_metadata",
    "is_capacity_error",
    "is_capacity_failure",
    "may_have_follow_up",
    "refused_for_capacity",
]

#: Error codes (batch ``errors`` or a refused create call) that mean "no capacity yet, try later".
CAPACITY_ERROR_CODES = frozenset({"token_limit_exceeded", "request_limit_exceeded"})
#: The submit task's idempotency key of a chunk (a retried submit reuses a batch carrying it).
METADATA_KEY = "aob_key"
#: On a batch the sensor made: the batch it follows (the one it re-creates, or whose failures it retries).
METADATA_FOLLOWS = "aob_follows"
#: On a batch the sensor made: its attempt number (1 = the requests as submitted, +1 per retry round).
METADATA_ATTEMPT = "aob_attempt"
_CHAIN_KEYS = (METADATA_FOLLOWS, METADATA_ATTEMPT)

#: Failures worth another round: they come from the provider's side, not from the request. A status
#: code matches the line's HTTP status, a text the line's ``error_code``.
DEFAULT_RETRY_ERROR_CODES: tuple[str | int, ...] = (
    "batch_expired",
    "rate_limit_exceeded",
    "server_error",
    "timeout",
    429,
    500,
    502,
    503,
    504,
)
#: 4xx statuses that are about load, not about the request.
_RETRYABLE_4XX = frozenset({408, 429})


def is_capacity_error(code: Any, message: Any = "") -> bool:
    """True for an enqueued token (or request) limit error, whatever field carries it."""
    if isinstance(code, str) and code in CAPACITY_ERROR_CODES:
        return True
    text = str(message or "").lower()
    return "enqueued" in text and "limit" in text


def refused_for_capacity(err: BaseException) -> bool:
    """True for an API error refusing a create call for an enqueued token (or request) limit."""
    import openai

    return isinstance(err, openai.APIError) and is_capacity_error(err.code, err.message)


def capacity_error_code(summary: Mapping[str, Any]) -> str | None:
    """The code (``token_limit_exceeded``, ``request_limit_exceeded``) of a batch that ended ``failed``
    only because an enqueued limit was reached; ``None`` for any other summary."""
    if summary.get("status") != "failed":
        return None
    for error in summary.get("errors") or ():
        if is_capacity_error(error.get("code"), error.get("message")):
            return str(error.get("code") or "enqueued_limit_reached")
    return None


def is_capacity_failure(summary: Mapping[str, Any]) -> bool:
    """A batch summary that ended ``failed`` only because the enqueued limit was reached."""
    return capacity_error_code(summary) is not None


# -- retry rounds --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Which failed request lines a retry round resubmits.

    :param codes: ``error_code`` values that are retried.
    :param statuses: HTTP status codes of failed lines that are retried.
    """

    codes: frozenset[str]
    statuses: frozenset[int]

    @classmethod
    def of(cls, retry_error_codes: Iterable[str | int] | None) -> RetryPolicy:
        """The policy of the sensor's ``retry_error_codes`` (``None``: :data:`DEFAULT_RETRY_ERROR_CODES`).

        :raises ValueError: a 4xx status other than 408/429 (the request itself is at fault: it would
            fail again), or something that is neither a code nor a status.
        """
        if retry_error_codes is None:
            retry_error_codes = DEFAULT_RETRY_ERROR_CODES
        elif isinstance(retry_error_codes, (str, int)):
            retry_error_codes = (retry_error_codes,)
        codes: set[str] = set()
        statuses: set[int] = set()
        for item in retry_error_codes:
            if isinstance(item, str) and item.strip().isdigit():
                item = int(item.strip())  # "500" from a template
            if isinstance(item, bool) or not isinstance(item, (str, int)) or item == "":
                raise ValueError(
                    f"retry_error_codes holds {item!r}: give error codes (str) or HTTP statuses (int)"
                )
            if isinstance(item, str):
                codes.add(item.strip())
            elif 400 <= item < 500 and item not in _RETRYABLE_4XX:
                raise ValueError(
                    f"retry_error_codes holds HTTP {item}: a 4xx line (other than 408/429) is refused for "
                    "the request itself and would fail again"
                )
            else:
                statuses.add(item)
        return cls(frozenset(codes), frozenset(statuses))

    def retryable(self, status_code: int | None, error_code: str | None) -> bool:
        """Whether a failed line with this HTTP status (``None``: not an HTTP failure) and code is retried."""
        if status_code is not None and 400 <= status_code < 500 and status_code not in _RETRYABLE_4XX:
            return False  # never a request the API refused, whatever its code says
        return error_code in self.codes or status_code in self.statuses

    def describe(self) -> str:
        return ", ".join([*sorted(self.codes), *(f"HTTP {s}" for s in sorted(self.statuses))])


class RetryLines(RecordSink):
    """A record sink that writes the request lines of retryable failures to ``path``, byte for byte as
    the input file holds them (the records come from the one record builder, through the Reconciler).

    :param path: the file to write (a valid batch input: one request per line).
    :param policy: which failures are retried.
    """

    def __init__(self, path: Path, policy: RetryPolicy) -> None:
        self.path = Path(path)
        self.policy = policy
        #: Lines written, by error code (what the round retries, and why).
        self.retried_by_code: Counter[str] = Counter()
        #: Failures left as they are, by error code.
        self.kept_by_code: Counter[str] = Counter()
        self._file = self.path.open("wb")

    @property
    def retried(self) -> int:
        return sum(self.retried_by_code.values())

    #: The request line is written as it is: parsed bodies and requests are not needed.
    takes_raw_json = True

    def write_success(self, record: dict[str, Any]) -> None:
        pass

    def write_failure(self, record: dict[str, Any], request_line: bytes) -> None:
        if self._retries(record.get("status_code"), str(record.get("error_code"))):
            self._file.write(request_line)
            self._file.write(b"\n")

    def write_failures(self, failures: FailureColumns) -> None:
        columns = failures.columns
        retried = [
            line
            for code, status_code, line in zip(
                map(str, columns["error_code"]), columns["status_code"], failures.request_lines, strict=True
            )
            if self._retries(status_code, code)
        ]
        if retried:
            self._file.write(b"\n".join([*retried, b""]))

    def _retries(self, status_code: int | None, code: str) -> bool:
        """Whether a failure is retried, counted under its code either way."""
        if self.policy.retryable(status_code, code):
            self.retried_by_code[code] += 1
            return True
        self.kept_by_code[code] += 1
        return False

    def close(self) -> None:
        self._file.close()


# -- follow-up batches ---------------------------------------------------------------------------


def follow_up_metadata(
    base: Mapping[str, str], *, follows: str | None, number: int, retry: bool
) -> tuple[dict[str, str], list[str]]:
    """The metadata of a batch the sensor makes, and the user keys dropped to fit OpenAI's 16 pairs.

    :param base: the metadata of the batch it follows (or of the refused create).
    :param follows: the batch it re-creates or retries (``None`` for a chunk never created).
    :param number: its attempt number.
    :param retry: a retry round holds only some of the chunk's requests, so it must not carry the
        chunk's idempotency key (a retried submit would take it for the whole chunk).
    """
    drop = (*_CHAIN_KEYS, METADATA_KEY) if retry else _CHAIN_KEYS
    metadata = {k: v for k, v in base.items() if k not in drop}
    chain = {METADATA_ATTEMPT: str(number)}
    if follows is not None:
        chain[METADATA_FOLLOWS] = follows
    dropped: list[str] = []
    # Batches made by the submit operator keep room for these keys; foreign ones may not: their last
    # user keys give way.
    while len(metadata) + len(chain) > MAX_METADATA_PAIRS:
        dropped.append(metadata.popitem()[0])
    return {**metadata, **chain}, dropped


@dataclass(frozen=True)
class FoundBatch:
    """A batch found at the API that may be a follow-up of the job's.

    :param batch_id: its id.
    :param input_file_id: its input file.
    :param metadata: its metadata.
    :param created_at: unix seconds.
    :param total: its request count, when known.
    """

    batch_id: str
    input_file_id: str
    metadata: Mapping[str, str]
    created_at: int
    total: int | None = None


def may_have_follow_up(chunk: Chunk) -> bool:
    """Whether the chunk's current attempt is one the sensor makes a follow-up for: a create that was
    refused, or a final batch that failed or holds failed requests."""
    current = chunk.current
    if not current.created:
        return True
    summary = current.summary
    if summary is None or not current.final:
        return False
    return summary["status"] in ("failed", "expired") or summary["request_counts"]["failed"] > 0


def adopt_follow_ups(job: Job, found: Iterable[FoundBatch]) -> list[str]:
    """Add to each chunk the follow-up batches an earlier try made but did not record.

    A chunk whose current batch is final (or whose create was refused) may have a follow-up at the API:
    made by a try that crashed, or was killed, before recording it. Following the ``aob_follows`` links
    (and, for a chunk never created, its ``aob_key``) finds it, so nothing is made twice.

    :return: one line per adopted batch, for the log.
    """
    by_follows: dict[str, list[FoundBatch]] = {}
    by_key: dict[str, list[FoundBatch]] = {}
    for batch in sorted(found, key=lambda b: b.created_at):
        follows = batch.metadata.get(METADATA_FOLLOWS)
        if follows:
            by_follows.setdefault(follows, []).append(batch)
        elif batch.metadata.get(METADATA_KEY):
            by_key.setdefault(batch.metadata[METADATA_KEY], []).append(batch)
    known = {a.batch_id for _, a in job.attempts() if a.batch_id is not None}
    notes: list[str] = []
    for chunk in job.chunks:
        while chunk.current.final or not chunk.current.created:
            follows = chunk.last_batch_id
            if follows is not None:
                candidates = by_follows.get(follows, [])
            else:
                candidates = by_key.get(chunk.key, []) if chunk.key else []
            batch = next((b for b in candidates if b.batch_id not in known), None)
            if batch is None:
                break
            followed = (
                chunk.current if follows is None else next(a for a in chunk.attempts if a.batch_id == follows)
            )
            number = _attempt_number(batch.metadata, followed.number)
            retry = number > followed.number
            reason: Reason = "retry" if retry else "capacity"
            if retry:
                followed.retried = batch.total if batch.total is not None else followed.retried
            chunk.attempts.append(
                Attempt(
                    number=number,
                    reason=reason,
                    batch_id=batch.batch_id,
                    input_file_id=batch.input_file_id,
                    retry_of=follows if retry else followed.retry_of,
                )
            )
            known.add(batch.batch_id)
            what = f"retry round of {follows}" if retry else f"re-creation of {follows or 'a refused chunk'}"
            notes.append(
                f"following batch {batch.batch_id} ({what}, attempt {number}) made by an earlier try"
            )
    return notes


def _attempt_number(metadata: Mapping[str, str], default: int) -> int:
    try:
        return max(1, int(metadata.get(METADATA_ATTEMPT, default)))
    except ValueError:
        return default
