"""Money: batch prices, prompt-token counts, the estimate and budget at submit, the cost at collect.

Plain Python (no Airflow import, no network). The pieces, in the order a job meets them:

* :class:`PriceTable` -- USD per 1M tokens at Batch API rates (``prices.json`` beside this module, each
  model with the date and the source of its price), overridable per model by a mapping or a JSON file.
* Token counting -- :class:`PromptTokens` counts the prompt of request bodies with a :class:`TokenCounter`:
  :data:`HEURISTIC` (UTF-8 bytes / 4 per text, free) or :func:`exact_counter` (OpenAI's ``o200k_base`` /
  ``cl100k_base`` encodings from the optional ``toktok-rs`` package, whose wheel carries them: nothing is
  downloaded at run time). :func:`encoding_for_model` picks the encoding of a model family.
* :func:`output_cap_reader` -- the output-token upper bound of one request (``max_completion_tokens`` /
  ``max_tokens`` / ``max_output_tokens``, times ``n``), ``None`` when the request sets none.
* :class:`CostEstimator` -> :class:`ChunkTally` per chunk -> :class:`CostEstimate` -- the estimate at
  submit: input tokens, output upper bound (a line without a cap is bounded by the model's
  ``max_output_tokens`` and flagged *unbounded*), cost range min / expected / max, the lines and chunks that
  weigh most. :meth:`CostEstimate.check_budget` raises :class:`OpenAIBatchBudgetError`.
* :meth:`PriceTable.cost_by_model` and :func:`usage_mismatch` -- the cost at collect, from the usage of
  every result line, cross-checked with ``Batch.usage``.

How prompt tokens are counted is a trade of time for accuracy (see :class:`CostEstimator`): by default
one line in :data:`SAMPLE_EVERY` of each chunk is counted and the chunk's bytes are scaled by what those
lines weigh, so the per-line cost of the estimate is reading the output cap; exact counting of every line
is for a budget cap or a user who asks for it.
"""

from __future__ import annotations

import heapq
import importlib.resources
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import orjson

from airflow_openai_batch.exceptions import OpenAIBatchBudgetError

__all__ = [
    "CL100K_BASE",
    "HEURISTIC",
    "IMAGE_PART_TOKENS",
    "MESSAGE_OVERHEAD_TOKENS",
    "O200K_BASE",
    "OUTPUT_CAP_FIELDS",
    "REQUEST_OVERHEAD_TOKENS",
    "SAMPLE_EVERY",
    "ChunkEstimate",
    "ChunkTally",
    "CostEstimate",
    "CostEstimator",
    "ModelPrice",
    "PriceTable",
    "PromptTokens",
    "TokenCounter",
    "cap_summary",
    "encoding_for_model",
    "exact_counter",
    "output_cap_fields",
    "output_cap_of_struct",
    "output_cap_reader",
    "request_token_estimator",
    "token_count_mode",
    "usage_mismatch",
]

_PRICES_FILE = "prices.json"
_PER_TOKENS = 1_000_000

# -- prices ------------------------------------------------------------------------------------------------

# Snapshot suffixes OpenAI appends to a model name: "-2024-07-18" and the older "-0613" form. Only these
# count as "the same model": a bare prefix match would price "o3-mini" as "o3".
_SNAPSHOT_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


@dataclass(frozen=True)
class ModelPrice:
    """USD per 1M tokens at Batch API rates, and the model's output limit.

    :param input: uncached input (prompt) tokens.
    :param output: output tokens (reasoning tokens included, as the API counts them).
    :param cached_input: cached input tokens, or ``None`` when the model has no cached price (billed as
        input then).
    :param max_output_tokens: the most tokens one answer may have (the bound of a request that sets no
        cap), or ``None`` when unknown.
    :param as_of: when the price was last checked (provenance, not compared).
    :param source: where the price comes from (provenance, not compared).
    """

    input: float
    output: float
    cached_input: float | None = None
    max_output_tokens: int | None = None
    as_of: str | None = field(default=None, compare=False)
    source: str | None = field(default=None, compare=False)

    def cost(self, input_tokens: int, output_tokens: int = 0, cached_input_tokens: int = 0) -> float:
        """USD for these tokens (unrounded).

        :param input_tokens: all prompt tokens, cached ones included (as the API reports them).
        :param output_tokens: completion tokens, reasoning included.
        :param cached_input_tokens: the part of ``input_tokens`` read from the prompt cache.
        """
        cached = min(cached_input_tokens, input_tokens)
        cached_price = self.input if self.cached_input is None else self.cached_input
        return (
            (input_tokens - cached) * self.input + cached * cached_price + output_tokens * self.output
        ) / _PER_TOKENS


def _price_from_mapping(model: str, spec: Mapping[str, Any]) -> ModelPrice:
    try:
        input_price = float(spec["input"])
        output_price = float(spec["output"])
        cached = spec.get("cached_input")
        cached_price = None if cached is None else float(cached)
        limit = spec.get("max_output_tokens")
        max_output = None if limit is None else int(limit)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"price of {model!r} needs numeric 'input' and 'output' (USD per 1M tokens), and numeric "
            f"'cached_input' / integer 'max_output_tokens' when given"
        ) from exc
    if min(input_price, output_price, cached_price or 0.0, max_output or 0) < 0:
        raise ValueError(f"price of {model!r} has a negative figure")
    return ModelPrice(
        input_price, output_price, cached_price, max_output, spec.get("as_of"), spec.get("source")
    )


def _load_builtin() -> dict[str, Any]:
    try:
        text = importlib.resources.files(__package__).joinpath(_PRICES_FILE).read_text(encoding="utf-8")
    except (ModuleNotFoundError, TypeError, FileNotFoundError):
        # Running from a source tree where the package is not importable as such: the file is right here.
        text = (Path(__file__).parent / _PRICES_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def _overrides_from_file(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """A JSON file of prices: the shape of ``prices.json`` (``{"models": {...}}``) or ``{model: {...}}``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read prices from {os.fspath(path)!r}: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ValueError(f"prices file {os.fspath(path)!r} must hold a JSON object")
    models = data.get("models", data)
    return {k: v for k, v in models.items() if not k.startswith("_")}


class PriceTable:
    """Batch API prices per model, with snapshot-name matching.

    :param prices: ``{model: ModelPrice}``.
    :param note: where the prices come from and as of when.
    :param as_of: the date of the table.
    """

    def __init__(
        self, prices: Mapping[str, ModelPrice], note: str | None = None, as_of: str | None = None
    ) -> None:
        self.prices = dict(prices)
        self.note = note
        self.as_of = as_of

    @classmethod
    def load(
        cls, overrides: Mapping[str, Mapping[str, Any]] | str | os.PathLike[str] | None = None
    ) -> PriceTable:
        """The built-in table, updated with ``overrides``.

        :param overrides: ``{model: {"input": x, "output": y, "cached_input": z, "max_output_tokens": n}}``
            in USD per 1M tokens at Batch rates, or the path of a JSON file holding such a mapping (or the
            shape of the built-in ``prices.json``). For a model already in the table the given fields
            replace its own (so ``{"gpt-4o": {"output": 4.0}}`` is enough); a new model needs ``input`` and
            ``output``.
        :raises ValueError: if an override is not usable.
        """
        data = _load_builtin()
        raw: dict[str, dict[str, Any]] = {m: dict(p) for m, p in data["models"].items()}
        if isinstance(overrides, (str, os.PathLike)):
            overrides = _overrides_from_file(overrides)
        for model, spec in (overrides or {}).items():
            if not isinstance(spec, Mapping):
                raise ValueError(f"price override for {model!r} must be a mapping, not {type(spec).__name__}")
            raw[model] = {**raw.get(model, {}), **spec}
        prices = {model: _price_from_mapping(model, spec) for model, spec in raw.items()}
        return cls(prices, note=data.get("_note"), as_of=data.get("_as_of"))

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

    def cost_by_model(self, usage_by_model: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, Any]]:
        """The cost of each model's usage, cached input priced apart (the manifest's ``cost_by_model``).

        :param usage_by_model: ``{model: {"input_tokens", "output_tokens", "cached_input_tokens",
            "reasoning_tokens"}}`` as collect sums them; cached tokens are part of ``input_tokens`` and
            reasoning tokens part of ``output_tokens``, as the API reports them.
        :return: ``{model: {"input_usd", "cached_input_usd", "output_usd", "reasoning_usd", "total_usd"}}``,
            rounded to 1e-6 USD; ``reasoning_usd`` is the share of ``output_usd`` spent on reasoning. Every
            figure is ``None`` for a model that is not in the table.
        """
        result: dict[str, dict[str, Any]] = {}
        for model, usage in usage_by_model.items():
            input_tokens = int(usage.get("input_tokens") or 0)
            output_tokens = int(usage.get("output_tokens") or 0)
            cached = min(int(usage.get("cached_input_tokens") or 0), input_tokens)
            reasoning = min(int(usage.get("reasoning_tokens") or 0), output_tokens)
            price = self.price_for(model)
            if price is None:
                result[model] = dict.fromkeys(
                    ("input_usd", "cached_input_usd", "output_usd", "reasoning_usd", "total_usd")
                )
                continue
            uncached_usd = price.cost(input_tokens - cached)
            cached_usd = price.cost(cached, cached_input_tokens=cached)
            output_usd = price.cost(0, output_tokens)
            result[model] = {
                "input_usd": round(uncached_usd, 6),
                "cached_input_usd": round(cached_usd, 6),
                "output_usd": round(output_usd, 6),
                "reasoning_usd": round(price.cost(0, reasoning), 6),
                "total_usd": round(uncached_usd + cached_usd + output_usd, 6),
            }
        return result

    def totals(self, usage_by_model: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
        """Token and cost totals over every model: the Asset event's ``extra`` and the summary's totals.

        :param usage_by_model: as for :meth:`cost_by_model`.
        :return: ``{"input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
            "cost_usd"}``; ``cost_usd`` is ``None`` when a model with usage has no price.
        """
        keys = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens")
        result: dict[str, Any] = {
            key: sum(int(usage.get(key) or 0) for usage in usage_by_model.values()) for key in keys
        }
        result["cost_usd"] = self.estimate_cost(usage_by_model)
        return result

    def estimate_cost(self, usage_by_model: Mapping[str, Mapping[str, int]]) -> float | None:
        """The total USD cost of the usage (the summary's ``estimated_cost_usd``).

        :param usage_by_model: as for :meth:`cost_by_model`.
        :return: the cost in USD, or ``None`` if a model that has usage is not in the table (a total that
            silently ignores part of the spend would be worse than none).
        """
        total = 0.0
        for model, usage in usage_by_model.items():
            if not (usage.get("input_tokens") or usage.get("output_tokens")):
                continue
            price = self.price_for(model)
            if price is None:
                return None
            total += price.cost(
                int(usage.get("input_tokens") or 0),
                int(usage.get("output_tokens") or 0),
                int(usage.get("cached_input_tokens") or 0),
            )
        return round(total, 6)


def usage_mismatch(
    batch_id: str, reported: Mapping[str, int] | None, counted: Mapping[str, int]
) -> str | None:
    """Compare ``Batch.usage`` (what the API billed, for batches created after 2025-09-07) with the sums
    of the batch's result lines.

    :param batch_id: the batch, named in the description.
    :param reported: ``Batch.usage`` flattened by :func:`airflow_openai_batch.core.batch_usage.batch_usage`
        (``input_tokens``, ``cached_input_tokens``, ``output_tokens``, ``reasoning_tokens``), or ``None``
        when the API reports none (then there is nothing to compare).
    :param counted: the lines' sums under the same names; a figure collect did not count is not compared.
    :return: ``None`` when they agree (or ``reported`` is missing), else one sentence to log, naming each
        figure that differs, both values and the difference.
    """
    if not reported:
        return None
    differences = []
    for key in ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens"):
        if key not in reported or key not in counted:
            continue
        billed, mine = int(reported[key] or 0), int(counted[key] or 0)
        if billed != mine:
            differences.append(
                f"{key} {billed:,} reported, {mine:,} in the result lines ({mine - billed:+,})"
            )
    if not differences:
        return None
    return f"Batch {batch_id}: Batch.usage disagrees with the result lines: " + "; ".join(differences)


# -- token counting -----------------------------------------------------------------------------------------

O200K_BASE = "o200k_base"
CL100K_BASE = "cl100k_base"

#: Tokens added per chat message / responses input item: 3 for the message framing (OpenAI's cookbook
#: "How to count tokens with tiktoken") and 1 for the role.
MESSAGE_OVERHEAD_TOKENS = 4
#: Tokens added once per chat-like request (the assistant reply priming).
REQUEST_OVERHEAD_TOKENS = 3
#: Tokens counted for one image part (the "low detail" base cost; high-detail images cost more).
IMAGE_PART_TOKENS = 85

# Model families by encoding, most specific first ("gpt-4o" before "gpt-4"). Every model since gpt-4o
# uses o200k_base, so an unknown name gets it too.
_ENCODING_PREFIXES: tuple[tuple[str, str], ...] = (
    ("gpt-4o", O200K_BASE),
    ("gpt-4.1", O200K_BASE),
    ("gpt-4.5", O200K_BASE),
    ("chatgpt-4o", O200K_BASE),
    ("gpt-4", CL100K_BASE),
    ("gpt-3.5", CL100K_BASE),
    ("gpt-35", CL100K_BASE),
    ("text-embedding-", CL100K_BASE),
)


def encoding_for_model(model: str | None) -> str:
    """The tokenizer encoding of a model family.

    :param model: a model name, snapshot or fine-tune (``ft:gpt-4o-mini:org::id``) included.
    :return: ``cl100k_base`` for gpt-4 / gpt-4-turbo / gpt-3.5 / text-embedding-*, ``o200k_base`` for
        gpt-4o, gpt-4.1, gpt-5, the o-series and any newer or unknown model.
    """
    name = (model or "").removeprefix("ft:")
    for prefix, encoding in _ENCODING_PREFIXES:
        if name.startswith(prefix):
            return encoding
    return O200K_BASE


class TokenCounter(Protocol):
    """Counts the tokens of texts.

    :ivar name: what is counted, for the log (``utf8/4`` or an encoding name).
    :ivar exact: whether the counts are the tokenizer's own.
    """

    name: str
    exact: bool

    def count_texts(self, texts: Sequence[str]) -> list[int]:
        """The tokens of each text, in order."""
        ...

    def total(self, texts: Sequence[str]) -> int:
        """The tokens of all the texts."""
        ...


class _Heuristic:
    """UTF-8 bytes / 4 per text: OpenAI's rule of thumb of ~4 characters per token for English, and for
    other scripts their UTF-8 length, which tracks their token count far better than their characters."""

    name = "utf8/4"
    exact = False

    def count_texts(self, texts: Sequence[str]) -> list[int]:
        # isascii() is O(1) on CPython's strings: only non-ASCII text pays for the encode.
        return [
            ((len(t) if t.isascii() else len(t.encode("utf-8", "surrogatepass"))) + 3) // 4 for t in texts
        ]

    def total(self, texts: Sequence[str]) -> int:
        total = 0
        for t in texts:
            total += ((len(t) if t.isascii() else len(t.encode("utf-8", "surrogatepass"))) + 3) // 4
        return total


#: The free estimate: UTF-8 bytes / 4 per text.
HEURISTIC: TokenCounter = _Heuristic()


class _ExactCounter:
    """OpenAI's encoding, through ``toktok-rs`` (the encodings are compiled into its wheel)."""

    exact = True

    def __init__(self, encoding: str, batch_count: Callable[..., list[int]]) -> None:
        self.name = encoding
        self._batch_count = batch_count

    def count_texts(self, texts: Sequence[str]) -> list[int]:
        # One call per batch of texts: the call itself costs ~12 us, a text ~0.2 us. One thread: a task
        # must not take every core of a shared worker.
        return self._batch_count(list(texts), self.name, threads=1)

    def total(self, texts: Sequence[str]) -> int:
        return sum(self._batch_count(list(texts), self.name, threads=1))


def exact_counter(encoding: str) -> TokenCounter | None:
    """The exact counter of ``encoding``, or ``None`` when the optional ``toktok-rs`` package (extra
    ``[tokens]``) is not installed. Nothing is downloaded: the encodings are inside its wheel.

    :param encoding: ``o200k_base`` or ``cl100k_base`` (see :func:`encoding_for_model`).
    """
    try:
        from toktok import batch_count
    except ImportError:
        return None
    return _ExactCounter(encoding, batch_count)


# One walker per endpoint: it appends the texts of a body's prompt to `texts` and returns the tokens it
# counts without text (framing, images, token-id lists).


def _value_texts(value: Any, texts: list[str]) -> int:
    """A prompt-like value: a str; or a list of str, of token ids (one token each), of token-id lists, or
    of typed parts (``{"type": "text", "text": ...}``, image parts)."""
    if isinstance(value, str):
        texts.append(value)
        return 0
    fixed = 0
    if isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, bool):
                continue
            elif isinstance(item, int):
                fixed += 1
            elif isinstance(item, list):
                fixed += _value_texts(item, texts)
            elif isinstance(item, Mapping):
                text = item.get("text")
                if isinstance(text, str):
                    texts.append(text)
                elif "image_url" in item or item.get("type") in ("image_url", "input_image"):
                    fixed += IMAGE_PART_TOKENS
    return fixed


def _json_texts(body: Mapping[str, Any], keys: Iterable[str], texts: list[str]) -> None:
    """Tool definitions and output schemas are part of the prompt; their JSON text is a fair proxy."""
    for key in keys:
        value = body.get(key)
        if value:
            try:
                texts.append(orjson.dumps(value).decode())
            except TypeError:
                continue


def _chat_texts(body: Mapping[str, Any], texts: list[str]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return REQUEST_OVERHEAD_TOKENS
    fixed = REQUEST_OVERHEAD_TOKENS + MESSAGE_OVERHEAD_TOKENS * len(messages)
    for message in messages:
        if type(message) is not dict and not isinstance(message, Mapping):
            fixed -= MESSAGE_OVERHEAD_TOKENS
            continue
        content = message.get("content")
        if type(content) is str:  # by far the most common shape
            texts.append(content)
        else:
            fixed += _value_texts(content, texts)
        if len(message) > 2:  # more than role and content: a name, tool calls...
            name = message.get("name")
            if isinstance(name, str):
                texts.append(name)
                fixed += 1
            if message.get("tool_calls"):
                _json_texts(message, ("tool_calls",), texts)
    if "tools" in body or "functions" in body or "response_format" in body:
        _json_texts(body, ("tools", "functions", "response_format"), texts)
    return fixed


def _responses_texts(body: Mapping[str, Any], texts: list[str]) -> int:
    fixed = REQUEST_OVERHEAD_TOKENS
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        fixed += MESSAGE_OVERHEAD_TOKENS
        texts.append(instructions)
    items = body.get("input")
    if isinstance(items, str):
        fixed += MESSAGE_OVERHEAD_TOKENS
        texts.append(items)
    elif isinstance(items, list):
        for item in items:
            if isinstance(item, Mapping) and "content" in item:
                fixed += MESSAGE_OVERHEAD_TOKENS + _value_texts(item["content"], texts)
            elif isinstance(item, Mapping):
                # function_call_output and other typed items: their text is what the model reads.
                output = item.get("output") or item.get("arguments")
                if isinstance(output, str):
                    texts.append(output)
                fixed += MESSAGE_OVERHEAD_TOKENS
            else:
                fixed += _value_texts([item], texts)
    if "tools" in body:
        _json_texts(body, ("tools",), texts)
    text_options = body.get("text")
    if isinstance(text_options, Mapping) and "format" in text_options:
        _json_texts(text_options, ("format",), texts)
    return fixed


def _prompt_texts(body: Mapping[str, Any], texts: list[str]) -> int:
    return _value_texts(body.get("prompt"), texts)


def _input_texts(body: Mapping[str, Any], texts: list[str]) -> int:
    return _value_texts(body.get("input"), texts)


_WALKERS: dict[str, Callable[[Mapping[str, Any], list[str]], int]] = {
    "/chat/completions": _chat_texts,
    "/responses": _responses_texts,
    "/completions": _prompt_texts,
    "/embeddings": _input_texts,
    "/moderations": _input_texts,
}


def _endpoint_path(endpoint: str) -> str:
    path = "/" + endpoint.strip().strip("/")
    return path[3:] if path.startswith("/v1/") else path


class PromptTokens:
    """The prompt tokens of request bodies of one endpoint, by one counter.

    Counted per endpoint: chat ``messages`` (string content, text parts, names, tool calls), responses
    ``input`` and ``instructions``, completions ``prompt``, embeddings and moderations ``input`` (token-id
    lists count one token per id); ``tools`` / ``functions`` / ``response_format`` / ``text.format`` by their
    JSON text; :data:`MESSAGE_OVERHEAD_TOKENS` per message and :data:`REQUEST_OVERHEAD_TOKENS` per chat-like
    request; :data:`IMAGE_PART_TOKENS` per image. With an exact counter the texts are counted exactly; the
    framing of schemas and tools is OpenAI's own and stays an approximation.

    :param endpoint: the batch endpoint, with or without ``/v1``. Endpoints without a text prompt model
        (images, videos) count the body's ``prompt``.
    :param counter: :data:`HEURISTIC` or an :func:`exact_counter`.
    """

    def __init__(self, endpoint: str, counter: TokenCounter) -> None:
        self.counter = counter
        self._total = counter.total
        self._walk = _WALKERS.get(_endpoint_path(endpoint), _prompt_texts)

    def count(self, body: Mapping[str, Any]) -> int:
        """The prompt tokens of one body. With an exact counter, prefer :meth:`count_many` (a call costs
        ~12 us on top of the texts)."""
        texts: list[str] = []
        fixed = self._walk(body, texts)
        return fixed + self._total(texts)

    def count_many(self, bodies: Sequence[Mapping[str, Any]]) -> list[int]:
        """The prompt tokens of each body, with one call to the counter for all of them."""
        texts: list[str] = []
        fixed: list[int] = []
        ends: list[int] = []
        walk = self._walk
        for body in bodies:
            fixed.append(walk(body, texts))
            ends.append(len(texts))
        counts = self.counter.count_texts(texts)
        result = []
        start = 0
        for base, end in zip(fixed, ends, strict=True):
            result.append(base + sum(counts[start:end]))
            start = end
        return result


def request_token_estimator(endpoint: str) -> Callable[[Mapping[str, Any]], int]:
    """The free estimate of one body's prompt tokens, for a hot loop (``body -> tokens``); the
    replacement of :func:`airflow_openai_batch.core.tokens.request_token_estimator`.

    :param endpoint: the batch endpoint, with or without ``/v1``.
    """
    return PromptTokens(endpoint, HEURISTIC).count


# -- output caps ------------------------------------------------------------------------------------------

#: What the legacy completions endpoint generates when a request sets no ``max_tokens`` (its default).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def _times(value: Any) -> int:
    """How many answers ``n`` / ``best_of`` ask for (1 unless a valid count above 1)."""
    return value if type(value) is int and value > 1 else 1


# One rule per endpoint, over the values of its OUTPUT_CAP_FIELDS in order (None where a field is absent).


def _chat_cap(max_completion_tokens: Any, max_tokens: Any, n: Any) -> int | None:
    cap = max_tokens if max_completion_tokens is None else max_completion_tokens
    if type(cap) is not int or cap <= 0:
        return None
    return cap if n is None else cap * _times(n)


def _responses_cap(max_output_tokens: Any) -> int | None:
    return max_output_tokens if type(max_output_tokens) is int and max_output_tokens > 0 else None


def _completions_cap(max_tokens: Any, n: Any, best_of: Any) -> int:
    cap = max_tokens if type(max_tokens) is int and max_tokens > 0 else COMPLETIONS_DEFAULT_MAX_TOKENS
    # best_of generates that many completions server-side, and every one is billed.
    return cap * max(_times(n), _times(best_of))


#: The body fields each endpoint's output cap is read from, in the order its rule takes them. A decoder that
#: names only some fields of the body (a msgspec Struct) names these for :func:`output_cap_of_struct`.
OUTPUT_CAP_FIELDS: dict[str, tuple[str, ...]] = {
    "/chat/completions": ("max_completion_tokens", "max_tokens", "n"),
    "/responses": ("max_output_tokens",),
    "/completions": ("max_tokens", "n", "best_of"),
    "/embeddings": (),
    "/moderations": (),
}

# Each rule read from a dict body and from a typed struct that names OUTPUT_CAP_FIELDS: plain attribute
# and key reads (a generic reader through map / attrgetter costs twice as much per line).
_CAP_READERS: dict[str, tuple[Callable[[Mapping[str, Any]], int | None], Callable[[Any], int | None]]] = {
    "/chat/completions": (
        lambda body: _chat_cap(body.get("max_completion_tokens"), body.get("max_tokens"), body.get("n")),
        lambda body: _chat_cap(body.max_completion_tokens, body.max_tokens, body.n),
    ),
    "/responses": (
        lambda body: _responses_cap(body.get("max_output_tokens")),
        lambda body: _responses_cap(body.max_output_tokens),
    ),
    "/completions": (
        lambda body: _completions_cap(body.get("max_tokens"), body.get("n"), body.get("best_of")),
        lambda body: _completions_cap(body.max_tokens, body.n, body.best_of),
    ),
    "/embeddings": (lambda body: 0, lambda body: 0),
    "/moderations": (lambda body: 0, lambda body: 0),
}
#: Endpoints without a token-priced output (images, videos): no cap.
_NO_CAP: tuple[Callable[[Any], None], Callable[[Any], None]] = (lambda body: None, lambda body: None)


def output_cap_fields(endpoint: str) -> tuple[str, ...]:
    """The body fields the output cap of ``endpoint`` is read from (:data:`OUTPUT_CAP_FIELDS`)."""
    return OUTPUT_CAP_FIELDS.get(_endpoint_path(endpoint), ())


def output_cap_reader(endpoint: str) -> Callable[[Mapping[str, Any]], int | None]:
    """The output-token upper bound of one request, for a hot loop (``body -> tokens or None``).

    Chat: ``max_completion_tokens`` (else the older ``max_tokens``) times ``n``; responses:
    ``max_output_tokens``; completions: ``max_tokens`` (the API's default 16 when absent) times
    ``max(n, best_of)``; embeddings and moderations: 0. Reasoning tokens are part of these caps, as the API
    counts them. ``None``: the request sets no cap (unbounded, up to the model's ``max_output_tokens``);
    a cap that is not a positive integer counts as none (the API rejects it; validation says so).

    :param endpoint: the batch endpoint, with or without ``/v1``.
    """
    return _CAP_READERS.get(_endpoint_path(endpoint), _NO_CAP)[0]


def output_cap_of_struct(endpoint: str) -> Callable[[Any], int | None]:
    """:func:`output_cap_reader` for a body decoded into a typed struct whose fields include
    :func:`output_cap_fields` (absent fields decoded as ``None``): the same rule, read by attribute.

    :param endpoint: the batch endpoint, with or without ``/v1``.
    """
    return _CAP_READERS.get(_endpoint_path(endpoint), _NO_CAP)[1]


def cap_summary(caps: Sequence[int | None], first_line: int) -> tuple[int, int, list[int]]:
    """Sum the caps of consecutive lines, for :meth:`ChunkTally.add_summary`.

    :param caps: each line's cap (``None``: it sets none).
    :param first_line: the line number of ``caps[0]``.
    :return: ``(sum of the caps set, lines without a cap, the first KEEP_LINES of their line numbers)``.
    """
    unbounded = caps.count(None)
    if not unbounded:
        return sum(caps), 0, []  # type: ignore[arg-type]
    lines = [first_line + i for i, cap in enumerate(caps) if cap is None][:KEEP_LINES]
    return sum(cap for cap in caps if cap is not None), unbounded, lines


# -- the estimate at submit ---------------------------------------------------------------------------------

#: Default sampling: one line in this many of each chunk (its first line always) is counted.
SAMPLE_EVERY = 32
#: Lines kept per list (unbounded lines, largest lines) in the estimate and the budget error.
KEEP_LINES = 10
#: Lines counted together by an exact counter (one call each; bounds the bodies held meanwhile).
_COUNT_BATCH = 1024
#: A typical answer, for the expected cost of a line: min(its cap, this).
TYPICAL_OUTPUT_TOKENS = 500
#: The same for reasoning models, whose output includes the reasoning tokens.
TYPICAL_REASONING_OUTPUT_TOKENS = 2_000
_REASONING_MODEL = re.compile(r"^(ft:)?(o\d|gpt-5)")


def token_count_mode(
    exact_tokens: bool | None = None,
    max_cost_usd: float | None = None,
    max_cost_usd_expected: float | None = None,
    max_enqueued_tokens: int | None = None,
) -> str:
    """How :class:`CostEstimator` should count prompt tokens for a submit's settings.

    :param exact_tokens: the user's choice; ``None`` decides from the caps.
    :return: ``"exact"`` when the user asks or a cap depends on the count, else ``"sampled"``.
    """
    if exact_tokens is not None:
        return "exact" if exact_tokens else "sampled"
    caps = (max_cost_usd, max_cost_usd_expected, max_enqueued_tokens)
    return "exact" if any(cap is not None for cap in caps) else "sampled"


class ChunkTally:
    """What one chunk weighs, fed line by line. Made by :meth:`CostEstimator.chunk`.

    Three ways to feed it, from the simplest to the cheapest per line:

    * :meth:`add` per line: reads the cap, samples or counts the prompt (~0.4 us a line on top of the
      parse, see ``make bench --only cost``);
    * :meth:`add_counted` per line, for a caller that has the line's cap and prompt tokens already (e.g.
      from a helper process, counted with :meth:`CostEstimator.prompt_tokens`);
    * for a hot loop: read each line's cap with :attr:`cap_of` into local sums, hand the sampled lines to
      :meth:`sample` (every line whose index in the chunk is a multiple of :attr:`sample_every`; every line
      when it is 1) and the sums to :meth:`add_summary` when the chunk (or a block of it) is done.

    :ivar requests: lines added.
    :ivar byte_count: their bytes (with newlines, as the caller counts them).
    :ivar output_bound: the sum of the caps of the lines that set one.
    :ivar unbounded: how many lines set no cap.
    :ivar unbounded_lines: the first :data:`KEEP_LINES` line numbers without a cap.
    """

    __slots__ = (
        "_pending",
        "_prompt",
        "byte_count",
        "cap_of",
        "counted",
        "counted_bytes",
        "counted_tokens",
        "heaviest",
        "index",
        "largest",
        "largest_size",
        "model",
        "output_bound",
        "requests",
        "sample_every",
        "unbounded",
        "unbounded_lines",
    )

    def __init__(
        self,
        index: int,
        model: str,
        cap_of: Callable[[Mapping[str, Any]], int | None],
        prompt: PromptTokens,
        sample_every: int,
    ) -> None:
        self.index = index
        self.model = model
        #: The endpoint's :func:`output_cap_reader`.
        self.cap_of = cap_of
        #: Sample one line in this many (1: count every line).
        self.sample_every = sample_every
        self._prompt = prompt
        self._pending: list[tuple[int, int, Mapping[str, Any]]] = []
        self.requests = 0
        self.byte_count = 0
        self.output_bound = 0
        self.unbounded = 0
        self.unbounded_lines: list[int] = []
        self.counted = 0
        self.counted_bytes = 0
        self.counted_tokens = 0
        #: Bytes and line number of the largest line.
        self.largest_size = 0
        self.largest = 0
        #: (prompt tokens, line) of the heaviest counted line.
        self.heaviest: tuple[int, int] = (0, 0)

    def add(self, line: int, size: int, body: Mapping[str, Any]) -> None:
        """One request line.

        :param line: its 1-based line number in the input.
        :param size: its bytes.
        :param body: its parsed ``body``.
        """
        n = self.requests
        self.requests = n + 1
        self.byte_count += size
        cap = self.cap_of(body)
        if cap is None:
            self._unbounded(line)
        else:
            self.output_bound += cap
        if size > self.largest_size:
            self.largest_size, self.largest = size, line
        if not n % self.sample_every:
            self.sample(line, size, body)

    def _unbounded(self, line: int) -> None:
        self.unbounded += 1
        if len(self.unbounded_lines) < KEEP_LINES:
            self.unbounded_lines.append(line)

    def sample(self, line: int, size: int, body: Mapping[str, Any]) -> None:
        """A line whose prompt is counted (its tokens are counted in batches, or when the chunk ends).

        :param line: its line number.
        :param size: its bytes.
        :param body: its parsed ``body``.
        """
        self._pending.append((line, size, body))
        if len(self._pending) >= _COUNT_BATCH:
            self._count_pending()

    def add_summary(
        self,
        requests: int,
        byte_count: int,
        output_bound: int,
        unbounded: int,
        unbounded_lines: Sequence[int] = (),
        largest: tuple[int, int] = (0, 0),
        prompt_tokens: int | None = None,
    ) -> None:
        """Lines summed by the caller (see the class docstring).

        :param requests: how many lines.
        :param byte_count: their bytes.
        :param output_bound: the sum of the caps of those that set one.
        :param unbounded: how many set none.
        :param unbounded_lines: some of their line numbers (the first are kept).
        :param largest: ``(bytes, line)`` of the largest of them.
        :param prompt_tokens: their prompt tokens when the caller counted every one of them (with
            :meth:`CostEstimator.prompt_tokens`), else ``None``.
        """
        self.requests += requests
        self.byte_count += byte_count
        if prompt_tokens is not None:
            self.counted += requests
            self.counted_bytes += byte_count
            self.counted_tokens += prompt_tokens
        self.output_bound += output_bound
        self.unbounded += unbounded
        self.unbounded_lines.extend(unbounded_lines[: KEEP_LINES - len(self.unbounded_lines)])
        if largest[0] > self.largest_size:
            self.largest_size, self.largest = largest

    def add_counted(self, line: int, size: int, cap: int | None, prompt_tokens: int) -> None:
        """One request line whose cap (:func:`output_cap_reader`) and prompt tokens are known."""
        self.requests += 1
        self.byte_count += size
        if cap is None:
            self._unbounded(line)
        else:
            self.output_bound += cap
        if size > self.largest_size:
            self.largest_size, self.largest = size, line
        self._counted(line, size, prompt_tokens)

    def _counted(self, line: int, size: int, tokens: int) -> None:
        self.counted += 1
        self.counted_bytes += size
        self.counted_tokens += tokens
        if tokens > self.heaviest[0]:
            self.heaviest = (tokens, line)

    def _count_pending(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        counts = self._prompt.count_many([body for _, _, body in pending])
        for (line, size, _), tokens in zip(pending, counts, strict=True):
            self._counted(line, size, tokens)

    def tokens_per_byte(self) -> float | None:
        """What the counted lines weigh: prompt tokens per byte, or ``None`` before any is counted."""
        self._count_pending()
        return self.counted_tokens / self.counted_bytes if self.counted_bytes else None

    def input_tokens(self, tokens_per_byte: float | None = None) -> int:
        """The chunk's prompt tokens: counted, or scaled by bytes from its counted lines, else by
        ``tokens_per_byte`` (what the model's samples weigh), else bytes / 4.

        :param tokens_per_byte: the fallback ratio for a chunk without counted lines.
        """
        self._count_pending()
        if self.counted == self.requests:
            return self.counted_tokens
        if self.counted_bytes:
            return round(self.counted_tokens * self.byte_count / self.counted_bytes)
        if tokens_per_byte is not None:
            return round(self.byte_count * tokens_per_byte)
        return (self.byte_count + 3) // 4


@dataclass(frozen=True, kw_only=True)
class EstimateFigures:
    """The additive figures of an estimate: of one chunk, or summed over the chunks.

    :param requests: lines.
    :param input_tokens: estimated prompt tokens.
    :param output_tokens_max: output upper bound (``None``: unbounded lines and no known model limit).
    :param output_tokens_expected: the expected output (each line ``min(cap, typical)``).
    :param unbounded_requests: lines without an output cap.
    :param cost_min: USD of the input alone (``None``: the model has no price); likewise below.
    :param cost_expected: USD of input + expected output.
    :param cost_max: USD of input + output upper bound.
    """

    requests: int
    input_tokens: int
    output_tokens_max: int | None
    output_tokens_expected: int
    unbounded_requests: int
    cost_min: float | None
    cost_expected: float | None
    cost_max: float | None

    def figures_dict(self) -> dict[str, Any]:
        """The figures, JSON-safe, the cost as ``cost_usd: {"min", "expected", "max"}``."""
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens_max": self.output_tokens_max,
            "output_tokens_expected": self.output_tokens_expected,
            "unbounded_requests": self.unbounded_requests,
            "cost_usd": _cost_range(self.cost_min, self.cost_expected, self.cost_max),
        }


#: The names of :class:`EstimateFigures`' fields: what :func:`_totals` sums.
_TOTALLED = tuple(f.name for f in fields(EstimateFigures))


@dataclass(frozen=True, kw_only=True)
class ChunkEstimate(EstimateFigures):
    """The estimate of one chunk: its :class:`EstimateFigures` and

    :param chunk: the chunk's index.
    :param model: its model.
    :param unbounded_lines: the first line numbers without a cap.
    :param largest_line: ``(bytes, line)`` of its largest line.
    """

    chunk: int
    model: str
    unbounded_lines: tuple[int, ...]
    largest_line: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "model": self.model, **self.figures_dict()}


def _cost_range(low: float | None, expected: float | None, high: float | None) -> dict[str, float | None]:
    return {
        "min": None if low is None else round(low, 6),
        "expected": None if expected is None else round(expected, 6),
        "max": None if high is None else round(high, 6),
    }


def _sum_or_none(values: Iterable[float | int | None]) -> Any:
    total: Any = 0
    for value in values:
        if value is None:
            return None
        total += value
    return total


def _totals(chunks: Sequence[ChunkEstimate]) -> dict[str, Any]:
    """The sums of the chunks' additive figures (a sum is ``None`` when one of its terms is)."""
    return {name: _sum_or_none(getattr(chunk, name) for chunk in chunks) for name in _TOTALLED}


def _usd(value: float | None) -> str:
    return "unknown" if value is None else f"${value:,.4f}"


class CostEstimator:
    """Builds the estimate at submit: one :class:`ChunkTally` per chunk, then :meth:`finish`.

    Prompt tokens (``count``):

    * ``"sampled"`` (default): one line in ``sample_every`` of each chunk (its first line always) is
      counted with the free UTF-8 bytes / 4 heuristic, and the chunk's bytes are scaled by what those lines
      weigh per byte. Per line this costs reading the output cap.
    * ``"exact"``: every line counted with OpenAI's encoding for the chunk's model (falls back to the
      heuristic when ``toktok-rs`` is not installed; :attr:`counter_name` says which was used).
    * ``"heuristic"``: every line counted with the heuristic.

    :param endpoint: the batch endpoint.
    :param prices: the price table (default: the built-in one).
    :param count: ``"sampled"``, ``"exact"`` or ``"heuristic"`` (see :func:`token_count_mode`).
    :param sample_every: the sampling interval of ``"sampled"``.
    :param typical_output_tokens: a typical answer, for the expected cost (default
        :data:`TYPICAL_OUTPUT_TOKENS`, :data:`TYPICAL_REASONING_OUTPUT_TOKENS` for reasoning models).
    """

    def __init__(
        self,
        endpoint: str,
        prices: PriceTable | None = None,
        count: str = "sampled",
        sample_every: int = SAMPLE_EVERY,
        typical_output_tokens: int | None = None,
    ) -> None:
        if count not in ("sampled", "exact", "heuristic"):
            raise ValueError(f"count must be 'sampled', 'exact' or 'heuristic', not {count!r}")
        if sample_every < 1:
            raise ValueError(f"sample_every must be >= 1, not {sample_every}")
        self.endpoint = endpoint
        self.prices = prices if prices is not None else PriceTable.load()
        self.count = count
        self.sample_every = 1 if count != "sampled" else sample_every
        self.typical_output_tokens = typical_output_tokens
        self._cap_of = output_cap_reader(endpoint)
        self._prompts: dict[str, PromptTokens] = {}
        self._tallies: list[ChunkTally] = []
        #: Lines sampled per model, outside any chunk (see :meth:`sample`).
        self._samples: dict[str, ChunkTally] = {}
        self._missing_exact = False

    def prompt_tokens(self, model: str) -> PromptTokens:
        """The prompt counter this estimator uses for ``model`` (exact or heuristic, per ``count``)."""
        encoding = encoding_for_model(model) if self.count == "exact" else ""
        prompt = self._prompts.get(encoding)
        if prompt is None:
            counter = exact_counter(encoding) if encoding else None
            if counter is None:
                self._missing_exact = self._missing_exact or bool(encoding)
                counter = HEURISTIC
            prompt = self._prompts[encoding] = PromptTokens(self.endpoint, counter)
        return prompt

    @property
    def counter_name(self) -> str:
        """How prompt tokens were counted, for the log and the XCom."""
        if self.count == "sampled":
            return f"{HEURISTIC.name}, 1 line in {self.sample_every} counted"
        names = sorted({p.counter.name for p in self._prompts.values()}) or [HEURISTIC.name]
        text = ", ".join(names)
        if self._missing_exact:
            text += " (exact counting asked; toktok-rs is not installed)"
        return text

    def chunk(self, index: int, model: str) -> ChunkTally:
        """A new chunk's tally.

        :param index: the chunk's index (as the submit names it).
        :param model: the chunk's model.
        """
        tally = ChunkTally(index, model, self._cap_of, self.prompt_tokens(model), self.sample_every)
        self._tallies.append(tally)
        return tally

    def sample(self, model: str, line: int, size: int, body: Mapping[str, Any]) -> None:
        """A line of ``model`` whose prompt is counted, for a caller that samples before it knows the line's
        chunk (e.g. one line in :attr:`sample_every` of each block it checks). A chunk of that model with no
        counted line of its own is estimated at what these lines weigh per byte.

        :param model: the line's model.
        :param line: its line number.
        :param size: its bytes.
        :param body: its parsed ``body``.
        """
        samples = self._samples.get(model)
        if samples is None:
            samples = self._samples[model] = ChunkTally(-1, model, self._cap_of, self.prompt_tokens(model), 1)
        samples.sample(line, size, body)

    def _typical(self, model: str) -> int:
        if self.typical_output_tokens is not None:
            return self.typical_output_tokens
        return TYPICAL_REASONING_OUTPUT_TOKENS if _REASONING_MODEL.match(model) else TYPICAL_OUTPUT_TOKENS

    def _estimate(self, tally: ChunkTally) -> ChunkEstimate:
        price = self.prices.price_for(tally.model)
        samples = self._samples.get(tally.model)
        input_tokens = tally.input_tokens(samples.tokens_per_byte() if samples is not None else None)
        unbounded = tally.unbounded
        typical = self._typical(tally.model)
        # A line's expected output is min(cap, typical); per chunk, with the caps summed, this is exact when
        # the lines share one cap (the usual template) and an upper estimate otherwise.
        bounded = tally.requests - unbounded
        expected = min(tally.output_bound, bounded * typical) + unbounded * typical
        limit = price.max_output_tokens if price is not None else None
        # Unbounded lines with no known model limit: no upper bound at all.
        output_max = None if unbounded and limit is None else tally.output_bound + unbounded * (limit or 0)
        if expected and output_max is not None:
            expected = min(expected, output_max)
        if price is None:
            cost_min = cost_expected = cost_max = None
        else:
            cost_min = price.cost(input_tokens)
            cost_expected = price.cost(input_tokens, expected)
            cost_max = None if output_max is None else price.cost(input_tokens, output_max)
        return ChunkEstimate(
            chunk=tally.index,
            model=tally.model,
            requests=tally.requests,
            input_tokens=input_tokens,
            output_tokens_max=output_max,
            output_tokens_expected=expected,
            unbounded_requests=unbounded,
            cost_min=cost_min,
            cost_expected=cost_expected,
            cost_max=cost_max,
            unbounded_lines=tuple(tally.unbounded_lines),
            largest_line=(tally.largest_size, tally.largest),
        )

    def finish(self) -> CostEstimate:
        """The estimate of every chunk made so far, and their total."""
        chunks = [self._estimate(tally) for tally in self._tallies]
        unpriced = sorted({t.model for t in self._tallies if self.prices.price_for(t.model) is None})
        return CostEstimate(
            chunks=chunks,
            counter=self.counter_name,
            prices_as_of=self.prices.as_of,
            unpriced_models=unpriced,
            model_limits={
                t.model: price.max_output_tokens
                for t in self._tallies
                if (price := self.prices.price_for(t.model)) is not None
            },
            **_totals(chunks),
        )


@dataclass(frozen=True, kw_only=True)
class CostEstimate(EstimateFigures):
    """The estimate of a whole submit (XCom ``cost_estimate``: :meth:`to_dict`): the totals over the
    chunks as :class:`EstimateFigures` (a total is ``None`` where a chunk's figure is unknown), and

    :param chunks: per chunk.
    :param counter: how prompt tokens were counted.
    :param prices_as_of: the price table's date.
    :param unpriced_models: models of the input that the price table does not know.
    :param model_limits: the output limit of each priced model (the bound of an unbounded line).
    """

    chunks: list[ChunkEstimate]
    counter: str
    prices_as_of: str | None
    unpriced_models: list[str]
    model_limits: Mapping[str, int | None]

    def unbounded_lines(self) -> list[int]:
        """The first :data:`KEEP_LINES` line numbers without an output cap."""
        return sorted(line for c in self.chunks for line in c.unbounded_lines)[:KEEP_LINES]

    def largest_lines(self, count: int = 3) -> list[dict[str, int]]:
        """The largest lines (one per chunk at most), biggest first."""
        top = heapq.nlargest(count, self.chunks, key=lambda c: c.largest_line[0])
        return [
            {"line": c.largest_line[1], "chunk": c.chunk, "bytes": c.largest_line[0]}
            for c in top
            if c.largest_line[0]
        ]

    def heaviest_chunks(self, count: int = 3, key: str = "max") -> list[ChunkEstimate]:
        """The chunks that cost most, by upper bound (``key="max"``) or expected cost; an unknown cost
        counts as the heaviest."""

        def weight(chunk: ChunkEstimate) -> float:
            value = chunk.cost_max if key == "max" else chunk.cost_expected
            return float("inf") if value is None else value

        return heapq.nlargest(count, self.chunks, key=weight)

    def to_dict(self) -> dict[str, Any]:
        """The XCom ``cost_estimate``: JSON-safe, totals first, then the chunks."""
        return {
            "currency": "USD",
            "priced_at": "batch",
            "prices_as_of": self.prices_as_of,
            "prompt_tokens_counted_by": self.counter,
            **self.figures_dict(),
            "unpriced_models": list(self.unpriced_models),
            "unbounded_lines": self.unbounded_lines(),
            "largest_lines": self.largest_lines(),
            "chunks": [c.to_dict() for c in self.chunks],
        }

    def table(self) -> str:
        """A small text table for the task log: one row per chunk (the heaviest 20 when there are more)
        and the total."""
        rows = [("chunk", "model", "requests", "input tok", "output tok max", "cost min / expected / max")]
        shown = (
            self.chunks if len(self.chunks) <= 20 else sorted(self.heaviest_chunks(20), key=lambda c: c.chunk)
        )

        def row(name: str, model: str, requests: int, inp: int, out: int | None, costs: tuple) -> tuple:
            return (
                name,
                model,
                f"{requests:,}",
                f"{inp:,}",
                "unbounded" if out is None else f"{out:,}",
                " / ".join(_usd(c) for c in costs),
            )

        for c in shown:
            costs = (c.cost_min, c.cost_expected, c.cost_max)
            rows.append(row(str(c.chunk), c.model, c.requests, c.input_tokens, c.output_tokens_max, costs))
        models = ",".join(sorted({c.model for c in self.chunks}))
        totals = (self.cost_min, self.cost_expected, self.cost_max)
        rows.append(row("total", models, self.requests, self.input_tokens, self.output_tokens_max, totals))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        head = f"Cost estimate at batch prices (as of {self.prices_as_of}); prompt tokens: {self.counter}" + (
            f"; {len(self.chunks) - len(shown)} lighter chunks not shown"
            if len(shown) < len(self.chunks)
            else ""
        )
        notes = []
        if self.unbounded_requests:
            notes.append(
                f"{self.unbounded_requests:,} requests set no output cap: bounded by the model's limit "
                f"(lines {', '.join(map(str, self.unbounded_lines()))}"
                f"{', ...' if self.unbounded_requests > KEEP_LINES else ''})"
            )
        if self.unpriced_models:
            notes.append(f"no price for {', '.join(self.unpriced_models)}: pass prices= to include them")
        return "\n".join([head, *lines, *notes])

    def check_budget(
        self, max_cost_usd: float | None = None, max_cost_usd_expected: float | None = None
    ) -> None:
        """Raise when the estimate is above a cap. Call before anything is uploaded.

        :param max_cost_usd: cap on the upper bound (input + every line's output cap, the model's limit for
            lines that set none).
        :param max_cost_usd_expected: cap on the expected cost (input + a typical output per line), for jobs
            whose outputs are unbounded.
        :raises OpenAIBatchBudgetError: naming the estimate, the cap, the heaviest chunks and the lines
            without an output cap. An estimate that cannot be priced (unknown model, unknown output limit)
            is over any cap: it cannot be shown to be under.
        """
        for cap, value, key, label in (
            (max_cost_usd, self.cost_max, "max", "max_cost_usd"),
            (max_cost_usd_expected, self.cost_expected, "expected", "max_cost_usd_expected"),
        ):
            if cap is None or (value is not None and value <= cap):
                continue
            raise OpenAIBatchBudgetError(self._budget_message(cap, value, key, label), self.to_dict())

    def _budget_message(self, cap: float, value: float | None, key: str, label: str) -> str:
        what = "upper bound" if key == "max" else "expected cost"
        if value is None:
            head = (
                f"The cost {what} of this submit cannot be estimated, so it cannot be kept under "
                f"{label}=${cap:,.2f}"
            )
        else:
            head = f"Estimated cost {what} ${value:,.2f} is above {label}=${cap:,.2f}"
        parts = [
            f"{head}; nothing was uploaded.",
            f"Estimate: {self.requests:,} requests, {self.input_tokens:,} input tokens, output up to "
            + ("unbounded" if self.output_tokens_max is None else f"{self.output_tokens_max:,}")
            + f" tokens; cost min {_usd(self.cost_min)}, expected {_usd(self.cost_expected)}, "
            f"max {_usd(self.cost_max)} (batch prices as of {self.prices_as_of}).",
        ]
        heaviest = self.heaviest_chunks(3, key)
        if heaviest:
            parts.append(
                "Heaviest chunks: "
                + "; ".join(
                    f"chunk {c.chunk} ({c.model}, {c.requests:,} requests, "
                    f"{c.unbounded_requests:,} without output cap): "
                    f"{_usd(c.cost_max if key == 'max' else c.cost_expected)}"
                    for c in heaviest
                )
                + "."
            )
        if self.unbounded_requests:
            limits = sorted(
                {f"{m}: {'unknown' if n is None else f'{n:,}'}" for m, n in self.model_limits.items()}
            )
            parts.append(
                f"{self.unbounded_requests:,} lines set no output cap (max_completion_tokens / max_tokens / "
                f"max_output_tokens) and are bounded by the model's output limit "
                f"({'; '.join(limits) or 'unknown'}): "
                f"lines {', '.join(map(str, self.unbounded_lines()))}"
                + (", ..." if self.unbounded_requests > KEEP_LINES else "")
                + "."
            )
        if self.unpriced_models:
            parts.append(f"No price for {', '.join(self.unpriced_models)}: pass prices= to include them.")
        largest = self.largest_lines()
        if largest:
            parts.append(
                "Largest lines: "
                + ", ".join(f"line {x['line']} ({x['bytes']:,} bytes, chunk {x['chunk']})" for x in largest)
                + "."
            )
        if value is not None and key == "max":
            parts.append(
                "Cap the output of the unbounded lines, raise the budget, or check the expected cost "
                "instead (max_cost_usd_expected)."
                if self.unbounded_requests
                else "Lower the output caps or the prompts, or raise the budget."
            )
        elif value is not None:
            parts.append("Shorten the prompts, lower the output caps or raise the budget.")
        return "\n".join(parts)
