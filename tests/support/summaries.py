"""Batch summaries as the sensor and trigger make them (``core/progress.batch_summary``), for tests that
script what a poll saw."""

from __future__ import annotations

from typing import Any


def summary(
    status: str, completed: int = 0, failed: int = 0, total: int = 10, **extra: Any
) -> dict[str, Any]:
    """A batch summary: ``completed`` successes and ``failed`` failures of ``total`` requests."""
    return {
        "status": status,
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "output_file_id": "file-out" if completed else None,
        "error_file_id": "file-err" if failed else None,
        "replaces": [],
        "model": "gpt-4o-mini",
        **extra,
    }
