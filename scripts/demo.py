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
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "demo-output"
AIRFLOW_HOME = OUTPUT / "airflow-home"
RESULTS = OUTPUT / "results"
BIN = Path(sys.executable).parent

# Emulator knobs for the demo: 3,000 tickets in batches of 1,200 at 1,000 lines/s with a 1.1 s expiry:
# the two full batches expire part-way (partial results kept), the last one completes; 3% of lines fail.
EMULATOR_ARGS = ["--rate", "1000", "--failure-rate", "0.03", "--expire-after", "1.1", "--seed", "7"]
DEMO_CONF = {"max_requests_per_batch": 1200}
LIVE_SAMPLE = 20  # tickets sent to OpenAI when OPENAI_API_KEY is set
TICKETS_CSV = REPO / "dags" / "data" / "support_tickets.csv"
# Reads one XCom of the run just made, through Airflow's own models (the demo's Airflow home and DB).
XCOM_QUERY = """
import json, sys
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
with create_session() as session:
    row = (
        session.query(XComModel)
        .filter_by(dag_id="nightly_classification", task_id=sys.argv[1], key=sys.argv[2])
        .order_by(XComModel.timestamp.desc())
        .first()
    )
    print(json.dumps(None if row is None else XComModel.deserialize_value(row)))
"""


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


def xcom(env: dict[str, str], task_id: str, key: str) -> Any:
    out = subprocess.run(
        [str(BIN / "python"), "-c", XCOM_QUERY, task_id, key],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def usd(value: float | None) -> str:
    return "unknown" if value is None else f"${value:,.4f}"


def print_cost(estimate: dict[str, Any] | None, summary: dict[str, Any]) -> None:
    """The estimate submit made before uploading anything, beside what collect counted."""
    if not estimate:
        return
    cost = estimate["cost_usd"]
    usage = summary["usage"]
    output_max = estimate["output_tokens_max"]
    print("\n============ cost: estimated before upload vs actual ============")
    print(f"{'':<22}{'estimate (submit)':>22}{'actual (collect)':>20}")
    print(f"{'requests':<22}{estimate['requests']:>22,}{summary['total']:>20,}")
    print(f"{'input tokens':<22}{estimate['input_tokens']:>22,}{usage['input_tokens']:>20,}")
    bound = "unbounded" if output_max is None else f"<= {output_max:,}"
    print(f"{'output tokens':<22}{bound:>22}{usage['output_tokens']:>20,}")
    span = f"{usd(cost['min'])} - {usd(cost['max'])}"
    print(f"{'cost at batch prices':<22}{span:>22}{usd(summary['estimated_cost_usd']):>20}")
    print("==================================================================")


def print_answers(answers_uri: str | None, rows: int = 5) -> None:
    """A few rows of the tickets table joined to their typed answers."""
    if not answers_uri:
        return
    import pyarrow.parquet as pq

    table = pq.read_table(
        answers_uri.removeprefix("file://"), columns=["ticket_id", "text", "status", "parsed"]
    )
    print("\n==================== answers.parquet (first rows) ====================")
    for row in table.slice(0, rows).to_pylist():
        parsed = row["parsed"] or {}
        label = f"{parsed.get('category')}{' (urgent)' if parsed.get('urgent') else ''}"
        print(f"{row['ticket_id']}  {row['status']:<9} {label:<26} {row['text'][:48]}")
    print("=======================================================================")


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
    for key in ("successes_uri", "failures_uri", "retry_requests_uri", "answers_uri"):
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
        sample = OUTPUT / "tickets-sample.csv"
        with TICKETS_CSV.open() as source, sample.open("w") as out:
            out.writelines(line for _, line in zip(range(LIVE_SAMPLE + 1), source, strict=False))
        conf = {"tickets": str(sample)}
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
    manifest = max(manifests, key=lambda p: p.stat().st_mtime)
    print_summary(manifest)
    summary = json.loads(manifest.read_text())
    print_answers(summary.get("answers_uri"))
    print_cost(xcom(env, "submit", "cost_estimate"), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
