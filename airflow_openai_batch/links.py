"""Extra links from a task to its batches in the OpenAI dashboard."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from airflow_openai_batch.compat import BaseOperatorLink, XCom

if TYPE_CHECKING:
    from airflow_openai_batch.compat import BaseOperator, Context, TaskInstanceKey

DASHBOARD_BATCHES_URL = "https://platform.openai.com/batches"
#: XCom key under which a task stores the batch ids its links point at.
LINK_XCOM_KEY = "openai_batch_ids"


def persist_batch_links(context: Context, batch_ids: list[str]) -> None:
    """Store what the links need; call before deferring or returning."""
    context["ti"].xcom_push(key=LINK_XCOM_KEY, value=list(batch_ids))


class _BatchLinkBase(BaseOperatorLink):
    name: ClassVar[str]

    def _batch_ids(self, ti_key: TaskInstanceKey) -> list[str]:
        value: Any = XCom.get_value(key=LINK_XCOM_KEY, ti_key=ti_key)
        return [str(v) for v in value] if isinstance(value, list) else []


class OpenAIBatchLink(_BatchLinkBase):
    """The first (or only) batch of the task in the OpenAI dashboard."""

    name = "OpenAI Batch"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        ids = self._batch_ids(ti_key)
        return f"{DASHBOARD_BATCHES_URL}/{ids[0]}" if ids else ""


class OpenAIBatchesPageLink(_BatchLinkBase):
    """The dashboard's batches page, useful when the task created several batches."""

    name = "OpenAI Batches"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        return DASHBOARD_BATCHES_URL if self._batch_ids(ti_key) else ""
