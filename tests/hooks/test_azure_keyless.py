"""Keyless Azure OpenAI: a Microsoft Entra ID token from azure-identity instead of a key.

The credential is a small fake of our own (azure-identity's token-provider machinery around it is real),
handed to the hook through its ``azure_credential_factory`` seam; the emulator's Azure routes receive
``Authorization: Bearer <token>`` and record a digest of what arrived.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import sys
import time
from typing import Any

import openai
import pytest
from azure.core.credentials import AccessToken

from airflow_openai_batch.hooks.batch import (
    AZURE_TOKEN_SCOPE,
    OpenAIBatchHook,
    default_azure_credential,
    make_client,
    uses_azure_token,
)
from tests.conftest import TEST_API_KEY

TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.fake-entra-token-for-tests.SIGNATURE"


class FakeCredential:
    """An ``azure.core`` TokenCredential that hands out one fixed token and remembers the scopes asked."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken(self.token, int(time.time()) + 3600)


class FakeAsyncCredential:
    """The async twin (``azure.core.credentials_async.AsyncTokenCredential``), which must be closed."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.scopes: list[tuple[str, ...]] = []
        self.closed = False

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken(self.token, int(time.time()) + 3600)

    async def close(self) -> None:
        self.closed = True


class FakeCredentials:
    """An AzureCredentialFactory handing out the fakes above (and keeping them for the test to inspect)."""

    def __init__(self) -> None:
        self.sync = FakeCredential()
        self.async_ = FakeAsyncCredential()

    def __call__(self, *, asynchronous: bool) -> Any:
        return self.async_ if asynchronous else self.sync


def _azure_connection(monkeypatch: pytest.MonkeyPatch, url: str, **fields: Any) -> None:
    conn = {"conn_type": "openai_batch", "host": url, **fields}
    monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", json.dumps(conn))


def _chat_lines(n: int) -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/chat/completions",
                "body": {"model": "my-deployment", "messages": [{"role": "user", "content": "hi"}]},
            }
        ).encode()
        + b"\n"
        for i in range(n)
    )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_token_provider_login_reaches_the_azure_routes_as_a_bearer_token(
    emulator, monkeypatch, caplog
) -> None:
    _azure_connection(
        monkeypatch, emulator.url, extra={"api_version": "2024-10-21", "azure_ad_token_provider": True}
    )
    credentials = FakeCredentials()
    hook = OpenAIBatchHook(azure_credential_factory=credentials)
    caplog.set_level(logging.DEBUG)

    assert isinstance(hook.client, openai.AzureOpenAI)
    file_id = hook.upload_file(io.BytesIO(_chat_lines(3)), filename="in.jsonl").id
    batch = hook.create_batch(input_file_id=file_id, endpoint="/chat/completions")
    emulator.advance(3600)
    assert hook.get_batch(batch.id).status == "completed"

    stats = emulator.stats()
    assert stats["last_auth"] == "bearer" and stats["auth"] == {"bearer": stats["azure_calls"]}
    assert stats["last_credential_sha256"] == _sha256(TOKEN)  # the token itself arrived
    assert stats["last_api_version"] == "2024-10-21"
    assert credentials.sync.scopes and set(credentials.sync.scopes) == {(AZURE_TOKEN_SCOPE,)}
    assert TOKEN not in caplog.text


def test_no_key_with_azure_selected_also_logs_in_with_a_token(emulator, monkeypatch) -> None:
    for name in ("AZURE_OPENAI_API_KEY", "AZURE_OPENAI_AD_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    _azure_connection(monkeypatch, emulator.url, extra={"api_version": "2025-04-01-preview"})
    hook = OpenAIBatchHook(azure_credential_factory=FakeCredentials())
    assert uses_azure_token(hook.connection)
    list(hook.list_batches())
    assert emulator.stats()["last_credential_sha256"] == _sha256(TOKEN)


def test_a_key_keeps_the_key_login(emulator, monkeypatch) -> None:
    _azure_connection(monkeypatch, emulator.url, password=TEST_API_KEY, extra={"api_version": "2024-10-21"})
    hook = OpenAIBatchHook(azure_credential_factory=FakeCredentials())
    assert not uses_azure_token(hook.connection)
    list(hook.list_batches())
    stats = emulator.stats()
    assert stats["last_auth"] == "api-key" and stats["last_credential_sha256"] == _sha256(TEST_API_KEY)


def test_async_client_uses_the_async_credential_and_closes_it(emulator, monkeypatch) -> None:
    _azure_connection(
        monkeypatch, emulator.url, extra={"api_version": "2024-10-21", "azure_ad_token_provider": "true"}
    )
    credentials = FakeCredentials()
    hook = OpenAIBatchHook(azure_credential_factory=credentials)
    file_id = hook.upload_file(io.BytesIO(_chat_lines(2)), filename="in.jsonl").id
    batch_id = hook.create_batch(input_file_id=file_id, endpoint="/chat/completions").id

    async def poll() -> str:
        try:
            return (await hook.aget_batch(batch_id)).id
        finally:
            await hook.aclose()

    assert asyncio.run(poll()) == batch_id
    assert credentials.async_.scopes == [(AZURE_TOKEN_SCOPE,)]
    assert credentials.async_.closed
    assert emulator.stats()["last_credential_sha256"] == _sha256(TOKEN)


def test_a_token_echoed_by_the_server_never_reaches_the_exception(emulator, monkeypatch) -> None:
    _azure_connection(
        monkeypatch, emulator.url, extra={"api_version": "2024-10-21", "azure_ad_token_provider": True}
    )
    # The emulator's 404 quotes the batch id asked for: asking for the token makes the server echo it.
    hook = OpenAIBatchHook(azure_credential_factory=FakeCredentials())
    with pytest.raises(openai.NotFoundError) as caught:
        hook.get_batch(TOKEN)
    assert TOKEN not in str(caught.value) and TOKEN not in json.dumps(caught.value.body)
    assert "***" in str(caught.value)


def test_the_token_is_registered_with_the_task_log_masker(emulator, monkeypatch) -> None:
    from airflow.providers.common.compat.sdk import redact

    token = "entra-token-never-seen-before-7311"
    line = f"a careless line that prints the token: {token}"
    assert token in str(redact(line))
    _azure_connection(
        monkeypatch, emulator.url, extra={"api_version": "2024-10-21", "azure_ad_token_provider": True}
    )
    credentials = FakeCredentials()
    credentials.sync = FakeCredential(token)
    list(OpenAIBatchHook(azure_credential_factory=credentials).list_batches())
    assert token not in str(redact(line))


def test_misconfigured_keyless_connections_are_clear_errors(monkeypatch) -> None:
    from airflow.sdk import Connection

    not_azure = Connection(
        conn_id="c1", conn_type="openai_batch", extra=json.dumps({"azure_ad_token_provider": True})
    )
    with pytest.raises(ValueError, match="'c1': azure_ad_token_provider needs Azure OpenAI"):
        make_client(not_azure, azure_credential=FakeCredential())
    both = Connection(
        conn_id="c2",
        conn_type="openai_batch",
        password=TEST_API_KEY,
        extra=json.dumps({"api_version": "2024-10-21", "azure_ad_token_provider": True}),
    )
    with pytest.raises(ValueError, match="'c2' has both a key and azure_ad_token_provider") as caught:
        make_client(both, azure_credential=FakeCredential())
    assert TEST_API_KEY not in str(caught.value)


def test_default_credential_is_azure_identitys_and_a_missing_extra_says_what_to_install(
    monkeypatch,
) -> None:
    from azure.identity import DefaultAzureCredential
    from azure.identity.aio import DefaultAzureCredential as AsyncDefaultAzureCredential

    assert isinstance(default_azure_credential(asynchronous=False), DefaultAzureCredential)
    credential = default_azure_credential(asynchronous=True)
    assert isinstance(credential, AsyncDefaultAzureCredential)
    asyncio.run(credential.close())

    # As if the [azure] extra were not installed.
    monkeypatch.setitem(sys.modules, "azure.identity", None)
    with pytest.raises(ImportError, match=r"pip install 'airflow-openai-batch\[azure\]'"):
        default_azure_credential(asynchronous=False)
