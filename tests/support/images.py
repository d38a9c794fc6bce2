"""Standard-library checks that bytes are a well-formed image (no imaging library needed)."""

from __future__ import annotations

import struct
import zlib

_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of a valid PNG; raises AssertionError on any defect: signature, chunk CRCs,
    IHDR first and IEND last, and the IDAT stream inflating to exactly the rows IHDR announces."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    offset, chunks, idat = 8, [], b""
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        if kind == b"IDAT":
            idat += body
        offset += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b""), [k for k, _ in chunks]
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert width > 0 and height > 0 and depth == 8 and interlace == 0
    raw = zlib.decompress(idat)
    row = 1 + width * _CHANNELS[colour]
    assert len(raw) == height * row, "IDAT does not hold the announced rows"
    assert all(raw[i * row] <= 4 for i in range(height)), "bad filter byte"
    return width, height


def assert_valid_image(data: bytes, image_format: str) -> None:
    """A structural check of each format the emulator makes (PNG fully, the others by their framing)."""
    if image_format == "png":
        png_size(data)
    elif image_format == "gif":
        assert data[:6] == b"GIF89a" and data.endswith(b"\x3b")
    elif image_format == "webp":
        assert data[:4] == b"RIFF" and data[8:16] == b"WEBPVP8L"
        assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    elif image_format == "jpeg":
        assert data[:2] == b"\xff\xd8" and data.endswith(b"\xff\xd9")
    elif image_format == "svg":
        assert data.startswith(b"<svg") and data.endswith(b"</svg>")
    else:
        raise AssertionError(f"unknown format {image_format!r}")
