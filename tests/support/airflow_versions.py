"""Airflow names the tests need that moved between 3.0 and the newest release and that the package itself
does not use (those come from ``airflow_openai_batch.compat``). The fast suite runs on the floor release too.
"""

from __future__ import annotations

try:
    from airflow.dag_processing.dagbag import DagBag
except ImportError:  # Airflow 3.0 and 3.1
    from airflow.models.dagbag import DagBag

__all__ = ["DagBag"]
