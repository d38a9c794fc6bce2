"""Fixtures for the emulator tests: one server per module, reset per test, and clients whose every
JSON response is validated against OpenAI's published schemas (the check runs on all tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import openai
import pytest

from airflow_openai_batch.emulator import EmulatorServer

from .helpers import SchemaChecker


@pytest.fixture(scope="module")
def server() -> Iterator[EmulatorServer]:
    # A frozen clock: time moves only through advance(), so every lifecycle test is deterministic.
    with EmulatorServer(time_scale=0) as srv:
        yield srv


@pytest.fixture
def emulator(server: EmulatorServer) -> Iterator[EmulatorServer]:
    server.reset(restore_config=True)
    yield server
    server.reset(restore_config=True)


@pytest.fixture
def schema_checker() -> Iterator[SchemaChecker]:
    checker = SchemaChecker()
    yield checker
    assert not checker.failures, "\n".join(checker.failures)


@pytest.fixture
def make_client(
    emulator: EmulatorServer, schema_checker: SchemaChecker
) -> Iterator[Callable[..., openai.OpenAI]]:
    """Strict openai clients on the emulator, every response checked against the schemas."""
    clients: list[openai.OpenAI] = []

    def make(**kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("_strict_response_validation", True)
        http_client = httpx2.Client(event_hooks={"response": [schema_checker]})
        client = emulator.client(http_client=http_client, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: Callable[..., openai.OpenAI]) -> openai.OpenAI:
    return make_client()
