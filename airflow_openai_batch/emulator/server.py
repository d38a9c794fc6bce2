"""Run the emulator with uvicorn: in a background thread (tests) or in the foreground (CLI)."""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import uvicorn

from .app import create_app
from .config import EmulatorConfig
from .state import EmulatorState

if TYPE_CHECKING:
    import openai


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port`` (port 0 = a free port chosen by the OS)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class NotifyingServer(uvicorn.Server):
    """A uvicorn server that sets ``ready`` once it accepts connections and calls
    ``on_ready`` / ``on_shutdown`` hooks.

    ``on_shutdown`` runs inside ``serve``: after a SIGTERM uvicorn re-raises the signal once
    ``serve`` returns, so cleanup placed after ``run()`` would never happen.

    :param config: the uvicorn config.
    :param on_ready: called once the server accepts connections.
    :param on_shutdown: called once the server has shut down.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        on_ready: Callable[[], None] | None = None,
        on_shutdown: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self._on_ready = on_ready
        self._on_shutdown = on_shutdown

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._on_ready is not None:
            self._on_ready()
        self.ready.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().shutdown(sockets)
        finally:
            if self._on_shutdown is not None:
                self._on_shutdown()


def uvicorn_config(app: Any, log_level: str = "warning") -> uvicorn.Config:
    return uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        # Keep-alive connections of clients still open must not delay a stop for long.
        timeout_graceful_shutdown=2,
    )


class EmulatorServer:
    """The emulator on ``127.0.0.1`` and a free port, served by uvicorn in a daemon thread.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.

    :param config: starting knobs (default ``EmulatorConfig()``).
    :param knobs: knobs overriding ``config`` (e.g. ``EmulatorServer(rate=50, time_scale=0)``).
    """

    def __init__(self, config: EmulatorConfig | None = None, **knobs: Any) -> None:
        config = config or EmulatorConfig()
        self.config = config.replace(**knobs) if knobs else config
        self.app = create_app(self.config)
        self.state: EmulatorState = self.app.state.emulator
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._server: NotifyingServer | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (the server root; Azure clients use it as ``azure_endpoint``)."""
        if self.port is None:
            raise RuntimeError("the emulator is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL: ``url + "/v1"``."""
        return self.url + "/v1"

    def start(self, timeout: float = 10.0) -> EmulatorServer:
        """Start serving and return once ``/health`` answers."""
        if self._stopped:
            raise RuntimeError("an EmulatorServer cannot be restarted; create a new one")
        if self._thread is not None:
            return self
        self._socket = bind_socket(self.host, 0)
        self.port = self._socket.getsockname()[1]
        self._server = NotifyingServer(uvicorn_config(self.app))
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="openai-batch-emulator",
            daemon=True,
        )
        self._thread.start()
        # Wait on the server's own readiness signal, watching for a thread that died on startup.
        waited = 0.0
        while not self._server.ready.wait(0.05):
            waited += 0.05
            if not self._thread.is_alive() or waited >= timeout:
                self.stop()
                raise RuntimeError("the emulator did not start")
        self._check_health(timeout)
        return self

    def _check_health(self, timeout: float) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"the emulator's /health answered {response.status}")
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop serving and delete the stored bytes (a temporary data dir is removed)."""
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()
        self.state.close()

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ controls

    def configure(self, **knobs: Any) -> EmulatorConfig:
        """Change knobs at runtime (e.g. ``configure(fault_rate=0.3)``); returns the new config."""
        return self.state.configure(**knobs)

    def reset(self, restore_config: bool = False) -> None:
        """Drop all files, batches and stats; with ``restore_config`` also undo ``configure`` calls."""
        self.state.reset(restore_config=restore_config)

    def stats(self) -> dict[str, Any]:
        """Call counts per route name, ``faults`` per route, files/batches counts, last api-version..."""
        return self.state.stats()

    def advance(self, seconds: float) -> float:
        """Move the virtual clock forward by ``seconds``; returns the new virtual time."""
        return self.state.advance(seconds)

    def client(self, **kwargs: Any) -> openai.OpenAI:
        """An ``openai.OpenAI`` client for this emulator (``api_key="sk-test"`` unless given)."""
        import openai

        kwargs.setdefault("api_key", "sk-test")
        return openai.OpenAI(base_url=self.base_url, **kwargs)
