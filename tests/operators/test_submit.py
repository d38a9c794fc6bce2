"""OpenAIBatchSubmitOperator against the emulator: splitting, validation, sources, retry safety."""

from __future__ import annotations

import json

import pytest

from airflow_openai_batch.exceptions import OpenAIBatchInputError
from airflow_openai_batch.operators import submit as submit_module
from airflow_openai_batch.operators.submit import (
    METADATA_KEY,
    OpenAIBatchSubmitOperator,
)
from tests.conftest import InMemoryTaskStateStore
from tests.support.request_lines import CHAT, batch_lines, chat_line, write_jsonl


def all_batches(emulator) -> list:
    return list(emulator.client().batches.list(limit=100))


def run_submit(make_context, context=None, **kwargs) -> list[str]:
    op = OpenAIBatchSubmitOperator(task_id="submit", **kwargs)
    return op.execute(context if context is not None else make_context())


def test_120001_lines_make_three_batches_in_order(emulator, make_context, tmp_path) -> None:
    path = tmp_path / "in.jsonl"
    with path.open("w") as out:
        for i in range(120_001):
            out.write(
                f'{{"custom_id":"r{i}","method":"POST","url":"{CHAT}","body":{{"model":"m","input":"x"}}}}\n'
            )
    ids = run_submit(make_context, requests=str(path), endpoint=CHAT)
    assert len(ids) == 3
    counts = [len(batch_lines(emulator, bid)) for bid in ids]
    assert counts == [50_000, 50_000, 20_001]
    assert batch_lines(emulator, ids[2])[-1]["custom_id"] == "r120000"
    metas = [emulator.client().batches.retrieve(bid).metadata for bid in ids]
    assert [m["aob_chunk"] for m in metas] == ["1/3", "2/3", "3/3"]
    assert len({m[METADATA_KEY] for m in metas}) == 3


def test_two_models_are_grouped_into_two_batches(emulator, make_context, tmp_path) -> None:
    rows = [chat_line(i, model="gpt-4o-mini" if i % 2 else "gpt-4.1-nano") for i in range(10)]
    ids = run_submit(make_context, requests=str(write_jsonl(tmp_path / "in.jsonl", rows)))
    assert len(ids) == 2
    models = [{line["body"]["model"] for line in batch_lines(emulator, bid)} for bid in ids]
    assert models == [{"gpt-4.1-nano"}, {"gpt-4o-mini"}]


def test_byte_limit_splits_into_the_fewest_batches(emulator, make_context, tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(10, 40)])  # equal-length lines
    line_bytes = len(path.read_bytes().splitlines()[0]) + 1
    ids = run_submit(make_context, requests=str(path), max_bytes_per_batch=line_bytes * 10 + 5)
    assert [len(batch_lines(emulator, bid)) for bid in ids] == [10, 10, 10]


def test_embedding_inputs_split_on_the_50000_input_rule(emulator, make_context, tmp_path) -> None:
    rows = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": ["a"] * 20_000},
        }
        for i in range(5)
    ]
    ids = run_submit(
        make_context, requests=str(write_jsonl(tmp_path / "e.jsonl", rows)), endpoint="/v1/embeddings"
    )
    assert [len(batch_lines(emulator, bid)) for bid in ids] == [2, 2, 1]


def test_list_input_with_short_items_and_a_default_model(emulator, make_context) -> None:
    items = [
        {"custom_id": f"c{i}", "body": {"messages": [{"role": "user", "content": str(i)}]}} for i in range(4)
    ]
    items.append(chat_line(99))
    (bid,) = run_submit(make_context, requests=items, model="gpt-4o-mini")
    lines = batch_lines(emulator, bid)
    assert [line["custom_id"] for line in lines] == ["c0", "c1", "c2", "c3", "req-99"]
    assert {line["method"] for line in lines} == {"POST"} and {line["url"] for line in lines} == {CHAT}
    assert {line["body"]["model"] for line in lines} == {"gpt-4o-mini"}


def test_s3_input_through_a_real_s3_server_and_object_storage_path(
    emulator, make_context, s3_bucket, s3_server
) -> None:
    import boto3

    body = b"".join(json.dumps(chat_line(i)).encode() + b"\n" for i in range(25))
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").put_object(
        Bucket=s3_bucket, Key="nightly/in.jsonl", Body=body
    )
    from airflow.sdk import ObjectStoragePath

    (bid,) = run_submit(make_context, requests=f"s3://aws_default@{s3_bucket}/nightly/in.jsonl")
    assert len(batch_lines(emulator, bid)) == 25
    ids = run_submit(
        make_context,
        context=make_context(run_id="other"),
        requests=ObjectStoragePath(f"s3://aws_default@{s3_bucket}/nightly/in.jsonl"),
    )
    assert len(ids) == 1 and ids[0] != bid


BAD_INPUTS = {
    "invalid json": ("{not json", "line 2", "JSON"),
    "not an object": ("[1, 2]", "line 2", "object"),
    "missing custom_id": (
        json.dumps({"method": "POST", "url": CHAT, "body": {"model": "m"}}),
        "line 2",
        "custom_id",
    ),
    "empty custom_id": (json.dumps(chat_line(5, custom_id="")), "line 2", "custom_id"),
    "non-string custom_id": (json.dumps(chat_line(5, custom_id=7)), "line 2", "custom_id"),
    "duplicate custom_id": (json.dumps(chat_line(0)), "line 2", "line 1"),
    "method not POST": (json.dumps(chat_line(5, method="GET")), "line 2", "method"),
    "url mismatch": (json.dumps(chat_line(5, url="/v1/embeddings")), "line 2", "url"),
    "body not an object": (json.dumps(chat_line(5, body=[1])), "line 2", "body"),
    "no model": (json.dumps(chat_line(5, model=None)), "line 2", "model"),
    "stream true": (json.dumps(chat_line(5, body={"model": "m", "stream": True})), "line 2", "stream"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_rejected_naming_the_line_and_nothing_is_uploaded(
    case, emulator, make_context, tmp_path
) -> None:
    bad_line, where, what = BAD_INPUTS[case]
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(chat_line(0)) + "\n" + bad_line + "\n" + json.dumps(chat_line(1)) + "\n")
    with pytest.raises(OpenAIBatchInputError) as info:
        run_submit(make_context, requests=str(path))
    assert where in str(info.value) and what.lower() in str(info.value).lower()
    assert emulator.stats()["files"] == 0 and emulator.stats()["batches"] == 0
    assert emulator.stats()["calls"].get("files.create", 0) == 0


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"requests": []}, "empty"),
        ({"endpoint": "/v1/unknown"}, "endpoint"),
        ({"metadata": {f"k{i}": "v" for i in range(12)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "64"),
        ({"metadata": {"k": "v" * 513}}, "512"),
        ({"max_bytes_per_batch": 50}, "line 1"),
    ],
)
def test_other_bad_inputs_are_rejected_before_any_upload(kwargs, expected, emulator, make_context) -> None:
    args = {"requests": [chat_line(0)], **kwargs}
    with pytest.raises(OpenAIBatchInputError) as info:
        run_submit(make_context, **args)
    assert expected in str(info.value)
    assert emulator.stats()["files"] == 0 and emulator.stats()["batches"] == 0


def test_many_bad_lines_are_capped_with_the_total(emulator, make_context, tmp_path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join("{oops\n" for _ in range(500)))
    with pytest.raises(OpenAIBatchInputError) as info:
        run_submit(make_context, requests=str(path))
    assert info.value.total == 500 and len(info.value.problems) < 500
    assert "500 problems" in str(info.value) and "line 500" not in str(info.value)


def test_rerun_for_the_same_run_reuses_every_batch(emulator, make_context, tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(9)])
    first = run_submit(make_context, requests=str(path), max_requests_per_batch=4)
    second = run_submit(make_context, requests=str(path), max_requests_per_batch=4)
    assert first == second and len(first) == 3
    assert len(all_batches(emulator)) == 3
    # Another run of the same DAG is new work: new batches.
    third = run_submit(
        make_context,
        context=make_context(run_id="scheduled__2"),
        requests=str(path),
        max_requests_per_batch=4,
    )
    assert set(third).isdisjoint(first) and len(all_batches(emulator)) == 6


def test_task_state_store_is_used_and_a_failed_batch_is_replaced(emulator, make_context, tmp_path) -> None:
    store = InMemoryTaskStateStore()
    emulator.configure(rate=0.001)  # still in progress when cancelled
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    (first,) = run_submit(make_context, context=make_context(state_store=store), requests=str(path))
    assert first in store.data.values()
    emulator.client().batches.cancel(first)
    emulator.advance(3600)
    (second,) = run_submit(make_context, context=make_context(state_store=store), requests=str(path))
    assert second != first and store.data == {next(iter(store.data)): second}
    assert len(all_batches(emulator)) == 2


def test_a_crash_right_after_create_is_recovered_without_a_duplicate(
    emulator, make_context, tmp_path, monkeypatch
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(6)])

    def crash(self, key, batch_id):
        raise SystemExit("worker died right after batches.create")

    with monkeypatch.context() as patch:
        patch.setattr(submit_module._ChunkSubmitter, "_remember", crash)
        with pytest.raises(SystemExit):
            run_submit(make_context, requests=str(path), max_requests_per_batch=3)
    assert len(all_batches(emulator)) == 1
    ids = run_submit(make_context, requests=str(path), max_requests_per_batch=3)
    assert len(ids) == 2 and len(all_batches(emulator)) == 2
    assert ids[0] == all_batches(emulator)[-1].id


def test_an_ambiguous_create_error_is_reconciled_by_lookup(emulator, make_context, tmp_path) -> None:
    emulator.configure(fault_after_create_rate=1.0)
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    (bid,) = run_submit(make_context, requests=str(path))
    batches = all_batches(emulator)
    assert [b.id for b in batches] == [bid]
    assert emulator.stats()["calls"]["batches.create"] == 1


def test_create_faults_that_create_nothing_are_retried(emulator, make_context, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("airflow_openai_batch.hooks.batch.time.sleep", lambda _s: None)
    emulator.configure(fault_rate=0.5, fault_routes=("batches.create",), fault_kinds=("500", "drop"), seed=3)
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(8)])
    ids = run_submit(make_context, requests=str(path), max_requests_per_batch=2)
    assert len(ids) == 4 and len(all_batches(emulator)) == 4


def test_logs_and_links_name_every_chunk(emulator, make_context, tmp_path, capfd) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(4)])
    context = make_context()
    ids = run_submit(make_context, context=context, requests=str(path), max_requests_per_batch=2)
    logged = capfd.readouterr().out
    for bid in ids:
        assert bid in logged
    assert "Chunk 1/2: 2 requests" in logged and "model gpt-4o-mini" in logged
    assert context["ti"].xcoms["openai_batch_ids"] == ids
