"""Hook for the OpenAI Files + Batches API (OpenAI, Azure OpenAI, or any compatible base URL)."""

from __future__ import annotations

import asyncio
import functools
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from airflow_openai_batch.compat import BaseHook, get_async_connection, mask_secret
from airflow_openai_batch.core.jsonl import LineIterator, iter_raw_blocks, lines_from_raw_blocks
from airflow_openai_batch.core.progress import describe_api_error, retry_after_seconds
from airflow_openai_batch.limits import COMPLETION_WINDOW, MAX_LIST_PAGE_SIZE

if TYPE_CHECKING:
    from openai import AsyncOpenAI, OpenAI
    from openai.types import Batch, FileObject

    from airflow_openai_batch.compat import Connection

#: Read size when streaming a result file; large enough that per-chunk overhead vanishes.
_DOWNLOAD_CHUNK_BYTES = 1 << 20
#: Downloads of one file before a connection cut short is an error.
_DOWNLOAD_ATTEMPTS = 5
#: Longest Retry-After a rate-limited create waits for in-process; longer ones raise.
_MAX_CREATE_RETRY_AFTER = 60.0
#: The Microsoft Entra ID scope of Azure OpenAI (Cognitive Services) access tokens.
AZURE_TOKEN_SCOPE = "https://cognitiveservices.azure.com/.default"
#: Environment variables the Azure client reads a key or token from when it is given none.
_AZURE_ENV_CREDENTIALS = ("AZURE_OPENAI_API_KEY", "AZURE_OPENAI_AD_TOKEN")


class AzureCredentialFactory(Protocol):
    """Makes the credential a keyless Azure connection logs in with.

    With ``asynchronous=False`` it returns an ``azure.core.credentials.TokenCredential`` (sync
    ``get_token``), with ``asynchronous=True`` an ``azure.core.credentials_async.AsyncTokenCredential``
    (for the trigger's async client). The default is :func:`default_azure_credential`.
    """

    def __call__(self, *, asynchronous: bool) -> Any: ...


def _azure_identity_missing(err: ImportError) -> ImportError:
    return ImportError(
        "Keyless Azure OpenAI login (connection extra azure_ad_token_provider, or Azure without a key) "
        "needs the azure-identity package: pip install 'airflow-openai-batch[azure]'"
    )


def default_azure_credential(*, asynchronous: bool) -> Any:
    """``azure-identity``'s ``DefaultAzureCredential`` (environment, workload or managed identity,
    Azure CLI...), the async one from ``azure.identity.aio`` for an async client."""
    try:
        if asynchronous:
            from azure.identity.aio import DefaultAzureCredential
        else:
            from azure.identity import DefaultAzureCredential
    except ImportError as err:
        raise _azure_identity_missing(err) from err
    return DefaultAzureCredential()


def azure_token_provider(credential: Any, *, asynchronous: bool) -> Callable[[], Any]:
    """A bearer-token provider for the Azure clients' ``azure_ad_token_provider``, from ``credential``.

    ``azure-identity`` caches and refreshes the token. Each new token is registered with Airflow's
    secrets masker, so it is redacted should anything ever log it.
    """
    try:
        if asynchronous:
            from azure.identity.aio import get_bearer_token_provider as get_async_provider
        else:
            from azure.identity import get_bearer_token_provider
    except ImportError as err:
        raise _azure_identity_missing(err) from err
    masked: set[str] = set()

    def mask(token: str) -> str:
        if token not in masked:
            masked.clear()  # only the current token needs remembering
            masked.add(token)
            mask_secret(token)
        return token

    if asynchronous:
        fetch_async: Callable[[], Awaitable[str]] = get_async_provider(credential, AZURE_TOKEN_SCOPE)

        async def provide_async() -> str:
            return mask(await fetch_async())

        return provide_async
    fetch = get_bearer_token_provider(credential, AZURE_TOKEN_SCOPE)
    return lambda: mask(fetch())


def _is_true(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return value is True


def uses_azure_token(conn: Connection) -> bool:
    """Whether the connection logs in to Azure OpenAI without a key (Microsoft Entra ID token).

    True with the extra ``azure_ad_token_provider: true``, or when Azure is selected (``api_version``)
    and no key is given (no password, no extra ``api_key``, no ``AZURE_OPENAI_API_KEY`` /
    ``AZURE_OPENAI_AD_TOKEN`` / ``OPENAI_API_KEY`` in the environment).

    :raises ValueError: the extra is set on a connection that is not Azure, or beside a key.
    """
    extra = conn.extra_dejson or {}
    has_key = bool(conn.password or extra.get("api_key"))
    if _is_true(extra.get("azure_ad_token_provider")):
        if not extra.get("api_version"):
            raise ValueError(
                f"Connection {conn.conn_id!r}: azure_ad_token_provider needs Azure OpenAI, selected by the "
                "extra api_version (with host as the Azure endpoint)"
            )
        if has_key:
            raise ValueError(
                f"Connection {conn.conn_id!r} has both a key and azure_ad_token_provider: true; "
                "remove one (a key and a token cannot both be sent)"
            )
        return True
    if not extra.get("api_version") or has_key:
        return False
    return not any(os.environ.get(name) for name in (*_AZURE_ENV_CREDENTIALS, "OPENAI_API_KEY"))


def build_client_kwargs(conn: Connection) -> tuple[bool, dict[str, Any]]:
    """Turn an Airflow connection into ``(is_azure, kwargs)`` for the openai client classes.

    The single place a connection is interpreted, shared by the sync and async clients.
    password = API key; host = base URL (Azure endpoint when ``api_version`` is set);
    extra: ``organization``, ``project``, ``timeout``, ``max_retries``, ``default_headers``,
    ``api_version``, ``azure_ad_token_provider`` (keyless Azure: see :func:`uses_azure_token`) and
    ``openai_client_kwargs`` (passed through last, so it wins).
    """
    extra = conn.extra_dejson or {}
    if uses_azure_token(conn):
        api_key = None  # the client is given a token provider instead (see make_client)
    else:
        api_key = conn.password or extra.get("api_key") or os.environ.get("OPENAI_API_KEY")
    if api_key:
        mask_secret(api_key)
    kwargs: dict[str, Any] = {"api_key": api_key}
    api_version = extra.get("api_version")
    base_url = conn.host or None
    if base_url and conn.schema and "://" not in base_url:
        base_url = f"{conn.schema}://{base_url}"
    if base_url and conn.port and f":{conn.port}" not in base_url:
        base_url = base_url.rstrip("/") + f":{conn.port}"
    if api_version:
        kwargs["api_version"] = api_version
        if base_url:
            kwargs["azure_endpoint"] = base_url
    elif base_url:
        kwargs["base_url"] = base_url
    for key in ("organization", "project", "default_headers"):
        if extra.get(key):
            kwargs[key] = extra[key]
    if extra.get("timeout") not in (None, ""):
        kwargs["timeout"] = float(extra["timeout"])
    if extra.get("max_retries") not in (None, ""):
        kwargs["max_retries"] = int(extra["max_retries"])
    kwargs.update(extra.get("openai_client_kwargs") or {})
    return bool(api_version), kwargs


def make_client(
    conn: Connection,
    *,
    asynchronous: bool = False,
    overrides: Mapping[str, Any] | None = None,
    azure_credential: Any = None,
) -> OpenAI | AsyncOpenAI:
    """The one client factory: OpenAI/AsyncOpenAI, or the Azure twins when ``api_version`` is set.

    :param overrides: client kwargs that win over the connection (e.g. ``max_retries=0`` for a caller
        that retries by itself).
    :param azure_credential: for a keyless Azure connection, the credential to take tokens from (sync or
        async to match ``asynchronous``); default: a new ``DefaultAzureCredential``.
    """
    import openai

    is_azure, kwargs = build_client_kwargs(conn)
    if is_azure and uses_azure_token(conn):
        if azure_credential is None:
            azure_credential = default_azure_credential(asynchronous=asynchronous)
        kwargs.pop("api_key", None)
        kwargs["azure_ad_token_provider"] = azure_token_provider(azure_credential, asynchronous=asynchronous)
    kwargs.update(overrides or {})
    if is_azure:
        cls = openai.AsyncAzureOpenAI if asynchronous else openai.AzureOpenAI
    else:
        cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return _key_redacting(cls)(**kwargs)


@functools.cache
def _key_redacting(cls: type) -> type:
    """``cls`` whose API errors never carry its API key, even when a server echoes the key back."""

    class KeyRedacting(cls):  # type: ignore[misc,valid-type]
        # The SDK's documented hook for building API errors; overridden because there is no public way
        # to keep a credential a server echoes back out of the error text.
        def _make_status_error(self, err_msg: str, *, body: object, response: Any) -> Any:
            for secret in (self.api_key, *_request_credentials(response)):
                if secret:
                    err_msg = err_msg.replace(secret, "***")
                    body = _redact(body, secret)
            return super()._make_status_error(err_msg, body=body, response=response)

    KeyRedacting.__name__ = KeyRedacting.__qualname__ = cls.__name__
    return KeyRedacting


def _request_credentials(response: Any) -> tuple[str, ...]:
    """The key or bearer token the failed request carried (an Azure token is not the client's api_key)."""
    headers = response.request.headers
    bearer = headers.get("authorization", "")
    token = bearer[7:].strip() if bearer[:7].lower() == "bearer " else ""
    return (token, headers.get("api-key", ""))


def _redact(value: Any, secret: str) -> Any:
    if isinstance(value, str):
        return value.replace(secret, "***")
    if isinstance(value, dict):
        return {k: _redact(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, secret) for v in value]
    return value


def is_rate_limited(err: BaseException) -> bool:
    """A 429 that waiting fixes: nothing was done, try again later (a spent quota is not one)."""
    import openai

    return isinstance(err, openai.RateLimitError) and getattr(err, "code", None) != "insufficient_quota"


def is_ambiguous_error(err: BaseException) -> bool:
    """True when a call may or may not have taken effect (timeout, dropped connection, 5xx)."""
    import openai

    if isinstance(err, (openai.APITimeoutError, openai.APIConnectionError)):
        return True
    return isinstance(err, openai.APIStatusError) and err.status_code >= 500


class OpenAIBatchHook(BaseHook):
    """Talks to the OpenAI Files and Batches API.

    :param conn_id: Airflow connection of type ``openai_batch`` (connections made for the official
        ``openai`` provider work too). password = API key, host = base URL, extra as in the README.
    :param client_overrides: openai client kwargs that win over the connection's (e.g. ``max_retries``).
    :param azure_credential_factory: makes the credential of a keyless Azure connection (default:
        ``DefaultAzureCredential``); a seam for tests and for custom Entra ID logins.
    """

    conn_name_attr = "conn_id"
    default_conn_name = "openai_default"
    conn_type = "openai_batch"
    hook_name = "OpenAI Batch"

    def __init__(
        self,
        conn_id: str = default_conn_name,
        client_overrides: Mapping[str, Any] | None = None,
        azure_credential_factory: AzureCredentialFactory = default_azure_credential,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id
        self.client_overrides = dict(client_overrides or {})
        self.azure_credential_factory = azure_credential_factory
        self._async_client: AsyncOpenAI | None = None
        self._async_credential: Any = None
        self._async_client_lock = asyncio.Lock()

    # -- clients ---------------------------------------------------------------------------------

    @cached_property
    def connection(self) -> Connection:
        return self.get_connection(self.conn_id)

    @cached_property
    def client(self) -> OpenAI:
        conn = self.connection
        credential = self.azure_credential_factory(asynchronous=False) if uses_azure_token(conn) else None
        return make_client(  # type: ignore[return-value]
            conn, overrides=self.client_overrides, azure_credential=credential
        )

    def get_conn(self) -> OpenAI:
        return self.client

    @property
    def is_azure(self) -> bool:
        return bool((self.connection.extra_dejson or {}).get("api_version"))

    async def aget_async_client(self) -> AsyncOpenAI:
        """An async client from a connection fetched without blocking the event loop (for triggers)."""
        # Concurrent polls must share one client (one connection pool), so build it once.
        async with self._async_client_lock:
            if self._async_client is None:
                # BaseHook.aget_connection is missing on 3.0 and can deadlock before 3.3.2: compat picks.
                conn = await get_async_connection(self.conn_id, hook=self)
                if uses_azure_token(conn):
                    # Kept to be closed with the client: the async credential holds its own session.
                    self._async_credential = self.azure_credential_factory(asynchronous=True)
                self._async_client = make_client(  # type: ignore[assignment]
                    conn,
                    asynchronous=True,
                    overrides=self.client_overrides,
                    azure_credential=self._async_credential,
                )
        return self._async_client  # type: ignore[return-value]

    # -- files -----------------------------------------------------------------------------------

    def upload_file(
        self,
        source: str | os.PathLike[str] | IO[bytes],
        *,
        filename: str | None = None,
        purpose: str = "batch",
        expires_after: int | None = None,
    ) -> FileObject:
        """Upload a batch input file, streaming it from disk or a file object (never read whole).

        :param source: a local path or a binary file object positioned at the start.
        :param filename: the name OpenAI shows; defaults to the path's name.
        :param purpose: the file purpose, ``batch`` for batch input.
        :param expires_after: seconds after upload when OpenAI deletes the file (``expires_after`` with
            anchor ``created_at``; OpenAI accepts 3600-2592000); ``None`` keeps OpenAI's default (30 days
            for batch files).
        """
        extra: dict[str, Any] = {}
        if expires_after is not None:
            extra["expires_after"] = {"anchor": "created_at", "seconds": int(expires_after)}
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            with path.open("rb") as stream:
                # A (name, file object) tuple makes the SDK stream the body; a bare path would be
                # read fully into memory by the SDK.
                return self.client.files.create(
                    file=(filename or path.name, stream),
                    purpose=purpose,
                    **extra,
                )
        return self.client.files.create(
            file=(filename or "batch.jsonl", source),
            purpose=purpose,
            **extra,
        )

    def iter_file_lines(self, file_id: str) -> LineIterator:
        """A file's lines (raw bytes, no newline), as :func:`~airflow_openai_batch.core.jsonl.iter_lines`
        yields them (so a consumer may take them as raw blocks). Nothing is downloaded until the first
        line is read. The body is streamed into a local spool file (memory stays flat) and downloaded
        again from the start when the connection drops, so a download cut short is never read as the
        file."""
        return lines_from_raw_blocks(self._iter_file_blocks(file_id))

    def _iter_file_blocks(self, file_id: str) -> Iterator[bytes]:
        with tempfile.TemporaryFile(prefix="openai-batch-download-") as spool:
            self._download(file_id, spool)
            spool.seek(0)
            yield from iter_raw_blocks(spool)

    def _download(self, file_id: str, out: IO[bytes]) -> None:
        import httpx2
        import openai

        for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
            out.seek(0)
            out.truncate()
            try:
                with self.client.files.with_streaming_response.content(file_id) as response:
                    for chunk in response.iter_bytes(_DOWNLOAD_CHUNK_BYTES):
                        out.write(chunk)
                return
            except (httpx2.TransportError, openai.APIConnectionError) as err:
                if attempt == _DOWNLOAD_ATTEMPTS:
                    raise
                self.log.warning(
                    "Download of %s broke off (%s); downloading it again (%d of %d)",
                    file_id,
                    type(err).__name__,
                    attempt + 1,
                    _DOWNLOAD_ATTEMPTS,
                )
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))

    def get_file(self, file_id: str) -> FileObject:
        return self.client.files.retrieve(file_id)

    def delete_file(self, file_id: str) -> bool:
        return bool(self.client.files.delete(file_id).deleted)

    # -- batches ---------------------------------------------------------------------------------

    def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str = COMPLETION_WINDOW,
        metadata: Mapping[str, str] | None = None,
        output_expires_after: int | None = None,
    ) -> Batch:
        """Create a batch. Never retried by the SDK: a retried POST can create a duplicate batch.

        Callers that get an ambiguous error (timeout, 5xx, dropped connection) must look the batch up
        by its metadata before creating again (see :meth:`find_batch`).
        """
        extra: dict[str, Any] = {}
        if metadata:
            extra["metadata"] = dict(metadata)
        if output_expires_after is not None:
            extra["output_expires_after"] = {"anchor": "created_at", "seconds": int(output_expires_after)}
        return self.client.with_options(max_retries=0).batches.create(
            input_file_id=input_file_id,
            endpoint=endpoint,  # type: ignore[arg-type]
            completion_window=completion_window,  # type: ignore[arg-type]
            **extra,
        )

    def create_batch_reconciled(
        self,
        *,
        lookup: tuple[str, str],
        input_file_id: str,
        endpoint: str,
        completion_window: str = COMPLETION_WINDOW,
        metadata: Mapping[str, str] | None = None,
        output_expires_after: int | None = None,
        attempts: int = 5,
        is_reusable: Callable[[Batch], bool] = lambda batch: True,
    ) -> Batch:
        """Create a batch at most once, even when the API answers ambiguously.

        A timeout, 5xx or dropped connection may or may not have created the batch, so before trying
        again the batch is looked up by a metadata pair unique to it (``lookup``, also present in
        ``metadata``). A 429 created nothing: it is waited out (Retry-After) and tried again. Other
        errors propagate at once.

        :param lookup: ``(metadata_key, value)`` identifying this batch.
        :param attempts: create calls at most.
        :param is_reusable: whether a batch found by the lookup may stand for the one being created.
        """
        key, value = lookup
        for attempt in range(1, attempts + 1):
            started = int(time.time())
            try:
                return self.create_batch(
                    input_file_id=input_file_id,
                    endpoint=endpoint,
                    completion_window=completion_window,
                    metadata=metadata,
                    output_expires_after=output_expires_after,
                )
            except Exception as err:
                if attempt == attempts:
                    raise
                if is_rate_limited(err):
                    wait = retry_after_seconds(err)
                    wait = min(2**attempt, 10) if wait is None else wait
                    if wait > _MAX_CREATE_RETRY_AFTER:
                        raise
                    self.log.warning("Creating a batch was rate limited (429); trying again in %.1f s", wait)
                    time.sleep(wait)
                    continue
                if not is_ambiguous_error(err):
                    raise
                self.log.warning(
                    "Creating a batch answered %s; looking it up (%s=%s) before trying again",
                    type(err).__name__,
                    key,
                    value,
                )
                # Five minutes of slack: the server's clock and ours may differ.
                for batch in self.find_batch(key, value, created_after=started - 300):
                    if is_reusable(batch):
                        return batch
                time.sleep(min(2**attempt, 10))
        raise AssertionError("unreachable")

    def get_batch(self, batch_id: str) -> Batch:
        return self.client.batches.retrieve(batch_id)

    def cancel_batch(self, batch_id: str) -> Batch:
        return self.client.batches.cancel(batch_id)

    def list_batches(
        self, *, created_after: int | None = None, page_size: int = MAX_LIST_PAGE_SIZE
    ) -> Iterator[Batch]:
        """Yield batches newest first across all pages, stopping at the first older than ``created_after``.

        :param created_after: unix seconds; a cut-off so a lookup does not walk years of history.
        :param page_size: batches per page (1-100).
        """
        for batch in self.client.batches.list(limit=page_size):
            if created_after is not None and batch.created_at < created_after:
                return
            yield batch

    def find_batch(
        self, metadata_key: str, metadata_value: str, *, created_after: int | None = None
    ) -> Iterator[Batch]:
        """Yield batches (newest first) whose metadata has ``metadata_key == metadata_value``."""
        for batch in self.list_batches(created_after=created_after):
            if (batch.metadata or {}).get(metadata_key) == metadata_value:
                yield batch

    # -- async, for the trigger ------------------------------------------------------------------

    async def aget_batch(self, batch_id: str) -> Batch:
        client = await self.aget_async_client()
        return await client.batches.retrieve(batch_id)

    async def acancel_batch(self, batch_id: str) -> Batch:
        client = await self.aget_async_client()
        return await client.batches.cancel(batch_id)

    async def alist_batches(
        self, *, created_after: int | None = None, page_size: int = MAX_LIST_PAGE_SIZE
    ) -> AsyncIterator[Batch]:
        """Async twin of :meth:`list_batches`."""
        client = await self.aget_async_client()
        async for batch in client.batches.list(limit=page_size):
            if created_after is not None and batch.created_at < created_after:
                return
            yield batch

    async def alist_batch_pages(self, *, page_size: int = MAX_LIST_PAGE_SIZE) -> AsyncIterator[list[Batch]]:
        """Pages of batches, newest first, one ``batches.list`` call each, fetched only when asked for.

        Page by page rather than batch by batch, so a caller can count its calls and stop between pages.

        :param page_size: batches per page (1-100).
        """
        client = await self.aget_async_client()
        page = await client.batches.list(limit=page_size)
        while True:
            yield list(page.data or ())
            if not page.has_next_page():
                return
            page = await page.get_next_page()

    async def aclose(self) -> None:
        if self._async_client is not None:
            await self._async_client.close()
            self._async_client = None
        if self._async_credential is not None:
            await self._async_credential.close()
            self._async_credential = None

    # -- UI --------------------------------------------------------------------------------------

    def test_connection(self) -> tuple[bool, str]:
        """Check the key and base URL with one cheap call (list one batch)."""
        try:
            self.client.batches.list(limit=1)
        except Exception as err:  # the UI wants a message, not a traceback
            return False, describe_api_error(err)
        return True, "Connection to the OpenAI Batch API works."
