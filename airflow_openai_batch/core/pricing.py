"""Estimate what a batch job cost from its token usage (no Airflow import, no network).

Prices are data (``prices.json`` next to this module, USD per 1M tokens at Batch API rates) and can be
overridden per model, because they change more often than this package is released.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ModelPrice", "PriceTable"]

_PRICES_FILE = "prices.json"
_PER_TOKENS = 1_000_000

# Snapshot suffixes OpenAI appends to a model name: "-2024-07-18" and the older "-0613" form. Only these
# count as "the same model": a bare prefix match would price "o3-mini" as "o3".
_SNAPSHOT_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


@dataclass(frozen=True)
class ModelPrice:
    """USD per 1M tokens at Batch API rates.

    :param input: uncached input (prompt) tokens.
    :param output: output tokens (reasoning tokens included, as the API counts them).
    :param cached_input: cached input tokens, or ``None`` when the model has no cached price (billed as
        input then).
    """

    input: float
    output: float
    cached_input: float | None = None


def _price_from_mapping(model: str, spec: Mapping[str, Any]) -> ModelPrice:
    try:
        input_price = float(spec["input"])
        output_price = float(spec["output"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"price of {model!r} needs numeric 'input' and 'output' (USD per 1M tokens)"
        ) from exc
    cached = spec.get("cached_input")
    return ModelPrice(input_price, output_price, None if cached is None else float(cached))


def _load_builtin() -> dict[str, Any]:
    try:
        text = importlib.resources.files(__package__).joinpath(_PRICES_FILE).read_text(encoding="utf-8")
    except (ModuleNotFoundError, TypeError, FileNotFoundError):
        # Running from a source tree where the package is not importable as such (e.g. a namespace
        # package on an old Python): the file is right here.
        text = (Path(__file__).parent / _PRICES_FILE).read_text(encoding="utf-8")
    return json.loads(text)


class PriceTable:
    """Batch API prices per model, with snapshot-name matching.

    :param prices: ``{model: ModelPrice}``.
    :param note: where the prices come from and as of when.
    """

    def __init__(self, prices: Mapping[str, ModelPrice], note: str | None = None) -> None:
        self.prices = dict(prices)
        self.note = note

    @classmethod
    def load(cls, overrides: Mapping[str, Mapping[str, float]] | None = None) -> PriceTable:
        """The built-in table, updated with ``overrides``.

        :param overrides: ``{model: {"input": x, "output": y, "cached_input": z}}`` in USD per 1M tokens
            at Batch rates. For a model already in the table the given fields replace its own (so
            ``{"gpt-4o": {"output": 4.0}}`` is enough); a new model needs ``input`` and ``output``.
        :raises ValueError: if an override is not usable.
        """
        data = _load_builtin()
        raw: dict[str, dict[str, Any]] = {m: dict(p) for m, p in data["models"].items()}
        for model, spec in (overrides or {}).items():
            if not isinstance(spec, Mapping):
                raise ValueError(f"price override for {model!r} must be a mapping, not {type(spec).__name__}")
            raw[model] = {**raw.get(model, {}), **spec}
        prices = {model: _price_from_mapping(model, spec) for model, spec in raw.items()}
        return cls(prices, note=data.get("_note"))

    def price_for(self, model: str | None) -> ModelPrice | None:
        """The price of ``model``: an exact name first, then the longest known name it is a dated
        snapshot of (``gpt-4o-mini-2024-07-18`` -> ``gpt-4o-mini``).

        :param model: a model name as the API reports it.
        :return: the price, or ``None`` for an unknown model.
        """
        if not model:
            return None
        price = self.prices.get(model)
        if price is not None:
            return price
        best: str | None = None
        for known in self.prices:
            if (
                model.startswith(known)
                and _SNAPSHOT_SUFFIX.fullmatch(model[len(known) :])
                and (best is None or len(known) > len(best))
            ):
                best = known
        return self.prices[best] if best is not None else None

    def estimate_cost(self, usage_by_model: Mapping[str, Mapping[str, int]]) -> float | None:
        """Estimated USD cost of the usage (e.g. ``ReconcileSummary.usage_by_model``).

        Cached input tokens are part of ``input_tokens``: they are billed at ``cached_input`` and the
        rest at ``input``.

        :param usage_by_model: ``{model: {"input_tokens", "output_tokens", "cached_input_tokens"}}``.
        :return: the cost in USD, or ``None`` if a model that has usage is not in the table (an
            estimate that silently ignores part of the spend would be worse than none).
        """
        cost = 0.0
        for model, usage in usage_by_model.items():
            input_tokens = int(usage.get("input_tokens") or 0)
            output_tokens = int(usage.get("output_tokens") or 0)
            cached = min(int(usage.get("cached_input_tokens") or 0), input_tokens)
            if not input_tokens and not output_tokens:
                continue
            price = self.price_for(model)
            if price is None:
                return None
            cached_price = price.cached_input if price.cached_input is not None else price.input
            cost += (
                (input_tokens - cached) * price.input + cached * cached_price + output_tokens * price.output
            ) / _PER_TOKENS
        return round(cost, 6)
