"""The record builder's column readers against their one-by-one statements."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st
from msgspec import Raw

from airflow_openai_batch.core.records import usage_columns, usage_fields

_COUNT = st.none() | st.integers(0, 10**6)


@st.composite
def _usage(draw: st.DrawFn) -> Any:
    """A usage object as any endpoint states it (either naming, both, neither; details or not), or none."""
    usage: dict[str, Any] = {}
    for first, second in (("input_tokens", "prompt_tokens"), ("output_tokens", "completion_tokens")):
        for name in draw(st.sampled_from([(first,), (second,), (first, second), ()])):
            usage[name] = draw(_COUNT)
    if draw(st.booleans()):
        usage["total_tokens"] = draw(_COUNT)
    for details, count in (
        ("input_tokens_details", "cached_tokens"),
        ("prompt_tokens_details", "cached_tokens"),
        ("output_tokens_details", "reasoning_tokens"),
        ("completion_tokens_details", "reasoning_tokens"),
    ):
        if draw(st.booleans()):
            usage[details] = draw(st.none() | st.fixed_dictionaries({count: _COUNT}))
    return draw(st.just(usage) | st.none())


@given(st.lists(_usage(), min_size=1, max_size=30))
def test_usage_columns_read_each_usage_as_usage_fields_does(usages: list[Any]) -> None:
    columns = usage_columns([Raw(orjson.dumps(u)) for u in usages])
    assert columns.rows() == [usage_fields(u) for u in usages]
