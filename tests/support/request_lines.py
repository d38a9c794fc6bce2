"""Request lines as tests write them: a chat line, a JSONL file, and the lines a batch was created from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHAT = "/v1/chat/completions"


def chat_line(i: int, model: str | None = "gpt-4o-mini", **overrides: object) -> dict:
    """The ``i``-th chat request line (``custom_id`` ``req-<i>``), with ``overrides`` applied."""
    body: dict = {"messages": [{"role": "user", "content": f"Classify item {i}"}]}
    if model:
        body["model"] = model
    line = {"custom_id": f"req-{i}", "method": "POST", "url": CHAT, "body": body}
    line.update(overrides)
    return line


def write_jsonl(path: Path, rows: list) -> Path:
    """``rows`` as JSONL at ``path``: dicts are encoded, strings written as they are."""
    with path.open("wb") as out:
        for row in rows:
            out.write((row if isinstance(row, str) else json.dumps(row)).encode() + b"\n")
    return path


def batch_lines(emulator: Any, batch_id: str) -> list[dict]:
    """The request lines of the input file the emulator holds for ``batch_id``."""
    client = emulator.client()
    batch = client.batches.retrieve(batch_id)
    return [json.loads(line) for line in client.files.content(batch.input_file_id).text.splitlines()]
