"""CLI: ``python -m airflow_openai_batch.emulator --port 8000 [--rate ...]`` (``openai-batch-emulator``).

Every knob of :class:`EmulatorConfig` is a flag (``--failure-rate``, ``--expire-after``...); the
``OPENAI_BATCH_EMULATOR_*`` env vars are the defaults. Prints ``emulator listening on
http://HOST:PORT`` once it accepts connections (with ``--port 0``, the port actually chosen).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import fields

from .app import create_app
from .config import ENV_PREFIX, KNOB_HELP, EmulatorConfig, parse_knob
from .server import NotifyingServer, bind_socket, uvicorn_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openai-batch-emulator",
        description="A local, stateful emulator of the OpenAI Files + Batches API.",
    )
    parser.add_argument(
        "--host",
        default=os.environ.get(ENV_PREFIX + "HOST", "127.0.0.1"),
        help="interface to bind (env OPENAI_BATCH_EMULATOR_HOST; default 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get(ENV_PREFIX + "PORT", "8000")),
        help="port, 0 = any free port (env OPENAI_BATCH_EMULATOR_PORT; default 8000)",
    )
    parser.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    for f in fields(EmulatorConfig):
        # SUPPRESS: only flags actually given override the env-derived defaults.
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,
            metavar=f.name.upper(),
            help=f"{KNOB_HELP[f.name]} (env {ENV_PREFIX}{f.name.upper()}; default {f.default!r})",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator in the foreground until interrupted (SIGINT/SIGTERM)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {}
    for f in fields(EmulatorConfig):
        if hasattr(args, f.name):
            try:
                overrides[f.name] = parse_knob(f.name, getattr(args, f.name))
            except ValueError as exc:
                parser.error(f"--{f.name.replace('_', '-')}: {exc}")
    try:
        config = EmulatorConfig.from_env(**overrides)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    app = create_app(config)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        app.state.emulator.close()
        parser.error(f"cannot listen on {args.host}:{args.port}: {exc}")
    port = sock.getsockname()[1]
    shown_host = f"[{args.host}]" if ":" in args.host else args.host

    def announce() -> None:
        print(f"emulator listening on http://{shown_host}:{port}", flush=True)

    server = NotifyingServer(
        uvicorn_config(app, log_level=args.log_level),
        on_ready=announce,
        # The stored bytes die with the process: remove them (and a temporary data dir).
        on_shutdown=app.state.emulator.close,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
