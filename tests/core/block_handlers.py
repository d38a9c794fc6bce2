"""Handlers that tests run inside a BlockHelper process (it imports them as ``tests.core.block_handlers``).

Each factory takes the config bytes and returns the function that answers a block.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def upper(config: bytes) -> Callable[[bytes], bytes]:
    """Answer each block in upper case; ``config`` is seconds of work per block (as text)."""
    cost = float(config or b"0")

    def handle(block: bytes) -> bytes:
        if cost:
            time.sleep(cost)  # stands for the CPU work of a real block
        return block.upper()

    return handle


def dies_at(config: bytes) -> Callable[[bytes], bytes]:
    """Answer blocks in upper case until one equals ``config``, then exit without answering."""

    def handle(block: bytes) -> bytes:
        if block == config:
            os._exit(3)
        return block.upper()

    return handle


def environment(config: bytes) -> Callable[[bytes], bytes]:
    """Answer with the value of the environment variable named by the block."""
    return lambda block: os.environ.get(block.decode(), "").encode()


def imported(config: bytes) -> Callable[[bytes], bytes]:
    """Answer ``b"yes"`` if the module named by the block was imported in the helper, else ``b"no"``."""
    import sys

    return lambda block: b"yes" if block.decode() in sys.modules else b"no"
