"""core.media: the images of an images batch written as files, locally and on S3 (moto server)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
import pytest

from airflow_openai_batch.core.media import (
    LocalMediaSink,
    ObjectStoreMediaSink,
    image_file_name,
    sniff_image_format,
    write_images,
)
from tests.support.images import assert_valid_image, png_size

GENERATIONS = "/v1/images/generations"


def _image_batch_bodies(emulator, n_requests: int = 4, **body: Any) -> dict[str, dict[str, Any]]:
    """Success bodies of an images batch run on the emulator, by custom_id."""
    client = emulator.client()
    lines = [
        {
            "custom_id": f"img/{i}" if i % 2 else f"img-{i}",  # odd ids are not file-name safe
            "method": "POST",
            "url": GENERATIONS,
            "body": {"model": "gpt-image-2", "prompt": f"picture {i}", "n": 1 + i % 3, **body},
        }
        for i in range(n_requests)
    ]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    file_id = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint=GENERATIONS, completion_window="24h")
    emulator.advance(3600)
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.output_file_id
    out = {}
    for raw in client.files.content(done.output_file_id).text.splitlines():
        line = json.loads(raw)
        out[line["custom_id"]] = line["response"]["body"]
    assert len(out) == n_requests
    return out


def _local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    assert parsed.scheme == "file"
    return Path(parsed.path)


def test_images_become_valid_png_files_on_local_disk(emulator, tmp_path) -> None:
    bodies = _image_batch_bodies(emulator)
    sink = LocalMediaSink(tmp_path / "out")
    records = {}
    for custom_id, body in bodies.items():
        answer = write_images(custom_id, body, sink)
        records[custom_id] = {"custom_id": custom_id, "images": answer.images, "body": answer.body}

    files = sorted((tmp_path / "out" / "images").iterdir())
    assert len(files) == sum(len(body["data"]) for body in bodies.values()) == 1 + 2 + 3 + 1
    assert not [f for f in files if f.name.endswith(".partial")]
    for custom_id, record in records.items():
        assert len(record["images"]) == len(bodies[custom_id]["data"])
        for index, uri in enumerate(record["images"]):
            path = _local_path(uri)
            assert path.parent == tmp_path / "out" / "images"
            assert path.name.endswith(f"-{index}.png")
            data = path.read_bytes()
            assert png_size(data) == (8, 8)
            assert data == base64.b64decode(bodies[custom_id]["data"][index]["b64_json"])
        # The record keeps the body, less the image bytes.
        assert "b64_json" not in json.dumps(record["body"])
        assert record["body"]["usage"] == bodies[custom_id]["usage"]
        assert len(record["body"]["data"]) == len(record["images"])
    # The unsafe ids kept their own files, and the names say which request they belong to.
    assert any(f.name.startswith("img_1~") for f in files)
    assert {f.name for f in files if f.name.startswith("img-0-")} == {"img-0-0.png"}


def test_a_staging_folder_records_the_final_uris(emulator, tmp_path) -> None:
    body = next(iter(_image_batch_bodies(emulator, n_requests=1).values()))
    sink = LocalMediaSink(tmp_path / "staging", uri_prefix="s3://bucket/results/run-1/")
    answer = write_images("r1", body, sink)
    assert answer.images == ["s3://bucket/results/run-1/images/r1-0.png"]
    png_size((tmp_path / "staging" / "images" / "r1-0.png").read_bytes())


def test_images_go_straight_to_s3(emulator, s3_bucket, s3_server) -> None:
    from airflow.sdk import ObjectStoragePath

    bodies = _image_batch_bodies(emulator)
    folder = ObjectStoragePath(f"s3://aws_default@{s3_bucket}/results/run-1")
    sink = ObjectStoreMediaSink(folder)
    uris = [uri for cid, body in bodies.items() for uri in write_images(cid, body, sink).images]

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = sorted(obj["Key"] for obj in s3.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert len(keys) == len(uris) == 7
    assert all(key.startswith("results/run-1/images/") and key.endswith(".png") for key in keys)
    for uri in uris:
        assert uri.startswith("s3://") and uri.endswith(".png")
        key = uri.split(f"{s3_bucket}/", 1)[1]
        png_size(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())


@pytest.mark.parametrize("output_format", ["webp", "gif", "jpeg", "svg"])
def test_the_declared_output_format_names_the_files(emulator, tmp_path, output_format) -> None:
    bodies = _image_batch_bodies(emulator, n_requests=1, output_format=output_format)
    [(custom_id, body)] = bodies.items()
    answer = write_images(custom_id, body, LocalMediaSink(tmp_path))
    for uri in answer.images:
        path = _local_path(uri)
        assert path.suffix == f".{output_format}"
        assert_valid_image(path.read_bytes(), output_format)
        assert sniff_image_format(path.read_bytes()) == output_format


def test_without_output_format_the_bytes_name_the_format(emulator, tmp_path) -> None:
    body = next(iter(_image_batch_bodies(emulator, n_requests=1, output_format="gif").values()))
    del body["output_format"]
    [uri] = write_images("r", body, LocalMediaSink(tmp_path)).images
    assert uri.endswith("/images/r-0.gif")


def test_url_answers_are_recorded_as_given(tmp_path) -> None:
    body = {"created": 1, "data": [{"url": "https://files.example/a.png", "revised_prompt": "a cat"}]}
    answer = write_images("r", body, LocalMediaSink(tmp_path))
    assert answer.images == ["https://files.example/a.png"]
    assert answer.body == body
    assert not list(tmp_path.iterdir())


def test_bad_base64_names_the_request_and_the_image(tmp_path) -> None:
    body = {"created": 1, "data": [{"b64_json": "aGk="}, {"b64_json": "not base64!"}]}
    with pytest.raises(ValueError, match=r"request 'r7': image 1 of the answer is not valid base64"):
        write_images("r7", body, LocalMediaSink(tmp_path))


def test_file_names_are_safe_and_distinct() -> None:
    ids = ["a", "a/b", "a_b", "a b", "../x", ".", "", "é", "x" * 600, "x" * 601]
    names = [image_file_name(custom_id, 0, "png") for custom_id in ids]
    assert len(set(names)) == len(names)
    for name in names:
        folder, _, file_name = name.partition("/")
        assert folder == "images" and "/" not in file_name and not file_name.startswith(".")
        assert len(file_name.encode()) <= 255
        assert set(file_name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~")
    assert image_file_name("a", 2, "webp") == "images/a-2.webp"
