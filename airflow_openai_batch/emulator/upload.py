"""Streaming ``multipart/form-data`` upload: the file part goes straight to disk.

Starlette's ``request.form()`` would spool the file to a temporary file first and we would copy it
again; this parser writes each chunk of the ``file`` part into its final place as it arrives, so a
200 MB upload never sits in memory and is written to disk once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

#: Non-file fields are small (purpose, expires_after[...]): cap them so a bad client cannot fill RAM.
MAX_FIELD_BYTES = 64 * 1024


class UploadError(Exception):
    """The request is not a usable multipart upload (answered as a 400)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass
class UploadResult:
    """What the multipart body held: text fields, and the file part's name and size."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    size: int = 0


class _Collector:
    def __init__(self, dest: Any, file_field: str, max_file_bytes: int) -> None:
        self.dest = dest
        self.file_field = file_field
        self.max_file_bytes = max_file_bytes
        self.result = UploadResult()
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._data = bytearray()

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._data = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise UploadError("Every multipart part needs a Content-Disposition name.")
        self._name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options and self._name == self.file_field:
            if self.result.filename is not None:
                raise UploadError("Only one file may be uploaded per request.", param=self.file_field)
            self._is_file = True
            self.result.filename = options[b"filename"].decode("utf-8", "replace") or "upload"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.result.size += end - start
            if self.result.size > self.max_file_bytes:
                raise UploadError(
                    f"File is too large: the maximum is {self.max_file_bytes} bytes.",
                    param=self.file_field,
                    code="file_too_large",
                )
            self.dest.write(data[start:end])
        else:
            self._data += data[start:end]
            if len(self._data) > MAX_FIELD_BYTES:
                raise UploadError(f"The field {self._name!r} is too large.", param=self._name)

    def on_part_end(self) -> None:
        if not self._is_file and self._name:
            self.result.fields[self._name] = self._data.decode("utf-8", "replace")


async def receive_upload(
    content_type: str | None,
    stream: AsyncIterator[bytes],
    dest_path: Path,
    *,
    file_field: str = "file",
    max_file_bytes: int,
) -> UploadResult:
    """Parse a multipart body from ``stream``, writing the ``file_field`` part to ``dest_path``.

    :param content_type: the request's Content-Type header (must carry the boundary).
    :param stream: the request body, chunk by chunk.
    :param dest_path: where the file part is written.
    :param file_field: name of the file part.
    :param max_file_bytes: a larger file part aborts the upload with :class:`UploadError`.
    """
    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError("The request must be multipart/form-data with a boundary.")
    with open(dest_path, "wb") as dest:
        collector = _Collector(dest, file_field, max_file_bytes)
        parser = MultipartParser(
            params[b"boundary"],
            {
                "on_part_begin": collector.on_part_begin,
                "on_part_data": collector.on_part_data,
                "on_part_end": collector.on_part_end,
                "on_header_field": collector.on_header_field,
                "on_header_value": collector.on_header_value,
                "on_header_end": collector.on_header_end,
                "on_headers_finished": collector.on_headers_finished,
            },
        )
        try:
            async for chunk in stream:
                parser.write(chunk)
            parser.finalize()
        except FormParserError as exc:
            raise UploadError(f"Invalid multipart data: {exc}") from exc
    return collector.result
