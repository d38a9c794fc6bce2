"""The price table's former home: :mod:`airflow_openai_batch.core.cost` holds everything about money now.

Kept so that ``from airflow_openai_batch.core.pricing import PriceTable`` goes on working.
"""

from __future__ import annotations

from airflow_openai_batch.core.cost import ModelPrice, PriceTable

__all__ = ["ModelPrice", "PriceTable"]
