"""Injected faults: 429 with Retry-After, 500, dropped connections, and the ambiguous create."""

from __future__ import annotations

from collections.abc import Callable

import httpx2
import openai
import pytest

from airflow_openai_batch.emulator import EmulatorServer

from .helpers import chat_line, upload

GET_ROUTES = ("files.retrieve", "files.list", "batches.retrieve", "batches.list")


def test_sdk_retries_recover_from_faults_on_gets(
    make_client: Callable[..., openai.OpenAI], emulator: EmulatorServer
) -> None:
    setup = make_client()
    file_id = upload(setup, [chat_line("a")])
    batch = setup.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    # Seed 2 injects every kind (429, 500, drop) early in the stream while keeping the SDK's
    # exponential backoff (0.5 s and up for 500s and drops) short.
    emulator.configure(fault_rate=0.3, fault_routes=GET_ROUTES, seed=2)
    retrying = make_client(max_retries=5)
    for _ in range(4):
        assert retrying.files.retrieve(file_id).id == file_id
        assert retrying.batches.retrieve(batch.id).id == batch.id
        assert [b.id for b in retrying.batches.list().data] == [batch.id]
    stats = emulator.stats()
    faults = sum(stats["faults"][route] for route in GET_ROUTES)
    assert faults > 0, "the seeded fault stream must have hit some calls"
    assert sum(stats["calls"][route] for route in GET_ROUTES) == 12 + faults  # every fault was retried
    assert stats["faults"]["batches.create"] == 0  # not a faulted route
    assert set(stats["faults_by_kind"]) == {"429", "500", "drop"}


def test_injected_429_carries_retry_after(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    emulator.configure(fault_rate=1.0, fault_kinds=("429",), retry_after=0.25)
    with pytest.raises(openai.RateLimitError) as info:
        client.batches.list()
    headers = info.value.response.headers
    assert headers["retry-after-ms"] == "250"
    assert float(headers["retry-after"]) == 0.25
    assert info.value.code == "rate_limit_exceeded"
    assert emulator.stats()["faults_by_kind"] == {"429": 1}


def test_injected_500(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    emulator.configure(fault_rate=1.0, fault_kinds=("500",))
    with pytest.raises(openai.InternalServerError):
        client.files.list()


def test_drop_is_a_connection_error_and_the_server_survives(
    client: openai.OpenAI, emulator: EmulatorServer
) -> None:
    emulator.configure(fault_rate=1.0, fault_kinds=("drop",), fault_routes=("batches.list",))
    for _ in range(3):
        with pytest.raises(openai.APIConnectionError) as info:
            client.batches.list()
        assert isinstance(info.value.__cause__, httpx2.TransportError)
    # Other routes, and the same one once faults are off, still work: uvicorn survived the drops.
    assert client.files.list().data == []
    emulator.configure(fault_rate=0.0)
    assert client.batches.list().data == []
    assert emulator.stats()["faults"]["batches.list"] == 3


@pytest.mark.parametrize("kind", ["429", "500", "drop"])
def test_faulted_create_creates_nothing(client: openai.OpenAI, emulator: EmulatorServer, kind: str) -> None:
    file_id = upload(client, [chat_line("a")])
    emulator.configure(fault_rate=1.0, fault_kinds=(kind,), fault_routes=("batches.create",))
    with pytest.raises((openai.APIStatusError, openai.APIConnectionError)):
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    emulator.configure(fault_rate=0.0)
    assert client.batches.list().data == []
    assert emulator.stats()["batches"] == 0


def test_faulted_upload_stores_nothing(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    emulator.configure(fault_rate=1.0, fault_kinds=("drop",), fault_routes=("files.create",))
    with pytest.raises(openai.APIConnectionError):
        upload(client, [chat_line("a")])
    emulator.configure(fault_rate=0.0)
    assert client.files.list().data == []


@pytest.mark.parametrize("kind", ["500", "drop"])
def test_fault_after_create_is_the_ambiguous_case(
    make_client: Callable[..., openai.OpenAI], emulator: EmulatorServer, kind: str
) -> None:
    client = make_client()
    file_id = upload(client, [chat_line("a")])
    emulator.configure(fault_after_create_rate=1.0, fault_kinds=(kind,))
    with pytest.raises((openai.InternalServerError, openai.APIConnectionError)):
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    # The batch exists although the client saw an error.
    [batch] = client.batches.list().data
    assert batch.input_file_id == file_id
    assert emulator.stats()["faults_after_create"] == 1

    # A client that blindly retries the create makes a duplicate: what retry-safety must avoid.
    retrying = make_client(max_retries=1)
    with pytest.raises((openai.InternalServerError, openai.APIConnectionError)):
        retrying.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert len(client.batches.list().data) == 3


def test_faults_are_reproducible_for_a_seed(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    def pattern() -> list[bool]:
        emulator.reset()
        emulator.configure(fault_rate=0.5, fault_kinds=("500",), seed=11)
        outcome = []
        for _ in range(20):
            try:
                client.files.list()
                outcome.append(True)
            except openai.InternalServerError:
                outcome.append(False)
        return outcome

    first = pattern()
    assert first == pattern()
    assert True in first and False in first
