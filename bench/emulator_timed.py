"""The emulator in its own process, timing every request it serves: ``python -m bench.emulator_timed``.

An ASGI middleware adds up, per route, the wall time from a request's arrival to the end of its response
(receiving an upload and streaming a download included) and the process's CPU time; ``GET
/_bench/timing`` answers the totals. This is the "emulator time" of the end-to-end benchmark: the rest of
the wall time is ours (and Airflow's).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

_ID = re.compile(r"/(file|batch)[-_][A-Za-z0-9]+")


class Timing:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.cpu0 = time.process_time()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/_bench/timing":
            body = json.dumps(
                {
                    "seconds": sum(self.seconds.values()),
                    "calls": sum(self.calls.values()),
                    "by_route": {k: [self.calls[k], self.seconds[k]] for k in self.calls},
                    "cpu_seconds": time.process_time() - self.cpu0,
                }
            ).encode()
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        route = scope["method"] + " " + _ID.sub(r"/{\1}", scope["path"])
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.seconds[route] += time.perf_counter() - start
            self.calls[route] += 1


def serve(knobs: dict[str, Any], wrap: Callable[[Any], Any]) -> None:
    """Serve the emulator with ``knobs`` behind the ASGI middleware ``wrap(app)`` on a free port, saying
    ``emulator listening on <url>`` once it accepts connections (what the bench harness waits for)."""
    from airflow_openai_batch.emulator import EmulatorConfig, create_app
    from airflow_openai_batch.emulator.server import NotifyingServer, bind_socket, uvicorn_config

    app = create_app(EmulatorConfig(**knobs))
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = NotifyingServer(
        uvicorn_config(wrap(app)),
        on_ready=lambda: print(f"emulator listening on http://127.0.0.1:{port}", flush=True),
        on_shutdown=app.state.emulator.close,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def main() -> None:
    serve(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}, Timing)


if __name__ == "__main__":
    main()
