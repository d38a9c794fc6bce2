"""Shared fixtures: an isolated Airflow home, the emulator on loopback, a real S3-compatible server.

Airflow reads its configuration at import time, so the environment is set here, at the top of the
first module pytest imports, before anything imports airflow.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_DAGS_FOLDER = REPO_ROOT / "tests" / "dags"
#: The fake API key every test uses; tests search outputs for it to prove it never leaks.
TEST_API_KEY = "sk-test-0123456789abcdefSECRET"

_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="aob-airflow-home-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(TEST_DAGS_FOLDER)
# Two bundles, so dag.test() finds both the example DAGs (documentation) and the test-only DAGs.
os.environ["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"] = json.dumps(
    [
        {
            "name": name,
            "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
            "kwargs": {"path": str(path), "refresh_interval": 0},
        }
        for name, path in (("examples", REPO_ROOT / "dags"), ("test_dags", TEST_DAGS_FOLDER))
    ]
)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_AIRFLOW_HOME}/airflow.db"
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")
# Never talk to real OpenAI from a test, whatever the developer's shell holds.
for _var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
    os.environ.pop(_var, None)

import pytest  # noqa: E402

from airflow_openai_batch.emulator import EmulatorConfig, EmulatorServer  # noqa: E402


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session's Airflow home (metadata DB, logs) goes with the session."""
    shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def connection_uri_json(base_url: str, **extra: object) -> str:
    """The JSON form of an ``openai_batch`` connection pointing at ``base_url``."""
    conn: dict[str, object] = {"conn_type": "openai_batch", "password": TEST_API_KEY, "host": base_url}
    if extra:
        conn["extra"] = extra
    return json.dumps(conn)


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[EmulatorServer]:
    with EmulatorServer(EmulatorConfig(rate=1_000_000.0, seed=1)) as server:
        yield server


@pytest.fixture
def emulator(emulator_server: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatorServer]:
    """The shared emulator, emptied and reset to fast defaults, with ``openai_default`` pointing at it."""
    emulator_server.reset(restore_config=True)
    monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_uri_json(emulator_server.base_url))
    yield emulator_server


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated metadata DB (SQLite in the session's Airflow home), for dag.test() and CLI tests."""
    from airflow.utils import db

    db.resetdb()
    return _AIRFLOW_HOME


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible server (moto in server mode) on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on the moto server, with ``aws_default`` pointing at it; yields the bucket name."""
    import uuid

    import boto3

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": s3_server, "region_name": "us-east-1"},
            }
        ),
    )
    bucket = f"bucket-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    yield bucket


class InMemoryTaskStateStore:
    """Airflow 3.3's ``task_state_store`` semantics (a per-task-instance key/value store), in memory."""

    def __init__(self) -> None:
        self.data: dict[str, object] = {}

    def get(self, key: str, default: object = None) -> object:
        return self.data.get(key, default)

    def set(self, key: str, value: object, *, retention: object = None) -> None:
        self.data[key] = value


class RecordingTaskInstance:
    """The parts of a task instance that operators touch when called directly (``op.execute``)."""

    def __init__(self, dag_id: str, task_id: str, run_id: str, map_index: int = -1) -> None:
        self.dag_id, self.task_id, self.run_id, self.map_index = dag_id, task_id, run_id, map_index
        self.xcoms: dict[str, object] = {}

    def xcom_push(self, key: str, value: object) -> None:
        self.xcoms[key] = value


@pytest.fixture
def make_context():
    """Build a minimal task context for calling ``execute`` directly (DAG-level tests use dag.test())."""
    import pendulum

    def build(
        dag_id: str = "test_dag",
        task_id: str = "task",
        run_id: str = "manual__2026-11-22T00:00:00",
        map_index: int = -1,
        state_store: InMemoryTaskStateStore | None = None,
    ) -> dict[str, object]:
        class _DagRun:
            run_after = pendulum.now("UTC").subtract(minutes=5)

        context: dict[str, object] = {
            "ti": RecordingTaskInstance(dag_id, task_id, run_id, map_index),
            "dag_run": _DagRun(),
            "run_id": run_id,
        }
        if state_store is not None:
            context["task_state_store"] = state_store
        return context

    return build
