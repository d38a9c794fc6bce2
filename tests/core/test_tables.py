"""Tables in, tables out: rows become request lines, answers come back joined to their rows."""

from __future__ import annotations

import datetime
import decimal
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_openai_batch.core.jsonl import iter_lines
from airflow_openai_batch.core.prepare import BuiltLines, prepare_from_lines
from airflow_openai_batch.core.requests import RequestRules
from airflow_openai_batch.core.tables import (
    TableInput,
    TableRequests,
    TableSource,
    join_answers,
    prepare_from_table,
    table_format,
)
from airflow_openai_batch.core.writers import ResultWriter
from airflow_openai_batch.exceptions import OpenAIBatchInputError, OpenAIBatchJoinError
from tests.support.outlets import NoOutletEvents

CHAT = "/v1/chat/completions"
TICKETS_CSV = Path(__file__).resolve().parents[2] / "dags" / "data" / "support_tickets.csv"


def write_parquet(path: Path, columns: dict, **kwargs) -> Path:
    pq.write_table(pa.table(columns), path, **kwargs)
    return path


def tickets(n: int = 5) -> dict:
    return {
        "ticket_id": [f"T{i:03d}" for i in range(n)],
        "subject": [f"Subject {i}" for i in range(n)],
        "text": [f"Ticket text number {i}" for i in range(n)],
    }


def lines_of(requests: TableRequests) -> list[dict]:
    return [orjson.loads(line) for line in requests.lines()]


def problems_of(err: pytest.ExceptionInfo) -> list[str]:
    return [str(p) for p in err.value.problems]


# -- reading tables ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("t.parquet", "parquet"),
        ("s3://b/dir/t.PQ", "parquet"),
        ("drop.csv", "csv"),
        ("requests.jsonl", None),
        ("folder/", None),
    ],
)
def test_table_format_is_told_by_the_name(name, expected) -> None:
    assert table_format(name) == expected


def test_a_folder_is_read_in_path_order_and_hidden_files_are_skipped(tmp_path) -> None:
    folder = tmp_path / "table"
    (folder / "b").mkdir(parents=True)
    write_parquet(folder / "b" / "part-0.parquet", {"id": ["c"], "text": ["third"]})
    write_parquet(folder / "a.parquet", {"id": ["a", "b"], "text": ["first", "second"]})
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / ".a.parquet.crc").write_bytes(b"junk")
    table = TableInput(folder)
    assert table.format == "parquet"
    requests = TableRequests(table, endpoint=CHAT, id_column="id", prompt="{text}", model="m")
    assert [line["custom_id"] for line in lines_of(requests)] == ["a", "b", "c"]
    assert requests.source().row_count == 3


def test_nothing_at_the_path_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(OpenAIBatchInputError, match="no table at"):
        TableInput(tmp_path / "missing.parquet")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(OpenAIBatchInputError, match="cannot tell the table format"):
        TableInput(tmp_path / "notes.txt")


# -- rows -> request lines ------------------------------------------------------------------------------


def test_parquet_rows_become_chat_requests_with_the_template_filled(tmp_path) -> None:
    path = write_parquet(tmp_path / "t.parquet", tickets(3))
    template = "Label this ticket:\nSubject: {subject}\n\n{text}"
    requests = TableRequests(
        TableInput(path),
        endpoint="chat/completions",
        id_column="ticket_id",
        prompt=template,
        system_prompt="You label support tickets.",
        body={"temperature": 0, "max_completion_tokens": 50},
        model="gpt-4o-mini",
    )
    lines = lines_of(requests)
    rows = pa.table(tickets(3)).to_pylist()
    assert lines == [
        {
            "custom_id": row["ticket_id"],
            "method": "POST",
            "url": CHAT,
            "body": {
                "model": "gpt-4o-mini",
                "temperature": 0,
                "max_completion_tokens": 50,
                "messages": [
                    {"role": "system", "content": "You label support tickets."},
                    {"role": "user", "content": template.format(**row)},
                ],
            },
        }
        for row in rows
    ]
    source = requests.source()
    assert source == TableSource(str(path), "parquet", "ticket_id", 3, CHAT)


@pytest.mark.parametrize(
    ("endpoint", "system", "expected_body"),
    [
        (
            "/v1/chat/completions",
            True,
            {"messages": [{"role": "system", "content": "S t0"}, {"role": "user", "content": "P t0"}]},
        ),
        ("/v1/responses", True, {"input": "P t0", "instructions": "S t0"}),
        ("/v1/responses", False, {"input": "P t0"}),
        ("/v1/embeddings", False, {"input": "P t0"}),
        ("/v1/completions", False, {"prompt": "P t0"}),
        ("/v1/moderations", False, {"input": "P t0"}),
        ("/v1/images/generations", False, {"prompt": "P t0"}),
    ],
)
def test_each_endpoint_gets_the_prompt_in_its_own_field(tmp_path, endpoint, system, expected_body) -> None:
    path = write_parquet(tmp_path / "t.parquet", {"id": ["r1"], "text": ["t0"]})
    requests = TableRequests(
        TableInput(path),
        endpoint=endpoint,
        id_column="id",
        prompt="P {text}",
        system_prompt="S {text}" if system else None,
        model="m",
    )
    [line] = lines_of(requests)
    assert line["url"] == endpoint
    assert line["body"] == {"model": "m", **expected_body}


@pytest.mark.parametrize("endpoint", ["/v1/embeddings", "/v1/completions", "/v1/moderations"])
def test_a_system_prompt_where_the_endpoint_has_none_is_refused(tmp_path, endpoint) -> None:
    path = write_parquet(tmp_path / "t.parquet", {"id": ["r1"], "text": ["t0"]})
    with pytest.raises(OpenAIBatchInputError, match="takes no system prompt"):
        TableRequests(TableInput(path), endpoint=endpoint, id_column="id", prompt="{text}", system_prompt="S")


def test_a_missing_column_is_an_error_before_any_row_is_read(tmp_path) -> None:
    path = write_parquet(tmp_path / "t.parquet", tickets())

    class CountingTable(TableInput):
        reads = 0

        def batches(self, *args, **kwargs):
            CountingTable.reads += 1
            return super().batches(*args, **kwargs)

    with pytest.raises(OpenAIBatchInputError) as err:
        TableRequests(
            CountingTable(path), endpoint=CHAT, id_column="ticket_id", prompt="{subject}: {body} {lang}"
        )
    assert problems_of(err) == [
        f"input, prompt: names column {name!r}, which the table lacks (columns: ticket_id, subject, text)"
        for name in ("body", "lang")
    ]
    assert CountingTable.reads == 0
    with pytest.raises(OpenAIBatchInputError, match="id_column: names column 'id'"):
        TableRequests(TableInput(path), endpoint=CHAT, id_column="id", prompt="{text}")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "{0}"}, "fields must name a column"),
        ({"prompt": "{}"}, "fields must name a column"),
        ({"prompt": "{text"}, "is not a valid format template"),
        ({"prompt": "{text:{width}}"}, "nested fields"),
        ({}, "needs prompt="),
        ({"prompt": "{text}", "request_builder": dict}, "not both"),
        ({"prompt": "{text}", "body": {"messages": []}}, "sets messages, which the prompt template fills"),
        ({"prompt": "{text}", "body": {"model": "a"}, "model": "b"}, "sets model 'a' but model= is 'b'"),
        ({"prompt": "{text}", "body": {"when": object()}}, "not JSON-serializable"),
        ({"prompt": "{text}", "on_null": "skip"}, "on_null"),
    ],
)
def test_parameters_that_cannot_work_are_refused_up_front(tmp_path, kwargs, message) -> None:
    path = write_parquet(tmp_path / "t.parquet", tickets())
    with pytest.raises(OpenAIBatchInputError, match=message):
        TableRequests(TableInput(path), endpoint=CHAT, id_column="ticket_id", **kwargs)


def test_empty_and_null_ids_are_named_by_row_and_column(tmp_path) -> None:
    path = write_parquet(
        tmp_path / "t.parquet", {"id": ["a", "", "c", None, "e"], "text": ["x"] * 5}, row_group_size=2
    )
    requests = TableRequests(TableInput(path), endpoint=CHAT, id_column="id", prompt="{text}", batch_rows=2)
    with pytest.raises(OpenAIBatchInputError) as err:
        list(requests.lines())
    assert problems_of(err) == [
        "row 2, id: the id is an empty string; every row needs a non-empty id",
        "row 4, id: the id is null; every row needs a non-empty id",
    ]
    assert err.value.total == 2


def test_a_duplicate_id_is_named_with_the_row_that_used_it_first(tmp_path) -> None:
    """Duplicates are the line validator's to find (one rule, one place): a table's line n is its row n."""
    path = write_parquet(tmp_path / "t.parquet", {"id": ["a", "b", "a", "c"], "text": ["x"] * 4})
    requests = TableRequests(TableInput(path), endpoint=CHAT, id_column="id", prompt="{text}", model="m")
    with pytest.raises(OpenAIBatchInputError) as err:
        prepare_from_lines(requests.lines(), endpoint=CHAT, work_dir=tmp_path / "work")
    [problem] = err.value.problems
    assert problem.line == 3
    assert problem.field == "custom_id" and "a" in problem.reason and problem.reason.endswith("line 1")
    assert not list((tmp_path / "work").glob("*.jsonl"))


def test_integer_ids_become_their_decimal_text(tmp_path) -> None:
    path = write_parquet(
        tmp_path / "t.parquet", {"n": pa.array([7, -3, 12], pa.int64()), "text": ["a", "b", "c"]}
    )
    requests = TableRequests(TableInput(path), endpoint=CHAT, id_column="n", prompt="{n}: {text}")
    lines = lines_of(requests)
    assert [line["custom_id"] for line in lines] == ["7", "-3", "12"]
    assert lines[1]["body"]["messages"][0]["content"] == "-3: b"


def test_an_id_column_of_another_type_is_refused(tmp_path) -> None:
    path = write_parquet(tmp_path / "t.parquet", {"score": [1.5], "text": ["a"]})
    with pytest.raises(OpenAIBatchInputError, match="has type double; ids must be text or integers"):
        TableRequests(TableInput(path), endpoint=CHAT, id_column="score", prompt="{text}")


def test_nulls_in_prompt_columns_are_errors_unless_read_as_empty(tmp_path) -> None:
    path = write_parquet(tmp_path / "t.parquet", {"id": ["a", "b", "c"], "text": ["x", None, None]})
    requests = TableRequests(TableInput(path), endpoint=CHAT, id_column="id", prompt="<{text}>")
    with pytest.raises(OpenAIBatchInputError) as err:
        list(requests.lines())
    assert problems_of(err) == [
        f"row {n}, text: null in a prompt column (field {{text}}); on_null='empty' reads it as ''"
        for n in (2, 3)
    ]
    requests = TableRequests(
        TableInput(path), endpoint=CHAT, id_column="id", prompt="<{text}>", on_null="empty"
    )
    assert [line["body"]["messages"][0]["content"] for line in lines_of(requests)] == ["<x>", "<>", "<>"]


def test_problems_are_counted_beyond_those_listed(tmp_path) -> None:
    path = write_parquet(
        tmp_path / "t.parquet", {"id": pa.array([None] * 80, pa.string()), "text": ["x"] * 80}
    )
    requests = TableRequests(TableInput(path), endpoint=CHAT, id_column="id", prompt="{text}", max_problems=5)
    with pytest.raises(OpenAIBatchInputError) as err:
        list(requests.lines())
    assert err.value.total == 80 and len(err.value.problems) == 5
    assert "... and 75 more" in str(err.value)


NASTY = [
    "Grüße aus Köln, naïve café, 日本語のテキスト, emoji 🎉, العربية",
    'quotes " and \\ backslashes \\" and {braces}',
    "tabs\tand\r\nwindows newlines\nand a bell \x07 and nul \x00 and \x1f",
    "",
    "line separator \u2028 and paragraph \u2029 and DEL \x7f",
]


@pytest.mark.parametrize("text", NASTY)
def test_any_text_survives_into_the_request_exactly(tmp_path, text) -> None:
    path = write_parquet(
        tmp_path / "t.parquet", {"id": ["a", "b"], "text": [text, "plain"], "n": ["é", "\x01"]}
    )
    requests = TableRequests(
        TableInput(path), endpoint=CHAT, id_column="id", prompt="«{text}» {n}", system_prompt="ß {n}"
    )
    lines = lines_of(requests)
    assert lines[0]["body"]["messages"] == [
        {"role": "system", "content": "ß é"},
        {"role": "user", "content": f"«{text}» é"},
    ]
    assert lines[1]["body"]["messages"][1]["content"] == "«plain» \x01"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(st.text(st.characters(exclude_categories=("Cs",))), min_size=1, max_size=20),
    prefix=st.text(st.characters(exclude_categories=("Cs",)), max_size=10).map(
        lambda s: s.replace("{", "{{").replace("}", "}}")
    ),
)
def test_prompts_equal_python_formatting_for_any_text(tmp_path, texts, prefix) -> None:
    path = write_parquet(tmp_path / "t.parquet", {"id": [f"r{i}" for i in range(len(texts))], "text": texts})
    template = prefix + "{text}|{id}"
    requests = TableRequests(TableInput(path), endpoint="/v1/responses", id_column="id", prompt=template)
    assert [line["body"]["input"] for line in lines_of(requests)] == [
        template.format(text=t, id=f"r{i}") for i, t in enumerate(texts)
    ]


def test_format_specs_conversions_and_nested_fields_format_like_python(tmp_path) -> None:
    columns = {
        "id": ["a", "b"],
        "score": [0.5, 2.25],
        "ok": [True, False],
        "when": [datetime.datetime(2026, 1, 2, 3, 4), datetime.datetime(2026, 5, 6, 7, 8)],
        "meta": [{"lang": "fr", "tier": 1}, {"lang": "de", "tier": 2}],
        "name": ["Ann", "Bo"],
    }
    path = write_parquet(tmp_path / "t.parquet", columns)
    template = "{score:.1f}|{ok}|{when:%Y-%m-%d}|{meta[lang]}|{name!r:>6}|{score}"
    requests = TableRequests(TableInput(path), endpoint="/v1/responses", id_column="id", prompt=template)
    rows = pa.table(columns).to_pylist()
    assert [line["body"]["input"] for line in lines_of(requests)] == [template.format(**r) for r in rows]


def test_a_value_the_format_spec_cannot_take_is_named_by_row(tmp_path) -> None:
    path = write_parquet(tmp_path / "t.parquet", {"id": ["a", "b"], "meta": [{"lang": "fr"}, {"lang": None}]})
    requests = TableRequests(
        TableInput(path), endpoint="/v1/responses", id_column="id", prompt="{meta[lang]:d}"
    )
    with pytest.raises(OpenAIBatchInputError) as err:
        list(requests.lines())
    first, second = problems_of(err)
    assert first.startswith("row 1, meta: cannot format {meta[lang]:d} with value 'fr': ValueError")
    assert second.startswith("row 2, meta: null in a prompt column (field {meta[lang]:d})")


def test_a_request_builder_gets_each_row_and_its_body_is_merged(tmp_path) -> None:
    columns = {"id": ["a", "b"], "text": ["x", "y"], "n": pa.array([1, 2], pa.int32())}
    path = write_parquet(tmp_path / "t.parquet", columns)
    seen = []

    def build(row: dict) -> dict:
        seen.append(row)
        return {"input": [row["text"]] * row["n"], "temperature": 0.5}

    requests = TableRequests(
        TableInput(path),
        endpoint="/v1/embeddings",
        id_column="id",
        request_builder=build,
        body={"dimensions": 8, "temperature": 0},
        model="text-embedding-3-small",
    )
    assert lines_of(requests) == [
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "dimensions": 8, "temperature": 0.5, "input": inputs},
        }
        for cid, inputs in (("a", ["x"]), ("b", ["y", "y"]))
    ]
    assert seen == pa.table(columns).to_pylist()


def test_a_failing_request_builder_is_named_by_row(tmp_path) -> None:
    path = write_parquet(tmp_path / "t.parquet", {"id": ["a", "b", "c"], "n": [1, 0, 2]})

    def build(row: dict):
        if row["n"] == 2:
            return ["not", "a", "dict"]
        return {"input": str(1 / row["n"]), "when": decimal.Decimal(1) if row["id"] == "a" else 0}

    requests = TableRequests(
        TableInput(path), endpoint="/v1/embeddings", id_column="id", request_builder=build
    )
    with pytest.raises(OpenAIBatchInputError) as err:
        list(requests.lines())
    assert [p.split(":")[0] for p in problems_of(err)] == ["row 1", "row 2", "row 3"]
    assert "not JSON-serializable" in problems_of(err)[0]
    assert "ZeroDivisionError" in problems_of(err)[1]
    assert "returned list, not a dict" in problems_of(err)[2]


def test_csv_ids_and_prompt_columns_are_read_as_written(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text('code,amount,text\n007,1.50,"a, quoted ""one"""\n010,2,"multi\nline"\n', encoding="utf-8")
    requests = TableRequests(
        TableInput(path), endpoint="/v1/responses", id_column="code", prompt="{amount} {text}"
    )
    lines = lines_of(requests)
    assert [line["custom_id"] for line in lines] == ["007", "010"]
    assert [line["body"]["input"] for line in lines] == ['1.50 a, quoted "one"', "2 multi\nline"]


def test_the_example_csv_becomes_valid_prepared_chunks(tmp_path) -> None:
    """The lines are what the line validator takes from a JSONL file: chunks hold exactly them."""
    table = TableInput(TICKETS_CSV)
    requests = TableRequests(
        table,
        endpoint=CHAT,
        id_column="ticket_id",
        prompt="Label this ticket ({customer_tier}):\n{text}",
        system_prompt="You label support tickets.",
        model="gpt-4o-mini",
    )
    prepared = prepare_from_lines(
        requests.lines(), endpoint=CHAT, work_dir=tmp_path, max_requests_per_batch=1000
    )
    assert prepared.total_requests == 3000 == requests.source().row_count
    assert len(prepared.chunks) == 3
    chunk_lines = [line for chunk in prepared.chunks for line in iter_lines(chunk.path.open("rb"))]
    expected = list(
        TableRequests(
            TableInput(TICKETS_CSV),
            endpoint=CHAT,
            id_column="ticket_id",
            prompt="Label this ticket ({customer_tier}):\n{text}",
            system_prompt="You label support tickets.",
            model="gpt-4o-mini",
        ).lines()
    )
    assert chunk_lines == expected
    rows = pacsv.read_csv(TICKETS_CSV, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    first = orjson.loads(chunk_lines[0])
    assert first["custom_id"] == rows.column("ticket_id")[0].as_py()
    assert first["body"]["messages"][1]["content"].endswith(rows.column("text")[0].as_py())


def test_lines_come_in_blocks_of_whole_lines(tmp_path) -> None:
    texts = ["x" * (i % 300) for i in range(6000)]
    path = write_parquet(tmp_path / "t.parquet", {"id": [f"r{i}" for i in range(6000)], "text": texts})
    requests = TableRequests(TableInput(path), endpoint=CHAT, id_column="id", prompt="{text}", model="m")
    blocks = list(requests.blocks())
    assert len(blocks) > 1
    assert all(block.endswith(b"\n") for block in blocks)
    assert [orjson.loads(line)["custom_id"] for block in blocks for line in block.splitlines()] == [
        f"r{i}" for i in range(6000)
    ]


def test_source_needs_the_lines_read_first(tmp_path) -> None:
    path = write_parquet(tmp_path / "t.parquet", tickets())
    requests = TableRequests(TableInput(path), endpoint=CHAT, id_column="ticket_id", prompt="{text}")
    with pytest.raises(RuntimeError):
        requests.source()


# -- object storage --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_tables_on_s3_read_like_local_ones(fmt, tmp_path, s3_bucket) -> None:
    from airflow.sdk import ObjectStoragePath

    local = tmp_path / f"t.{fmt}"
    if fmt == "parquet":
        write_parquet(local, tickets(50))
    else:
        pacsv.write_csv(pa.table(tickets(50)), local)
    remote = ObjectStoragePath(f"s3://aws_default@{s3_bucket}/drops/t.{fmt}")
    remote.write_bytes(local.read_bytes())
    kwargs = {"endpoint": CHAT, "id_column": "ticket_id", "prompt": "{subject}: {text}", "model": "m"}
    on_s3 = TableRequests(TableInput(remote.path, filesystem=remote.fs, uri=str(remote)), **kwargs)
    assert list(on_s3.lines()) == list(TableRequests(TableInput(local), **kwargs).lines())
    assert on_s3.source().uri == f"s3://aws_default@{s3_bucket}/drops/t.{fmt}"
    assert on_s3.source().row_count == 50


# -- the table's location, from submit to collect ------------------------------------------------------


def test_table_source_round_trips_through_dict_and_batch_metadata() -> None:
    source = TableSource("s3://aws_default@bucket/t.parquet", "parquet", "ticket_id", 3000, CHAT)
    assert TableSource.from_dict(orjson.loads(orjson.dumps(source.to_dict()))) == source
    metadata = source.to_metadata()
    assert all(len(v) <= 512 for v in metadata.values()) and len(metadata) == 2
    assert TableSource.from_metadata({"other": "x", **metadata}) == source
    assert TableSource.from_metadata({"other": "x"}) is None


@pytest.mark.parametrize("uri", ["s3://key:secret@bucket/t.parquet", "https://h/t.csv?X-Amz-Signature=abc"])
def test_table_source_refuses_locations_that_carry_secrets(uri) -> None:
    with pytest.raises(ValueError, match="password or a query string"):
        TableSource(uri, "csv", "id", 1)


def test_table_source_from_dict_names_what_is_missing() -> None:
    with pytest.raises(ValueError, match="lacks 'row_count'"):
        TableSource.from_dict({"uri": "/t.csv", "format": "csv", "id_column": "id"})
    with pytest.raises(ValueError, match="version"):
        TableSource.from_dict({"version": 9})


# -- answers joined back to their rows -------------------------------------------------------------------


def typed_table(n: int) -> pa.Table:
    """A table whose columns have many Arrow types, to see each kept as it is."""
    return pa.table(
        {
            "id": pa.array([f"id-{(i * 7919) % 100_003:06d}" for i in range(n)]),  # not in sorted order
            "n": pa.array(range(n), pa.int32()),
            "score": pa.array([i / 3 for i in range(n)], pa.float64()),
            "flag": pa.array([i % 2 == 0 for i in range(n)]),
            "when": pa.array(
                [
                    datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(hours=i)
                    for i in range(n)
                ],
                pa.timestamp("us", tz="UTC"),
            ),
            "tags": pa.array([[f"t{i % 3}"] * (i % 3) for i in range(n)], pa.list_(pa.string())),
            "meta": pa.array([{"lang": "fr" if i % 2 else "de", "k": i} for i in range(n)]),
            "tier": pa.array(["free", "pro", None][i % 3] for i in range(n)).dictionary_encode(),
            "price": pa.array([decimal.Decimal(i) / 100 for i in range(n)], pa.decimal128(10, 2)),
        }
    )


def write_results(
    folder: Path, fmt: str, ids: list[str], failed: set[str], embeddings: bool = False
) -> dict[str, Path]:
    """The collect's result files for these ids, written by the collect's own writer, in another order."""
    with ResultWriter(folder, fmt) as writer:
        for i, cid in enumerate(reversed(ids)):
            if cid in failed:
                record = {
                    "custom_id": cid,
                    "batch_id": "batch_1",
                    "status_code": 400,
                    "error_code": "invalid_value",
                    "error_message": f"bad {cid}",
                    "request": {"custom_id": cid},
                }
                writer.write_failure(record, orjson.dumps(record["request"]))
                continue
            usage = {"prompt_tokens": 10 + i, "completion_tokens": 2, "total_tokens": 12 + i}
            record = {
                "custom_id": cid,
                "batch_id": "batch_1",
                "status_code": 200,
                "body": {"usage": usage},
                "usage": usage,
            }
            if embeddings:
                record["embedding"] = [float(i), 0.5]
            else:
                record["content"] = f"answer to {cid}"
            writer.write_success(record)
    return writer.paths()


def join(
    tmp_path: Path, table_path: Path, paths: dict, source: TableSource, out: str = "answers.parquet", **kwargs
):
    return join_answers(
        TableInput(table_path),
        source,
        successes=paths["successes"],
        failures=paths["failures"],
        destination=tmp_path / "out" / out,
        **kwargs,
    )


@pytest.mark.parametrize("results_format", ["jsonl", "parquet"])
@pytest.mark.parametrize("budget", [256 << 20, 4096])
def test_answers_keep_every_input_row_in_order_with_its_columns_and_types(
    tmp_path, results_format, budget
) -> None:
    n = 2500
    table = typed_table(n)
    table_path = write_parquet(tmp_path / "t.parquet", table, row_group_size=700)
    ids = table.column("id").to_pylist()
    failed = set(ids[::7])
    paths = write_results(tmp_path / "results", results_format, ids, failed)
    source = TableSource(str(table_path), "parquet", "id", n, CHAT)
    summary = join(tmp_path, table_path, paths, source, memory_budget=budget)
    answers = pq.read_table(summary.path)
    assert answers.num_rows == summary.rows == n
    assert (summary.succeeded, summary.failed, summary.unanswered) == (n - len(failed), len(failed), 0)
    assert (summary.partitions > 0) == (budget < 1 << 20)
    assert answers.select(table.column_names).equals(table)
    assert answers.schema.names == [
        *table.column_names,
        "status",
        "content",
        "error_code",
        "error_message",
        "usage",
    ]
    assert answers.schema.field("usage").type == pa.struct(
        [("input_tokens", pa.int64()), ("output_tokens", pa.int64()), ("total_tokens", pa.int64())]
    )
    by_row = answers.to_pylist()
    for position, row in enumerate(by_row):
        cid = ids[position]
        if cid in failed:
            assert (row["status"], row["content"], row["error_code"], row["error_message"], row["usage"]) == (
                "failed",
                None,
                "invalid_value",
                f"bad {cid}",
                None,
            )
        else:
            written = n - 1 - position  # the results were written in reverse order
            assert row["status"] == "succeeded" and row["content"] == f"answer to {cid}"
            assert row["usage"] == {
                "input_tokens": 10 + written,
                "output_tokens": 2,
                "total_tokens": 12 + written,
            }
            assert row["error_code"] is None
    assert not list((tmp_path / "out").glob(".*work"))


def test_keep_columns_chooses_and_orders_the_input_columns(tmp_path) -> None:
    table = typed_table(30)
    table_path = write_parquet(tmp_path / "t.parquet", table)
    ids = table.column("id").to_pylist()
    paths = write_results(tmp_path / "r", "jsonl", ids, set())
    source = TableSource(str(table_path), "parquet", "id", 30, CHAT)
    summary = join(tmp_path, table_path, paths, source, keep_columns=["score", "id"])
    answers = pq.read_table(summary.path)
    assert answers.column_names[:2] == ["score", "id"]
    assert answers.column("score").equals(table.column("score"))
    summary = join(tmp_path, table_path, paths, source, keep_columns=[])
    assert pq.read_table(summary.path).column_names[0] == "status" and summary.rows == 30
    with pytest.raises(ValueError, match=r"keep_columns names \['nope'\]"):
        join(tmp_path, table_path, paths, source, keep_columns=["nope"])


def test_answers_jsonl_has_a_line_per_row_in_order(tmp_path) -> None:
    table = typed_table(40)
    table_path = write_parquet(tmp_path / "t.parquet", table)
    ids = table.column("id").to_pylist()
    paths = write_results(tmp_path / "r", "parquet", ids, {ids[3]})
    source = TableSource(str(table_path), "parquet", "id", 40, CHAT)
    summary = join(tmp_path, table_path, paths, source, out="answers.jsonl")
    rows = [orjson.loads(line) for line in summary.path.read_bytes().splitlines()]
    assert [r["id"] for r in rows] == ids
    assert rows[0]["meta"] == {"lang": "de", "k": 0} and rows[0]["price"] == "0.00"
    assert rows[1]["when"] == "2026-01-01T01:00:00+00:00"
    assert rows[3]["status"] == "failed" and rows[4]["content"] == f"answer to {ids[4]}"


def test_embeddings_come_back_as_vectors(tmp_path) -> None:
    table_path = write_parquet(tmp_path / "docs.parquet", {"doc": ["d1", "d2"], "text": ["a", "b"]})
    for fmt in ("jsonl", "parquet"):
        paths = write_results(tmp_path / fmt, fmt, ["d1", "d2"], set(), embeddings=True)
        source = TableSource(str(table_path), "parquet", "doc", 2, "/v1/embeddings")
        answers = pq.read_table(join(tmp_path, table_path, paths, source).path)
        assert "content" not in answers.column_names
        assert answers.schema.field("embedding").type == pa.list_(pa.float32())
        assert answers.column("embedding").to_pylist() == [[1.0, 0.5], [0.0, 0.5]]


def test_structured_answers_keep_their_shape(tmp_path) -> None:
    """``parsed`` / ``tool_calls`` as a structured-answers collect writes them: a typed struct in Parquet
    (kept as it is), JSON in JSONL (kept as JSON text in Parquet, as JSON in answers.jsonl)."""
    table_path = write_parquet(tmp_path / "t.parquet", {"id": ["a", "b"], "text": ["x", "y"]})
    parsed_type = pa.struct([("category", pa.string()), ("urgent", pa.bool_())])
    successes = tmp_path / "pq" / "successes.parquet"
    successes.parent.mkdir()
    pq.write_table(
        pa.table(
            {
                "custom_id": ["b", "a"],
                "content": ['{"category":"bug","urgent":true}', '{"category":"billing","urgent":false}'],
                "parsed": pa.array(
                    [{"category": "bug", "urgent": True}, {"category": "billing", "urgent": False}],
                    parsed_type,
                ),
                "finish_reason": ["stop", "stop"],
            }
        ),
        successes,
    )
    source = TableSource(str(table_path), "parquet", "id", 2, CHAT)
    answers = pq.read_table(
        join(tmp_path, table_path, {"successes": successes, "failures": None}, source).path
    )
    assert answers.schema.field("parsed").type == parsed_type
    assert answers.column("parsed").to_pylist() == [
        {"category": "billing", "urgent": False},
        {"category": "bug", "urgent": True},
    ]
    assert answers.column("finish_reason").to_pylist() == ["stop", "stop"]

    jsonl = tmp_path / "js" / "successes.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_bytes(
        b'{"custom_id":"a","content":"x","parsed":{"category":"billing","urgent":false},"body":{}}\n'
        b'{"custom_id":"b","content":null,"tool_calls":[{"name":"f","arguments":{"q":1}}],"body":{}}\n'
    )
    summary = join(tmp_path, table_path, {"successes": jsonl, "failures": None}, source, out="answers.jsonl")
    rows = [orjson.loads(line) for line in summary.path.read_bytes().splitlines()]
    assert rows[0]["parsed"] == {"category": "billing", "urgent": False} and rows[0]["tool_calls"] is None
    assert rows[1]["tool_calls"] == [{"name": "f", "arguments": {"q": 1}}] and rows[1]["parsed"] is None
    assert "finish_reason" not in rows[0]


def test_rows_without_an_answer_are_kept_with_a_null_status(tmp_path) -> None:
    table_path = write_parquet(tmp_path / "t.parquet", {"id": ["a", "b", "c"]})
    paths = write_results(tmp_path / "r", "jsonl", ["a", "c"], set())
    source = TableSource(str(table_path), "parquet", "id", 3, CHAT)
    summary = join(tmp_path, table_path, paths, source)
    assert summary.unanswered == 1
    assert pq.read_table(summary.path).column("status").to_pylist() == ["succeeded", None, "succeeded"]


def test_a_table_that_changed_since_submit_is_refused(tmp_path) -> None:
    table_path = write_parquet(tmp_path / "t.parquet", {"id": ["a", "b", "c"]})
    paths = write_results(tmp_path / "r", "parquet", ["a", "b", "x"], set())
    with pytest.raises(OpenAIBatchJoinError, match="it has 3 rows, 4 at submit"):
        join(tmp_path, table_path, paths, TableSource(str(table_path), "parquet", "id", 4, CHAT))
    with pytest.raises(OpenAIBatchJoinError, match="1 answers have a custom_id that is no row's 'id'"):
        join(tmp_path, table_path, paths, TableSource(str(table_path), "parquet", "id", 3, CHAT))
    assert not list((tmp_path / "out").glob("*"))


def test_an_input_column_named_like_an_answer_column_must_be_left_out(tmp_path) -> None:
    table_path = write_parquet(tmp_path / "t.parquet", {"id": ["a"], "status": ["open"]})
    paths = write_results(tmp_path / "r", "jsonl", ["a"], set())
    source = TableSource(str(table_path), "parquet", "id", 1, CHAT)
    with pytest.raises(ValueError, match=r"column\(s\) \['status'\] have the names of answer columns"):
        join(tmp_path, table_path, paths, source)
    assert join(tmp_path, table_path, paths, source, keep_columns=["id"]).rows == 1


def test_a_csv_table_joins_with_its_ids_as_written(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("code,qty\n007,3\n010,4\n", encoding="utf-8")
    paths = write_results(tmp_path / "r", "jsonl", ["010", "007"], {"010"})
    summary = join(tmp_path, path, paths, TableSource(str(path), "csv", "code", 2, CHAT))
    answers = pq.read_table(summary.path)
    assert answers.column("code").to_pylist() == ["007", "010"]
    assert answers.schema.field("qty").type == pa.int64()
    assert answers.column("status").to_pylist() == ["succeeded", "failed"]


# -- end to end over HTTP --------------------------------------------------------------------------------


def test_table_to_answers_through_the_emulator(emulator, make_context, tmp_path) -> None:
    """Rows -> lines -> the submit and collect operators against the emulator -> answers joined back."""
    from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
    from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator

    rows = pacsv.read_csv(TICKETS_CSV).slice(0, 60)
    table_path = write_parquet(tmp_path / "tickets.parquet", rows)
    requests = TableRequests(
        TableInput(table_path),
        endpoint=CHAT,
        id_column="ticket_id",
        prompt="Label: {text}",
        model="gpt-4o-mini",
    )
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_bytes(b"".join(requests.blocks()))
    emulator.configure(failure_rate=0.2)
    batch_ids = OpenAIBatchSubmitOperator(task_id="submit", requests=str(jsonl)).execute(make_context())
    emulator.advance(3600)
    context = make_context(task_id="collect")
    context["outlet_events"] = NoOutletEvents()
    summary = OpenAIBatchCollectOperator(
        task_id="collect",
        batch_ids=batch_ids,
        output_uri=f"file://{tmp_path}/results",
        output_format="parquet",
    ).execute(context)
    results = tmp_path / "results"
    joined = join_answers(
        TableInput(table_path),
        requests.source(),
        successes=results / "successes.parquet",
        failures=results / "failures.parquet",
        destination=tmp_path / "answers.parquet",
    )
    answers = pq.read_table(joined.path)
    assert answers.select(rows.column_names).equals(pq.read_table(table_path))
    assert (joined.succeeded, joined.failed, joined.unanswered) == (
        summary["succeeded"],
        summary["failed"],
        0,
    )
    assert joined.failed > 0 and joined.succeeded > 0
    succeeded = answers.filter(pa.compute.equal(answers.column("status"), "succeeded"))
    assert all(isinstance(c, str) for c in succeeded.column("content").to_pylist())


def test_doubled_braces_are_literal_braces_not_columns(tmp_path) -> None:
    path = write_parquet(tmp_path / "t.parquet", {"id": ["a"], "text": ["x"]})
    requests = TableRequests(
        TableInput(path), endpoint="/v1/responses", id_column="id", prompt='{{"q": "{text}"}}'
    )
    assert lines_of(requests)[0]["body"]["input"] == '{"q": "x"}'


def test_a_pre_encoded_body_part_is_spliced_into_every_line(tmp_path) -> None:
    """How a response schema's format arrives (structured answers encode it once, as an orjson
    Fragment): written into each line as it is, at no cost per row."""
    path = write_parquet(tmp_path / "t.parquet", {"id": ["a", "b"], "text": ["x", "y"]})
    response_format = {"type": "json_schema", "json_schema": {"name": "label", "strict": True, "schema": {}}}
    body = {"response_format": orjson.Fragment(orjson.dumps(response_format))}
    requests = TableRequests(TableInput(path), endpoint=CHAT, id_column="id", prompt="{text}", body=body)
    assert [line["body"]["response_format"] for line in lines_of(requests)] == [response_format] * 2


# -- the prep of a table: its template lines go through prepare as they were built -------------------------


class Label(pydantic.BaseModel):
    label: str


def chunk_contents(prepared) -> list[tuple[str, list[dict]]]:
    return [
        (c.model, [orjson.loads(line) for line in iter_lines(c.path.open("rb"))]) for c in prepared.chunks
    ]


@pytest.mark.parametrize(
    ("endpoint", "table_kwargs", "prepare_kwargs"),
    [
        (CHAT, {"system_prompt": "S {subject}", "body": {"temperature": 0, "max_completion_tokens": 7}}, {}),
        (CHAT, {"body": {"n": 2, "max_tokens": 5}}, {"response_schema": Label}),
        # The body's own format is kept, the schema is not put in (counted as own formats).
        (CHAT, {"body": {"response_format": {"type": "json_object"}}}, {"response_schema": Label}),
        (
            "/v1/responses",
            {"system_prompt": "S", "body": {"text": {"verbosity": "low"}}},
            {"response_schema": Label},
        ),
        ("/v1/embeddings", {}, {"max_embedding_inputs": 5}),
        # No model anywhere: the API's default model for moderations.
        ("/v1/moderations", {"model": None}, {"model": None}),
        ("/v1/completions", {"body": {"max_tokens": 9}}, {"max_requests_per_batch": 4}),
    ],
)
def test_a_tables_prep_equals_the_line_validators_prep_of_its_lines(
    tmp_path, endpoint, table_kwargs, prepare_kwargs
) -> None:
    """The fast path (lines handed to prepare as built) and the JSONL path (every line validated) make the
    same requests, cut into the same chunks, with the same estimate."""
    path = write_parquet(tmp_path / "t.parquet", tickets(23), row_group_size=10)
    options = {"model": "gpt-4o-mini", **table_kwargs}

    def requests() -> TableRequests:
        return TableRequests(
            TableInput(path),
            endpoint=endpoint,
            id_column="ticket_id",
            prompt="P {text}",
            batch_rows=8,
            **options,
        )

    limits = {"endpoint": endpoint, "max_requests_per_batch": 10, "model": "gpt-4o-mini", **prepare_kwargs}
    fast, source = prepare_from_table(requests(), work_dir=tmp_path / "fast", **limits)
    slow = prepare_from_lines(requests().lines(), work_dir=tmp_path / "slow", **limits)
    assert chunk_contents(fast) == chunk_contents(slow)
    assert [c.request_count for c in fast.chunks] == [c.request_count for c in slow.chunks]
    assert [c.embedding_inputs for c in fast.chunks] == [c.embedding_inputs for c in slow.chunks]
    assert fast.own_formats == slow.own_formats
    assert fast.cost.to_dict() == slow.cost.to_dict()
    assert fast.total_requests == source.row_count == 23


def test_template_lines_reach_prepare_as_built_and_a_request_builders_as_lines(tmp_path) -> None:
    path = write_parquet(tmp_path / "t.parquet", tickets(20))
    rules = RequestRules(CHAT, model=None, max_bytes=1 << 20, max_embedding_inputs=2048, max_tokens=None)
    template = TableRequests(
        TableInput(path), endpoint=CHAT, id_column="ticket_id", prompt="{text}", model="m"
    )
    [built] = template.built_blocks(rules)
    assert isinstance(built, BuiltLines)
    assert built.ids == tickets(20)["ticket_id"]
    assert built.model == "m" and len(built.ends) == 21 and built.ends[-1] == len(built.data)
    builder = TableRequests(
        TableInput(path), endpoint=CHAT, id_column="ticket_id", request_builder=lambda row: {"model": "m"}
    )
    assert all(isinstance(block, bytes) for block in builder.built_blocks(rules))


def test_a_row_too_large_for_a_batch_is_named_by_row(tmp_path) -> None:
    """A batch whose longest line breaks a limit goes to the line validator, which names the row."""
    texts = ["short"] * 12
    texts[9] = "x" * 500
    path = write_parquet(tmp_path / "t.parquet", {"id": [f"r{i}" for i in range(12)], "text": texts})
    requests = TableRequests(TableInput(path), endpoint=CHAT, id_column="id", prompt="{text}", batch_rows=4)
    with pytest.raises(OpenAIBatchInputError) as err:
        prepare_from_table(
            requests, endpoint=CHAT, work_dir=tmp_path / "w", model="m", max_bytes_per_batch=400
        )
    [problem] = err.value.problems
    assert problem.line == 10 and problem.unit == "row"
    assert "above max_bytes_per_batch=400" in problem.reason
    assert not list((tmp_path / "w").glob("*.jsonl*"))


def test_a_template_body_the_rules_refuse_is_named_on_every_row(tmp_path) -> None:
    """The first line of a batch goes through the line validator: a body that breaks a rule sends the
    rows to it line by line, and each is named as a JSONL file's line would be."""
    path = write_parquet(tmp_path / "t.parquet", tickets(3))
    requests = TableRequests(
        TableInput(path),
        endpoint=CHAT,
        id_column="ticket_id",
        prompt="{text}",
        body={"stream": True},
        model="m",
    )
    with pytest.raises(OpenAIBatchInputError) as err:
        prepare_from_table(requests, endpoint=CHAT, work_dir=tmp_path / "w")
    assert [(p.line, p.field) for p in err.value.problems] == [
        (1, "body.stream"),
        (2, "body.stream"),
        (3, "body.stream"),
    ]


def test_a_duplicate_id_is_named_by_row_on_the_tables_path(tmp_path) -> None:
    path = write_parquet(tmp_path / "t.parquet", {"id": ["a", "b", "c", "b"], "text": ["x"] * 4})
    requests = TableRequests(
        TableInput(path), endpoint=CHAT, id_column="id", prompt="{text}", model="m", batch_rows=2
    )
    with pytest.raises(OpenAIBatchInputError) as err:
        prepare_from_table(requests, endpoint=CHAT, work_dir=tmp_path / "w")
    [problem] = err.value.problems
    assert (problem.line, problem.field, problem.unit) == (4, "custom_id", "row")
    assert problem.reason.endswith("row 2")


@pytest.mark.parametrize("column", ["id", "text"])
def test_bytes_that_are_not_utf8_are_named_by_row(tmp_path, column) -> None:
    """Parquet does not check that its text is UTF-8. Printable ASCII needs no check, so a batch of it is
    built at once; any other batch is checked, and a row that is not UTF-8 is named."""
    values = {"id": [b"a", b"b", b"c", b"d"], "text": [b"x", b"y", "caf\u00e9".encode(), b"z"]}
    values[column][3] = b"bad \xff"
    columns = {name: pa.array(v, pa.binary()).view(pa.string()) for name, v in values.items()}
    path = write_parquet(tmp_path / "t.parquet", columns)
    requests = TableRequests(
        TableInput(path), endpoint=CHAT, id_column="id", prompt="{text}", model="m", batch_rows=2
    )
    with pytest.raises(OpenAIBatchInputError) as err:
        prepare_from_table(requests, endpoint=CHAT, work_dir=tmp_path / "w")
    [problem] = err.value.problems
    assert (problem.line, problem.unit) == (4, "row")
    assert "UTF-8" in problem.reason


def test_a_batch_cut_into_pieces_is_prepared_as_its_lines_are(tmp_path) -> None:
    """A batch of rows larger than a piece is handed over in pieces: the chunks, the estimate and its
    largest line (in the second piece here) are those of the JSONL path, and the ids' order check holds
    for ids of one length and of several."""
    rows = 3000
    texts = [f"text {i} " + "w" * 1000 for i in range(rows)]
    texts[1500] += "z" * 900  # the largest line: in the second piece of the first batch (2 MB)
    ids = [f"T{i:05d}" for i in range(rows)]
    ids[1:3] = ["T9", "T10"]  # several lengths in the first batch: the finder orders them itself
    path = write_parquet(tmp_path / "t.parquet", {"id": ids, "text": texts})
    limits = {"endpoint": CHAT, "model": "gpt-4o-mini", "max_requests_per_batch": 1000}

    def requests() -> TableRequests:
        return TableRequests(
            TableInput(path), endpoint=CHAT, id_column="id", prompt="{text}", batch_rows=2048
        )

    fast, _ = prepare_from_table(requests(), work_dir=tmp_path / "fast", **limits)
    slow = prepare_from_lines(requests().lines(), work_dir=tmp_path / "slow", **limits)
    assert chunk_contents(fast) == chunk_contents(slow)
    assert fast.cost.to_dict() == slow.cost.to_dict()
    assert fast.cost.largest_lines(1)[0]["line"] == 1501
