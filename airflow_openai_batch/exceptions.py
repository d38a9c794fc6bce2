"""Exceptions raised by airflow-openai-batch (no Airflow import, so the core modules can raise them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class OpenAIBatchError(Exception):
    """Base class of every error this package raises on purpose."""


@dataclass(frozen=True)
class InputProblem:
    """One problem found in the submitted requests.

    :param line: 1-based line number in the input (or list index + 1, or table row number), or ``None``
        for the whole input.
    :param field: the field at fault (``custom_id``, ``body.model``, a table column...), or ``None``.
    :param reason: what is wrong, in plain words.
    :param unit: what ``line`` counts: ``"line"``, or ``"row"`` for a table input.
    """

    line: int | None
    field: str | None
    reason: str
    unit: str = "line"

    def __str__(self) -> str:
        where = f"{self.unit} {self.line}" if self.line is not None else "input"
        if self.field:
            where += f", {self.field}"
        return f"{where}: {self.reason}"


class OpenAIBatchInputError(OpenAIBatchError, ValueError):
    """The requests cannot be submitted. Raised before anything is uploaded.

    :param problems: the problems found, at most the reporting cap.
    :param total: how many problems there were in all (may exceed ``len(problems)``).
    """

    def __init__(self, problems: Sequence[InputProblem], total: int | None = None) -> None:
        self.problems = list(problems)
        self.total = total if total is not None else len(self.problems)
        shown = "\n".join(f"  - {p}" for p in self.problems)
        more = self.total - len(self.problems)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        noun = "problem" if self.total == 1 else "problems"
        super().__init__(f"Invalid batch input ({self.total} {noun}); nothing was uploaded:\n{shown}{tail}")


class OpenAIBatchOutcomeError(OpenAIBatchError):
    """Batches ended in a way the task was told to treat as failure.

    :param message: the explanation.
    :param batches: ``{batch_id: summary}`` of the batches concerned.
    """

    def __init__(self, message: str, batches: Mapping[str, Any] | None = None) -> None:
        self.batches = dict(batches or {})
        super().__init__(message)


class OpenAIBatchFailedError(OpenAIBatchOutcomeError):
    """One or more batches ended ``failed``."""


class OpenAIBatchCancelledError(OpenAIBatchOutcomeError):
    """One or more batches ended ``cancelled``."""


class OpenAIBatchTimeoutError(OpenAIBatchOutcomeError):
    """The deadline passed before every batch was final (the batches were cancelled if asked)."""


class OpenAIBatchPollingError(OpenAIBatchOutcomeError):
    """The API kept failing while polling, beyond the fault budget."""


class OpenAIBatchFailureRatioError(OpenAIBatchOutcomeError):
    """The collected failure ratio is above ``fail_on_failure_ratio`` (results were written first)."""


class OpenAIBatchEventError(OpenAIBatchError, ValueError):
    """A trigger event the sensor does not understand (missing keys, unknown status, wrong ids)."""


class OpenAIBatchJoinError(OpenAIBatchError):
    """The answers cannot be joined back to the input table (e.g. it changed since submit)."""


class OpenAIBatchXComLimitError(OpenAIBatchError):
    """Too many records to return through XCom; set ``output_uri``."""


class OpenAIBatchBudgetError(OpenAIBatchError):
    """The cost estimate is above ``max_cost_usd`` / ``max_cost_usd_expected``. Raised before anything is
    uploaded.

    :param message: the estimate, the cap and the chunks or lines that weigh most.
    :param estimate: the estimate as pushed to XCom (``cost_estimate``), for a caller that wants the figures.
    """

    def __init__(self, message: str, estimate: Mapping[str, Any] | None = None) -> None:
        self.estimate = dict(estimate or {})
        super().__init__(message)
