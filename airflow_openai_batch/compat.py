"""The one place that knows which Airflow 3.x release is running.

Every Airflow name the package uses is imported here and nowhere else (``tests/test_compat.py``
checks it), so a name that moves between releases is fixed in one line. Where a name moved, it is
taken from ``airflow.providers.common.compat`` (Airflow's own cross-version import table, installed
with every Airflow 3 release) instead of repeating that table here:

- 3.0 has no ``airflow.sdk.BaseHook`` (it is ``airflow.hooks.base.BaseHook``) and no
  ``BaseHook.aget_connection``; 3.0 and 3.1 keep ``AirflowSensorTimeout`` and ``TaskDeferred`` in
  ``airflow.exceptions``; ``mask_secret`` and ``XCom`` moved between SDK modules.
- Features that arrived later are optional here, never assumed: ``task_state_store`` (3.3) is
  ``None`` before 3.3, and a trigger's ``async on_kill`` is called by the triggerer (when a user kills,
  clears or marks the deferred task) from 3.3 on only: older releases just drop the trigger, so a
  deferred wait cannot cancel its batches there when the task is marked failed; its deadline still does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from airflow.providers.common.compat.connection import get_async_connection
from airflow.providers.common.compat.sdk import (
    AirflowSensorTimeout,
    Asset,
    AssetAlias,
    BaseHook,
    BaseOperator,
    BaseOperatorLink,
    BaseSensorOperator,
    ObjectStoragePath,
    PokeReturnValue,
    TaskDeferred,
    XCom,
)
from airflow.triggers.base import BaseTrigger, TriggerEvent

try:
    from airflow.sdk.log import mask_secret
except ImportError:  # Airflow 3.0; common.compat maps this name only from 1.22, which needs Python 3.11
    from airflow.sdk.execution_time.secrets_masker import mask_secret

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

__all__ = [
    "AirflowSensorTimeout",
    "Asset",
    "AssetAlias",
    "BaseHook",
    "BaseOperator",
    "BaseOperatorLink",
    "BaseSensorOperator",
    "BaseTrigger",
    "ObjectStoragePath",
    "PokeReturnValue",
    "TaskDeferred",
    "TaskStateStore",
    "TriggerEvent",
    "XCom",
    "get_async_connection",
    "mask_secret",
    "task_state_store",
]


class TaskStateStore(Protocol):
    """The part of Airflow 3.3's per-task-instance key/value store (``context["task_state_store"]``)
    that the package uses: values that survive the task's retries."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def set(self, key: str, value: Any, *, retention: Any = None) -> None: ...


def task_state_store(context: Context) -> TaskStateStore | None:
    """The task instance's durable store, or ``None`` where Airflow has none (before 3.3).

    :param context: the task's context.
    """
    return context.get("task_state_store")
