"""ASGI middleware in front of the emulator app: what real servers do that the emulator does not.

- ``azure = True``: batch objects as Azure OpenAI returns them: ``""`` instead of ``null`` file ids,
  ``null`` request_counts fields, ``null`` endpoint.
- ``overrides[batch_id]``: fields replaced in that batch object (e.g. an ``output_file_id`` pointing
  at a crafted result file).
- ``files[file_id]``: bytes served as that file's content (e.g. Azure's zero-byte error file).
"""

from __future__ import annotations

import json
import re
from typing import Any

_CONTENT = re.compile(r"/v1/files/([^/]+)/content")


class QuirksMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.azure = False
        self.overrides: dict[str, dict[str, Any]] = {}
        self.files: dict[str, bytes] = {}
        self.rewritten = 0

    def reset(self) -> None:
        self.azure = False
        self.overrides.clear()
        self.files.clear()
        self.rewritten = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        served = _CONTENT.fullmatch(path)
        if served and served.group(1) in self.files:
            body = self.files[served.group(1)]
            headers = [(b"content-type", b"application/octet-stream"), (b"content-length", b"%d" % len(body))]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if not path.startswith("/v1/batches"):
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: Any) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = self._rewrite(b"".join(chunks))
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)

    def _rewrite(self, raw: bytes) -> bytes:
        try:
            data = json.loads(raw)
        except ValueError:
            return raw
        if isinstance(data, dict) and data.get("object") == "batch":
            data = self._batch(data)
        elif isinstance(data, dict) and data.get("object") == "list":
            data["data"] = [self._batch(b) for b in data.get("data", [])]
        return json.dumps(data).encode()

    def _batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch = {**batch, **self.overrides.get(batch.get("id"), {})}
        if self.azure:
            for key in ("output_file_id", "error_file_id"):
                if batch.get(key) is None:
                    batch[key] = ""
            batch["request_counts"] = {"total": None, "completed": None, "failed": None}
            batch["endpoint"] = None
        self.rewritten += 1
        return batch
