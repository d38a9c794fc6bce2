"""Polling cost: many batches waiting in one triggerer-like event loop against the emulator.

The emulator runs in its own process with a frozen clock (``--time-scale 0``); every wait of every
waiter goes through a simulated-time scheduler
(:class:`~airflow_openai_batch.emulator.simulated_time.SimulatedTime`, plugged into the trigger's
``_clock`` / ``_sleep`` seams) that, once every waiter is asleep, moves the emulator's clock to the
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
    """The emulator in a child process, with helpers for its admin routes."""

    def __init__(self, **knobs: Any) -> None:
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

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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
        body = b"".join(
            b'{"custom_id":"b%d-r%d","method":"POST","url":"/v1/chat/completions",'
            b'"body":{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}}\n' % (i, j)
            for j in range(lines)
        )
        upload = client.files.create(file=(f"in-{i}.jsonl", body), purpose="batch")
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
                if not isinstance(batch, BaseException) and batch.status in FINAL:
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
            )
            trigger._clock = clock.time
            trigger._sleep = clock.sleep

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
