"""OpenAIBatchSubmitOperator with a table input: Parquet and CSV rows -> request lines -> batches in the
emulator (the real openai SDK over HTTP), local and on a moto S3 server, and the XCom that tells collect
where the table is."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from airflow_openai_batch.core.tables import TableSource
from airflow_openai_batch.exceptions import OpenAIBatchInputError
from airflow_openai_batch.operators.submit import TABLE_SOURCE_XCOM, OpenAIBatchSubmitOperator
from tests.conftest import TEST_DAGS_FOLDER

CHAT = "/v1/chat/completions"


def tickets(n: int = 6) -> pa.Table:
    return pa.table(
        {
            "ticket_id": [f"T{i:03d}" for i in range(n)],
            "subject": [f"Subject {i}" for i in range(n)],
            "text": [f"Ticket text {i}: naïve café ✓" for i in range(n)],
            "priority": list(range(n)),
        }
    )


def write_table(path: Path, table: pa.Table) -> Path:
    if path.suffix == ".csv" or path.name.endswith("-csv"):
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


def submit(make_context, context=None, **kwargs) -> tuple[list[str], dict]:
    """Run the operator; returns the batch ids and the XComs it pushed. A run id of its own: the task's
    scratch folder is named after it, and other test sessions may run the same task id at once."""
    context = context if context is not None else make_context(run_id=f"manual__{uuid.uuid4().hex}")
    ids = OpenAIBatchSubmitOperator(task_id="submit", **kwargs).execute(context)
    return ids, context["ti"].xcoms


def uploaded_lines(emulator, batch_ids: list[str]) -> list[dict]:
    client = emulator.client()
    lines: list[dict] = []
    for batch_id in batch_ids:
        batch = client.batches.retrieve(batch_id)
        lines += [json.loads(line) for line in client.files.content(batch.input_file_id).text.splitlines()]
    return lines


def uploaded_files(emulator) -> list:
    return list(emulator.client().files.list())


# -- rows -> batches -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tickets.parquet", "tickets.csv"])
def test_table_rows_become_chat_requests_in_batches(name, emulator, make_context, tmp_path) -> None:
    path = write_table(tmp_path / name, tickets(7))
    ids, xcoms = submit(
        make_context,
        requests=str(path),
        id_column="ticket_id",
        prompt="Label this ticket.\n{subject}\n\n{text}",
        system_prompt="You label tickets (priority {priority}).",
        body={"temperature": 0, "max_completion_tokens": 20},
        model="gpt-4o-mini",
        max_requests_per_batch=3,
    )
    assert len(ids) == 3
    lines = uploaded_lines(emulator, ids)
    assert [line["custom_id"] for line in lines] == [f"T{i:03d}" for i in range(7)]
    assert lines[4] == {
        "custom_id": "T004",
        "method": "POST",
        "url": CHAT,
        "body": {
            "model": "gpt-4o-mini",
            "temperature": 0,
            "max_completion_tokens": 20,
            "messages": [
                {"role": "system", "content": "You label tickets (priority 4)."},
                {"role": "user", "content": "Label this ticket.\nSubject 4\n\nTicket text 4: naïve café ✓"},
            ],
        },
    }
    fmt = "csv" if name.endswith(".csv") else "parquet"
    assert xcoms[TABLE_SOURCE_XCOM] == {
        "version": 1,
        "uri": str(path),
        "format": fmt,
        "id_column": "ticket_id",
        "row_count": 7,
        "endpoint": CHAT,
    }
    assert TableSource.from_dict(xcoms[TABLE_SOURCE_XCOM]).row_count == 7
    assert len(xcoms["job"]["chunks"]) == 3


@pytest.mark.parametrize(
    ("endpoint", "field", "expected"),
    [
        ("/v1/responses", "input", "Ticket text 1: naïve café ✓"),
        ("/v1/embeddings", "input", "Ticket text 1: naïve café ✓"),
        ("/v1/completions", "prompt", "Ticket text 1: naïve café ✓"),
        ("/v1/moderations", "input", "Ticket text 1: naïve café ✓"),
    ],
)
def test_each_endpoint_gets_the_prompt_in_its_field(
    endpoint, field, expected, emulator, make_context, tmp_path
) -> None:
    path = write_table(tmp_path / "t.csv", tickets(2))
    ids, _ = submit(
        make_context, requests=str(path), endpoint=endpoint, id_column="ticket_id", prompt="{text}", model="m"
    )
    lines = uploaded_lines(emulator, ids)
    assert [line["url"] for line in lines] == [endpoint] * 2
    assert lines[1]["body"] == {"model": "m", field: expected}


def test_a_folder_of_parquet_parts_reads_in_path_order(emulator, make_context, tmp_path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    rows = tickets(6)
    write_table(folder / "part-1.parquet", rows.slice(3))
    write_table(folder / "part-0.parquet", rows.slice(0, 3))
    (folder / "_SUCCESS").write_text("")
    ids, xcoms = submit(make_context, requests=str(folder), id_column="ticket_id", prompt="{text}", model="m")
    assert [line["custom_id"] for line in uploaded_lines(emulator, ids)] == rows.column(
        "ticket_id"
    ).to_pylist()
    assert xcoms[TABLE_SOURCE_XCOM]["uri"] == str(folder)
    assert xcoms[TABLE_SOURCE_XCOM]["row_count"] == 6


def test_a_file_uri_is_opened_through_object_storage(emulator, make_context, tmp_path) -> None:
    path = write_table(tmp_path / "t.parquet", tickets(2))
    ids, xcoms = submit(
        make_context, requests=f"file://{path}", id_column="ticket_id", prompt="{subject}", model="m"
    )
    assert [line["body"]["messages"][0]["content"] for line in uploaded_lines(emulator, ids)] == [
        "Subject 0",
        "Subject 1",
    ]
    assert xcoms[TABLE_SOURCE_XCOM]["uri"] == f"file://{path}"


def test_input_format_says_a_file_without_a_suffix_is_a_table(emulator, make_context, tmp_path) -> None:
    path = tmp_path / "drop-csv"
    write_table(path, tickets(2))
    ids, xcoms = submit(
        make_context,
        requests=str(path),
        input_format="csv",
        id_column="ticket_id",
        prompt="{text}",
        model="m",
    )
    assert [line["custom_id"] for line in uploaded_lines(emulator, ids)] == ["T000", "T001"]
    assert xcoms[TABLE_SOURCE_XCOM]["format"] == "csv"


def test_a_request_builder_makes_each_body(emulator, make_context, tmp_path) -> None:
    path = write_table(tmp_path / "t.parquet", tickets(3))

    def build(row: dict) -> dict:
        return {
            "messages": [{"role": "user", "content": row["text"]}],
            "max_completion_tokens": 10 * (row["priority"] + 1),
        }

    ids, _ = submit(
        make_context,
        requests=str(path),
        id_column="ticket_id",
        request_builder=build,
        body={"temperature": 0.5},
        model="gpt-4o-mini",
    )
    lines = uploaded_lines(emulator, ids)
    assert [line["body"]["max_completion_tokens"] for line in lines] == [10, 20, 30]
    assert lines[2]["body"] == {
        "model": "gpt-4o-mini",
        "temperature": 0.5,
        "messages": [{"role": "user", "content": "Ticket text 2: naïve café ✓"}],
        "max_completion_tokens": 30,
    }


def test_a_response_schema_reaches_every_row_and_the_cost_estimate_counts_them(
    emulator, make_context, tmp_path
) -> None:
    from pydantic import BaseModel

    class Label(BaseModel):
        label: str

    path = write_table(tmp_path / "t.parquet", tickets(4))
    ids, xcoms = submit(
        make_context,
        requests=str(path),
        id_column="ticket_id",
        prompt="{text}",
        model="gpt-4o-mini",
        response_schema=Label,
    )
    formats = [line["body"]["response_format"] for line in uploaded_lines(emulator, ids)]
    assert len(formats) == 4 and all(f["type"] == "json_schema" for f in formats)
    assert formats[0]["json_schema"]["schema"]["properties"] == {"label": {"type": "string"}}
    assert "cost_estimate" in xcoms and xcoms[TABLE_SOURCE_XCOM]["row_count"] == 4


# -- object storage ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("as_path", [False, True])
def test_a_table_on_s3_is_read_through_the_connection(
    fmt, as_path, emulator, make_context, s3_bucket, s3_server, tmp_path
) -> None:
    import boto3

    local = write_table(tmp_path / f"t.{fmt}", tickets(4))
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").put_object(
        Bucket=s3_bucket, Key=f"drops/tickets.{fmt}", Body=local.read_bytes()
    )
    uri = f"s3://aws_default@{s3_bucket}/drops/tickets.{fmt}"
    if as_path:
        from airflow_openai_batch.compat import ObjectStoragePath

        source = ObjectStoragePath(uri)
    else:
        source = uri
    ids, xcoms = submit(make_context, requests=source, id_column="ticket_id", prompt="{subject}", model="m")
    lines = uploaded_lines(emulator, ids)
    assert [line["body"]["messages"][0]["content"] for line in lines] == [f"Subject {i}" for i in range(4)]
    assert xcoms[TABLE_SOURCE_XCOM]["uri"] == uri  # the connection id travels; collect opens it again
    assert xcoms[TABLE_SOURCE_XCOM]["format"] == fmt


# -- bad input: named, and nothing uploaded -------------------------------------------------------------


def test_a_missing_column_is_refused_before_anything_is_uploaded(emulator, make_context, tmp_path) -> None:
    path = write_table(tmp_path / "t.parquet", tickets())
    with pytest.raises(OpenAIBatchInputError) as err:
        submit(make_context, requests=str(path), id_column="ticket_id", prompt="{subject}: {body}")
    columns = "ticket_id, subject, text, priority"
    assert [str(p) for p in err.value.problems] == [
        f"input, prompt: names column 'body', which the table lacks (columns: {columns})"
    ]
    assert uploaded_files(emulator) == []
    assert emulator.stats()["files.create"] == 0


def test_duplicate_and_empty_ids_are_named_by_row(emulator, make_context, tmp_path) -> None:
    rows = tickets(4)
    duplicate = rows.set_column(0, "ticket_id", pa.array(["A", "B", "A", "C"]))
    path = write_table(tmp_path / "dup.parquet", duplicate)
    with pytest.raises(OpenAIBatchInputError) as err:
        submit(make_context, requests=str(path), id_column="ticket_id", prompt="{text}", model="m")
    assert [str(p) for p in err.value.problems] == [
        'row 3, custom_id: duplicate custom_id "A", first used on row 1'
    ]
    empty = rows.set_column(0, "ticket_id", pa.array(["A", "", "C", None]))
    path = write_table(tmp_path / "empty.parquet", empty)
    with pytest.raises(OpenAIBatchInputError) as err:
        submit(make_context, requests=str(path), id_column="ticket_id", prompt="{text}", model="m")
    assert [str(p) for p in err.value.problems] == [
        "row 2, ticket_id: the id is an empty string; every row needs a non-empty id",
        "row 4, ticket_id: the id is null; every row needs a non-empty id",
    ]
    assert uploaded_files(emulator) == []


def test_a_null_in_a_prompt_column_is_named_unless_read_as_empty(emulator, make_context, tmp_path) -> None:
    rows = tickets(3).set_column(2, "text", pa.array(["a", None, "c"]))
    path = write_table(tmp_path / "t.parquet", rows)
    with pytest.raises(OpenAIBatchInputError, match=r"row 2, text: null in a prompt column"):
        submit(make_context, requests=str(path), id_column="ticket_id", prompt="{text}", model="m")
    assert uploaded_files(emulator) == []
    ids, _ = submit(
        make_context, requests=str(path), id_column="ticket_id", prompt="<{text}>", model="m", on_null="empty"
    )
    contents = [line["body"]["messages"][0]["content"] for line in uploaded_lines(emulator, ids)]
    assert contents == ["<a>", "<>", "<c>"]


def test_table_parameters_with_a_jsonl_input_are_refused(emulator, make_context, tmp_path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(
        json.dumps({"custom_id": "a", "method": "POST", "url": CHAT, "body": {"model": "m", "messages": []}})
        + "\n"
    )
    with pytest.raises(OpenAIBatchInputError) as err:
        submit(make_context, requests=str(path), id_column="id", prompt="{text}")
    assert [p.field for p in err.value.problems] == ["id_column", "prompt"]
    assert "applies to a table input" in str(err.value)
    with pytest.raises(OpenAIBatchInputError, match="prompt: applies to a table input"):
        submit(make_context, requests=[{"custom_id": "a", "body": {"input": "x"}}], prompt="{text}")
    with pytest.raises(OpenAIBatchInputError, match="input_format: must be one of"):
        submit(make_context, requests=str(path), input_format="xlsx")
    assert uploaded_files(emulator) == []


# -- a real DAG run: Jinja and format fields in one template -------------------------------------------


def test_dag_test_renders_jinja_and_keeps_format_fields(airflow_db, emulator, tmp_path) -> None:
    from airflow.utils.state import DagRunState

    from tests.support.airflow_versions import DagBag

    path = write_table(tmp_path / "tickets.parquet", tickets(3))
    bag = DagBag(dag_folder=str(TEST_DAGS_FOLDER / "table_submit_dag.py"))
    assert bag.import_errors == {}
    dag = bag.get_dag("openai_batch_table_submit_test")
    dag_run = dag.test(run_conf={"table": str(path)})
    assert dag_run.state == DagRunState.SUCCESS
    ti = dag_run.get_task_instance("submit")
    ids = ti.xcom_pull(task_ids="submit")
    lines = uploaded_lines(emulator, ids)
    assert [line["body"]["messages"] for line in lines][2] == [
        {
            "role": "system",
            "content": 'You label tickets for openai_batch_table_submit_test. Answer {"label": ...}',
        },
        {"role": "user", "content": f"Run {dag_run.run_id}. Label this ticket: Ticket text 2: naïve café ✓"},
    ]
    source = ti.xcom_pull(task_ids="submit", key=TABLE_SOURCE_XCOM)
    assert source["uri"] == str(path) and source["row_count"] == 3 and source["id_column"] == "ticket_id"
