"""Generated images as files: the success body of an images batch line, with its base64 images written
out one file each and replaced by their URIs.

Plain Python (no Airflow). Where the files go is the caller's choice through :class:`MediaSink`: a local
folder (:class:`LocalMediaSink`, written to a temporary name and renamed, so a file with its final
name is always complete), or an object store (:class:`ObjectStoreMediaSink` over an
``ObjectStoragePath``-like folder, where an object appears only once its upload has finished).

Layout: ``<folder>/images/<custom_id>-<n>.<format>``, ``n`` the image's index in the answer's ``data``
and ``format`` the body's ``output_format`` or, when absent, sniffed from the image's first bytes.
A ``custom_id`` with characters other than letters, digits, ``-``, ``_`` and ``.`` (or a leading dot)
has them replaced by ``_`` and a short hash of the id appended, so names are safe in any file system
and URI, and every request keeps its own files.

The Videos API (``/v1/videos``) shut down on 2026-09-24 and the Batch API no longer accepts it, so
there is no video counterpart: submit refuses that endpoint before uploading anything.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

__all__ = [
    "IMAGES_FOLDER",
    "IMAGE_ENDPOINTS",
    "ImageAnswer",
    "LocalMediaSink",
    "MediaSink",
    "ObjectStoreMediaSink",
    "WritableFolder",
    "image_file_name",
    "sniff_image_format",
    "write_images",
]

#: The Batch endpoints whose answers carry images.
IMAGE_ENDPOINTS = frozenset({"/v1/images/generations", "/v1/images/edits"})
#: The sub-folder of the output folder that holds the image files.
IMAGES_FOLDER = "images"
#: Longest custom_id kept whole in a file name; longer ones are cut and hashed, so a name stays within
#: the 255 bytes file systems allow.
_MAX_ID_CHARS = 160
_SAFE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


class MediaSink(Protocol):
    """Where media files go. Each file is written whole, once, and never seen half-written."""

    def put(self, name: str, data: bytes) -> str:
        """Store ``data`` as ``name`` (a relative path such as ``images/r1-0.png``).

        :return: the URI the file is read at afterwards.
        """
        ...


class LocalMediaSink:
    """Files under a local folder, each written to a temporary name and renamed into place.

    :param folder: the local folder the files go to.
    :param uri_prefix: the URI the folder is read at, when it is not the folder itself (e.g. a staging
        folder published to object storage later: the records then point at the final place). Default:
        the folder's ``file://`` URI.
    """

    def __init__(self, folder: str | os.PathLike[str], uri_prefix: str | None = None) -> None:
        self.folder = Path(folder)
        self.uri_prefix = (uri_prefix or self.folder.resolve().as_uri()).rstrip("/")

    def put(self, name: str, data: bytes) -> str:
        target = self.folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(partial, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            raise
        return f"{self.uri_prefix}/{name}"


class WritableFolder(Protocol):
    """The part of ``airflow.sdk.ObjectStoragePath`` (a universal-pathlib path) a sink needs."""

    def __truediv__(self, name: str) -> WritableFolder: ...

    def open(self, mode: str) -> IO[bytes]: ...


class ObjectStoreMediaSink:
    """Files in an object store folder (S3, GCS...), e.g. an ``ObjectStoragePath``.

    An object store makes an object visible only when its upload completes, so a direct write is
    already all-or-nothing. For a local folder use :class:`LocalMediaSink` (a local file is visible
    while it is written).

    :param folder: the destination folder.
    """

    def __init__(self, folder: WritableFolder) -> None:
        self.folder = folder

    def put(self, name: str, data: bytes) -> str:
        target = self.folder / name
        with target.open("wb") as out:
            out.write(data)
        return str(target)


@dataclass(frozen=True)
class ImageAnswer:
    """One image answer made into files.

    :param images: per item of the answer's ``data``, in order: the URI of the written file, or the
        ``url`` the API gave (recorded as given; such URLs expire at OpenAI after a while).
    :param body: the answer without the image bytes (each item's ``b64_json`` removed).
    """

    images: list[str]
    body: dict[str, Any]


_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"\xff\xd8\xff", 0, "jpeg"),
    (b"GIF87a", 0, "gif"),
    (b"GIF89a", 0, "gif"),
    (b"WEBP", 8, "webp"),
)


def sniff_image_format(data: bytes) -> str | None:
    """``png``, ``jpeg``, ``gif``, ``webp`` or ``svg`` from an image's first bytes, else ``None``."""
    for magic, offset, name in _MAGIC:
        if data[offset : offset + len(magic)] == magic and (name != "webp" or data[:4] == b"RIFF"):
            return name
    head = data[:256].lstrip()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096]):
        return "svg"
    return None


def image_file_name(custom_id: str, index: int, image_format: str) -> str:
    """``images/<custom_id>-<index>.<format>``; an id that is not safe as it is (see the module
    docstring) becomes ``<id with _ for unsafe characters, cut>~<16 hex of its sha256>``."""
    safe = "".join(char if char in _SAFE_CHARS else "_" for char in custom_id)
    if safe != custom_id or safe.startswith(".") or len(safe) > _MAX_ID_CHARS or not safe:
        digest = hashlib.sha256(custom_id.encode()).hexdigest()[:16]
        safe = f"{safe.lstrip('.')[:_MAX_ID_CHARS]}~{digest}"
    return f"{IMAGES_FOLDER}/{safe}-{index}.{image_format}"


def write_images(custom_id: str, body: Mapping[str, Any], sink: MediaSink) -> ImageAnswer:
    """Write each base64 image of an images-endpoint success body to ``sink``, one file each.

    :param custom_id: the request's id (names the files).
    :param body: the success body (``ImagesResponse``: ``data: [{b64_json | url, ...}]``,
        ``output_format`` for GPT image models).
    :param sink: where the files go.
    :raises ValueError: an item's ``b64_json`` is not base64 (naming the request and the item).
    """
    declared = body.get("output_format")
    items = body.get("data") or []
    images: list[str] = []
    kept: list[Any] = []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            kept.append(item)
            continue
        encoded = item.get("b64_json")
        if isinstance(encoded, str) and encoded:
            try:
                data = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError) as err:
                raise ValueError(
                    f"request {custom_id!r}: image {index} of the answer is not valid base64 ({err})"
                ) from None
            image_format = declared if isinstance(declared, str) and declared else None
            image_format = image_format or sniff_image_format(data) or "bin"
            images.append(sink.put(image_file_name(custom_id, index, image_format), data))
            kept.append({key: value for key, value in item.items() if key != "b64_json"})
        else:
            url = item.get("url")
            if isinstance(url, str) and url:
                images.append(url)
            kept.append(dict(item))
    return ImageAnswer(images=images, body={**body, "data": kept} if "data" in body else dict(body))
