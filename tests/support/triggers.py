"""Trigger test helpers shared by the trigger and poll-board tests: scripted batches, a scripted hook, a
fake clock, and a trigger wired to them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx2
import openai
import pytest
from openai.types import Batch

from airflow_openai_batch.triggers.batch import Clock, OpenAIBatchTrigger

T0 = 1_750_000_000.0


def make_batch(
    batch_id: str, status: str, total: int = 10, completed: int = 0, failed: int = 0, **extra: Any
):
    data: dict[str, Any] = {
        "id": batch_id,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-in",
        "completion_window": "24h",
        "status": status,
        "created_at": int(T0),
        "model": "gpt-4o-mini",
        "request_counts": {"total": total, "completed": completed, "failed": failed},
    }
    data.update(extra)
    return Batch(**data)


def api_error(status: int, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    request = httpx2.Request("GET", "http://127.0.0.1/v1/batches/b")
    response = httpx2.Response(status, headers=headers or {}, request=request)
    cls = {
        401: openai.AuthenticationError,
        404: openai.NotFoundError,
        429: openai.RateLimitError,
        500: openai.InternalServerError,
        503: openai.InternalServerError,
    }[status]
    return cls(f"HTTP {status} from the test", response=response, body=None)


class ScriptedHook:
    """Stands in for OpenAIBatchHook: each retrieve of a batch returns its next scripted state."""

    def __init__(self, script: dict[str, list[Any]]) -> None:
        self.script = {bid: list(states) for bid, states in script.items()}
        self.calls: list[tuple[str, str]] = []
        self.closed = False

    async def aget_async_client(self) -> None:
        return None

    async def aget_batch(self, batch_id: str) -> Batch:
        self.calls.append(("retrieve", batch_id))
        states = self.script[batch_id]
        state = states.pop(0) if len(states) > 1 else states[0]
        if isinstance(state, BaseException):
            raise state
        return state

    async def acancel_batch(self, batch_id: str) -> Batch:
        self.calls.append(("cancel", batch_id))
        return make_batch(batch_id, "cancelling")

    async def aclose(self) -> None:
        self.closed = True


class FakeTime:
    """A clock (epoch seconds) and a sleep that only moves it, optionally driving the emulator too."""

    def __init__(self, start: float = T0, on_sleep: Callable[[float], None] | None = None) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self.on_sleep = on_sleep

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(seconds)
        await asyncio.sleep(0)


class StopsAtFirstWait:
    """A clock on real time whose first wait between polls never ends: ``waiting`` is set when it starts,
    so a test can cancel the trigger there, as a triggerer does on a user action or a shutdown."""

    def __init__(self) -> None:
        self.waiting = asyncio.Event()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        self.waiting.set()
        await asyncio.Event().wait()  # never set: only a cancel ends this wait


async def cancel_at_first_wait(trigger: OpenAIBatchTrigger) -> None:
    """Run ``trigger`` (made with a :class:`StopsAtFirstWait` clock) until it first waits, then cancel it."""
    clock = trigger.clock
    assert isinstance(clock, StopsAtFirstWait)
    task = asyncio.ensure_future(first_event_async(trigger))
    await clock.waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def make_trigger(clock: Clock | None = None, hook: Any = None, **kwargs: Any) -> OpenAIBatchTrigger:
    """A trigger on ``clock`` (a :class:`FakeTime`, a :class:`StopsAtFirstWait`, the emulator's
    ``SimulatedTime``; ``None``: the system's), calling through ``hook`` when one is given (its own calls
    and its poll board's: one board per test loop)."""
    kwargs.setdefault("batch_ids", ["batch_a"])
    kwargs.setdefault("poll_interval", 0.01)
    kwargs.setdefault("max_poll_interval", 0.05)
    kwargs.setdefault("retry_failed_requests", 0)  # retry rounds have tests of their own
    return OpenAIBatchTrigger(**kwargs, clock=clock, hook=hook)


async def first_event_async(trigger: OpenAIBatchTrigger) -> dict[str, Any]:
    gen = trigger.run()
    event = await gen.__anext__()
    # Exactly one event: the generator must end right after it.
    with pytest.raises(StopAsyncIteration):
        await gen.__anext__()
    return event.payload


def first_event(trigger: OpenAIBatchTrigger) -> dict[str, Any]:
    return asyncio.run(first_event_async(trigger))


def create_sized_batches(server: Any, sizes: list[int]) -> list[str]:
    """One chat batch per entry of ``sizes``, holding that many requests; their ids, oldest first."""
    client = server.client()
    ids = []
    for n, size in enumerate(sizes):
        body = b"".join(
            json.dumps(
                {
                    "custom_id": f"req-{n}-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hi {i}"}]},
                }
            ).encode()
            + b"\n"
            for i in range(size)
        )
        upload = client.files.create(file=("in.jsonl", body), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        ids.append(batch.id)
    return ids


def virtual_time(server: Any) -> FakeTime:
    """A fake clock whose sleeps move the emulator's (frozen) virtual clock by the same amount."""
    server.configure(time_scale=0.0)
    return FakeTime(start=time.time(), on_sleep=server.advance)
