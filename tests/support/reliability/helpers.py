"""Shared helpers of the reliability suite: figures, bounded polling, requests, subprocess workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tests.support.polling import wait_until

REPO_ROOT = Path(__file__).resolve().parents[3]
#: Every figures line printed by this suite, repeated in pytest's terminal summary (see conftest.py).
FIGURES: list[str] = []
CHAT = "/v1/chat/completions"


def report(test: str, **figures: Any) -> str:
    """Print one line of figures for a test (also shown in the terminal summary of the run)."""
    parts = []
    for key, value in figures.items():
        if isinstance(value, float):
            value = f"{value:.2f}"
        elif isinstance(value, Mapping):
            value = "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
        parts.append(f"{key}={value}")
    line = f"[reliability] {test}: " + ", ".join(parts)
    print(line, flush=True)
    FIGURES.append(line)
    return line


def reseed(emulator: Any, seed: int) -> None:
    """Restart the emulator's fault stream at ``seed`` without dropping its files and batches."""
    emulator.configure(seed=seed + 100_003)
    emulator.configure(seed=seed)


def chat_request(i: int, prefix: str = "rel", model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {
        "custom_id": f"{prefix}-{i:05d}",
        "method": "POST",
        "url": CHAT,
        "body": {"model": model, "messages": [{"role": "user", "content": f"Classify item {i} (é, 漢字)"}]},
    }


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    with path.open("wb") as out:
        for row in rows:
            out.write(json.dumps(row).encode() + b"\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def outcome_of(successes: Iterable[Mapping[str, Any]], failures: Iterable[Mapping[str, Any]]) -> dict:
    """What a collect produced, independent of batch ids and order: ids per outcome, codes per id."""
    ok = sorted(r["custom_id"] for r in successes)
    failed = {r["custom_id"]: r["error_code"] for r in failures}
    return {"succeeded": ok, "failed": dict(sorted(failed.items()))}


def count_ids(*record_lists: Iterable[Mapping[str, Any]]) -> Counter:
    return Counter(r["custom_id"] for records in record_lists for r in records)


class FileTaskStateStore:
    """A durable ``task_state_store`` (Airflow 3.3 semantics) kept in a JSON file, so that it survives a
    SIGKILL of the process using it, like the metadata-DB-backed store of a real Airflow."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def _load(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str, default: Any = None) -> Any:
        return self._load().get(key, default)

    def set(self, key: str, value: Any, *, retention: Any = None) -> None:
        data = self._load()
        data[key] = value
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)


class Worker:
    """``python -m tests.support.reliability.worker SPEC`` in a subprocess that blocks at a chosen point.

    The worker writes ``spec["marker"]`` when it reaches the point, then blocks forever; the test waits
    for the marker (bounded polling of a file) and SIGKILLs it: a real crash, not an exception.
    """

    def __init__(self, spec: Mapping[str, Any], work_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.spec = dict(spec)
        self.work_dir = work_dir
        self.marker = Path(self.spec["marker"])
        self.log_path = work_dir / f"worker-{self.marker.stem}.log"
        tmp_dir = work_dir / "worker-tmp"
        tmp_dir.mkdir(exist_ok=True)
        full_env = dict(os.environ if env is None else env)
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p
        )
        full_env["TMPDIR"] = str(tmp_dir)  # staging files a killed worker leaves behind land here
        self.tmp_dir = tmp_dir
        spec_path = work_dir / f"spec-{self.marker.stem}.json"
        spec_path.write_text(json.dumps(self.spec))
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.reliability.worker", str(spec_path)],
            cwd=REPO_ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_for_marker(self, timeout: float = 60.0) -> dict[str, Any]:
        def reached() -> bool:
            if self.marker.exists():
                return True
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited with {self.proc.returncode} before reaching "
                    f"{self.spec.get('kill_point')}:\n{self.output()}"
                )
            return False

        wait_until(reached, timeout=timeout, what=f"worker to reach {self.spec.get('kill_point')}")
        return json.loads(wait_until(lambda: self.marker.read_text() or None, timeout=5, what="marker text"))

    def kill(self) -> int:
        """SIGKILL the worker (no cleanup, no finally blocks, no atexit) and reap it."""
        self.proc.send_signal(signal.SIGKILL)
        code = self.proc.wait(timeout=30)
        self._log.close()
        return code

    def wait(self, timeout: float = 120.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self._log.close()
        return code

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if not self._log.closed:
            self._log.close()
