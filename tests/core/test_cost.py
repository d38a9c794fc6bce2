"""Money: the price table, prompt-token counts, the estimate and budget at submit, the cost at collect."""

from __future__ import annotations

import ast
import csv
import importlib.resources
import io
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from airflow_openai_batch.core import pricing
from airflow_openai_batch.core.batch_usage import batch_usage
from airflow_openai_batch.core.cost import (
    HEURISTIC,
    IMAGE_PART_TOKENS,
    KEEP_LINES,
    MESSAGE_OVERHEAD_TOKENS,
    REQUEST_OVERHEAD_TOKENS,
    TYPICAL_OUTPUT_TOKENS,
    CostEstimator,
    ModelPrice,
    PriceTable,
    PromptTokens,
    cap_summary,
    encoding_for_model,
    exact_counter,
    output_cap_fields,
    output_cap_of_struct,
    output_cap_reader,
    request_token_estimator,
    token_count_mode,
    usage_mismatch,
)
from airflow_openai_batch.emulator import EmulatorServer
from airflow_openai_batch.emulator.responses import DEFAULT_MODELS, ENDPOINT_MODERATIONS
from airflow_openai_batch.exceptions import OpenAIBatchBudgetError
from tests.conftest import REPO_ROOT
from tests.support.multilingual import multilingual_texts

CHAT = "/v1/chat/completions"
M = MESSAGE_OVERHEAD_TOKENS
R = REQUEST_OVERHEAD_TOKENS
TICKETS = REPO_ROOT / "dags" / "data" / "support_tickets.csv"

# -- prices -------------------------------------------------------------------------------------------------

REQUIRED_MODELS = [
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-4o",
    "gpt-4o-mini",
    "o1",
    "o3",
    "o3-mini",
    "o4-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
    "omni-moderation-latest",
]


def test_prices_json_is_packaged_dated_and_sourced_per_model() -> None:
    data = json.loads(
        importlib.resources.files("airflow_openai_batch.core").joinpath("prices.json").read_text("utf-8")
    )
    assert "BATCH" in data["_note"] and "change" in data["_note"]
    assert data["_as_of"] >= "2026-12-01"
    for model, spec in data["models"].items():
        assert spec["as_of"] >= "2025-01-01" and len(spec["source"]) > 20, model
    table = PriceTable.load()
    assert table.as_of == data["_as_of"]
    for model in REQUIRED_MODELS:
        price = table.price_for(model)
        assert price is not None, model
        assert price.input >= 0 and price.output >= 0
        assert price.max_output_tokens is not None, model
        if price.cached_input is not None:
            assert price.cached_input <= price.input
    # Batch = half the standard price: gpt-4o is $2.50 / $1.25 cached / $10.00 per 1M tokens standard.
    assert table.price_for("gpt-4o") == ModelPrice(1.25, 5.0, 0.625, 16384)
    assert table.price_for("gpt-5-mini") == ModelPrice(0.125, 1.0, 0.0125, 128000)
    assert table.price_for("omni-moderation-latest") == ModelPrice(0.0, 0.0, None, 0)
    assert table.price_for("text-embedding-3-small").max_output_tokens == 0


def _submitted_models_of_example_dags() -> set[str]:
    from jinja2 import Template

    from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
    from tests.support.airflow_versions import DagBag

    bag = DagBag(dag_folder=str(REPO_ROOT / "dags"))
    assert bag.import_errors == {}
    models = set()
    for dag in bag.dags.values():
        for task in dag.tasks:
            if isinstance(task, OpenAIBatchSubmitOperator) and task.model:
                models.add(Template(task.model).render(params=dag.params.dump()))
    return models


def test_every_model_of_the_example_dags_and_the_emulator_defaults_has_a_price() -> None:
    models = _submitted_models_of_example_dags()
    assert {"gpt-4o-mini", "text-embedding-3-small"} <= models
    # The emulator answers a moderation without a model with its default; images and videos are billed
    # per image / per second, not per token, so the token price table leaves them out on purpose.
    models.add(DEFAULT_MODELS[ENDPOINT_MODERATIONS])
    table = PriceTable.load()
    assert {m for m in models if table.price_for(m) is None} == set()


def test_dated_snapshot_matches_the_longest_known_prefix() -> None:
    table = PriceTable.load()
    assert table.price_for("gpt-4o-mini-2024-07-18") == table.price_for("gpt-4o-mini")
    assert table.price_for("gpt-4o-2024-08-06") == table.price_for("gpt-4o")
    assert table.price_for("gpt-4.1-nano-2025-04-14") == table.price_for("gpt-4.1-nano")
    assert table.price_for("gpt-3.5-turbo-0125") == table.price_for("gpt-3.5-turbo")
    assert table.price_for("gpt-5.4-mini-2026-03-17") == table.price_for("gpt-5.4-mini")
    # an exact entry wins over the prefix (this snapshot had its own, higher price)
    assert table.price_for("gpt-4o-2024-05-13") != table.price_for("gpt-4o")
    # only date suffixes count: another model that shares a prefix is not priced as it
    assert table.price_for("gpt-4o-audio-preview") is None
    assert table.price_for("o3-deep-research") is None
    assert table.price_for("") is None and table.price_for(None) is None


def test_overrides_by_mapping_add_models_and_change_fields() -> None:
    table = PriceTable.load(
        {
            "my-azure-deployment": {"input": 1.0, "output": 2.0, "max_output_tokens": 4096},
            "gpt-4o": {"output": 4.0},  # partial: the rest stays as shipped
        }
    )
    assert table.price_for("my-azure-deployment") == ModelPrice(1.0, 2.0, None, 4096)
    assert table.price_for("gpt-4o") == ModelPrice(
        input=1.25, output=4.0, cached_input=0.625, max_output_tokens=16384
    )
    usage = {
        "my-azure-deployment": {"input_tokens": 500_000, "output_tokens": 500_000, "cached_input_tokens": 100}
    }
    # no cached price: cached tokens are billed as input
    assert table.estimate_cost(usage) == pytest.approx(1.5)
    # the shipped table is untouched
    assert PriceTable.load().price_for("gpt-4o").output == 5.0


def test_overrides_from_a_json_file_in_either_shape(tmp_path: Path) -> None:
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"gpt-4o-mini": {"input": 0.05}, "house-model": {"input": 3, "output": 6}}))
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"_as_of": "2027-01", "models": {"house-model": {"input": 4, "output": 8}}}))
    table = PriceTable.load(str(flat))
    assert table.price_for("gpt-4o-mini").input == 0.05 and table.price_for("gpt-4o-mini").output == 0.3
    assert table.price_for("house-model") == ModelPrice(3.0, 6.0)
    assert PriceTable.load(nested).price_for("house-model") == ModelPrice(4.0, 8.0)


def test_bad_overrides_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="input"):
        PriceTable.load({"new-model": {"output": 1.0}})
    with pytest.raises(ValueError, match="mapping"):
        PriceTable.load({"new-model": 3.0})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="negative"):
        PriceTable.load({"gpt-4o": {"input": -1}})
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read prices from .*broken\.json"):
        PriceTable.load(broken)
    with pytest.raises(ValueError, match="cannot read prices"):
        PriceTable.load(tmp_path / "missing.json")


def test_the_former_pricing_module_still_serves_the_same_table() -> None:
    assert pricing.PriceTable is PriceTable and pricing.ModelPrice is ModelPrice


# -- the cost at collect -------------------------------------------------------------------------------------


def test_cached_input_and_reasoning_are_priced_apart() -> None:
    table = PriceTable.load()
    usage = {
        "gpt-4o-mini": {
            "input_tokens": 2_000_000,
            "cached_input_tokens": 1_000_000,
            "output_tokens": 1_000_000,
            "reasoning_tokens": 0,
        },
        "o4-mini-2025-04-16": {
            "input_tokens": 1_000_000,
            "cached_input_tokens": 0,
            "output_tokens": 2_000_000,
            "reasoning_tokens": 1_500_000,
        },
        "mystery-model": {"input_tokens": 10, "output_tokens": 1},
    }
    costs = table.cost_by_model(usage)
    # 1M uncached * 0.075 + 1M cached * 0.0375 + 1M output * 0.30
    assert costs["gpt-4o-mini"] == {
        "input_usd": 0.075,
        "cached_input_usd": 0.0375,
        "output_usd": 0.3,
        "reasoning_usd": 0.0,
        "total_usd": 0.4125,
    }
    o4 = costs["o4-mini-2025-04-16"]
    assert o4["output_usd"] == pytest.approx(4.4) and o4["reasoning_usd"] == pytest.approx(3.3)
    assert o4["total_usd"] == pytest.approx(0.55 + 4.4)  # reasoning is inside the output, not added
    assert set(costs["mystery-model"].values()) == {None}
    # the total refuses to ignore the unpriced model's spend; without it, it adds up the rest
    assert table.estimate_cost(usage) is None and table.totals(usage)["cost_usd"] is None
    del usage["mystery-model"]
    assert table.estimate_cost(usage) == pytest.approx(0.4125 + 4.95)
    assert table.totals(usage) == {
        "input_tokens": 3_000_000,
        "cached_input_tokens": 1_000_000,
        "output_tokens": 3_000_000,
        "reasoning_tokens": 1_500_000,
        "cost_usd": table.estimate_cost(usage),
    }
    assert table.estimate_cost({}) == 0.0


def test_batch_usage_agreeing_with_the_lines_is_no_mismatch() -> None:
    reported = batch_usage(
        {
            "usage": {
                "input_tokens": 100,
                "input_tokens_details": {"cached_tokens": 20},
                "output_tokens": 50,
                "output_tokens_details": {"reasoning_tokens": 10},
                "total_tokens": 150,
            }
        }
    )
    counted = {"input_tokens": 100, "cached_input_tokens": 20, "output_tokens": 50, "reasoning_tokens": 10}
    assert usage_mismatch("batch_1", reported, counted) is None
    assert usage_mismatch("batch_1", None, counted) is None  # batches before 2025-09-07 report none
    # a figure collect did not count is not compared
    assert usage_mismatch("batch_1", reported, {"input_tokens": 100, "output_tokens": 50}) is None


def test_batch_usage_mismatch_names_each_figure_both_values_and_the_difference() -> None:
    reported = {"input_tokens": 1_000, "cached_input_tokens": 0, "output_tokens": 400, "reasoning_tokens": 0}
    counted = {"input_tokens": 990, "cached_input_tokens": 0, "output_tokens": 400, "reasoning_tokens": 0}
    message = usage_mismatch("batch_abc", reported, counted)
    assert message == (
        "Batch batch_abc: Batch.usage disagrees with the result lines: "
        "input_tokens 1,000 reported, 990 in the result lines (-10)"
    )


def test_batch_usage_of_an_emulator_batch_cross_checks_with_its_result_lines(
    emulator: EmulatorServer,
) -> None:
    client = emulator.client()
    records = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": CHAT,
            "body": {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "x" * (10 * i + 1)}]},
        }
        for i in range(5)
    ]
    data = b"".join(orjson.dumps(r) + b"\n" for r in records)
    file = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint=CHAT, completion_window="24h")
    emulator.advance(1)
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.usage is not None
    counted = dict.fromkeys(("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens"), 0)
    lines = [orjson.loads(line) for line in client.files.content(done.output_file_id).content.splitlines()]
    for line in lines:
        usage = line["response"]["body"]["usage"]
        counted["input_tokens"] += usage["prompt_tokens"]
        counted["cached_input_tokens"] += usage["prompt_tokens_details"]["cached_tokens"]
        counted["output_tokens"] += usage["completion_tokens"]
        counted["reasoning_tokens"] += usage["completion_tokens_details"]["reasoning_tokens"]
    assert counted["reasoning_tokens"] > 0
    reported = batch_usage(done.model_dump())
    assert usage_mismatch(done.id, reported, counted) is None
    short = {**counted, "output_tokens": counted["output_tokens"] - 7}
    message = usage_mismatch(done.id, reported, short)
    assert message is not None and done.id in message and "output_tokens" in message and "(-7)" in message
    client.close()


# -- token counting -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4o-2024-08-06", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("o3", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("ft:gpt-4o-mini:acme::abc123", "o200k_base"),
        ("some-future-model", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        (None, "o200k_base"),
    ],
)
def test_encoding_follows_the_model_family(model: str | None, encoding: str) -> None:
    assert encoding_for_model(model) == encoding


def test_exact_counter_counts_with_openais_encodings_offline() -> None:
    o200k = exact_counter("o200k_base")
    cl100k = exact_counter("cl100k_base")
    assert o200k is not None and cl100k is not None and o200k.exact and not HEURISTIC.exact
    # "hello world" is two tokens in both; Chinese text splits differently in each encoding.
    text = "发票金额与订单确认不一致。请检查折扣码。"
    assert o200k.count_texts(["hello world", "", text]) == [2, 0, o200k.count_texts([text])[0]]
    assert cl100k.count_texts(["hello world"]) == [2]
    assert o200k.count_texts([text]) != cl100k.count_texts([text])
    # the heuristic counts UTF-8 bytes / 4: 3 bytes per CJK character, 1 per ASCII one
    assert HEURISTIC.count_texts(["hello world", text]) == [3, (3 * len(text) + 3) // 4]


def test_exact_counter_is_none_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "toktok", None)  # as if toktok-rs were not installed
    assert exact_counter("o200k_base") is None
    estimator = CostEstimator(CHAT, count="exact")
    estimator.chunk(0, "gpt-4o-mini").add(1, 100, {"messages": [{"role": "user", "content": "hi"}]})
    assert "toktok-rs is not installed" in estimator.finish().counter


def test_prompt_walkers_count_every_part_of_each_endpoint() -> None:
    def tokens(endpoint: str, body: dict[str, Any]) -> int:
        return PromptTokens(endpoint, HEURISTIC).count(body)

    chat = {
        "messages": [
            {"role": "system", "content": "abcd" * 3},
            {
                "role": "user",
                "name": "ann",
                "content": [{"type": "text", "text": "abcd"}, {"type": "image_url"}],
            },
        ],
        "tools": [{"type": "function"}],
    }
    tools_json = len(orjson.dumps([{"type": "function"}]))
    assert tokens(CHAT, chat) == R + 2 * M + 3 + (1 + 1) + 1 + IMAGE_PART_TOKENS + (tools_json + 3) // 4
    responses = {"instructions": "abcd", "input": [{"role": "user", "content": "abcdabcd"}, "abcd"]}
    assert tokens("/v1/responses", responses) == R + M + 1 + M + 2 + 1
    assert tokens("/v1/completions", {"prompt": [[1, 2, 3], "abcd"]}) == 3 + 1
    assert tokens("/v1/embeddings", {"input": ["abcd", "abcdabcd"]}) == 1 + 2
    assert tokens(
        "/v1/moderations", {"input": [{"type": "text", "text": "abcd"}, {"type": "image_url"}]}
    ) == (1 + IMAGE_PART_TOKENS)
    assert tokens("/v1/images/generations", {"prompt": "abcdabcd"}) == 2
    # the free estimate prepare can call per line is the same count
    assert request_token_estimator(CHAT)(chat) == tokens(CHAT, chat)


def test_count_many_equals_one_by_one_with_either_counter() -> None:
    bodies = [{"messages": [{"role": "user", "content": text}]} for _, text in multilingual_texts(3)]
    for counter in (HEURISTIC, exact_counter("o200k_base")):
        prompt = PromptTokens(CHAT, counter)
        assert prompt.count_many(bodies) == [prompt.count(b) for b in bodies]
    assert PromptTokens(CHAT, HEURISTIC).count_many([]) == []


def _ratios(endpoint: str, bodies: Sequence[Mapping[str, Any]], encoding: str) -> tuple[float, float, float]:
    estimate = PromptTokens(endpoint, HEURISTIC).count_many(bodies)
    exact = PromptTokens(endpoint, exact_counter(encoding)).count_many(bodies)
    per_line = [e / x for e, x in zip(estimate, exact, strict=True)]
    return sum(estimate) / sum(exact), min(per_line), max(per_line)


def _ticket_bodies() -> list[dict[str, Any]]:
    """The nightly example DAG's requests as submit builds them: its answer model made a strict
    ``response_format`` (the model class is taken from the DAG file without importing Airflow)."""
    from typing import Literal

    from pydantic import BaseModel

    from airflow_openai_batch.core.schema import SchemaInjector, response_schema

    tree = ast.parse((REPO_ROOT / "dags" / "nightly_classification.py").read_text())
    model_class = [
        node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "TicketLabel"
    ]
    namespace: dict[str, Any] = {"BaseModel": BaseModel, "Literal": Literal}
    exec(
        compile(ast.Module(body=model_class, type_ignores=[]), "nightly_classification.py", "exec"), namespace
    )
    ticket_label = namespace["TicketLabel"]
    ticket_label.model_rebuild(_types_namespace=namespace)  # its annotations name this namespace's Literal
    injector = SchemaInjector(response_schema(ticket_label), CHAT)
    bodies = []
    with TICKETS.open(newline="") as tickets:
        for row in csv.DictReader(tickets):
            body: dict[str, Any] = {
                "messages": [
                    {"role": "system", "content": "Label the support ticket."},
                    {"role": "user", "content": row["text"]},
                ]
            }
            injector.inject_body(body)
            bodies.append(orjson.loads(orjson.dumps(body)))
    return bodies


def test_estimate_error_on_the_example_data_is_small() -> None:
    # Measured: chat 1.12x in total (1.08-1.17 per line), embeddings 1.02x (0.78-1.36 per line).
    total, low, high = _ratios(CHAT, _ticket_bodies(), "o200k_base")
    assert 1.0 <= total <= 1.2 and low >= 1.0 and high <= 1.25
    with TICKETS.open(newline="") as tickets:
        documents = [{"input": row["text"]} for row in csv.DictReader(tickets)]
    total, low, high = _ratios("/v1/embeddings", documents, encoding_for_model("text-embedding-3-small"))
    assert 0.95 <= total <= 1.1 and low >= 0.7 and high <= 1.45


def test_estimate_error_on_multilingual_text_stays_within_half_to_double() -> None:
    # Measured per line (o200k_base): 0.57x (numbers) .. 2.09x (Russian); total 1.12x. With cl100k_base:
    # 0.57x .. 1.36x, total 0.80x. A chars / 4 rule would put CJK at ~0.5x.
    texts = multilingual_texts()
    bodies = [{"messages": [{"role": "user", "content": text}]} for _, text in texts]
    total, low, high = _ratios(CHAT, bodies, "o200k_base")
    assert 1.0 <= total <= 1.25 and low >= 0.5 and high <= 2.2
    total, low, high = _ratios(CHAT, bodies, "cl100k_base")
    assert 0.7 <= total <= 0.9 and low >= 0.5 and high <= 1.45
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for (kind, _), body in zip(texts, bodies, strict=True):
        by_kind.setdefault(kind, []).append(body)
    cjk = {kind: _ratios(CHAT, by_kind[kind], "o200k_base")[0] for kind in ("chinese", "japanese", "korean")}
    assert all(0.9 <= r <= 1.3 for r in cjk.values()), cjk


# -- output caps ---------------------------------------------------------------------------------------------


def test_output_caps_per_endpoint() -> None:
    chat = output_cap_reader(CHAT)
    assert chat({"max_completion_tokens": 50}) == 50
    assert chat({"max_tokens": 30}) == 30
    assert chat({"max_completion_tokens": 50, "max_tokens": 10}) == 50
    assert chat({"max_completion_tokens": 50, "n": 3}) == 150
    assert chat({}) is None
    assert chat({"max_completion_tokens": "50"}) is None and chat({"max_tokens": True}) is None
    assert chat({"max_completion_tokens": 0}) is None
    responses = output_cap_reader("/v1/responses")
    assert responses({"max_output_tokens": 1000}) == 1000 and responses({"max_tokens": 5}) is None
    completions = output_cap_reader("/completions")
    assert completions({}) == 16  # the API's default max_tokens
    assert completions({"max_tokens": 100, "n": 2, "best_of": 5}) == 500
    assert output_cap_reader("/v1/embeddings")({"input": "x"}) == 0
    assert output_cap_reader("/v1/moderations")({"input": "x"}) == 0
    assert output_cap_reader("/v1/images/generations")({"prompt": "x"}) is None


def test_output_caps_read_from_a_typed_struct_follow_the_same_rules() -> None:
    import msgspec

    cases = [
        (CHAT, {"max_completion_tokens": 50, "n": 3}),
        (CHAT, {"max_tokens": 30}),
        (CHAT, {"max_completion_tokens": "50"}),
        (CHAT, {}),
        ("/v1/responses", {"max_output_tokens": 1000}),
        ("/v1/completions", {"max_tokens": 100, "n": 2, "best_of": 5}),
        ("/v1/completions", {}),
        ("/v1/embeddings", {"input": "x"}),
        ("/v1/images/generations", {"prompt": "x"}),
    ]
    for endpoint, body in cases:
        # The body as a typed decoder sees it: only the cap fields, the rest skipped.
        fields = [(name, Any, None) for name in output_cap_fields(endpoint)]
        struct = msgspec.defstruct("Body", fields)
        decoded = msgspec.json.decode(orjson.dumps({**body, "messages": [], "model": "m"}), type=struct)
        assert output_cap_of_struct(endpoint)(decoded) == output_cap_reader(endpoint)(body), (endpoint, body)


# -- the estimate at submit ----------------------------------------------------------------------------------


def _line(body: dict[str, Any], cid: str = "x") -> bytes:
    return orjson.dumps({"custom_id": cid, "method": "POST", "url": CHAT, "body": body})


def _feed(estimator: CostEstimator, chunks: dict[str, list[dict[str, Any]]]) -> None:
    line = 0
    for index, (model, bodies) in enumerate(chunks.items()):
        tally = estimator.chunk(index, model)
        for body in bodies:
            line += 1
            tally.add(line, len(_line(body)) + 1, body)


def test_a_small_estimate_by_hand() -> None:
    prompt = {"role": "user", "content": "abcd" * 25}  # 25 tokens by the heuristic
    bodies = [
        {"model": "gpt-4o-mini", "messages": [prompt], "max_completion_tokens": 100},
        {"model": "gpt-4o-mini", "messages": [prompt], "max_completion_tokens": 1000},
        {"model": "gpt-4o-mini", "messages": [prompt]},
    ]
    estimator = CostEstimator(CHAT, count="heuristic")
    _feed(estimator, {"gpt-4o-mini": bodies})
    estimate = estimator.finish()
    (chunk,) = estimate.chunks
    input_tokens = 3 * (R + M + 25)
    assert chunk.input_tokens == input_tokens
    assert chunk.output_tokens_max == 100 + 1000 + 16384  # the unbounded line takes the model's limit
    assert chunk.unbounded_requests == 1 and chunk.unbounded_lines == (3,)
    # expected: min(sum of caps, capped lines * typical) + unbounded * typical
    assert chunk.output_tokens_expected == min(1100, 2 * TYPICAL_OUTPUT_TOKENS) + TYPICAL_OUTPUT_TOKENS
    price = PriceTable.load().price_for("gpt-4o-mini")
    assert chunk.cost_min == pytest.approx(input_tokens * 0.075 / 1e6)
    assert chunk.cost_max == pytest.approx(price.cost(input_tokens, 17484))
    assert chunk.cost_expected == pytest.approx(price.cost(input_tokens, 1500))
    assert estimate.cost_max == chunk.cost_max and estimate.requests == 3


def test_sampled_estimate_tracks_the_full_count_and_exact_counts_every_line() -> None:
    bodies = [{"model": "gpt-4o-mini", **b, "max_completion_tokens": 50} for b in _ticket_bodies()]
    figures = {}
    for count in ("sampled", "heuristic", "exact"):
        estimator = CostEstimator(CHAT, count=count)
        _feed(estimator, {"gpt-4o-mini": bodies})
        figures[count] = estimator.finish()
    heuristic = figures["heuristic"].input_tokens
    assert heuristic == sum(PromptTokens(CHAT, HEURISTIC).count_many(bodies))
    assert figures["exact"].input_tokens == sum(
        PromptTokens(CHAT, exact_counter("o200k_base")).count_many(bodies)
    )
    assert abs(figures["sampled"].input_tokens / heuristic - 1) < 0.02
    assert figures["sampled"].counter == "utf8/4, 1 line in 32 counted"
    assert figures["exact"].counter == "o200k_base" and figures["heuristic"].counter == "utf8/4"
    assert figures["exact"].output_tokens_max == 50 * len(bodies) and figures["exact"].unbounded_requests == 0


def test_add_counted_takes_the_callers_figures() -> None:
    estimator = CostEstimator(CHAT)
    tally = estimator.chunk(0, "gpt-4.1-nano")
    tally.add_counted(1, 300, 20, 70)
    tally.add_counted(2, 900, None, 210)
    (chunk,) = estimator.finish().chunks
    assert chunk.input_tokens == 280 and chunk.output_tokens_max == 20 + 32768
    assert chunk.unbounded_lines == (2,) and chunk.largest_line == (900, 2)


def test_the_hot_loop_api_gives_the_same_estimate_as_add() -> None:
    bodies = [
        {"messages": [{"role": "user", "content": f"ticket {i} " * (i % 7 + 1)}], "max_tokens": 10 + i % 3}
        for i in range(100)
    ]
    for i in (5, 40, 77):
        del bodies[i]["max_tokens"]
    by_add = CostEstimator(CHAT)
    _feed(by_add, {"gpt-4o": bodies})
    inlined = CostEstimator(CHAT)
    chunk = inlined.chunk(0, "gpt-4o")
    bound = unbounded = byte_count = 0
    unbounded_lines, largest = [], (0, 0)
    for n, body in enumerate(bodies):
        size = len(_line(body)) + 1
        byte_count += size
        cap = chunk.cap_of(body)
        if cap is None:
            unbounded += 1
            unbounded_lines.append(n + 1)
        else:
            bound += cap
        if size > largest[0]:
            largest = (size, n + 1)
        if not n % chunk.sample_every:
            chunk.sample(n + 1, size, body)
        if n == 49:  # a block boundary: half the sums now, half at the end
            chunk.add_summary(50, byte_count, bound, unbounded, unbounded_lines, largest)
            bound = unbounded = byte_count = 0
            unbounded_lines, largest = [], (0, 0)
    chunk.add_summary(50, byte_count, bound, unbounded, unbounded_lines, largest)
    assert inlined.finish() == by_add.finish()
    assert by_add.finish().chunks[0].unbounded_lines == (6, 41, 78)


def test_samples_taken_per_model_before_the_chunk_is_known_scale_its_bytes() -> None:
    bodies = [
        {"messages": [{"role": "user", "content": "word " * (5 + i % 9)}], "max_tokens": 8} for i in range(64)
    ]
    sizes = [len(_line(b)) + 1 for b in bodies]
    caps = [output_cap_reader(CHAT)(b) for b in bodies]
    caps[3] = None
    estimator = CostEstimator(CHAT)
    for i in range(0, 64, estimator.sample_every):  # a block checker samples before placing its lines
        estimator.sample("gpt-4o", i + 1, sizes[i], bodies[i])
    for index, (start, stop) in enumerate(((0, 40), (40, 64))):  # two chunks of the same model
        bound, unbounded, lines = cap_summary(caps[start:stop], start + 1)
        estimator.chunk(index, "gpt-4o").add_summary(
            stop - start, sum(sizes[start:stop]), bound, unbounded, lines
        )
    first, second = estimator.finish().chunks
    counted = PromptTokens(CHAT, HEURISTIC).count_many([bodies[0], bodies[32]])
    per_byte = sum(counted) / (sizes[0] + sizes[32])
    assert first.input_tokens == round(sum(sizes[:40]) * per_byte)
    assert second.input_tokens == round(sum(sizes[40:]) * per_byte)
    assert (first.unbounded_requests, first.unbounded_lines, first.output_tokens_max) == (
        1,
        (4,),
        39 * 8 + 16384,
    )
    assert cap_summary([5, 6], 10) == (11, 0, [])
    assert cap_summary([None] * 12, 1) == (0, 12, list(range(1, KEEP_LINES + 1)))


def test_unknown_models_and_limits_leave_the_cost_unknown_not_zero() -> None:
    estimator = CostEstimator(CHAT, prices=PriceTable.load({"house": {"input": 1, "output": 2}}))
    _feed(
        estimator,
        {
            "mystery": [{"messages": [], "max_tokens": 5}],
            "house": [{"messages": []}],  # priced, but no known output limit and no cap
            "gpt-4o": [{"messages": [], "max_tokens": 5}],
        },
    )
    estimate = estimator.finish()
    mystery, house, known = estimate.chunks
    assert mystery.cost_min is None and mystery.output_tokens_max == 5
    assert house.cost_min is not None and house.output_tokens_max is None and house.cost_max is None
    assert known.cost_max is not None
    assert estimate.cost_max is None and estimate.output_tokens_max is None
    assert estimate.unpriced_models == ["mystery"]
    assert "no price for mystery" in estimate.table()


def test_the_xcom_estimate_is_json_and_names_totals_chunks_and_lines() -> None:
    estimator = CostEstimator(CHAT)
    _feed(
        estimator,
        {
            "gpt-4o-mini": [{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}] * 4,
            "gpt-5": [{"messages": [{"role": "user", "content": "hi" * 500}]}] * 2,
        },
    )
    estimate = estimator.finish()
    data = json.loads(json.dumps(estimate.to_dict()))
    assert data["currency"] == "USD" and data["priced_at"] == "batch" and data["prices_as_of"]
    assert data["requests"] == 6 and data["unbounded_requests"] == 2 and data["unbounded_lines"] == [5, 6]
    assert data["output_tokens_max"] == 40 + 2 * 128000
    assert set(data["cost_usd"]) == {"min", "expected", "max"}
    assert data["cost_usd"]["min"] < data["cost_usd"]["expected"] < data["cost_usd"]["max"]
    assert [c["model"] for c in data["chunks"]] == ["gpt-4o-mini", "gpt-5"]
    assert data["largest_lines"][0]["chunk"] == 1
    table = estimate.table()
    assert "gpt-4o-mini" in table and "total" in table and "2 requests set no output cap" in table


def test_token_count_mode_is_exact_when_a_cap_depends_on_it() -> None:
    assert token_count_mode() == "sampled"
    assert token_count_mode(max_cost_usd=5) == "exact"
    assert token_count_mode(max_cost_usd_expected=5) == "exact"
    assert token_count_mode(max_enqueued_tokens=10_000) == "exact"
    assert token_count_mode(exact_tokens=False, max_cost_usd=5) == "sampled"
    assert token_count_mode(exact_tokens=True) == "exact"
    with pytest.raises(ValueError, match="count"):
        CostEstimator(CHAT, count="precise")


# -- the budget --------------------------------------------------------------------------------------------


def _estimate_with_an_unbounded_line() -> Any:
    estimator = CostEstimator(CHAT, count="exact")
    capped = {"messages": [{"role": "user", "content": "classify this"}], "max_completion_tokens": 20}
    chunks = {"gpt-4o-mini": [capped] * 100, "gpt-5": [capped] * 50}
    chunks["gpt-5"][6] = {"messages": [{"role": "user", "content": "write freely"}]}  # line 107
    _feed(estimator, chunks)
    return estimator.finish()


def test_budget_under_the_cap_passes() -> None:
    estimate = _estimate_with_an_unbounded_line()
    estimate.check_budget(max_cost_usd=estimate.cost_max + 0.01, max_cost_usd_expected=1.0)
    estimate.check_budget()  # no cap, no check


def test_budget_error_names_estimate_cap_heaviest_chunk_and_the_unbounded_line() -> None:
    estimate = _estimate_with_an_unbounded_line()
    # One unbounded gpt-5 line may write 128,000 tokens: $0.64 at $5 per 1M; the rest is cents.
    assert 0.64 < estimate.cost_max < 0.66
    with pytest.raises(OpenAIBatchBudgetError) as err:
        estimate.check_budget(max_cost_usd=0.10)
    message = str(err.value)
    assert f"Estimated cost upper bound ${estimate.cost_max:,.2f} is above max_cost_usd=$0.10" in message
    assert "nothing was uploaded" in message
    assert "Heaviest chunks: chunk 1 (gpt-5, 50 requests, 1 without output cap)" in message
    assert "1 lines set no output cap" in message and "gpt-5: 128,000" in message
    assert "lines 107." in message
    assert err.value.estimate["cost_usd"]["max"] == round(estimate.cost_max, 6)
    # the expected cost of the same job is far below the cap: a job with open answers can cap that instead
    estimate.check_budget(max_cost_usd_expected=0.10)
    with pytest.raises(
        OpenAIBatchBudgetError, match=r"expected cost \$0\.0\d is above max_cost_usd_expected"
    ):
        estimate.check_budget(max_cost_usd_expected=0.0001)


def test_budget_with_an_unpriced_model_cannot_be_kept() -> None:
    estimator = CostEstimator(CHAT)
    _feed(estimator, {"mystery": [{"messages": [], "max_tokens": 1}]})
    with pytest.raises(OpenAIBatchBudgetError, match=r"(?s)cannot be estimated.*No price for mystery"):
        estimator.finish().check_budget(max_cost_usd=100.0)


def test_unbounded_lines_are_listed_up_to_the_keep_limit() -> None:
    estimator = CostEstimator(CHAT)
    _feed(estimator, {"gpt-4o": [{"messages": []}] * (KEEP_LINES + 5)})
    estimate = estimator.finish()
    assert estimate.unbounded_requests == KEEP_LINES + 5
    assert estimate.unbounded_lines() == list(range(1, KEEP_LINES + 1))
    with pytest.raises(OpenAIBatchBudgetError, match=r"lines 1, 2, .*, 10, \.\.\."):
        estimate.check_budget(max_cost_usd=0.0)


def test_heuristic_overcounts_prose_and_undercounts_code_and_numbers() -> None:
    # Where the free estimate errs, per kind of text (medians per line, o200k_base).
    texts = multilingual_texts()
    medians = {}
    for kind in ("english", "chinese", "code", "numbers"):
        bodies = [{"input": t} for k, t in texts if k == kind]
        estimate = PromptTokens("/v1/embeddings", HEURISTIC).count_many(bodies)
        exact = PromptTokens("/v1/embeddings", exact_counter("o200k_base")).count_many(bodies)
        medians[kind] = statistics.median(e / x for e, x in zip(estimate, exact, strict=True))
    assert medians["english"] > 1.0 > medians["code"] > medians["numbers"]
    assert 0.9 < medians["chinese"] < 1.4
