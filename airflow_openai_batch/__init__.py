"""Apache Airflow 3 provider for the OpenAI Batch API.

Public classes are importable from here lazily, so ``import airflow_openai_batch`` (done by Airflow's
providers manager at start-up) stays cheap and imports neither Airflow nor the openai SDK.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from airflow_openai_batch.get_provider_info import get_provider_info

if TYPE_CHECKING:
    from airflow_openai_batch.exceptions import OpenAIBatchInputError
    from airflow_openai_batch.hooks.batch import OpenAIBatchHook
    from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
    from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
    from airflow_openai_batch.sensors.batch import OpenAIBatchSensor
    from airflow_openai_batch.triggers.batch import OpenAIBatchTrigger
    from airflow_openai_batch.version import __version__

# Lazy as well: the version is read from the installed metadata (tens of milliseconds), which a helper
# process importing one core module must not pay for.
_LAZY = {
    "__version__": "airflow_openai_batch.version",
    "OpenAIBatchHook": "airflow_openai_batch.hooks.batch",
    "OpenAIBatchSubmitOperator": "airflow_openai_batch.operators.submit",
    "OpenAIBatchSensor": "airflow_openai_batch.sensors.batch",
    "OpenAIBatchTrigger": "airflow_openai_batch.triggers.batch",
    "OpenAIBatchCollectOperator": "airflow_openai_batch.operators.collect",
    "OpenAIBatchInputError": "airflow_openai_batch.exceptions",
}

__all__ = [
    "OpenAIBatchCollectOperator",
    "OpenAIBatchHook",
    "OpenAIBatchInputError",
    "OpenAIBatchSensor",
    "OpenAIBatchSubmitOperator",
    "OpenAIBatchTrigger",
    "__version__",
    "get_provider_info",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
