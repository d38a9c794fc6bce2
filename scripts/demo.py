"""`make demo`: run the nightly classification DAG end to end through Airflow and print the summary.

Offline by default: starts the bundled emulator on a free loopback port (with some failed lines and
some expired batches switched on) and points the ``openai_default`` connection at it. With
``OPENAI_API_KEY`` set, runs a small sample against OpenAI instead (the Batch API may take hours).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "demo-output"
AIRFLOW_HOME = OUTPUT / "airflow-home"
RESULTS = OUTPUT / "results"
BIN = Path(sys.executable).parent

# Emulator knobs for the demo: 3,000 tickets in batches of 1,200 at 1,000 lines/s with a 1.1 s expiry:
# the two full batches expire part-way (partial results kept), the last one completes; 3% of lines fail.
EMULATOR_ARGS = ["--rate", "1000", "--failure-rate", "0.03", "--expire-after", "1.1", "--seed", "7"]
DEMO_CONF = {"max_requests_per_batch": 1200}
LIVE_CONF = {"sample_size": 20}


def start_emulator(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [str(BIN / "python"), "-m", "airflow_openai_batch.emulator", "--port", "0", *EMULATOR_ARGS],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    for line in process.stdout:  # the emulator prints its address once it accepts connections
        if "listening on" in line:
            return process, line.rsplit(" ", 1)[-1].strip()
        if time.monotonic() > deadline:
            break
    process.kill()
    raise SystemExit("the emulator did not start")


def airflow(env: dict[str, str], *args: str) -> None:
    subprocess.run([str(BIN / "airflow"), *args], env=env, check=True)


def print_summary(manifest_path: Path) -> None:
    summary = json.loads(manifest_path.read_text())
    usage = summary["usage"]
    cost = summary["estimated_cost_usd"]
    print("\n==================== collect summary ====================")
    print(f"batches                       {len(summary['batch_ids'])}: {', '.join(summary['batch_ids'])}")
    print(f"requests                      {summary['total']:,}")
    print(f"succeeded                     {summary['succeeded']:,}")
    print(f"failed                        {summary['failed']:,}")
    for code, count in sorted(summary["failed_by_code"].items(), key=lambda kv: -kv[1]):
        print(f"  {code:<28}{count:,}")
    print(f"tokens in / out               {usage['input_tokens']:,} / {usage['output_tokens']:,}")
    print(f"estimated cost                {'unknown' if cost is None else f'${cost:.4f}'}")
    print("files:")
    for key in ("successes_uri", "failures_uri", "retry_requests_uri"):
        print(f"  {summary[key]}")
    print(f"  {manifest_path}")
    print("==========================================================")


def main() -> int:
    shutil.rmtree(AIRFLOW_HOME, ignore_errors=True)
    AIRFLOW_HOME.mkdir(parents=True)
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "OPENAI_BATCH_OUTPUT_ROOT": str(RESULTS),
    }
    emulator = None
    live = bool(os.environ.get("OPENAI_API_KEY"))
    if live:
        print("OPENAI_API_KEY is set: running a 20-ticket sample against OpenAI (may take a while).")
        env["AIRFLOW_CONN_OPENAI_DEFAULT"] = json.dumps(
            {"conn_type": "openai_batch", "password": os.environ["OPENAI_API_KEY"]}
        )
        conf = LIVE_CONF
    else:
        env.pop("OPENAI_API_KEY", None)
        emulator, url = start_emulator(env)
        print(f"Emulator at {url} (offline run; set OPENAI_API_KEY to use OpenAI)")
        env["AIRFLOW_CONN_OPENAI_DEFAULT"] = json.dumps(
            {"conn_type": "openai_batch", "password": "sk-demo-not-a-real-key", "host": f"{url}/v1"}
        )
        env["OPENAI_BATCH_POLL_INTERVAL"] = "1"
        conf = DEMO_CONF
    try:
        started = time.time()
        airflow(env, "db", "migrate")
        airflow(env, "dags", "test", "nightly_classification", "-c", json.dumps(conf))
    finally:
        if emulator is not None:
            emulator.terminate()
            emulator.wait(timeout=30)
    manifests = [
        p for p in RESULTS.glob("classification/*/results/manifest.json") if p.stat().st_mtime >= started
    ]
    if not manifests:
        print("No manifest was written: see the task logs above.")
        return 1
    print_summary(max(manifests, key=lambda p: p.stat().st_mtime))
    return 0


if __name__ == "__main__":
    sys.exit(main())
