"""Collect joins the answers back to the rows of the table they were asked from (``join_input`` /
``keep_columns``): submit from a Parquet or CSV table into the emulator (the real openai SDK over HTTP),
the batches finish, collect writes ``answers.<ext>`` beside its other files, locally and on a moto S3
server. The table's location reaches collect in the batches' metadata, never from the test."""

from __future__ import annotations

import datetime
import json
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from airflow_openai_batch.core.tables import METADATA_TABLE, METADATA_TABLE_URI
from airflow_openai_batch.core.writers import read_records
from airflow_openai_batch.exceptions import OpenAIBatchInputError, OpenAIBatchJoinError
from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
from tests.support.outlets import NoOutletEvents

ROWS = 12


def tickets(n: int = ROWS) -> pa.Table:
    """Typed columns, ids not in sorted order (the join must keep the input's order, not sort)."""
    return pa.table(
        {
            "ticket_id": [f"T{(i * 7) % n:03d}-{i}" for i in range(n)],
            "text": [f"Ticket {i}: naïve café ✓ 票" for i in range(n)],
            "priority": pa.array(range(n), pa.int16()),
            "score": [i / 4 for i in range(n)],
            "urgent": [i % 3 == 0 for i in range(n)],
            "opened": pa.array(
                [datetime.datetime(2026, 1, 1 + i, tzinfo=datetime.UTC) for i in range(n)],
                pa.timestamp("us", "UTC"),
            ),
        }
    )


def write_table(path: Path, table: pa.Table) -> Path:
    if path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


def read_input(path: Path) -> pa.Table:
    """The input as a reader of the file sees it (CSV types as pyarrow infers them; ids as text)."""
    if path.suffix == ".csv":
        options = pacsv.ConvertOptions(column_types={"ticket_id": pa.string()})
        return pacsv.read_csv(path, convert_options=options)
    return pq.read_table(path)


def read_answers(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]


def submit_and_finish(emulator, make_context, requests, **kwargs) -> list[str]:
    """Submit, then move the emulator's clock until every batch is final."""
    context = make_context(task_id="submit", run_id=f"manual__{uuid.uuid4().hex}")
    ids = OpenAIBatchSubmitOperator(task_id="submit", requests=requests, **kwargs).execute(context)
    emulator.advance(3600)
    client = emulator.client()
    assert all(client.batches.retrieve(i).status == "completed" for i in ids)
    return ids


def submit_table(emulator, make_context, path: Path | str, **kwargs) -> list[str]:
    """Submit a table of tickets (prompt from ``text``) and let its batches finish."""
    options = {"id_column": "ticket_id", "prompt": "{text}", "model": "gpt-4o-mini", **kwargs}
    return submit_and_finish(emulator, make_context, str(path), **options)


def collect(make_context, batch_ids, **kwargs) -> dict:
    context = make_context(task_id="collect", run_id=f"manual__{uuid.uuid4().hex}")
    context["outlet_events"] = NoOutletEvents()
    return OpenAIBatchCollectOperator(task_id="collect", batch_ids=batch_ids, **kwargs).execute(context)


def check_joined(answers: list[dict], table: pa.Table, out: Path, kept: list[str]) -> None:
    """One row per input row in input order, the kept columns' values, and each row's outcome as collect
    wrote it in successes / failures."""
    successes = {r["custom_id"]: r for r in read_records(next(out.glob("successes.*")))}
    failures = {r["custom_id"]: r for r in read_records(next(out.glob("failures.*")))}
    ids = table.column("ticket_id").to_pylist()
    assert len(answers) == table.num_rows
    for row, (i, cid) in zip(answers, enumerate(ids), strict=True):
        for name in kept:
            assert row[name] == table.column(name)[i].as_py() or (
                isinstance(row[name], str) and name == "opened"  # JSON text of a timestamp
            ), (i, name)
        if cid in successes:
            assert row["status"] == "succeeded" and row["content"] == successes[cid]["content"]
            assert row["error_code"] is None and row["usage"]["input_tokens"] > 0
        else:
            assert row["status"] == "failed" and row["error_code"] == failures[cid]["error_code"], cid
            assert row["content"] is None


@pytest.mark.parametrize(
    ("name", "output_format"), [("tickets.parquet", "parquet"), ("tickets.csv", "jsonl")]
)
def test_answers_join_back_to_every_input_row_in_order(
    name, output_format, emulator, make_context, tmp_path
) -> None:
    emulator.configure(time_scale=0, failure_rate=0.3, failure_kinds="400")
    path = write_table(tmp_path / name, tickets())
    ids = submit_table(
        emulator, make_context, path, prompt="Label this ticket: {text}", max_requests_per_batch=5
    )
    assert len(ids) == 3
    out = tmp_path / "out"
    summary = collect(make_context, ids, output_uri=str(out), output_format=output_format, join_input=True)

    answers_file = out / f"answers.{output_format}"
    assert summary["answers_uri"] == f"file://{answers_file}"
    assert summary["answers"]["rows"] == ROWS and summary["answers"]["unanswered"] == 0
    assert summary["answers"]["failed"] == summary["failed"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["answers_uri"] == summary["answers_uri"]
    assert not list(out.glob("*.partial"))

    table = read_input(path)
    answers = read_answers(answers_file)
    check_joined(answers, table, out, table.column_names)
    failed = [r for r in answers if r["status"] == "failed"]
    assert failed and all(r["error_code"] and r["error_message"] for r in failed)
    if output_format == "parquet":
        schema = pq.read_schema(answers_file)
        # every input column, first and with its type
        assert schema.names[: table.num_columns] == table.column_names
        for field in table.schema:
            assert schema.field(field.name).type == field.type, field.name


def test_keep_columns_keeps_only_those(emulator, make_context, tmp_path) -> None:
    emulator.configure(time_scale=0)
    path = write_table(tmp_path / "tickets.parquet", tickets())
    ids = submit_table(emulator, make_context, path)
    out = tmp_path / "out"
    summary = collect(
        make_context,
        ids,
        output_uri=str(out),
        output_format="parquet",
        keep_columns=["priority", "ticket_id"],
    )
    schema = pq.read_schema(out / "answers.parquet")
    assert schema.names[:2] == ["priority", "ticket_id"]
    assert not {"text", "score", "urgent", "opened"} & set(schema.names)
    assert schema.field("priority").type == pa.int16()
    answers = read_answers(out / "answers.parquet")
    check_joined(answers, pq.read_table(path), out, ["priority", "ticket_id"])
    assert summary["answers"]["succeeded"] == ROWS


def test_rows_of_batches_left_out_are_unanswered(emulator, make_context, tmp_path) -> None:
    emulator.configure(time_scale=0)
    path = write_table(tmp_path / "tickets.parquet", tickets())
    ids = submit_table(emulator, make_context, path, max_requests_per_batch=5)
    out = tmp_path / "out"
    summary = collect(make_context, ids[:1], output_uri=str(out), join_input=True)
    answers = read_answers(out / "answers.jsonl")
    assert summary["answers"]["unanswered"] == ROWS - 5
    assert [r["status"] for r in answers] == ["succeeded"] * 5 + [None] * (ROWS - 5)


@pytest.mark.parametrize("name", ["tickets.parquet", "tickets.csv"])
def test_a_table_and_the_output_on_s3(name, emulator, make_context, s3_bucket, s3_server, tmp_path) -> None:
    import boto3

    emulator.configure(time_scale=0, failure_rate=0.25, failure_kinds="400")
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    local = write_table(tmp_path / name, tickets())
    s3.put_object(Bucket=s3_bucket, Key=f"in/{name}", Body=local.read_bytes())
    ids = submit_table(emulator, make_context, f"s3://aws_default@{s3_bucket}/in/{name}")
    summary = collect(
        make_context,
        ids,
        output_uri=f"s3://aws_default@{s3_bucket}/out",
        output_format="parquet",
        join_input=True,
    )
    assert summary["answers_uri"].endswith(f"{s3_bucket}/out/answers.parquet")
    out = tmp_path / "fetched"
    out.mkdir()
    for key in ("answers.parquet", "successes.parquet", "failures.parquet", "manifest.json"):
        (out / key).write_bytes(s3.get_object(Bucket=s3_bucket, Key=f"out/{key}")["Body"].read())
    table = read_input(local)
    answers = read_answers(out / "answers.parquet")
    check_joined(answers, table, out, table.column_names)
    schema = pq.read_schema(out / "answers.parquet")
    for field in table.schema:
        assert schema.field(field.name).type == field.type, field.name
    assert json.loads((out / "manifest.json").read_text())["answers_uri"] == summary["answers_uri"]
    assert 0 < summary["answers"]["failed"] < ROWS


def test_a_table_changed_since_submit_is_refused_and_nothing_is_published(
    emulator, make_context, tmp_path
) -> None:
    emulator.configure(time_scale=0)
    path = write_table(tmp_path / "tickets.parquet", tickets())
    ids = submit_table(emulator, make_context, path)
    write_table(path, tickets(ROWS - 1))
    out = tmp_path / "out"
    with pytest.raises(OpenAIBatchJoinError, match=f"{ROWS - 1} rows, {ROWS} at submit"):
        collect(make_context, ids, output_uri=str(out), join_input=True)
    assert not out.exists() or not list(out.iterdir())


def test_submit_puts_the_table_in_each_batch_metadata(emulator, make_context, tmp_path) -> None:
    emulator.configure(time_scale=0)
    path = write_table(tmp_path / "tickets.csv", tickets())
    ids = submit_table(emulator, make_context, path, max_requests_per_batch=6, metadata={"team": "support"})
    for batch_id in ids:
        metadata = emulator.client().batches.retrieve(batch_id).metadata
        assert metadata[METADATA_TABLE_URI] == str(path.absolute()) and metadata["team"] == "support"
        assert json.loads(metadata[METADATA_TABLE])["i"] == "ticket_id"


def test_a_table_input_leaves_less_room_for_user_metadata(emulator, make_context, tmp_path) -> None:
    path = write_table(tmp_path / "tickets.parquet", tickets())
    with pytest.raises(OpenAIBatchInputError, match="leaves room for 7"):
        OpenAIBatchSubmitOperator(
            task_id="submit",
            requests=str(path),
            id_column="ticket_id",
            prompt="{text}",
            model="gpt-4o-mini",
            metadata={f"k{i}": "v" for i in range(8)},
        ).execute(make_context(run_id=f"manual__{uuid.uuid4().hex}"))
    assert list(emulator.client().files.list()) == []


def test_join_without_a_table_is_a_clear_error_before_anything_is_written(
    emulator, make_context, tmp_path
) -> None:
    emulator.configure(time_scale=0)
    rows = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hi {i}"}]},
        }
        for i in range(3)
    ]
    ids = submit_and_finish(emulator, make_context, rows)
    out = tmp_path / "out"
    with pytest.raises(OpenAIBatchJoinError, match="aob_table"):
        collect(make_context, ids, output_uri=str(out), join_input=True)
    assert not out.exists()
    with pytest.raises(ValueError, match="output_uri"):
        collect(make_context, ids, keep_columns=["text"])
