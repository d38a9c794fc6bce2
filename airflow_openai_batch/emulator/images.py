"""Tiny, valid, deterministic images for the emulator's image endpoints, made with the standard library.

Each image is a small square of one colour (the colour derived from the request, so images differ):
PNG (RGBA), GIF (two-colour palette, uncompressed LZW), WebP (lossless VP8L whose prefix codes each
have a single symbol, so the pixels take no bits at all), JPEG (baseline greyscale, one 8x8 block) and
SVG. Real sizes are not honoured: an emulator image is :data:`IMAGE_SIDE` pixels square whatever
``size`` asks, which keeps a batch of thousands of images small and fast.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

#: Width and height of every emulator image (JPEG: one 8x8 block).
IMAGE_SIDE = 8

RGBA = tuple[int, int, int, int]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(colour: RGBA, side: int = IMAGE_SIDE) -> bytes:
    """An RGBA PNG of one colour."""
    header = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)  # 8-bit RGBA, no interlace
    row = b"\x00" + bytes(colour) * side  # filter type 0 (none), then the pixels
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(row * side))
        + _png_chunk(b"IEND", b"")
    )


class _BitWriter:
    """Bits packed least significant first, as GIF's LZW and WebP's VP8L streams want them."""

    def __init__(self) -> None:
        self.value = 0
        self.count = 0

    def write(self, value: int, bits: int) -> None:
        self.value |= (value & ((1 << bits) - 1)) << self.count
        self.count += bits

    def to_bytes(self) -> bytes:
        return self.value.to_bytes((self.count + 7) // 8, "little")


def gif(colour: RGBA, side: int = IMAGE_SIDE) -> bytes:
    """A GIF89a of one colour: palette entry 0, coded without compression (a clear code every two
    pixels keeps the LZW code width at three bits, so no dictionary is needed)."""
    clear, end, width = 4, 5, 3  # minimum code size 2
    bits = _BitWriter()
    for pixel in range(side * side):
        if pixel % 2 == 0:
            bits.write(clear, width)
        bits.write(0, width)
    bits.write(end, width)
    data = bits.to_bytes()
    blocks = b"".join(bytes([len(data[i : i + 255])]) + data[i : i + 255] for i in range(0, len(data), 255))
    palette = bytes(colour[:3]) + b"\x00\x00\x00"
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", side, side, 0x80, 0, 0)  # global palette of 2 entries
        + palette
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, side, side, 0)
        + b"\x02"
        + blocks
        + b"\x00\x3b"
    )


def webp(colour: RGBA, side: int = IMAGE_SIDE) -> bytes:
    """A lossless WebP (VP8L) of one colour: five single-symbol prefix codes, zero bits per pixel."""
    red, green, blue, alpha = colour
    bits = _BitWriter()
    bits.write(side - 1, 14)
    bits.write(side - 1, 14)
    bits.write(1, 1)  # alpha is used
    bits.write(0, 3)  # version
    bits.write(0, 1)  # no transform
    bits.write(0, 1)  # no colour cache
    bits.write(0, 1)  # no meta prefix codes
    for symbol in (green, red, blue, alpha):
        bits.write(1, 1)  # simple code
        bits.write(0, 1)  # one symbol
        bits.write(1, 1)  # of 8 bits
        bits.write(symbol, 8)
    bits.write(0b0001, 4)  # distance code: simple, one symbol, 1 bit, symbol 0
    payload = b"\x2f" + bits.to_bytes()
    if len(payload) % 2:
        chunk = b"VP8L" + struct.pack("<I", len(payload)) + payload + b"\x00"
    else:
        chunk = b"VP8L" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def _jpeg_segment(marker: int, data: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(data) + 2) + data


def jpeg(colour: RGBA, side: int = IMAGE_SIDE) -> bytes:
    """A baseline greyscale JPEG, one 8x8 block of mid grey (``colour`` and ``side`` are not used:
    one block whose DC and AC codes are one bit each keeps the coder trivial)."""
    del colour, side
    quant = _jpeg_segment(0xDB, b"\x00" + b"\x01" * 64)
    frame = _jpeg_segment(0xC0, struct.pack(">BHHB", 8, 8, 8, 1) + b"\x01\x11\x00")
    # One-symbol Huffman tables: DC category 0 and AC end-of-block, each coded as the bit 0.
    dc_table = _jpeg_segment(0xC4, b"\x00" + b"\x01" + b"\x00" * 15 + b"\x00")
    ac_table = _jpeg_segment(0xC4, b"\x10" + b"\x01" + b"\x00" * 15 + b"\x00")
    scan = _jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
    entropy = b"\x3f"  # bits 0 (DC diff 0), 0 (EOB), then padding ones
    return b"\xff\xd8" + quant + frame + dc_table + ac_table + scan + entropy + b"\xff\xd9"


def svg(colour: RGBA, side: int = IMAGE_SIDE) -> bytes:
    """An SVG square of one colour."""
    fill = "#{:02x}{:02x}{:02x}".format(*colour[:3])
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{side}" height="{side}">'
        f'<rect width="{side}" height="{side}" fill="{fill}"/></svg>'
    ).encode()


#: The encoders by ``output_format``.
ENCODERS: dict[str, Callable[[RGBA], bytes]] = {
    "png": png,
    "gif": gif,
    "webp": webp,
    "jpeg": jpeg,
    "svg": svg,
}
