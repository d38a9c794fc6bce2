"""Collect's exact usage and cost: prompt, cached-prompt, completion and reasoning tokens per model from
every result line, priced with the cached-input price, cross-checked with ``Batch.usage``, and the totals
in the Asset event's ``extra``. Batches run in the emulator (the real openai SDK over HTTP); the expected
figures are read from the emulator's own files and ``prices.json``, not from the code under test."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator

PRICES = json.loads((Path(__file__).parents[2] / "airflow_openai_batch/core/prices.json").read_text())[
    "models"
]
KEYS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens")
#: About 1,500 prompt tokens in the emulator's count (characters / 4): over OpenAI's 1,024-token cache floor.
LONG_TEXT = "Our shared support policy, read before every ticket. " * 115


def request(i: int, url: str, model: str) -> dict:
    text = f"{LONG_TEXT}\nTicket {i}: the printer is on fire."
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    if url == "/v1/responses":
        body = {"model": model, "input": text}
    return {"custom_id": f"r{i}", "method": "POST", "url": url, "body": body}


def submit_and_finish(emulator, make_context, rows: list[dict], **kwargs) -> list[str]:
    context = make_context(task_id="submit", run_id=f"manual__{uuid.uuid4().hex}")
    ids = OpenAIBatchSubmitOperator(task_id="submit", requests=rows, **kwargs).execute(context)
    emulator.advance(3600)
    assert all(emulator.client().batches.retrieve(i).status == "completed" for i in ids)
    return ids


class _OutletEvents(dict):
    """Records the asset events a task emits, with their extra (Airflow's accessor, reduced)."""

    def __init__(self) -> None:
        super().__init__()
        self.added: list[tuple[str, dict | None]] = []

    def __getitem__(self, alias):
        events = self

        class _Accessor:
            def add(self, asset, extra=None):
                events.added.append((asset.uri, extra))

        return _Accessor()


def collect(make_context, batch_ids, **kwargs) -> tuple[dict, list]:
    context = make_context(task_id="collect", run_id=f"manual__{uuid.uuid4().hex}")
    context["outlet_events"] = events = _OutletEvents()
    summary = OpenAIBatchCollectOperator(task_id="collect", batch_ids=batch_ids, **kwargs).execute(context)
    return summary, events.added


def usage_in_result_lines(emulator, batch_ids: list[str]) -> dict[str, dict[str, int]]:
    """Per model, the sums of the output lines' usage, read straight from the emulator's files."""
    client = emulator.client()
    sums: dict[str, dict[str, int]] = {}
    for batch_id in batch_ids:
        batch = client.batches.retrieve(batch_id)
        for line in client.files.content(batch.output_file_id).text.splitlines():
            body = json.loads(line)["response"]["body"]
            usage = body["usage"]
            inp = usage.get("prompt_tokens", usage.get("input_tokens"))
            out = usage.get("completion_tokens", usage.get("output_tokens"))
            details_in = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
            details_out = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
            model = sums.setdefault(body["model"], dict.fromkeys(KEYS, 0))
            model["input_tokens"] += inp
            model["cached_input_tokens"] += details_in["cached_tokens"]
            model["output_tokens"] += out
            model["reasoning_tokens"] += details_out["reasoning_tokens"]
    return sums


@pytest.mark.parametrize("url", ["/v1/chat/completions", "/v1/responses"])
def test_cached_and_reasoning_tokens_are_counted_and_priced_apart(
    url, emulator, make_context, tmp_path
) -> None:
    emulator.configure(time_scale=0, cached_prompt_rate=0.5)
    model = "gpt-5-mini"
    ids = submit_and_finish(
        emulator,
        make_context,
        [request(i, url, model) for i in range(40)],
        max_requests_per_batch=15,
        endpoint=url,
    )
    summary, events = collect(make_context, ids, output_uri=str(tmp_path / "out"))

    truth = usage_in_result_lines(emulator, ids)
    counted = summary["usage_by_model"][model]
    assert {k: counted[k] for k in KEYS} == truth[model]
    # a real mix: some prompts cached, some not; a reasoning model reasons
    assert 0 < truth[model]["cached_input_tokens"] < truth[model]["input_tokens"]
    assert 0 < truth[model]["reasoning_tokens"] < truth[model]["output_tokens"]
    assert summary["usage"]["reasoning_tokens"] == truth[model]["reasoning_tokens"]

    price = PRICES[model]
    t = truth[model]
    uncached, cached = t["input_tokens"] - t["cached_input_tokens"], t["cached_input_tokens"]
    cost = summary["cost_by_model"][model]
    assert cost["input_usd"] == pytest.approx(uncached * price["input"] / 1e6, abs=1e-6)
    assert cost["cached_input_usd"] == pytest.approx(cached * price["cached_input"] / 1e6, abs=1e-6)
    assert cost["output_usd"] == pytest.approx(t["output_tokens"] * price["output"] / 1e6, abs=1e-6)
    assert cost["reasoning_usd"] == pytest.approx(t["reasoning_tokens"] * price["output"] / 1e6, abs=1e-6)
    # the cached tokens cost a tenth of the uncached price: billing them as input would cost more
    assert cost["cached_input_usd"] < cached * price["input"] / 1e6 / 5
    total = cost["input_usd"] + cost["cached_input_usd"] + cost["output_usd"]
    assert cost["total_usd"] == pytest.approx(total, abs=2e-6)
    assert summary["estimated_cost_usd"] == pytest.approx(total, abs=2e-6)

    # Batch.usage (the emulator bills what it returned) agrees with the lines: nothing to warn about
    assert summary["usage_mismatches"] == []
    # the totals ride on the asset event and in the manifest
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["cost_by_model"] == summary["cost_by_model"]
    assert manifest["usage_by_model"] == summary["usage_by_model"]
    [(uri, extra)] = events
    assert uri == f"file://{tmp_path / 'out'}"
    assert extra == {
        "total": 40,
        "succeeded": 40,
        "failed": 0,
        **{k: t[k] for k in KEYS},
        "cost_usd": summary["estimated_cost_usd"],
    }


def test_a_batch_usage_that_disagrees_with_the_lines_is_logged(emulator, make_context, capfd) -> None:
    # Lines the emulator processed (and bills in Batch.usage) but leaves out of both result files.
    emulator.configure(time_scale=0, missing_rate=0.3)
    rows = [request(i, "/v1/chat/completions", "gpt-4o-mini") for i in range(30)]
    ids = submit_and_finish(emulator, make_context, rows, max_requests_per_batch=15)
    summary, _ = collect(make_context, ids)

    assert summary["failed_by_code"]["missing"] > 0
    billed = [emulator.client().batches.retrieve(i).usage for i in ids]
    assert len(summary["usage_mismatches"]) == 2
    for batch_id, usage, sentence in zip(ids, billed, summary["usage_mismatches"], strict=True):
        counted = summary["batches"][batch_id]["usage"]
        assert usage.input_tokens > counted["input_tokens"]
        assert sentence.startswith(f"Batch {batch_id}: Batch.usage disagrees")
        assert f"input_tokens {usage.input_tokens:,} reported, {counted['input_tokens']:,}" in sentence
    logged = capfd.readouterr()
    assert summary["usage_mismatches"][0] in logged.out + logged.err
