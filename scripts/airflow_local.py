"""``make airflow``: a local Airflow deployment with the provider and the emulator, to explore the UI.

The same launcher as the deployment test (``tests/support/cluster.py``): api-server, scheduler,
dag-processor and triggerer as separate processes (LocalExecutor, SQLite) on 127.0.0.1, the example DAGs
of ``dags/``, and an ``openai_default`` connection of type ``openai_batch`` pointing at the emulator (no
OpenAI account, no network). Prints the UI's URL and login; Ctrl-C stops everything.

Run from the repository root: ``python -m scripts.airflow_local [--port 8080] [--rate 20]``.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import tempfile
import threading
import time
from pathlib import Path

from airflow_openai_batch.emulator import EmulatorConfig, EmulatorServer
from tests.support.cluster import AirflowCluster

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="the UI / REST API port on 127.0.0.1")
    parser.add_argument(
        "--rate",
        type=float,
        default=20.0,
        help="request lines the emulator processes per second per batch (low: watch the sensor defer)",
    )
    parser.add_argument("--home", type=Path, default=None, help="AIRFLOW_HOME (default: a new temp dir)")
    return parser.parse_args()


def stop_on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    args = parse_args()
    # Ctrl-C and a plain kill both stop the deployment cleanly (a background job starts with SIGINT ignored).
    signal.signal(signal.SIGINT, stop_on_signal)
    signal.signal(signal.SIGTERM, stop_on_signal)
    home = args.home or Path(tempfile.mkdtemp(prefix="aob-airflow-local-"))
    home.mkdir(parents=True, exist_ok=True)
    output_root = home / "output"
    started = time.monotonic()
    with EmulatorServer(EmulatorConfig(rate=args.rate, seed=1)) as emulator:
        extra_env = {"OPENAI_BATCH_OUTPUT_ROOT": str(output_root), "OPENAI_BATCH_POLL_INTERVAL": "5"}
        cluster = AirflowCluster(home, REPO_ROOT / "dags", extra_env, port=args.port)
        try:
            print(f"Starting Airflow in {home} (logs: {home}/*.out) ...", flush=True)
            cluster.start()
            cluster.create_connection(
                "openai_default",
                "openai_batch",
                host=emulator.base_url,
                password=f"sk-local-{secrets.token_hex(8)}",
                description="The local OpenAI Batch emulator (make airflow)",
            )
            print(
                f"\nAirflow is up after {time.monotonic() - started:.0f} s\n"
                f"  UI:        {cluster.base}\n"
                f"  login:     {cluster.username} / {cluster.password}\n"
                f"  emulator:  {emulator.base_url} (rate {args.rate:g} lines/s per batch)\n"
                f"  results:   {output_root}\n"
                "Trigger nightly_classification (its tickets param names the table). Ctrl-C stops it all.",
                flush=True,
            )
            threading.Event().wait()  # until Ctrl-C
        except KeyboardInterrupt:
            print("\nStopping ...", flush=True)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
