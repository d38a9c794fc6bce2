"""A collect worker SIGKILLed mid-write, then retried: complete, non-duplicated output, manifest last.

The collect operator's ``execute`` runs in a subprocess and blocks while staging records, while copying
``failures`` into the output folder, or just before the manifest; the test SIGKILLs it there, checks
that no final-named file in the output folder is a half file, then runs collect again into the same
folder (a task retry) and checks the result: each custom_id exactly once, no leftovers, a consistent
manifest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from airflow_openai_batch.core.writers import read_records
from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
from tests.support.reliability.helpers import Worker, chat_request, count_ids, report
from tests.support.reliability.worker import make_context

REQUESTS = 300
FINAL_NAMES = {"successes.jsonl", "failures.jsonl", "retry_requests.jsonl", "manifest.json"}
#: Final-named files that must already be complete in the output folder when the kill happens.
PUBLISHED_AT_KILL = {
    "mid_reconcile": set(),
    "mid_publish": {"successes.jsonl"},
    "before_manifest": {"successes.jsonl", "failures.jsonl", "retry_requests.jsonl"},
}


@pytest.fixture
def finished_batches(emulator) -> tuple[list[str], list[str]]:
    """Three completed batches with ~20% failed and ~5% missing requests; returns (batch ids, custom ids)."""
    emulator.configure(failure_rate=0.2, missing_rate=0.05, time_scale=0.0)
    rows = [chat_request(i) for i in range(REQUESTS)]
    spec = {"dag_id": "reliability_crash", "task_id": "submit", "run_id": "collect-crash"}
    spec["run_after"] = time.time() - 300
    ids = OpenAIBatchSubmitOperator(task_id="submit", requests=rows, max_requests_per_batch=100).execute(
        make_context(spec)
    )
    emulator.advance(3600)
    assert [emulator.client().batches.retrieve(b).status for b in ids] == ["completed"] * 3
    return ids, [r["custom_id"] for r in rows]


class Output:
    """The output folder of a collect: a local directory or an S3 prefix (moto on loopback)."""

    def __init__(self, target: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.target = target
        self.local = tmp_path / "results"
        if target == "s3":
            import boto3

            self.bucket = request.getfixturevalue("s3_bucket")
            endpoint = request.getfixturevalue("s3_server")
            self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            self.uri = f"s3://aws_default@{self.bucket}/results/run-1"
        else:
            self.uri = str(self.local)

    def files(self) -> dict[str, bytes]:
        """Every object/file in the folder, by name (what a reader of the folder would see)."""
        if self.target == "s3":
            listing = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="results/run-1/").get("Contents", [])
            return {
                o["Key"].rsplit("/", 1)[1]: self.s3.get_object(Bucket=self.bucket, Key=o["Key"])[
                    "Body"
                ].read()
                for o in listing
            }
        return {p.name: p.read_bytes() for p in self.local.iterdir()} if self.local.exists() else {}


@pytest.mark.parametrize(
    ("target", "kill_point"),
    [("local", point) for point in sorted(PUBLISHED_AT_KILL)]
    + [("s3", "mid_publish"), ("s3", "before_manifest")],
)
def test_collect_killed_mid_write_then_retried_writes_everything_once(
    finished_batches, tmp_path, request, target, kill_point
) -> None:
    batch_ids, custom_ids = finished_batches
    out = Output(target, tmp_path, request)
    spec = {
        "mode": "collect",
        "kill_point": kill_point,
        "after_records": 100,
        "marker": str(tmp_path / f"{kill_point}.marker"),
        "result": str(tmp_path / f"{kill_point}.result.json"),
        "dag_id": "reliability_crash",
        "task_id": "collect",
        "run_id": "collect-crash",
        "run_after": time.time() - 300,
        "batch_ids": batch_ids,
        "output_uri": out.uri,
    }
    started = time.monotonic()
    with Worker(spec, tmp_path) as worker:
        worker.wait_for_marker()
        assert worker.kill() == -9
    assert not Path(spec["result"]).exists()
    left = out.files()
    final_at_kill = set(left) & FINAL_NAMES
    assert final_at_kill == PUBLISHED_AT_KILL[kill_point], (
        f"after a kill at {kill_point} the output held {sorted(left)}"
    )
    assert "manifest.json" not in left, "a folder without its manifest is unfinished; it must say so"
    if target == "s3":
        assert set(left) == final_at_kill, "an object store shows no half-uploaded object"
    staging_left = sum(1 for p in worker.tmp_dir.rglob("*") if p.is_file())

    op = OpenAIBatchCollectOperator(task_id="collect", batch_ids=batch_ids, output_uri=out.uri)
    summary = op.execute(make_context(spec))
    elapsed = time.monotonic() - started

    published = out.files()
    assert set(published) == FINAL_NAMES, f"leftovers after the retry: {sorted(set(published) - FINAL_NAMES)}"
    for name in final_at_kill:
        # What was final-named at the kill was complete: the retry wrote exactly the same bytes.
        assert left[name] == published[name], name
    copies = tmp_path / "read-back"
    copies.mkdir()
    for name, data in published.items():
        (copies / name).write_bytes(data)
    successes = list(read_records(copies / "successes.jsonl"))
    failures = list(read_records(copies / "failures.jsonl"))
    counts = count_ids(successes, failures)
    assert sorted(counts) == sorted(custom_ids) and set(counts.values()) == {1}
    retry_lines = [json.loads(line) for line in (copies / "retry_requests.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in retry_lines] == [r["custom_id"] for r in failures]
    manifest = json.loads((copies / "manifest.json").read_text())
    assert manifest["total"] == REQUESTS == len(successes) + len(failures)
    assert (manifest["succeeded"], manifest["failed"]) == (len(successes), len(failures))
    assert sum(manifest["failed_by_code"].values()) == manifest["failed"] > 0
    assert manifest["successes_uri"].endswith("/successes.jsonl")
    assert summary["total"] == manifest["total"] and summary["failed"] == manifest["failed"]
    report(
        f"collect SIGKILL {kill_point} ({target})",
        final_files_at_kill=len(final_at_kill),
        partial_files_at_kill=len(set(left) - FINAL_NAMES),
        staging_files_left_in_tmp=staging_left,
        records=len(successes) + len(failures),
        duplicates=sum(n - 1 for n in counts.values()),
        failed_by_code=dict(sorted(manifest["failed_by_code"].items())),
        seconds=elapsed,
    )
