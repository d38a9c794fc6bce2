"""The Batch object's own ``model`` and ``usage`` (reported by OpenAI for batches created since
September 2025), flattened for the sensor's summary and its progress line. Plain Python, no Airflow."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["batch_usage", "describe_tokens"]


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def batch_usage(batch: Mapping[str, Any]) -> dict[str, int] | None:
    """A batch's token usage so far, or ``None`` when the API reports none (older batches, Azure).

    :param batch: the Batch as a mapping (``openai.types.Batch.model_dump()``).
    :return: ``{"input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
        "total_tokens"}``; the same names as collect's usage (reasoning tokens are part of output).
    """
    usage = batch.get("usage")
    if not isinstance(usage, Mapping):
        return None
    return {
        "input_tokens": _int(usage.get("input_tokens")),
        "cached_input_tokens": _int(_mapping(usage.get("input_tokens_details")).get("cached_tokens")),
        "output_tokens": _int(usage.get("output_tokens")),
        "reasoning_tokens": _int(_mapping(usage.get("output_tokens_details")).get("reasoning_tokens")),
        "total_tokens": _int(usage.get("total_tokens")),
    }


def describe_tokens(usage: Mapping[str, int] | None) -> str:
    """``1,234,567 tokens so far (1,000,000 in, 200,000 cached; 234,567 out)`` for a progress line,
    or ``""`` when nothing is reported yet."""
    if not usage or not usage.get("total_tokens"):
        return ""
    text = f"{usage['total_tokens']:,} tokens so far ({usage['input_tokens']:,} in"
    if usage.get("cached_input_tokens"):
        text += f", {usage['cached_input_tokens']:,} cached"
    text += f"; {usage['output_tokens']:,} out"
    if usage.get("reasoning_tokens"):
        text += f", {usage['reasoning_tokens']:,} reasoning"
    return text + ")"
