"""Batch summaries, progress lines, the adaptive polling schedule and API fault classification.

Plain Python (no Airflow import): the sensor's poke path and the trigger share every function here, so
a summary, a progress line or an outcome decision is computed in exactly one place.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from airflow_openai_batch.core.batch_usage import batch_usage, describe_tokens
from airflow_openai_batch.exceptions import (
    OpenAIBatchCancelledError,
    OpenAIBatchFailedError,
    OpenAIBatchOutcomeError,
)
from airflow_openai_batch.statuses import BatchStatus, is_final

__all__ = [
    "MAX_ERRORS_IN_SUMMARY",
    "NEAR_DONE_FRACTION",
    "AdaptivePollSchedule",
    "align_to_grid",
    "backoff_delay",
    "batch_summary",
    "check_outcome",
    "classify_api_error",
    "describe_api_error",
    "describe_batch_errors",
    "format_duration",
    "processed_fraction",
    "progress_line",
    "retry_after_seconds",
]

#: Validation errors can name thousands of lines; XCom must stay small, so a summary keeps the first few.
MAX_ERRORS_IN_SUMMARY = 20
#: Above this share of processed requests a batch counts as "close to done" and is polled tightly.
NEAR_DONE_FRACTION = 0.9

ErrorKind = Literal["transient", "fatal"]


# -- summaries -----------------------------------------------------------------------------------


def _as_mapping(batch: Any) -> Mapping[str, Any]:
    import openai

    if isinstance(batch, Mapping):
        return batch
    if isinstance(batch, openai.BaseModel):  # a Batch, or a part of one (request_counts, an error)
        return batch.model_dump()
    raise TypeError(f"expected an openai Batch or a mapping, got {type(batch).__name__}")


def _count(value: Any) -> int:
    # Azure reports request_counts fields as null while a batch validates.
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _file_id(value: Any) -> str | None:
    # Azure reports "" instead of null for a missing file.
    return value or None


def batch_summary(batch: Any, *, replaces: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON-safe, XCom-sized summary of one batch.

    :param batch: an ``openai.types.Batch`` or its ``model_dump()``.
    :param replaces: ids of earlier batches this one replaces (re-created after a limit error).
    :return: ``{"status", "request_counts": {"total", "completed", "failed"}, "output_file_id",
        "error_file_id", "replaces", "model"}`` plus ``"usage"`` (tokens so far, see
        :func:`~airflow_openai_batch.core.batch_usage.batch_usage`) when the API reports it, ``"errors"``
        (the batch's errors, at most :data:`MAX_ERRORS_IN_SUMMARY`, with ``"errors_total"`` when cut) and
        ``"warnings"`` when any.
    """
    data = _as_mapping(batch)
    counts = data.get("request_counts") or {}
    if not isinstance(counts, Mapping):
        counts = _as_mapping(counts)
    summary: dict[str, Any] = {
        "status": str(data.get("status")),
        "request_counts": {
            "total": _count(counts.get("total")),
            "completed": _count(counts.get("completed")),
            "failed": _count(counts.get("failed")),
        },
        "output_file_id": _file_id(data.get("output_file_id")),
        "error_file_id": _file_id(data.get("error_file_id")),
        "replaces": list(replaces),
        "model": data.get("model"),
    }
    usage = batch_usage(data)
    if usage is not None:
        summary["usage"] = usage
    errors_obj = data.get("errors") or {}
    raw_errors = errors_obj.get("data") if isinstance(errors_obj, Mapping) else None
    if raw_errors:
        errors = [
            {key: value for key, value in _as_mapping(err).items() if value is not None} for err in raw_errors
        ]
        summary["errors"] = errors[:MAX_ERRORS_IN_SUMMARY]
        if len(errors) > MAX_ERRORS_IN_SUMMARY:
            summary["errors_total"] = len(errors)
    warnings = _summary_warnings(summary)
    if warnings:
        summary["warnings"] = warnings
    return summary


def _summary_warnings(summary: Mapping[str, Any]) -> list[str]:
    status = summary["status"]
    counts = summary["request_counts"]
    warnings: list[str] = []
    if status == BatchStatus.COMPLETED and counts["completed"] == 0:
        # `completed` is not success: a batch whose every request failed still ends `completed`.
        if counts["total"] > 0 or not summary["output_file_id"]:
            warnings.append(
                f"completed with 0 successful requests ({counts['failed']:,} of {counts['total']:,} failed); "
                f"see error file {summary['error_file_id']}"
            )
    elif status == BatchStatus.EXPIRED:
        warnings.append(
            f"expired after {counts['completed']:,} of {counts['total']:,} requests succeeded; "
            "the rest failed with batch_expired (finished results are collectable and billed)"
        )
    return warnings


def processed_fraction(summary: Mapping[str, Any]) -> float | None:
    """Share of requests processed (succeeded or failed), or ``None`` while the total is unknown."""
    counts = summary["request_counts"]
    total = counts["total"]
    if total <= 0:
        return None
    return min(1.0, (counts["completed"] + counts["failed"]) / total)


def describe_batch_errors(summary: Mapping[str, Any], limit: int = 3) -> str:
    """The first few ``errors`` of a summary as one short string (``code (line n): message``)."""
    parts = []
    for err in (summary.get("errors") or [])[:limit]:
        text = str(err.get("code") or "error")
        if err.get("line") is not None:
            text += f" (line {err['line']})"
        if err.get("message"):
            text += f": {err['message']}"
        parts.append(text)
    more = int(summary.get("errors_total") or len(summary.get("errors") or [])) - len(parts)
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


def format_duration(seconds: float) -> str:
    """``0.05s``, ``42s``, ``7m 05s``, ``3h 20m``: short and readable in a log line."""
    if seconds < 10:
        return f"{seconds:.2f}s".replace(".00s", "s")
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def progress_line(batch_id: str, summary: Mapping[str, Any], *, eta_seconds: float | None = None) -> str:
    """One log line for a batch: ``batch_abc: in_progress 12,345/50,000 (24.7%), 12 failed``.

    The count is of processed requests (succeeded + failed), so a batch reaches 100% however many
    failed. A batch at 100% that is still ``in_progress``/``finalizing`` says its results are being
    written, so a long finalization does not look like a hang.
    """
    status = summary["status"]
    counts = summary["request_counts"]
    total, failed = counts["total"], counts["failed"]
    processed = counts["completed"] + failed
    line = f"{batch_id}: {status}"
    if total > 0:
        line += f" {processed:,}/{total:,} ({100.0 * processed / total:.1f}%)"
        if failed:
            line += f", {failed:,} failed"
    if status == BatchStatus.FAILED and summary.get("errors"):
        line += f": {describe_batch_errors(summary)}"
    if not is_final(status):
        if total > 0 and processed >= total and status != BatchStatus.CANCELLING:
            line += "; all requests processed, results are being written"
        elif status == BatchStatus.FINALIZING:
            line += "; results are being written"
        elif eta_seconds is not None and math.isfinite(eta_seconds):
            line += f", about {format_duration(eta_seconds)} left at the current rate"
        tokens = describe_tokens(summary.get("usage"))
        if tokens:
            line += f"; {tokens}"
    for warning in summary.get("warnings") or ():
        line += f" WARNING: {warning}"
    return line


# -- outcome -------------------------------------------------------------------------------------


def _describe(ids_and_summaries: Iterable[tuple[str, Mapping[str, Any]]]) -> str:
    parts = []
    for batch_id, summary in ids_and_summaries:
        errors = describe_batch_errors(summary)
        parts.append(f"{batch_id} ({errors})" if errors else batch_id)
    return ", ".join(parts)


def check_outcome(summaries: Mapping[str, Mapping[str, Any]], fail_on_statuses: Iterable[str]) -> list[str]:
    """Decide how final batches end the task: raise for a status in ``fail_on_statuses``, else warn.

    :param summaries: ``{batch_id: summary}``; every status must be final.
    :param fail_on_statuses: final statuses that fail the task.
    :return: warnings to log (expired batches, completed batches with no success).
    :raises OpenAIBatchFailedError: a batch ended ``failed`` and ``failed`` fails the task.
    :raises OpenAIBatchCancelledError: likewise for ``cancelled``.
    :raises OpenAIBatchOutcomeError: another final status listed in ``fail_on_statuses`` (e.g. expired).
    """
    fail_on = set(fail_on_statuses)
    not_final = [bid for bid, s in summaries.items() if not is_final(s["status"])]
    if not_final:
        raise ValueError(f"batches are not final yet: {', '.join(not_final)}")
    by_status: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for batch_id, summary in summaries.items():
        by_status.setdefault(summary["status"], []).append((batch_id, summary))
    failing = {status: items for status, items in by_status.items() if status in fail_on}
    if failing:
        described = "; ".join(f"{status}: {_describe(items)}" for status, items in sorted(failing.items()))
        total = sum(len(items) for items in failing.values())
        message = f"{total} of {len(summaries)} batches ended in a failing status ({described})"
        concerned = {bid: dict(s) for items in failing.values() for bid, s in items}
        # The most severe status picks the class, so callers can catch exactly the case they handle.
        if BatchStatus.FAILED in failing:
            raise OpenAIBatchFailedError(message, concerned)
        if BatchStatus.CANCELLED in failing:
            raise OpenAIBatchCancelledError(message, concerned)
        raise OpenAIBatchOutcomeError(message, concerned)
    return [f"{bid}: {warning}" for bid, s in summaries.items() for warning in s.get("warnings") or ()]


# -- polling schedule ----------------------------------------------------------------------------


@dataclass
class _Observation:
    at: float
    processed: int


@dataclass
class AdaptivePollSchedule:
    """Chooses the wait before the next poll from how the batches progress.

    - Starts at ``poll_interval``.
    - While nothing changes (no status or count moved), the interval doubles up to
      ``max_poll_interval``: a batch waiting in OpenAI's queue costs a handful of calls per hour.
    - Once requests are being processed, it projects each batch's completion from its processing
      rate since it was first seen in progress, and waits half the shortest projected time, so the
      interval shrinks as completion nears (within ``[poll_interval, max_poll_interval]``).
    - A batch that is close to done (``finalizing``, fully processed, or past
      :data:`NEAR_DONE_FRACTION` with no rate to project from) is polled every ``poll_interval``.
    - Never waits past the deadline.

    :param poll_interval: the shortest wait, seconds.
    :param max_poll_interval: the longest wait, seconds (a finished batch is seen at most this late).
    """

    poll_interval: float
    max_poll_interval: float
    interval: float = field(init=False)
    _first: dict[str, _Observation] = field(default_factory=dict, init=False, repr=False)
    _last: dict[str, tuple[str, int, int, int]] = field(default_factory=dict, init=False, repr=False)
    _etas: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _near_done: bool = field(default=False, init=False, repr=False)
    _changed: bool = field(default=True, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, got {self.poll_interval}")
        if not self.max_poll_interval >= self.poll_interval:
            raise ValueError(
                f"max_poll_interval ({self.max_poll_interval}) must be >= "
                f"poll_interval ({self.poll_interval})"
            )
        self.interval = self.poll_interval

    def observe(self, summaries: Mapping[str, Mapping[str, Any]], now: float) -> bool:
        """Record one poll (the batches polled, keyed by id); return whether any status or count moved."""
        changed = False
        near_done = False
        for batch_id, summary in summaries.items():
            status = summary["status"]
            counts = summary["request_counts"]
            key = (status, counts["total"], counts["completed"], counts["failed"])
            if self._last.get(batch_id) != key:
                changed = True
                self._last[batch_id] = key
            if status == BatchStatus.IN_PROGRESS and batch_id not in self._first:
                self._first[batch_id] = _Observation(now, counts["completed"] + counts["failed"])
            self._etas.pop(batch_id, None)
            if is_final(status):
                continue
            eta = self.eta(batch_id, summary, now)
            if eta is not None:
                self._etas[batch_id] = eta
            fraction = processed_fraction(summary)
            if (
                status == BatchStatus.FINALIZING
                or (fraction is not None and fraction >= 1.0)
                or (eta is None and fraction is not None and fraction >= NEAR_DONE_FRACTION)
            ):
                near_done = True
        self._changed = changed
        self._near_done = near_done
        return changed

    def last_eta(self, batch_id: str) -> float | None:
        """The projection :meth:`observe` made for a batch not final, if it could make one."""
        return self._etas.get(batch_id)

    def eta(self, batch_id: str, summary: Mapping[str, Any], now: float) -> float | None:
        """Projected seconds until every request of the batch is processed, or ``None`` if unknown."""
        first = self._first.get(batch_id)
        counts = summary["request_counts"]
        if first is None or counts["total"] <= 0 or now <= first.at:
            return None
        processed = counts["completed"] + counts["failed"]
        rate = (processed - first.processed) / (now - first.at)
        if rate <= 0:
            return None
        return max(0.0, (counts["total"] - processed) / rate)

    def next_interval(self, now: float | None = None, deadline: float | None = None) -> float:
        """The wait before the next poll, from what :meth:`observe` recorded last."""
        if self._near_done:
            interval = self.poll_interval
        elif self._etas:
            interval = min(self._etas.values()) / 2
        elif not self._changed:
            interval = self.interval * 2
        else:
            interval = self.interval
        self.interval = min(self.max_poll_interval, max(self.poll_interval, interval))
        if deadline is not None and now is not None:
            return max(0.0, min(self.interval, deadline - now))
        return self.interval


#: The least share of a wait that alignment to the full grid keeps. Below half, so a waiter polled a
#: moment after a half-grid point (the poll took that moment) still moves to the full grid.
GRID_KEEPS = 0.4


def align_to_grid(
    now: float, wait: float, poll_interval: float, max_poll_interval: float
) -> tuple[float, float | None]:
    """Shorten a wait so the next poll falls on a grid in absolute (epoch) time; never lengthen it.

    Waiters that started at different moments then poll at the same instants, so a process that runs
    many of them can serve their polls together (see ``triggers/_poll_board.py``). The grid is
    ``max_poll_interval`` for a wait that long, else ``poll_interval``: the poll is moved back to the last
    grid point before it was due. When that would cut the wait below :data:`GRID_KEEPS` of it, the half
    grid is tried (it always keeps at least half); the next full-length wait then lands on the full grid
    (a waiter on the half grid is half a grid step from it, which the full grid keeps), so a waiter pays
    at most two shortened waits per change of interval and a finished batch is still seen no later than
    the schedule promised.

    :param now: the time the wait starts from, epoch seconds.
    :param wait: the wait the schedule asked for, seconds.
    :param poll_interval: the fine grid, seconds.
    :param max_poll_interval: the coarse grid, seconds.
    :return: ``(wait, grid)``: the aligned wait (``<= wait``) and the grid it is aligned to, or the
        unchanged wait and ``None`` when no grid keeps enough of it.
    """
    if not wait > 0:
        return wait, None
    grid = max_poll_interval if wait >= max_poll_interval else poll_interval
    for step, keeps in ((grid, GRID_KEEPS), (grid / 2, 0.5)):
        shortened = math.floor((now + wait) / step) * step - now
        if shortened >= wait * keeps:
            # min(): floating-point rounding may put the grid point a hair after the due time.
            return min(wait, shortened), step
    return wait, None


# -- API faults ----------------------------------------------------------------------------------

#: Retry-After above this is treated as this: a storm must not park the wait for a day.
MAX_RETRY_AFTER_SECONDS = 3600.0
#: Attempts per cancel call; kept small because Airflow bounds on_kill() (30 s by default).
CANCEL_ATTEMPTS = 3


def classify_api_error(err: BaseException) -> ErrorKind:
    """``transient`` for faults worth retrying (429, 408, 5xx, timeouts, dropped connections), else ``fatal``.

    A 4xx other than 408/429 (bad key, unknown batch id, forbidden) will not fix itself by waiting.
    """
    import openai

    if isinstance(err, (openai.APITimeoutError, openai.APIConnectionError)):
        return "transient"
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        return "transient" if status in (408, 429) or status >= 500 else "fatal"
    return "fatal"


def retry_after_seconds(err: BaseException) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms`` or ``retry-after``), if it said so."""
    import openai

    if not isinstance(err, openai.APIStatusError):
        return None
    headers = err.response.headers
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(header)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            seconds = _http_date_delay(value)
        if seconds is not None and math.isfinite(seconds) and seconds >= 0:
            return min(seconds, MAX_RETRY_AFTER_SECONDS)
    return None


def _http_date_delay(value: str) -> float | None:
    import email.utils
    import time

    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    return email.utils.mktime_tz(parsed) - time.time()


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff: ``base * 2 ** (attempt - 1)`` capped at ``cap`` (``attempt`` counts from 1)."""
    return min(cap, base * (2 ** max(0, min(attempt - 1, 30))))


_KEYLIKE = re.compile(r"(sk-|key[=:]\s*)[A-Za-z0-9_\-]{4,}")


def describe_api_error(err: BaseException) -> str:
    """A short, key-free description of an API error: ``RateLimitError (HTTP 429): message``."""
    import openai

    head = type(err).__name__
    if isinstance(err, openai.APIStatusError):
        head += f" (HTTP {err.status_code})"
    message = err.message if isinstance(err, openai.APIError) else None
    text = _KEYLIKE.sub(r"\1***", str(message or err))
    return f"{head}: {text[:500]}"
