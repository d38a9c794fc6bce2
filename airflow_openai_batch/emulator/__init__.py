"""A local, stateful emulator of the OpenAI Files + Batches API, for tests, benchmarks and demos.

An independent implementation of OpenAI's behaviour (it shares no code with the provider)::

    from airflow_openai_batch.emulator import EmulatorServer

    with EmulatorServer(time_scale=0) as server:
        client = server.client()
        ...
        server.advance(60)  # move the virtual clock

Or run it: ``python -m airflow_openai_batch.emulator --port 8000``.
"""

from __future__ import annotations

from .app import create_app
from .config import EmulatorConfig
from .server import EmulatorServer

__all__ = ["EmulatorConfig", "EmulatorServer", "create_app"]
