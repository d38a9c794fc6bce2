"""The emulator as a process: the CLI, env-var config, and flat memory for big files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest

from airflow_openai_batch.emulator import EmulatorConfig
from airflow_openai_batch.emulator.__main__ import build_parser

READY_TIMEOUT = 20.0


class EmulatorProcess:
    """``python -m airflow_openai_batch.emulator`` in a subprocess, with its announced URL."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "airflow_openai_batch.emulator", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.url = self._read_url()

    def _read_url(self) -> str:
        # Read the announcement on a thread so a silent child cannot hang the test.
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(READY_TIMEOUT)
        if not lines or not lines[0].startswith("emulator listening on http://"):
            self.stop()
            raise AssertionError(
                f"no listening line; stderr: {self.proc.stderr.read() if self.proc.stderr else ''}"
            )
        return lines[0].strip().rsplit(" ", 1)[-1]

    def peak_rss_kib(self) -> int:
        """The process's peak resident set size (VmHWM), in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=10)
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()
            if self.proc.stderr:
                self.proc.stderr.close()


@pytest.fixture
def process() -> Iterator[EmulatorProcess]:
    proc = EmulatorProcess("--rate", "100000", "--seed", "5", "--expire-after", "none")
    yield proc
    proc.stop()


def test_cli_serves_and_terminates(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    flags = ["--rate", "100000", "--seed", "5", "--expire-after", "none", "--data-dir", str(data_dir)]
    proc = EmulatorProcess(*flags)
    try:
        assert proc.url.startswith("http://127.0.0.1:") and not proc.url.endswith(":0")
        assert httpx2.get(proc.url + "/health").status_code == 200
        config = httpx2.get(proc.url + "/_emulator/config").json()
        assert config["rate"] == 100000 and config["seed"] == 5 and config["expire_after"] is None
        client = openai.OpenAI(api_key="k", base_url=proc.url + "/v1", max_retries=0)
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
        client.close()
        assert list(data_dir.iterdir()), "the upload is stored in the data dir"
    finally:
        code = proc.stop()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal (exit by SIGTERM).
    assert code in (0, -signal.SIGTERM)
    assert list(data_dir.iterdir()) == [], "the stored bytes are removed on shutdown"


def test_env_vars_are_defaults_and_flags_win() -> None:
    proc = EmulatorProcess(
        "--failure-rate",
        "0.2",
        env={"OPENAI_BATCH_EMULATOR_FAILURE_RATE": "0.5", "OPENAI_BATCH_EMULATOR_FAULT_KINDS": "429,drop"},
    )
    try:
        config = httpx2.get(proc.url + "/_emulator/config").json()
        assert config["failure_rate"] == 0.2
        assert config["fault_kinds"] == ["429", "drop"]
    finally:
        proc.stop()


def test_from_env_parses_every_kind_of_knob() -> None:
    env = {
        "OPENAI_BATCH_EMULATOR_RATE": "12.5",
        "OPENAI_BATCH_EMULATOR_EXPIRE_AFTER": "30",
        "OPENAI_BATCH_EMULATOR_ENQUEUED_TOKEN_LIMIT": "2_000_000",
        "OPENAI_BATCH_EMULATOR_FAULT_ROUTES": "batches.list, files.list",
        "OPENAI_BATCH_EMULATOR_DATA_DIR": "/tmp/x",
        "OPENAI_BATCH_EMULATOR_SEED": "9",
    }
    config = EmulatorConfig.from_env(env)
    assert config.rate == 12.5 and config.expire_after == 30.0
    assert config.enqueued_token_limit == 2_000_000
    assert config.fault_routes == ("batches.list", "files.list")
    assert config.data_dir == "/tmp/x" and config.seed == 9
    assert EmulatorConfig.from_env({"OPENAI_BATCH_EMULATOR_EXPIRE_AFTER": "none"}).expire_after is None
    with pytest.raises(ValueError):
        EmulatorConfig.from_env({"OPENAI_BATCH_EMULATOR_FAULT_KINDS": "404"})
    # Every knob has a CLI flag.
    flags = {a.dest for a in build_parser()._actions}
    assert set(EmulatorConfig.__dataclass_fields__) <= flags


def test_big_upload_keeps_memory_flat(process: EmulatorProcess, tmp_path: Path) -> None:
    size = 50 * 1024 * 1024
    line = (
        b'{"custom_id": "%08d", "method": "POST", "url": "/v1/embeddings", '
        b'"body": {"model": "m", "input": "%s"}}\n'
    )
    filler = "z" * 1000
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as handle:
        written = i = 0
        while written < size:
            data = line % (i, filler.encode())
            handle.write(data)
            written += len(data)
            i += 1
    client = openai.OpenAI(api_key="k", base_url=process.url + "/v1", max_retries=0)
    httpx2.get(process.url + "/health")  # warm up the request path before measuring
    before = process.peak_rss_kib()

    with open(big, "rb") as handle:
        file = client.files.create(file=handle, purpose="batch")
    assert file.bytes == written
    with client.files.with_streaming_response.content(file.id) as response:
        downloaded = sum(len(chunk) for chunk in response.iter_bytes())
    assert downloaded == written

    growth_mib = (process.peak_rss_kib() - before) / 1024
    # The 50 MB went through the emulator twice (up and down) without being held in memory.
    assert growth_mib < 15, f"emulator peak RSS grew by {growth_mib:.1f} MiB for a 50 MiB file"
    client.close()
