"""Helpers for the emulator tests: OpenAI's published schemas, and small request/file utilities."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import httpx2
import openai
from jsonschema import Draft202012Validator

# The schemas generated from OpenAI's public OpenAPI spec: the shared reference copy beside the
# repository when present, else the copy vendored with these tests.
_SHARED = Path(__file__).resolve().parents[3] / "shared" / "reference" / "openai-openapi-batch-schemas.json"
_VENDORED = Path(__file__).parent / "data" / "openai-openapi-batch-schemas.json"
SCHEMA_FILE = _SHARED if _SHARED.is_file() else _VENDORED
SCHEMAS: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())

_VALIDATORS: dict[str, Draft202012Validator] = {}

# Which schema each operation's body must match (the file's own "x-operations" map, as regexes).
_OPERATIONS: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"/files$"), "OpenAIFile"),
    ("GET", re.compile(r"/files$"), "ListFilesResponse"),
    ("GET", re.compile(r"/files/[^/]+$"), "OpenAIFile"),
    ("DELETE", re.compile(r"/files/[^/]+$"), "DeleteFileResponse"),
    ("POST", re.compile(r"/batches$"), "Batch"),
    ("GET", re.compile(r"/batches$"), "ListBatchesResponse"),
    ("GET", re.compile(r"/batches/[^/]+$"), "Batch"),
    ("POST", re.compile(r"/batches/[^/]+/cancel$"), "Batch"),
]


def validator(name: str) -> Draft202012Validator:
    """A validator for ``#/$defs/<name>`` of the published schemas (refs resolved within them)."""
    if name not in _VALIDATORS:
        schema = {"$schema": SCHEMAS["$schema"], "$defs": SCHEMAS["$defs"], "$ref": f"#/$defs/{name}"}
        Draft202012Validator.check_schema(schema)
        _VALIDATORS[name] = Draft202012Validator(schema)
    return _VALIDATORS[name]


def assert_schema(name: str, instance: Any) -> None:
    errors = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, f"{name} schema violations: " + "; ".join(
        f"{list(e.path)}: {e.message}" for e in errors[:5]
    )


def schema_for(method: str, path: str, status: int) -> str | None:
    if status >= 400:
        return "ErrorResponse"
    for op_method, pattern, name in _OPERATIONS:
        if op_method == method and pattern.search(path):
            return name
    return None


class SchemaChecker:
    """An httpx2 response hook: validates every JSON API response against its operation's schema."""

    def __init__(self) -> None:
        self.checked: list[tuple[str, str, str]] = []
        self.failures: list[str] = []

    def __call__(self, response: httpx2.Response) -> None:
        request = response.request
        path = request.url.path
        if path.endswith("/content") or request.headers.get("x-stainless-raw-response") == "stream":
            return  # file bytes, streamed: not a JSON body
        response.read()
        name = schema_for(request.method, path, response.status_code)
        if name is None:
            return
        try:
            assert_schema(name, response.json())
        except AssertionError as exc:
            self.failures.append(f"{request.method} {path}: {exc}")
        self.checked.append((request.method, path, name))


def jsonl(records: list[Any]) -> bytes:
    """Records as JSONL bytes (str records are written verbatim, for malformed lines)."""
    return b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in records)


def upload(client: openai.OpenAI, records: list[Any], name: str = "input.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(jsonl(records))), purpose="batch").id


def chat_line(custom_id: str, text: str = "hello", model: str = "gpt-4o-mini", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }


def read_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    """A result file's lines, streamed (never the whole body at once)."""
    if file_id is None:
        return []
    with client.files.with_streaming_response.content(file_id) as response:
        return [json.loads(line) for line in response.iter_lines() if line.strip()]
