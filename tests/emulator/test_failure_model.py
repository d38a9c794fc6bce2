"""Failing request lines: invalid requests fail at every attempt, transient ones only by a fresh draw.

A retried request is a new attempt: a line that failed with a 5xx, a 429 or a non-HTTP internal error
fails again only if the draw for its next attempt says so (as real transient faults), while a 400 fails
every time. ``expire_next_batches`` makes the next batches expire part-way and counts down.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import openai
import pytest

from airflow_openai_batch.emulator import EmulatorConfig, EmulatorServer
from airflow_openai_batch.emulator.responses import (
    HTTP_400,
    HTTP_429,
    HTTP_500,
    SUCCESS,
    is_transient,
    line_outcome,
)

from .helpers import chat_line, read_lines, upload


def run_batch(client: openai.OpenAI, emulator: EmulatorServer, ids: list[str]) -> Any:
    batch = client.batches.create(
        input_file_id=upload(client, [chat_line(i) for i in ids]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    emulator.advance(3600)
    return client.batches.retrieve(batch.id)


def failures(client: openai.OpenAI, batch: Any) -> dict[str, dict[str, Any]]:
    return {line["custom_id"]: line for line in read_lines(client, batch.error_file_id)}


def test_line_outcome_depends_on_the_attempt_only_for_transient_kinds() -> None:
    ids = [f"r{i}" for i in range(2_000)]
    for kinds, outcome in ((("500",), HTTP_500), (("429",), HTTP_429), (("400",), HTTP_400)):
        first = {i for i in ids if line_outcome(3, i, 0.2, 1, kinds) != SUCCESS}
        second = {i for i in first if line_outcome(3, i, 0.2, 2, kinds) != SUCCESS}
        assert 300 < len(first) < 500
        assert {line_outcome(3, i, 0.2, 1, kinds) for i in first} == {outcome}
        if outcome == HTTP_400:
            assert second == first  # the request itself is wrong: it fails at every attempt
        else:
            assert is_transient(outcome)
            assert 0.1 * len(first) < len(second) < 0.3 * len(first)  # a fresh draw at the same rate
            # Deterministic: the same attempt gives the same answer.
            assert second == {i for i in first if line_outcome(3, i, 0.2, 2, kinds) != SUCCESS}
    # The default mix is unchanged at the first attempt: a quarter 400, a quarter 500, half non-HTTP.
    mix = Counter(line_outcome(5, i, 1.0) for i in ids)
    assert set(mix) == {HTTP_400, HTTP_500, 3}
    assert 400 < mix[HTTP_400] < 600 and 400 < mix[HTTP_500] < 600


def test_a_retried_request_is_a_new_attempt_at_the_api(
    client: openai.OpenAI, emulator: EmulatorServer
) -> None:
    emulator.configure(failure_rate=0.3, failure_kinds=("500", "400"), seed=4, rate=1000)
    ids = [f"req-{i}" for i in range(300)]
    first = failures(client, run_batch(client, emulator, ids))
    by_status = Counter(line["response"]["status_code"] for line in first.values())
    assert by_status[500] > 20 and by_status[400] > 20
    # Resubmit exactly the failed lines, as a retry round does.
    again = failures(client, run_batch(client, emulator, sorted(first)))
    invalid = {cid for cid, line in first.items() if line["response"]["status_code"] == 400}
    transient = set(first) - invalid
    assert invalid <= set(again)  # every 400 fails again
    still = transient & set(again)
    assert len(still) < 0.5 * len(transient)  # most 500s pass on their second attempt
    assert {again[cid]["response"]["status_code"] for cid in still} <= {500}
    # A third attempt draws again: the survivors of the second are not stuck forever.
    third = failures(client, run_batch(client, emulator, sorted(still)))
    assert len(set(third) & still) < len(still) or not still


def test_429_and_internal_lines(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    emulator.configure(failure_rate=1.0, failure_kinds=("429", "internal"), seed=9)
    lines = failures(client, run_batch(client, emulator, [f"x{i}" for i in range(40)]))
    rate_limited = [line for line in lines.values() if line["response"]]
    internal = [line for line in lines.values() if not line["response"]]
    assert rate_limited and internal and len(lines) == 40
    assert {line["response"]["status_code"] for line in rate_limited} == {429}
    assert {line["response"]["body"]["error"]["code"] for line in rate_limited} == {"rate_limit_exceeded"}
    assert {line["error"]["code"] for line in internal} == {"internal_error"}


def test_expire_next_batches_expires_half_way_and_counts_down(
    client: openai.OpenAI, emulator: EmulatorServer
) -> None:
    emulator.configure(expire_next_batches=1, rate=10)
    ids = [f"e{i}" for i in range(20)]
    expired = run_batch(client, emulator, ids)
    assert expired.status == "expired"
    assert expired.request_counts.completed == 10
    lost = failures(client, expired)
    assert len(lost) == 10 and {line["error"]["code"] for line in lost.values()} == {"batch_expired"}
    retry = run_batch(client, emulator, sorted(lost))  # the next batch runs normally
    assert retry.status == "completed" and retry.request_counts.completed == 10


def test_failure_knobs_are_validated() -> None:
    with pytest.raises(ValueError, match="failure_kinds"):
        EmulatorConfig(failure_kinds=("404",))
    with pytest.raises(ValueError, match="expire_next_batches"):
        EmulatorConfig(expire_next_batches=-1)
    assert EmulatorConfig(failure_kinds="500,429").failure_kinds == ("500", "429")
