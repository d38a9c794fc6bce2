"""OpenAIBatchCollectOperator against the emulator: every request accounted for, results landed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_openai_batch.core.writers import read_records
from airflow_openai_batch.exceptions import OpenAIBatchFailureRatioError, OpenAIBatchXComLimitError
from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
from tests.conftest import TEST_API_KEY
from tests.support.request_lines import chat_line, write_jsonl

pytestmark = pytest.mark.usefixtures("emulator")


def submit(make_context, rows: list[dict], run_id: str = "run", **kwargs) -> list[str]:
    op = OpenAIBatchSubmitOperator(task_id="submit", requests=rows, **kwargs)
    return op.execute(make_context(run_id=run_id))


def collect(make_context, batch_ids, **kwargs) -> dict:
    context = make_context(task_id="collect")
    context["outlet_events"] = _OutletEvents()
    op = OpenAIBatchCollectOperator(task_id="collect", batch_ids=batch_ids, **kwargs)
    summary = op.execute(context)
    summary["_asset_events"] = context["outlet_events"].added
    return summary


class _OutletEvents(dict):
    """Records the asset events a task emits (Airflow's accessor, reduced to what collect uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.added: list[str] = []

    def __getitem__(self, alias):
        events = self

        class _Accessor:
            def add(self, asset, extra=None):
                events.added.append(asset.uri)

        return _Accessor()


def emulator_truth(emulator, batch_ids: list[str]) -> tuple[set[str], set[str], Counter]:
    """Read the emulator's result files directly: ids that succeeded, ids in any result, error codes."""
    client = emulator.client()
    ok, seen, codes = set(), set(), Counter()
    for bid in batch_ids:
        batch = client.batches.retrieve(bid)
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            for line in client.files.content(file_id).text.splitlines():
                row = json.loads(line)
                seen.add(row["custom_id"])
                response = row.get("response")
                if response and 200 <= response["status_code"] < 300:
                    ok.add(row["custom_id"])
                elif response:
                    codes[
                        (response["body"].get("error") or {}).get("code") or f"http_{response['status_code']}"
                    ] += 1
                else:
                    codes[row["error"]["code"]] += 1
    return ok, seen, codes


def test_every_outcome_is_counted_exactly_and_each_id_once(emulator, make_context, tmp_path) -> None:
    rows = [chat_line(i) for i in range(400)]
    client = emulator.client()
    emulator.configure(time_scale=0, failure_rate=0.2, rate=1_000_000.0)  # only advance() moves time
    completed = submit(make_context, rows[:100], run_id="completed")
    emulator.advance(60)
    assert client.batches.retrieve(completed[0]).status == "completed"
    emulator.configure(failure_rate=0.0, rate=10.0, expire_after=5.0)
    expired = submit(make_context, rows[100:200], run_id="expired")  # 50 of 100 done when it expires
    emulator.advance(10)
    assert client.batches.retrieve(expired[0]).status == "expired"
    emulator.configure(expire_after=None)
    cancelled = submit(make_context, rows[200:300], run_id="cancelled")
    emulator.advance(3)
    client.batches.cancel(cancelled[0])
    emulator.advance(1)
    assert client.batches.retrieve(cancelled[0]).status == "cancelled"
    emulator.configure(rate=1_000_000.0, missing_rate=0.1)
    missing = submit(make_context, rows[300:], run_id="missing")
    emulator.advance(3600)
    ids = completed + expired + cancelled + missing
    assert client.batches.retrieve(missing[0]).status == "completed"

    summary = collect(make_context, ids, output_uri=str(tmp_path / "out"))
    ok, seen, codes = emulator_truth(emulator, ids)
    assert summary["total"] == 400 == summary["succeeded"] + summary["failed"]
    assert summary["succeeded"] == len(ok)
    by_code = summary["failed_by_code"]
    assert sum(by_code.values()) == summary["failed"]
    for code, count in codes.items():
        assert by_code[code] == count, code
    assert by_code.get("batch_cancelled", 0) == sum(1 for r in rows[200:300] if r["custom_id"] not in seen)
    assert by_code.get("missing", 0) == sum(1 for r in rows[300:] if r["custom_id"] not in seen) > 0
    assert by_code["batch_expired"] >= 1 and by_code["batch_cancelled"] >= 1
    assert any(code not in ("batch_expired", "batch_cancelled", "missing") for code in by_code)

    out = tmp_path / "out"
    succ = list(read_records(out / "successes.jsonl"))
    fail = list(read_records(out / "failures.jsonl"))
    all_ids = [r["custom_id"] for r in succ + fail]
    assert sorted(all_ids) == sorted(r["custom_id"] for r in rows)
    assert all(r["content"] for r in succ)
    assert all(r["request"]["custom_id"] == r["custom_id"] and r["error_code"] for r in fail)
    retry = [json.loads(line) for line in (out / "retry_requests.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in retry] == [r["custom_id"] for r in fail]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == 400 and manifest["failures_uri"].endswith("failures.jsonl")
    assert summary["_asset_events"] == [f"file://{out}"]
    assert summary["usage"]["input_tokens"] > 0 and summary["estimated_cost_usd"] > 0


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    failure_rate=st.sampled_from([0.0, 0.3, 1.0]),
    missing_rate=st.sampled_from([0.0, 0.2]),
    size=st.integers(min_value=1, max_value=40),
    cancel_halfway=st.booleans(),
)
def test_invariant_holds_over_random_mixes(
    emulator_server, make_context, failure_rate, missing_rate, size, cancel_halfway
):
    emulator = emulator_server
    emulator.reset()
    emulator.configure(time_scale=0, rate=20.0, failure_rate=failure_rate, missing_rate=missing_rate)
    ids = submit(make_context, [chat_line(i) for i in range(size)])
    if cancel_halfway:
        emulator.advance(size / 20.0 / 2)
        emulator.client().batches.cancel(ids[0])
    emulator.advance(3600)
    summary = collect(make_context, ids, max_xcom_records=1000)
    records = summary["successes"] + summary["failures"]
    assert summary["total"] == size == summary["succeeded"] + summary["failed"]
    assert sorted(r["custom_id"] for r in records) == sorted(f"req-{i}" for i in range(size))
    assert sum(summary["failed_by_code"].values()) == summary["failed"]


@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
def test_local_and_s3_outputs_read_back_equal(
    output_format, emulator, make_context, tmp_path, s3_bucket, s3_server
) -> None:
    emulator.configure(failure_rate=0.25)
    ids = submit(make_context, [chat_line(i) for i in range(60)])
    emulator.advance(3600)
    local = collect(make_context, ids, output_uri=f"file://{tmp_path}/local", output_format=output_format)
    remote = collect(
        make_context,
        ids,
        output_uri=f"s3://aws_default@{s3_bucket}/results/run-1",
        output_format=output_format,
    )
    assert remote["successes_uri"].startswith("s3://")
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == sorted(
        f"results/run-1/{n}"
        for n in (
            f"successes.{output_format}",
            f"failures.{output_format}",
            "retry_requests.jsonl",
            "manifest.json",
        )
    )
    for name in (f"successes.{output_format}", f"failures.{output_format}"):
        s3.download_file(s3_bucket, f"results/run-1/{name}", str(tmp_path / f"s3-{name}"))
        local_rows = sorted(read_records(tmp_path / "local" / name), key=lambda r: r["custom_id"])
        s3_rows = sorted(read_records(tmp_path / f"s3-{name}"), key=lambda r: r["custom_id"])
        assert local_rows == s3_rows and local_rows
    assert local["succeeded"] == remote["succeeded"] and local["failed"] == remote["failed"] > 0


def test_retry_file_is_a_valid_submit_input(emulator, make_context, tmp_path) -> None:
    emulator.configure(failure_rate=0.5)
    ids = submit(make_context, [chat_line(i) for i in range(30)])
    emulator.advance(3600)
    first = collect(make_context, ids, output_uri=str(tmp_path / "pass1"))
    assert first["failed"] > 0
    emulator.configure(failure_rate=0.0)
    op = OpenAIBatchSubmitOperator(task_id="resubmit", requests=first["retry_requests_uri"])
    retry_ids = op.execute(make_context(task_id="resubmit"))
    emulator.advance(3600)
    second = collect(make_context, retry_ids, max_xcom_records=100)
    assert second["total"] == first["failed"] and second["succeeded"] == first["failed"]


def test_xcom_mode_returns_records_and_refuses_above_the_limit(emulator, make_context) -> None:
    ids = submit(make_context, [chat_line(i) for i in range(12)])
    emulator.advance(3600)
    summary = collect(make_context, ids, max_xcom_records=12)
    assert len(summary["successes"]) == 12 and summary["failures"] == []
    assert summary["output_uri"] is None and summary["successes"][0]["content"]
    json.dumps(summary)  # XCom must be JSON-safe
    with pytest.raises(OpenAIBatchXComLimitError, match="max_xcom_records=11"):
        collect(make_context, ids, max_xcom_records=11)


def test_fail_on_failure_ratio_fails_after_writing(emulator, make_context, tmp_path) -> None:
    emulator.configure(failure_rate=0.5)
    ids = submit(make_context, [chat_line(i) for i in range(40)])
    emulator.advance(3600)
    with pytest.raises(OpenAIBatchFailureRatioError, match="above fail_on_failure_ratio"):
        collect(make_context, ids, output_uri=str(tmp_path / "out"), fail_on_failure_ratio=0.05)
    assert (tmp_path / "out" / "manifest.json").exists()
    summary = collect(make_context, ids, output_uri=str(tmp_path / "out2"), fail_on_failure_ratio=0.95)
    assert summary["failed"] > 0


def test_delete_remote_files_after_a_good_write(emulator, make_context, tmp_path) -> None:
    emulator.configure(failure_rate=0.3)
    ids = submit(make_context, [chat_line(i) for i in range(20)])
    emulator.advance(3600)
    batch = emulator.client().batches.retrieve(ids[0])
    assert emulator.stats()["files"] == 3
    collect(make_context, ids, output_uri=str(tmp_path / "out"), delete_remote_files=True)
    assert emulator.stats()["files"] == 0
    assert Path(tmp_path / "out" / "manifest.json").exists()
    assert batch.input_file_id not in {f.id for f in emulator.client().files.list()}


def test_sensor_result_dict_is_accepted_and_no_key_leaks(emulator, make_context, tmp_path) -> None:
    ids = submit(make_context, [chat_line(i) for i in range(5)])
    emulator.advance(3600)
    sensor_result = {bid: {"status": "completed", "replaces": []} for bid in ids}
    summary = collect(make_context, sensor_result, output_uri=str(tmp_path / "o"))
    assert summary["batch_ids"] == ids and summary["succeeded"] == 5
    assert TEST_API_KEY not in json.dumps(summary)
    for path in (tmp_path / "o").iterdir():
        assert TEST_API_KEY.encode() not in path.read_bytes()


def test_a_file_input_round_trips_with_its_original_lines(emulator, make_context, tmp_path) -> None:
    rows = [chat_line(i) for i in range(10)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    emulator.configure(failure_rate=1.0)
    ids = OpenAIBatchSubmitOperator(task_id="s", requests=str(path)).execute(make_context())
    emulator.advance(3600)
    summary = collect(make_context, ids, max_xcom_records=100)
    assert sorted((f["request"] for f in summary["failures"]), key=lambda r: r["custom_id"]) == sorted(
        rows, key=lambda r: r["custom_id"]
    )
