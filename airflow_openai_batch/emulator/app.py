"""The ASGI app: OpenAI's Files + Batches routes, auth, fault injection and admin routes.

The API routes answer under ``/v1`` (OpenAI), without prefix, and under Azure OpenAI's
``/openai``, ``/openai/v1`` and ``/openai/deployments/{name}`` prefixes (``api-key`` header and
``?api-version=`` query, both recorded in the stats).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send

from .config import EmulatorConfig
from .responses import RETIRED_ENDPOINTS, canonical_endpoint
from .state import MAX_UPLOAD_BYTES, UPLOAD_PURPOSES, ApiError, EmulatorState, allowed_endpoints
from .upload import UploadError, receive_upload
from .validation import scan_input

Handler = Callable[[Request, EmulatorState], Awaitable[Response]]

_DROP_MESSAGE = "ASGI callable returned without completing response."
_CHUNK = 256 * 1024


class JSONResponse(Response):
    """orjson-encoded JSON, with an ``x-request-id`` header as OpenAI sends."""

    media_type = "application/json"

    def __init__(self, content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> None:
        headers = {"x-request-id": "req_" + secrets.token_hex(16), **(headers or {})}
        super().__init__(content, status_code=status_code, headers=headers)

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class DroppedResponse(Response):
    """A connection dropped mid-response: announces a Content-Length, sends part of the body and
    returns without finishing it, so the server closes the connection and the client sees an
    incomplete read (httpx ``RemoteProtocolError`` -> openai ``APIConnectionError``)."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"id": "dropped', "more_body": True})


class _ExpectedDropFilter(logging.Filter):
    """Hide uvicorn's complaint about the responses we drop on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _DROP_MESSAGE


def _install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _ExpectedDropFilter) for f in logger.filters):
        logger.addFilter(_ExpectedDropFilter())


def fault_response(kind: str, retry_after: float) -> Response:
    """The response of an injected fault of ``kind`` (``429``, ``500`` or ``drop``)."""
    if kind == "429":
        error = ApiError(
            429,
            "Rate limit reached for requests (emulated). Please try again later.",
            type="requests",
            code="rate_limit_exceeded",
        )
        return error_response(
            error,
            headers={
                "retry-after-ms": str(round(retry_after * 1000)),
                "retry-after": format(retry_after, "g"),
            },
        )
    if kind == "500":
        return error_response(
            ApiError(
                500,
                "The server had an error while processing your request. Sorry about that! (emulated)",
                type="server_error",
                code="server_error",
            )
        )
    return DroppedResponse()


def _credential(request: Request) -> tuple[str, str] | None:
    """``(style, secret)`` of the key or token the request carries: ``bearer`` or ``api-key``."""
    authorization = request.headers.get("authorization", "")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return "bearer", key.strip()
    api_key = request.headers.get("api-key", "").strip()
    if api_key:
        return "api-key", api_key
    return None


def _is_azure(request: Request) -> bool:
    return request.url.path.startswith("/openai/")


def api_route(route_name: str) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Wrap a handler with what every API call goes through: stats, auth, then fault injection
    (decided before the handler runs, so a faulted call does nothing), then error mapping."""

    def decorate(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            state: EmulatorState = request.app.state.emulator
            credential = _credential(request)
            auth = credential[0] if credential else None
            # Only a digest is kept: tests compare it with the credential they expect to arrive.
            digest = hashlib.sha256(credential[1].encode()).hexdigest() if credential else None
            state.record_call(
                route_name, request.query_params.get("api-version"), auth, _is_azure(request), digest
            )
            if auth is None:
                return error_response(
                    ApiError(
                        401,
                        "You didn't provide an API key. You need to provide your API key in an Authorization "
                        "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                        code="invalid_api_key",
                    )
                )
            fault = state.decide_fault(route_name)
            if fault is not None:
                return fault_response(fault, state.config.retry_after)
            try:
                return await handler(request, state)
            except ApiError as error:
                return error_response(error)

        return endpoint

    return decorate


# ---------------------------------------------------------------------- parameter helpers


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(
            400, f"Invalid '{name}': expected an integer.", param=name, code="invalid_type"
        ) from None
    if not low <= value <= high:
        raise ApiError(
            400,
            f"Invalid '{name}': must be between {low} and {high}, got {value}.",
            param=name,
            code="invalid_value",
        )
    return value


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload.)",
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return data


def _expires_after(anchor: Any, seconds: Any, param: str) -> int | None:
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise ApiError(
            400,
            f"Invalid '{param}.anchor': only 'created_at' is supported.",
            param=f"{param}.anchor",
            code="invalid_value",
        )
    try:
        value = int(seconds)
    except (TypeError, ValueError):
        raise ApiError(
            400,
            f"Invalid '{param}.seconds': expected an integer.",
            param=f"{param}.seconds",
            code="invalid_type",
        ) from None
    if not 3600 <= value <= 2_592_000:
        raise ApiError(
            400,
            f"Invalid '{param}.seconds': must be between 3600 (1 hour) and 2592000 (30 days).",
            param=f"{param}.seconds",
            code="invalid_value",
        )
    return value


def _check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise ApiError(
            400, "Invalid type for 'metadata': expected an object.", param="metadata", code="invalid_type"
        )
    if len(metadata) > 16:
        raise ApiError(
            400,
            "Invalid 'metadata': too many properties. Expected an object with at most 16 properties, but got "
            f"an object with {len(metadata)} properties instead.",
            param="metadata",
            code="object_above_max_properties",
        )
    for key, value in metadata.items():
        if len(key) > 64:
            raise ApiError(
                400,
                f"Invalid 'metadata': key {key[:20]!r}... is too long. Expected a string with maximum "
                "length 64, "
                f"but got a string with length {len(key)} instead.",
                param="metadata",
                code="string_above_max_length",
            )
        if not isinstance(value, str):
            raise ApiError(
                400,
                f"Invalid type for 'metadata.{key}': expected a string.",
                param=f"metadata.{key}",
                code="invalid_type",
            )
        if len(value) > 512:
            raise ApiError(
                400,
                f"Invalid 'metadata.{key}': string too long. Expected a string with maximum length 512, "
                "but got "
                f"a string with length {len(value)} instead.",
                param=f"metadata.{key}",
                code="string_above_max_length",
            )
    return metadata


# ---------------------------------------------------------------------- files


@api_route("files.create")
async def files_create(request: Request, state: EmulatorState) -> Response:
    tmp = state.new_path(".upload")
    try:
        try:
            upload = await receive_upload(
                request.headers.get("content-type"), request.stream(), tmp, max_file_bytes=MAX_UPLOAD_BYTES
            )
        except UploadError as exc:
            raise ApiError(400, exc.message, param=exc.param, code=exc.code) from None
        if upload.filename is None:
            raise ApiError(
                400, "Missing required parameter: 'file'.", param="file", code="missing_required_parameter"
            )
        purpose = upload.fields.get("purpose")
        if not purpose:
            raise ApiError(
                400,
                "Missing required parameter: 'purpose'.",
                param="purpose",
                code="missing_required_parameter",
            )
        if purpose not in UPLOAD_PURPOSES:
            raise ApiError(
                400,
                f"Invalid value for 'purpose': {purpose!r}. "
                f"Supported values are: {', '.join(UPLOAD_PURPOSES)}.",
                param="purpose",
                code="invalid_value",
            )
        ttl = _expires_after(
            upload.fields.get("expires_after[anchor]"),
            upload.fields.get("expires_after[seconds]"),
            "expires_after",
        )
        return JSONResponse(state.add_file(tmp, upload.filename, purpose, upload.size, ttl))
    finally:
        state.discard_path(tmp)  # no-op once add_file moved it into place


@api_route("files.retrieve")
async def files_retrieve(request: Request, state: EmulatorState) -> Response:
    return JSONResponse(state.get_file(request.path_params["file_id"]))


@api_route("files.list")
async def files_list(request: Request, state: EmulatorState) -> Response:
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "Invalid 'order': must be 'asc' or 'desc'.", param="order", code="invalid_value")
    limit = _int_param(request, "limit", 10_000, 1, 10_000)
    return JSONResponse(
        state.list_files(
            purpose=request.query_params.get("purpose"),
            limit=limit,
            after=request.query_params.get("after"),
            order=order,
        )
    )


@api_route("files.delete")
async def files_delete(request: Request, state: EmulatorState) -> Response:
    return JSONResponse(state.delete_file(request.path_params["file_id"]))


@api_route("files.content")
async def files_content(request: Request, state: EmulatorState) -> Response:
    handle, size = state.open_file(request.path_params["file_id"])

    async def chunks() -> Any:
        # Read from the already-open handle: a concurrent delete cannot cut the download short.
        try:
            while chunk := handle.read(_CHUNK):
                yield chunk
        finally:
            handle.close()

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={"content-length": str(size), "x-request-id": "req_" + secrets.token_hex(16)},
    )


# ---------------------------------------------------------------------- batches


@api_route("batches.create")
async def batches_create(request: Request, state: EmulatorState) -> Response:
    data = await _json_object(request)
    for name in ("input_file_id", "endpoint", "completion_window"):
        if data.get(name) is None:
            raise ApiError(
                400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
            )
    endpoint = data["endpoint"]
    allowed = allowed_endpoints(_is_azure(request))
    retired = RETIRED_ENDPOINTS.get(canonical_endpoint(str(endpoint)))
    if retired is not None:
        raise ApiError(400, retired, param="endpoint", code="invalid_value")
    if endpoint not in allowed:
        raise ApiError(
            400,
            f"Invalid value for 'endpoint': {endpoint!r}. Supported values are: {', '.join(allowed)}.",
            param="endpoint",
            code="invalid_value",
        )
    if data["completion_window"] != "24h":
        raise ApiError(
            400,
            f"Invalid value for 'completion_window': {data['completion_window']!r}. "
            "Supported values are: '24h'.",
            param="completion_window",
            code="invalid_value",
        )
    metadata = _check_metadata(data.get("metadata"))
    output_ttl = None
    expires = data.get("output_expires_after")
    if expires is not None:
        if not isinstance(expires, dict):
            raise ApiError(
                400,
                "Invalid type for 'output_expires_after'.",
                param="output_expires_after",
                code="invalid_type",
            )
        output_ttl = _expires_after(expires.get("anchor"), expires.get("seconds"), "output_expires_after")

    cfg = state.config
    batch_id, input_path = state.prepare_batch_input(str(data["input_file_id"]))
    try:
        # The scan reads the whole file: keep it off the event loop.
        scan = await run_in_threadpool(
            scan_input,
            input_path,
            endpoint,
            seed=cfg.seed,
            failure_rate=cfg.failure_rate,
            failure_kinds=cfg.failure_kinds,
            attempt_of=state.line_attempt,
            cached_prompt_rate=cfg.cached_prompt_rate,
            max_requests=cfg.max_requests_per_batch,
            max_bytes=cfg.max_bytes,
            max_embedding_inputs=cfg.max_embedding_inputs,
        )
        batch = state.create_batch(
            batch_id,
            input_path,
            scan,
            endpoint=endpoint,
            input_file_id=str(data["input_file_id"]),
            completion_window="24h",
            metadata=metadata,
            output_expires_after=output_ttl,
            seed=cfg.seed,
            failure_rate=cfg.failure_rate,
            missing_rate=cfg.missing_rate,
        )
    except BaseException:
        state.discard_path(input_path)
        raise
    after = state.decide_fault_after_create()
    if after is not None:
        return fault_response(after, cfg.retry_after)
    return JSONResponse(batch)


@api_route("batches.retrieve")
async def batches_retrieve(request: Request, state: EmulatorState) -> Response:
    return JSONResponse(state.get_batch(request.path_params["batch_id"]))


@api_route("batches.list")
async def batches_list(request: Request, state: EmulatorState) -> Response:
    limit = _int_param(request, "limit", 20, 1, 100)
    return JSONResponse(state.list_batches(limit=limit, after=request.query_params.get("after")))


@api_route("batches.cancel")
async def batches_cancel(request: Request, state: EmulatorState) -> Response:
    return JSONResponse(state.cancel_batch(request.path_params["batch_id"]))


# ---------------------------------------------------------------------- health and admin


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def admin_stats(request: Request) -> Response:
    return JSONResponse(request.app.state.emulator.stats())


async def admin_config(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    if request.method == "POST":
        try:
            knobs = await _json_object(request)
            state.configure(**knobs)
        except (TypeError, ValueError) as exc:
            return error_response(ApiError(400, str(exc), param="config", code="invalid_value"))
        except ApiError as error:
            return error_response(error)
    return JSONResponse(state.config.to_dict())


async def admin_reset(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    body = await request.body()
    restore = bool(orjson.loads(body).get("restore_config")) if body.strip() else False
    state.reset(restore_config=restore)
    return JSONResponse({"reset": True})


async def admin_advance(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    try:
        data = await _json_object(request)
        now = state.advance(float(data.get("seconds", 0)))
    except (TypeError, ValueError) as exc:
        return error_response(ApiError(400, str(exc), param="seconds", code="invalid_value"))
    except ApiError as error:
        return error_response(error)
    return JSONResponse({"now": now})


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = f"Invalid URL ({request.method} {request.url.path})"
    if exc.status_code == 405:
        message = f"Method not allowed ({request.method} {request.url.path})"
    return error_response(ApiError(exc.status_code, message))


async def _unexpected(request: Request, exc: Exception) -> Response:
    # An emulator bug still answers in OpenAI's shape (Starlette logs the traceback).
    return error_response(
        ApiError(
            500, f"Emulator error: {type(exc).__name__}: {exc}", type="server_error", code="server_error"
        )
    )


def _api_routes() -> list[BaseRoute]:
    return [
        Route("/files", files_create, methods=["POST"]),
        Route("/files", files_list, methods=["GET"]),
        Route("/files/{file_id}", files_retrieve, methods=["GET"]),
        Route("/files/{file_id}", files_delete, methods=["DELETE"]),
        Route("/files/{file_id}/content", files_content, methods=["GET"]),
        Route("/batches", batches_create, methods=["POST"]),
        Route("/batches", batches_list, methods=["GET"]),
        Route("/batches/{batch_id}", batches_retrieve, methods=["GET"]),
        Route("/batches/{batch_id}/cancel", batches_cancel, methods=["POST"]),
    ]


def create_app(config: EmulatorConfig | None = None) -> Starlette:
    """Build the emulator's ASGI app; ``app.state.emulator`` is its :class:`EmulatorState`.

    :param config: the knobs (default: ``EmulatorConfig()``).
    """
    _install_log_filter()
    api = _api_routes()
    routes: list[BaseRoute] = [
        Route("/health", health, methods=["GET"]),
        Route("/_emulator/stats", admin_stats, methods=["GET"]),
        Route("/_emulator/config", admin_config, methods=["GET", "POST"]),
        Route("/_emulator/reset", admin_reset, methods=["POST"]),
        Route("/_emulator/advance", admin_advance, methods=["POST"]),
        Mount("/v1", routes=api),
        Mount("/openai/v1", routes=api),
        Mount("/openai/deployments/{deployment}", routes=api),
        Mount("/openai", routes=api),
        *api,
    ]
    app = Starlette(
        routes=routes, exception_handlers={HTTPException: _http_exception, Exception: _unexpected}
    )
    app.state.emulator = EmulatorState(config or EmulatorConfig())
    return app
