"""A real Airflow 3 deployment: api-server, scheduler, dag-processor and triggerer processes.

LocalExecutor on SQLite, a fresh AIRFLOW_HOME, loopback only, a free port (or a given one). Each component
runs in its own process group, so a SIGKILL of the group takes the triggerer's runner subprocess down with
it (a crashed node), and a stop never leaves a worker behind. Everything the tests read goes through
Airflow's REST API (``/api/v2``, with a JWT from the simple auth manager's ``/auth/token``, as any client
would) or the metadata DB. Used by the reliability and deployment tests and by ``make airflow``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.polling import wait_until

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
COMPONENTS: dict[str, list[str]] = {
    "api-server": ["api-server"],  # the port and host come from AIRFLOW__API__*
    "scheduler": ["scheduler"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AirflowCluster:
    """Start with :meth:`start`, always :meth:`stop` (a fixture finalizer does).

    :param home: a fresh, empty AIRFLOW_HOME (DB, logs, the login's password file).
    :param dags_folder: the DAGS_FOLDER the dag-processor parses.
    :param extra_env: more environment for every component (connections, DAG knobs).
    :param port: the api-server's port on 127.0.0.1; a free one when ``None``.
    :param parallelism: the LocalExecutor's number of task slots.
    """

    #: The simple auth manager's one user; the password is made per cluster and written to its home.
    username = "admin"

    def __init__(
        self,
        home: Path,
        dags_folder: Path,
        extra_env: dict[str, str],
        *,
        port: int | None = None,
        parallelism: int = 4,
    ) -> None:
        from cryptography.fernet import Fernet

        self.home = home
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.fernet_key = Fernet.generate_key().decode()
        self.password = secrets.token_urlsafe(12)
        self.password_file = home / "simple_auth_manager_passwords.json"
        self._token: str | None = None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "OPENAI_"))}
        env.update(
            {
                "AIRFLOW_HOME": str(home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": str(parallelism),
                "AIRFLOW__CORE__FERNET_KEY": self.fernet_key,
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                # A real login (user + password -> JWT), as a user of the UI or the REST API has.
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{self.username}:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.password_file),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base}/execution/",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__BASE_URL": self.base,
                "AIRFLOW__API__WORKERS": "1",  # one uvicorn worker is plenty on loopback (and 2 cores)
                "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(24).hex(),
                # Runs start when a client triggers them, never from a schedule (the example DAGs are daily).
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
                "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
                # A dead triggerer's triggers go to a live one after this many seconds without heartbeat.
                "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "5",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            }
        )
        env.update(extra_env)
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.started_count: dict[str, int] = {}
        self._logs: list[Any] = []

    # -- processes -------------------------------------------------------------------------------

    def start(self, timeout: float = 150.0) -> None:
        self.password_file.write_text(json.dumps({self.username: self.password}))
        migrate = subprocess.run(
            [AIRFLOW, "db", "migrate"], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert migrate.returncode == 0, (
            f"airflow db migrate failed:\n{migrate.stdout[-3000:]}{migrate.stderr[-3000:]}"
        )
        for name in COMPONENTS:
            self.spawn(name)
        wait_until(
            self._healthy, timeout=timeout, interval=0.5, what="the Airflow components", details=self.tail
        )

    def spawn(self, name: str) -> subprocess.Popen:
        n = self.started_count[name] = self.started_count.get(name, 0) + 1
        log = (self.home / f"{name}-{n}.out").open("wb")
        self._logs.append(log)
        proc = subprocess.Popen(
            [AIRFLOW, *COMPONENTS[name]],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killpg reaches its children too
        )
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a component's whole process group (SIGKILL: a crash) and reap it."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def own_pids(self) -> list[int]:
        """Every live process whose environment names this cluster's AIRFLOW_HOME (ours alone)."""
        marker = f"AIRFLOW_HOME={self.home}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Task processes that left their group (if any): found by our unique home, killed by pid.
        for pid in self.own_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for log in self._logs:
            log.close()

    def tail(self, lines: int = 25) -> str:
        """The last lines of every component's output (HTTP access lines left out), for failure messages."""
        out = []
        for path in sorted(self.home.glob("*.out")):
            text = [
                line for line in path.read_text(errors="replace").splitlines() if "[http.access]" not in line
            ]
            out.append(f"--- {path.name} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    # -- REST API and DB -------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", **headers}
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=20) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def token(self) -> str:
        """A JWT for the REST API, from the simple auth manager's login endpoint (user + password)."""
        if self._token is None:
            body = {"username": self.username, "password": self.password}
            self._token = self._request("POST", "/auth/token", body, {})["access_token"]
        return self._token

    def api(self, method: str, path: str, body: Any = None) -> Any:
        return self._request(method, path, body, {"Authorization": f"Bearer {self.token()}"})

    def _healthy(self) -> bool:
        try:
            health = self._request("GET", "/api/v2/monitor/health", None, {})
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            return False
        parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
        return all((health.get(p) or {}).get("status") == "healthy" for p in parts)

    def wait_for_dag(self, dag_id: str, timeout: float = 120.0) -> None:
        def parsed() -> bool:
            try:
                return self.api("GET", f"/api/v2/dags/{dag_id}")["dag_id"] == dag_id
            except urllib.error.HTTPError:
                return False

        wait_until(
            parsed, timeout=timeout, interval=0.5, what=f"DAG {dag_id} to be parsed", details=self.tail
        )

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        run = self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
        return run["dag_run_id"]

    def ti_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        tis = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        return {ti["task_id"]: ti["state"] for ti in tis["task_instances"]}

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]

    def set_ti_state(self, dag_id: str, run_id: str, task_id: str, state: str) -> Any:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
        return self.api("PATCH", path, {"new_state": state})

    def create_connection(self, conn_id: str, conn_type: str, **fields: Any) -> Any:
        """Create a connection through the REST API (stored encrypted in the metadata DB, as in the UI)."""
        body = {"connection_id": conn_id, "conn_type": conn_type, **fields}
        if isinstance(body.get("extra"), dict):
            body["extra"] = json.dumps(body["extra"])
        return self.api("POST", "/api/v2/connections", body)

    def extra_links(self, dag_id: str, run_id: str, task_id: str) -> dict[str, str | None]:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/links"
        return self.api("GET", path)["extra_links"]

    def asset_events(self, **query: str) -> list[dict[str, Any]]:
        path = "/api/v2/assets/events" + ("?" + urllib.parse.urlencode(query) if query else "")
        return self.api("GET", path)["asset_events"]

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
        value = self.api("GET", path)["value"]
        return json.loads(value) if isinstance(value, str) else value

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Read the metadata DB (read-only; retried while a component holds the write lock)."""
        for _ in range(50):
            try:
                with sqlite3.connect(f"file:{self.home}/airflow.db?mode=ro", uri=True, timeout=5) as db:
                    return list(db.execute(sql, params))
            except sqlite3.OperationalError as err:
                if "locked" not in str(err):
                    raise
                time.sleep(0.1)
        raise AssertionError(f"the metadata DB stayed locked: {sql}")

    def decode_kwargs(self, raw: str) -> tuple[str, dict[str, Any]]:
        """A trigger row's kwargs as stored (plain JSON, or Fernet-encrypted JSON) -> (text, dict)."""
        from cryptography.fernet import Fernet

        text = (
            raw
            if raw.lstrip().startswith("{")
            else Fernet(self.fernet_key.encode()).decrypt(raw.encode()).decode()
        )
        data = json.loads(text)
        if isinstance(data, dict) and "__data__" in data:  # serde envelope
            data = data["__data__"]
        return text, data

    def triggers(self) -> list[dict[str, Any]]:
        rows = self.query("SELECT id, classpath, triggerer_id, kwargs FROM trigger ORDER BY id")
        out = []
        for trigger_id, classpath, triggerer_id, raw in rows:
            text, kwargs = self.decode_kwargs(raw)
            out.append(
                {
                    "id": trigger_id,
                    "classpath": classpath,
                    "triggerer_id": triggerer_id,
                    "text": text,
                    "kwargs": kwargs,
                }
            )
        return out
