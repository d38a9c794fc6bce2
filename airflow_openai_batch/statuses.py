"""The one status vocabulary for batches (no Airflow import)."""

from __future__ import annotations

from enum import Enum


class BatchStatus(str, Enum):
    """A batch's ``status`` as the API reports it."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


#: No further change will happen. ``cancelling`` is deliberately absent: it can take ~10 minutes.
FINAL_STATUSES: frozenset[str] = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)

#: Still consuming (or about to consume) capacity at OpenAI.
LIVE_STATUSES: frozenset[str] = frozenset(
    {BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING}
)

#: A batch in one of these can be reused by a retried submit instead of creating a new one.
REUSABLE_STATUSES: frozenset[str] = LIVE_STATUSES | {BatchStatus.COMPLETED}

#: Default final statuses that fail the sensor.
DEFAULT_FAIL_ON_STATUSES: tuple[str, ...] = (BatchStatus.FAILED.value, BatchStatus.CANCELLED.value)


def is_final(status: str) -> bool:
    return status in FINAL_STATUSES
