"""Polling cost: many batches waiting in one triggerer-like event loop against the emulator.

The emulator runs in its own process with a frozen clock (``--time-scale 0``); every wait of every
waiter goes through a simulated-time scheduler
(:class:`~airflow_openai_batch.emulator.simulated_time.SimulatedTime`, given to each trigger as its
``clock``) that, once every waiter is asleep, moves the emulator's clock to the
earliest wake-up and wakes those waiters. A simulated day runs in seconds, and this process's CPU time is
the waiters' own cost (HTTP client, parsing, scheduling, logging), the emulator's work being elsewhere.

Batches are all created at t0 and finish uniformly over the window: batch ``i`` holds
``round((i + 1) * window / n * rate)`` lines and the emulator processes ``rate`` lines per second per
batch, so batch ``i`` finishes at exactly ``t0 + lines / rate``.

Scenarios:

- ``ours_per_dag``: one :class:`OpenAIBatchTrigger` per batch, as 1,000 DAG runs each with its own
  sensor would defer (the usual shape: a job of up to 50,000 requests is one batch), all starting at t0;
- ``ours_per_dag_staggered``: the same, but each trigger starts at a random moment within the first
  ``start_spread`` seconds (seeded), as DAG runs that deferred at different times: the triggers share
  their polls (the poll board) only because they align on the same grid, not because they started
  together. A batch that finished before its trigger started counts as finished when the trigger
  started (its finish->seen delay is measured from then);
- ``ours_one_trigger``: one trigger waiting on all the batches (one sensor over 1,000 batch ids);
- ``fixed``: the official provider's behaviour, a retrieve per batch every 60 s until it is final
  (one async client per batch, as each official trigger builds its own hook).

Calls are ``batches.retrieve`` plus ``batches.list`` calls (the emulator counts each route); a batch
counts as seen at the first moment a trigger was handed its final status, whichever call fetched it.

**Trigger cost** (:func:`trigger_cost`) runs in real time instead: 500 triggers (one batch each) in one
event loop, as in one triggerer, against the emulator behind an API latency (200 ms: half on the way
there, half on the way back), the batches finishing uniformly over 60 s, every wait 2 s. The baseline
is the ideal loop in the same conditions: one shared ``AsyncOpenAI``, and per batch ``await retrieve``
every 2 s until it is final. Measured: the event loop's lag (a 25 ms ticker's oversleep), the
delay from a batch's finish to its waiter's end (our trigger's event; the loop's final retrieve), the
API calls and this process's CPU time.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from airflow_openai_batch.emulator.simulated_time import SimulatedTime

FINAL = frozenset({"completed", "failed", "expired", "cancelled"})


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Emulator:
    """The emulator in a child process, with helpers for its admin routes.

    :param latency: seconds added to every API call (admin routes excepted), half before the request is
        handled and half before the response starts (see :func:`serve`).
    """

    def __init__(self, latency: float = 0.0, **knobs: Any) -> None:
        if latency > 0:
            args = [sys.executable, "-m", "bench.polling", json.dumps({"latency": latency, "knobs": knobs})]
        else:
            args = [sys.executable, "-m", "airflow_openai_batch.emulator", "--port", "0"]
            for name, value in knobs.items():
                args += [f"--{name.replace('_', '-')}", str(value)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise RuntimeError(f"the emulator did not start: {line!r}")
        self.url = line.rsplit(" ", 1)[1].strip()
        host, port = self.url.removeprefix("http://").split(":")
        self._address = (host, int(port))

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        # A connection per call: uvicorn closes idle keep-alive connections after a few seconds.
        conn = http.client.HTTPConnection(*self._address, timeout=600)
        try:
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status} {payload[:200]!r}")
        return json.loads(payload)

    def advance(self, seconds: float) -> float:
        return self._call("POST", "/_emulator/advance", {"seconds": seconds})["now"]

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/_emulator/stats")

    def configure(self, **knobs: Any) -> dict[str, Any]:
        return self._call("POST", "/_emulator/config", knobs)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _chat_input(batch: int, lines: int) -> bytes:
    """A batch input file of ``lines`` small chat requests (custom ids unique across batches)."""
    return b"".join(
        b'{"custom_id":"b%d-r%d","method":"POST","url":"/v1/chat/completions",'
        b'"body":{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}}\n' % (batch, j)
        for j in range(lines)
    )


def create_batches(
    emulator: Emulator, count: int, window: float, rate: float, sample: int = 1
) -> list[tuple[str, float]]:
    """Batches created now, finishing uniformly over ``window``: ``[(batch_id, seconds)]``.

    :param count: how many batches the window is divided among.
    :param sample: create only every ``sample``-th of them (a uniform sample of the same distribution).
    """
    import openai

    client = openai.OpenAI(base_url=emulator.base_url, api_key="sk-bench", max_retries=0)
    out = []
    for i in range(sample // 2, count, sample):
        lines = max(1, round((i + 1) * window / count * rate))
        upload = client.files.create(file=(f"in-{i}.jsonl", _chat_input(i, lines)), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        out.append((batch.id, lines / rate))
    client.close()
    return out


def run(
    scenario: str,
    batches: int = 1000,
    window: float = 86_400.0,
    rate: float = 0.02,
    poll_interval: float = 60.0,
    max_poll_interval: float = 600.0,
    sample: int = 1,
    work_dir: str = "",
    start_spread: float = 3600.0,
    seed: int = 1,
) -> dict[str, Any]:
    """Run one scenario end to end; returns its figures (see the module docstring).

    :param start_spread: ``ours_per_dag_staggered`` only: triggers start uniformly within this many
        seconds after t0.
    :param seed: ``ours_per_dag_staggered`` only: the seed of the start times.
    """
    home = Path(work_dir) / f"airflow-{scenario}"
    home.mkdir(parents=True, exist_ok=True)
    os.environ["AIRFLOW_HOME"] = str(home)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{home}/airflow.db"

    emulator = Emulator(rate=rate, time_scale=0, seed=1)
    try:
        os.environ["AIRFLOW_CONN_OPENAI_DEFAULT"] = json.dumps(
            {"conn_type": "openai_batch", "password": "sk-bench", "host": emulator.base_url}
        )
        setup_t0 = time.perf_counter()
        created = create_batches(emulator, batches, window, rate, sample)
        setup_seconds = time.perf_counter() - setup_t0
        t0 = float(emulator.stats()["now"])  # the frozen clock: every batch was created at t0
        finish = {batch_id: t0 + seconds for batch_id, seconds in created}
        starts = {batch_id: t0 for batch_id in finish}
        if scenario == "ours_per_dag_staggered":
            rng = random.Random(seed)
            starts = {batch_id: t0 + rng.uniform(0.0, start_spread) for batch_id in finish}
        before = _poll_calls(emulator.stats())
        result = asyncio.run(
            _simulate(scenario, emulator, finish, starts, t0, poll_interval, max_poll_interval)
        )
        after = _poll_calls(emulator.stats())
    finally:
        emulator.stop()
    retrieves = after["batches.retrieve"] - before["batches.retrieve"]
    lists = after["batches.list"] - before["batches.list"]
    calls = retrieves + lists
    batch_hours = sum(f - t0 for f in finish.values()) / 3600
    # Measured from when the batch finished, or from when its trigger started if that was later.
    due = {b: max(f, starts[b]) for b, f in finish.items()}
    seen_delays = [result["seen"][b] - d for b, d in due.items()]
    event_delays = [result["events"][b] - d for b, d in due.items()]
    waited = len(finish)
    return {
        "scenario": scenario,
        "batches": waited,
        "sample_of": batches if sample > 1 else None,
        "window_hours": window / 3600,
        "poll_interval": poll_interval,
        "max_poll_interval": max_poll_interval,
        "start_spread": start_spread if scenario == "ours_per_dag_staggered" else 0.0,
        "api_calls": calls,
        "retrieve_calls": retrieves,
        "list_calls": lists,
        "calls_per_batch": calls / waited,
        "cpu_seconds": result["cpu"],
        "batch_hours": batch_hours,
        "cpu_seconds_per_batch_hour": result["cpu"] / batch_hours,
        "sim_wall_seconds": result["wall"],
        "setup_seconds": setup_seconds,
        "seen_delay_median": _median(seen_delays),
        "seen_delay_max": max(seen_delays),
        "event_delay_median": _median(event_delays),
        "event_delay_max": max(event_delays),
        "all_final": result["all_final"],
        "virtual_steps": result["steps"],
    }


def _poll_calls(stats: dict[str, Any]) -> dict[str, int]:
    """The polling calls so far: ``batches.retrieve`` and ``batches.list``, from the emulator's stats."""
    return {route: int(stats["calls"].get(route, 0)) for route in ("batches.retrieve", "batches.list")}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


async def _simulate(
    scenario: str,
    emulator: Emulator,
    finish: dict[str, float],
    starts: dict[str, float],
    t0: float,
    poll_interval: float,
    max_poll_interval: float,
) -> dict[str, Any]:
    clock = SimulatedTime(t0, emulator.advance)
    seen: dict[str, float] = {}
    events: dict[str, float] = {}
    statuses: dict[str, str] = {}
    ids = list(finish)
    waiters: list[Callable[[], Awaitable[None]]] = []

    if scenario in ("ours_per_dag", "ours_per_dag_staggered", "ours_one_trigger"):
        from airflow_openai_batch.triggers._poll_board import PollBoard
        from airflow_openai_batch.triggers.batch import OpenAIBatchTrigger

        original = PollBoard.fetch

        async def observed(self: Any, batch_ids: Any) -> Any:
            # Every state a trigger is handed passes here, whether a retrieve or a list page fetched it.
            results = await original(self, batch_ids)
            for batch_id, batch in results.items():
                if isinstance(batch, BaseException):
                    continue
                # A list page's batch is a plain dict, a retrieved one an openai Batch.
                status = batch["status"] if isinstance(batch, dict) else batch.status
                if status in FINAL:
                    seen.setdefault(batch_id, clock.now)
            return results

        PollBoard.fetch = observed  # type: ignore[method-assign]
        groups = [ids] if scenario == "ours_one_trigger" else [[b] for b in ids]
        for group in groups:
            start = min(starts[b] for b in group)
            trigger = OpenAIBatchTrigger(
                batch_ids=group,
                poll_interval=poll_interval,
                max_poll_interval=max_poll_interval,
                deadline=start + 3 * 86_400,
                started_at=start,
                clock=clock,
            )

            async def wait(trigger: OpenAIBatchTrigger = trigger, start: float = start) -> None:
                if start > clock.now:
                    await clock.sleep(start - clock.now)  # the DAG run defers later
                async for event in trigger.run():
                    for batch_id, summary in event.payload["batches"].items():
                        events[batch_id] = clock.now
                        statuses[batch_id] = summary["status"]
                    break

            waiters.append(wait)
    elif scenario == "fixed":
        import openai
        import structlog

        log = structlog.get_logger("bench.fixed_interval")

        for batch_id in ids:

            async def wait(batch_id: str = batch_id) -> None:
                # The official provider's loop: retrieve, and sleep a fixed interval until final.
                client = openai.AsyncOpenAI(base_url=emulator.base_url, api_key="sk-bench")
                try:
                    while True:
                        batch = await client.batches.retrieve(batch_id)
                        log.info("Batch %s status: %s", batch_id, batch.status)
                        if batch.status in FINAL:
                            seen[batch_id] = events[batch_id] = clock.now
                            statuses[batch_id] = batch.status
                            return
                        await clock.sleep(poll_interval)
                finally:
                    await client.close()

            waiters.append(wait)
    else:
        raise ValueError(f"unknown scenario {scenario!r}")

    cpu0 = _cpu_seconds()
    wall0 = time.perf_counter()
    await clock.run(*(waiter() for waiter in waiters))
    return {
        "cpu": _cpu_seconds() - cpu0,
        "wall": time.perf_counter() - wall0,
        "seen": seen,
        "events": events,
        "steps": clock.steps,
        "all_final": all(statuses.get(b) == "completed" for b in ids),
    }


# -- trigger cost: real time, with API latency ----------------------------------------------------------


def serve(spec: dict[str, Any]) -> None:
    """Serve the emulator with ``spec["latency"]`` seconds added to every API call (``python -m
    bench.polling '<spec>'``): half before the request is handled, half before its response starts, so a
    batch's status is read at the middle of the call, as over a network."""
    from bench.emulator_timed import serve as serve_wrapped

    half = float(spec["latency"]) / 2

    def with_latency(app: Any) -> Any:
        async def delayed(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
                await app(scope, receive, send)
                return
            await asyncio.sleep(half)

            async def send_later(message: Any) -> None:
                if message["type"] == "http.response.start":
                    await asyncio.sleep(half)
                await send(message)

            await app(scope, receive, send_later)

        return delayed

    serve_wrapped(spec["knobs"], with_latency)


async def _create_concurrently(emulator: Emulator, sizes: list[int], concurrency: int = 50) -> list[str]:
    """One chat batch per size, created ``concurrency`` at a time (each call pays the latency)."""
    import openai

    client = openai.AsyncOpenAI(base_url=emulator.base_url, api_key="sk-bench", max_retries=0)
    gate = asyncio.Semaphore(concurrency)

    async def create(i: int, lines: int) -> str:
        async with gate:
            upload = await client.files.create(file=(f"in-{i}.jsonl", _chat_input(i, lines)), purpose="batch")
            batch = await client.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        return batch.id

    try:
        return list(await asyncio.gather(*(create(i, n) for i, n in enumerate(sizes))))
    finally:
        await client.close()


def trigger_cost(
    scenario: str,
    batches: int = 500,
    latency: float = 0.2,
    window: float = 60.0,
    poll_interval: float = 2.0,
    rate: float = 5.0,
    work_dir: str = "",
) -> dict[str, Any]:
    """Run ``ours`` (one :class:`OpenAIBatchTrigger` per batch) or ``ideal`` in real time; its figures.

    The batches are created with the emulator stalled (``rate=0``), then all start at once: batch ``i``
    holds ``round((i + 1) * window / batches * rate)`` lines and finishes that many lines / ``rate``
    seconds after the start.
    """
    home = Path(work_dir) / f"airflow-trigger-cost-{scenario}"
    home.mkdir(parents=True, exist_ok=True)
    os.environ["AIRFLOW_HOME"] = str(home)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{home}/airflow.db"

    emulator = Emulator(latency=latency, rate=0, time_scale=1, seed=1)
    try:
        os.environ["AIRFLOW_CONN_OPENAI_DEFAULT"] = json.dumps(
            {"conn_type": "openai_batch", "password": "sk-bench", "host": emulator.base_url}
        )
        sizes = [max(1, round((i + 1) * window / batches * rate)) for i in range(batches)]
        ids = asyncio.run(_create_concurrently(emulator, sizes))
        # Imported before the batches start: importing Airflow takes seconds, which must not count.
        import airflow_openai_batch.triggers.batch  # noqa: F401

        before = _poll_calls(emulator.stats())
        emulator.configure(rate=rate)
        t0 = time.time()  # the emulator's clock runs at real speed: every batch started now
        finish = {batch_id: t0 + lines / rate for batch_id, lines in zip(ids, sizes, strict=True)}
        result = asyncio.run(_run_waiters(scenario, emulator, finish, poll_interval))
        after = _poll_calls(emulator.stats())
    finally:
        emulator.stop()
    delays = sorted(result["done"][b] - f for b, f in finish.items())
    lags = sorted(result["lags"])
    return {
        "scenario": scenario,
        "batches": batches,
        "latency": latency,
        "window": window,
        "poll_interval": poll_interval,
        "api_calls": sum(after.values()) - sum(before.values()),
        "retrieve_calls": after["batches.retrieve"] - before["batches.retrieve"],
        "list_calls": after["batches.list"] - before["batches.list"],
        "cpu_seconds": result["cpu"],
        "wall_seconds": result["wall"],
        "delay_p50": _quantile(delays, 0.50),
        "delay_p95": _quantile(delays, 0.95),
        "delay_max": delays[-1],
        "lag_p99": _quantile(lags, 0.99),
        "lag_max": lags[-1],
        "all_final": result["all_final"],
    }


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _run_waiters(
    scenario: str, emulator: Emulator, finish: dict[str, float], poll_interval: float
) -> dict[str, Any]:
    done: dict[str, float] = {}
    statuses: dict[str, str] = {}
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        # The event loop's responsiveness: how late a 25 ms sleep wakes up (the same small cost in both).
        while not stop.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.025)
            lags.append(max(0.0, time.perf_counter() - start - 0.025))

    if scenario == "ours":
        from airflow_openai_batch.triggers.batch import OpenAIBatchTrigger

        async def wait(batch_id: str) -> None:
            trigger = OpenAIBatchTrigger(
                batch_ids=[batch_id],
                poll_interval=poll_interval,
                max_poll_interval=poll_interval,
                deadline=time.time() + 3600,
                started_at=time.time(),
            )
            async for event in trigger.run():
                done[batch_id] = time.time()
                statuses[batch_id] = event.payload["batches"].get(batch_id, {}).get("status", "?")
                break

        client = None
    elif scenario == "ideal":
        import openai

        client = openai.AsyncOpenAI(base_url=emulator.base_url, api_key="sk-bench")

        async def wait(batch_id: str) -> None:
            assert client is not None
            due = time.monotonic()
            while True:
                batch = await client.batches.retrieve(batch_id)
                if batch.status in FINAL:
                    done[batch_id] = time.time()
                    statuses[batch_id] = batch.status
                    return
                # Every poll interval, not an interval after each answer: the call's time is not added.
                due += poll_interval
                await asyncio.sleep(max(0.0, due - time.monotonic()))

    else:
        raise ValueError(f"unknown scenario {scenario!r}")

    cpu0 = _cpu_seconds()
    wall0 = time.perf_counter()
    ticking = asyncio.ensure_future(ticker())
    try:
        await asyncio.gather(*(wait(batch_id) for batch_id in finish))
    finally:
        stop.set()
        await ticking
        if client is not None:
            await client.close()
    return {
        "cpu": _cpu_seconds() - cpu0,
        "wall": time.perf_counter() - wall0,
        "done": done,
        "lags": lags,
        "all_final": all(statuses.get(b) == "completed" for b in finish),
    }


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
