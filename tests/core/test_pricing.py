"""Batch price table: lookups, snapshot names, overrides, unknown models."""

from __future__ import annotations

import importlib.resources
import json

import pytest

from airflow_openai_batch.core.pricing import ModelPrice, PriceTable

REQUIRED_MODELS = [
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "o3",
    "o4-mini",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
    "omni-moderation-latest",
]


def test_prices_json_is_packaged_complete_and_dated() -> None:
    data = json.loads(
        importlib.resources.files("airflow_openai_batch.core").joinpath("prices.json").read_text("utf-8")
    )
    assert "2026" in data["_note"] and "change" in data["_note"]
    table = PriceTable.load()
    for model in REQUIRED_MODELS:
        price = table.price_for(model)
        assert price is not None, model
        assert price.input >= 0 and price.output >= 0
        if price.cached_input is not None:
            assert price.cached_input <= price.input
    assert table.price_for("omni-moderation-latest") == ModelPrice(0.0, 0.0)
    # Batch = half the synchronous price (gpt-4o: $2.50 / $10.00 per 1M tokens synchronous)
    assert table.price_for("gpt-4o") == ModelPrice(input=1.25, output=5.0, cached_input=0.625)


def test_cost_of_a_known_model_bills_cached_tokens_at_the_cached_price() -> None:
    table = PriceTable.load()
    usage = {
        "gpt-4o-mini": {
            "input_tokens": 2_000_000,
            "output_tokens": 1_000_000,
            "cached_input_tokens": 1_000_000,
        }
    }
    # 1M uncached * 0.075 + 1M cached * 0.0375 + 1M output * 0.30
    assert table.estimate_cost(usage) == pytest.approx(0.075 + 0.0375 + 0.30)
    assert table.estimate_cost({}) == 0.0


def test_dated_snapshot_matches_the_longest_known_prefix() -> None:
    table = PriceTable.load()
    assert table.price_for("gpt-4o-mini-2024-07-18") == table.price_for("gpt-4o-mini")
    assert table.price_for("gpt-4o-2024-08-06") == table.price_for("gpt-4o")
    assert table.price_for("gpt-4.1-nano-2025-04-14") == table.price_for("gpt-4.1-nano")
    assert table.price_for("gpt-3.5-turbo-0125") == table.price_for("gpt-3.5-turbo")
    # an exact entry wins over the prefix (this snapshot had its own, higher price)
    assert table.price_for("gpt-4o-2024-05-13") != table.price_for("gpt-4o")
    # only date suffixes count: another model that shares a prefix is not priced as it
    assert table.price_for("gpt-4o-audio-preview") is None
    assert table.price_for("o3-deep-research") is None
    assert table.price_for("") is None and table.price_for(None) is None


def test_usage_summed_per_snapshot_is_priced() -> None:
    table = PriceTable.load()
    cost = table.estimate_cost(
        {
            "gpt-5-mini-2025-08-07": {"input_tokens": 1_000_000, "output_tokens": 0},
            "text-embedding-3-small": {
                "input_tokens": 1_000_000,
                "output_tokens": 0,
                "total_tokens": 1_000_000,
            },
        }
    )
    assert cost == pytest.approx(0.125 + 0.01)


def test_overrides_add_models_and_change_fields() -> None:
    table = PriceTable.load(
        {
            "my-azure-deployment": {"input": 1.0, "output": 2.0},
            "gpt-4o": {"output": 4.0},  # partial: the rest stays as shipped
        }
    )
    assert table.price_for("my-azure-deployment") == ModelPrice(1.0, 2.0)
    assert table.price_for("gpt-4o") == ModelPrice(input=1.25, output=4.0, cached_input=0.625)
    usage = {
        "my-azure-deployment": {"input_tokens": 500_000, "output_tokens": 500_000, "cached_input_tokens": 100}
    }
    # no cached price: cached tokens are billed as input
    assert table.estimate_cost(usage) == pytest.approx(1.5)
    # the shipped table is untouched
    assert PriceTable.load().price_for("gpt-4o").output == 5.0


def test_bad_override_is_refused() -> None:
    with pytest.raises(ValueError, match="input"):
        PriceTable.load({"new-model": {"output": 1.0}})
    with pytest.raises(ValueError, match="mapping"):
        PriceTable.load({"new-model": 3.0})  # type: ignore[dict-item]


def test_unknown_model_with_usage_makes_the_estimate_none() -> None:
    table = PriceTable.load()
    assert table.estimate_cost({"gpt-4o": {"input_tokens": 10}, "mystery-model": {"input_tokens": 1}}) is None
    # an unknown model with no usage does not spoil the estimate
    assert (
        table.estimate_cost({"gpt-4o": {"input_tokens": 1_000_000}, "mystery-model": {"input_tokens": 0}})
        == 1.25
    )
