"""The 2026 surface in the emulator: image batches answer real images, /v1/videos is refused as OpenAI
now refuses it, and the Batch object reports its model and the usage summed from its lines."""

from __future__ import annotations

import base64
from typing import Any

import openai
import pytest
from openai.types import Batch, ImagesResponse

from airflow_openai_batch.emulator import EmulatorServer
from tests.support.images import assert_valid_image, png_size

from .helpers import assert_schema, chat_line, read_lines, upload

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"


def _line(custom_id: str, url: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def _run(client: openai.OpenAI, emulator: EmulatorServer, records: list, endpoint: str) -> Batch:
    batch = client.batches.create(
        input_file_id=upload(client, records),
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
    )
    emulator.advance(3600)
    return client.batches.retrieve(batch.id)


def _bodies(client: openai.OpenAI, batch: Batch) -> dict[str, dict[str, Any]]:
    out = {}
    for line in read_lines(client, batch.output_file_id):
        assert_schema("BatchRequestOutput", line)
        out[line["custom_id"]] = line["response"]["body"]
    return out


@pytest.mark.parametrize("output_format", ["png", "webp", "gif", "jpeg", "svg"])
def test_gpt_image_lines_answer_n_valid_images_in_the_asked_format(
    client: openai.OpenAI, emulator: EmulatorServer, output_format: str
) -> None:
    records = [
        _line("a", GENERATIONS, model="gpt-image-2", prompt="a red fox", n=3, output_format=output_format),
        _line("b", GENERATIONS, model="gpt-image-2", prompt="a blue bird", output_format=output_format),
    ]
    batch = _run(client, emulator, records, GENERATIONS)
    assert batch.status == "completed" and batch.model == "gpt-image-2"
    bodies = _bodies(client, batch)
    assert sorted(bodies) == ["a", "b"]
    images: list[bytes] = []
    for custom_id, count in (("a", 3), ("b", 1)):
        parsed = ImagesResponse.model_validate(bodies[custom_id])
        assert parsed.output_format == output_format and parsed.usage is not None
        assert parsed.data is not None and len(parsed.data) == count
        for item in parsed.data:
            assert item.url is None and item.b64_json
            data = base64.b64decode(item.b64_json, validate=True)
            assert_valid_image(data, output_format)
            images.append(data)
    if output_format != "jpeg":  # the JPEG is one grey block; the others take each image's colour
        assert len(set(images)) == len(images)
    if output_format == "png":
        assert {png_size(image) for image in images} == {(8, 8)}


def test_image_batches_are_deterministic(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    records = [_line("a", GENERATIONS, model="gpt-image-1.5", prompt="x", n=2)]
    first = _bodies(client, _run(client, emulator, records, GENERATIONS))["a"]["data"]
    second = _bodies(client, _run(client, emulator, records, GENERATIONS))["a"]["data"]
    assert first == second


def test_legacy_response_format_url_answers_urls_but_gpt_image_models_stay_base64(
    client: openai.OpenAI, emulator: EmulatorServer
) -> None:
    records = [
        _line("legacy", GENERATIONS, model="dall-e-3", prompt="a cat", n=2, response_format="url"),
        _line("gpt", GENERATIONS, model="gpt-image-1-mini", prompt="a cat", response_format="url"),
    ]
    # One model per batch: two batches.
    legacy = _bodies(client, _run(client, emulator, records[:1], GENERATIONS))["legacy"]
    gpt = _bodies(client, _run(client, emulator, records[1:], GENERATIONS))["gpt"]
    parsed = ImagesResponse.model_validate(legacy)
    assert parsed.data is not None and [bool(i.url and not i.b64_json) for i in parsed.data] == [True, True]
    assert all(i.revised_prompt == "a cat" for i in parsed.data)
    assert parsed.usage is None  # DALL-E reported no tokens
    assert "b64_json" in gpt["data"][0] and "url" not in gpt["data"][0]
    png_size(base64.b64decode(gpt["data"][0]["b64_json"]))


def test_edits_count_input_images_and_batch_usage_sums_the_lines(
    client: openai.OpenAI, emulator: EmulatorServer
) -> None:
    records = [
        _line(
            f"e{i}",
            EDITS,
            model="gpt-image-2",
            prompt="make it blue",
            images=[{"image_url": "https://example.com/a.png"}] * (i + 1),
            quality="low",
            n=i + 1,
        )
        for i in range(3)
    ]
    batch = _run(client, emulator, records, EDITS)
    bodies = _bodies(client, batch)
    usages = [ImagesResponse.model_validate(b).usage for b in bodies.values()]
    assert all(u is not None for u in usages)
    assert [bodies[f"e{i}"]["usage"]["output_tokens"] for i in range(3)] == [272, 544, 816]
    assert [bodies[f"e{i}"]["usage"]["input_tokens_details"]["image_tokens"] for i in range(3)] == [
        65,
        130,
        195,
    ]
    assert batch.usage is not None
    assert batch.usage.input_tokens == sum(u.input_tokens for u in usages if u)
    assert batch.usage.output_tokens == sum(u.output_tokens for u in usages if u) == 1632
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens


def test_image_lines_without_a_model_fail_validation(client: openai.OpenAI, emulator: EmulatorServer) -> None:
    batch = _run(client, emulator, [_line("a", GENERATIONS, prompt="x")], GENERATIONS)
    assert batch.status == "failed" and batch.errors is not None and batch.errors.data
    error = batch.errors.data[0]
    assert error.code == "missing_required_parameter" and error.param == "body.model" and error.line == 1


def test_batch_reports_model_and_usage_summed_from_its_lines(
    client: openai.OpenAI, emulator: EmulatorServer
) -> None:
    records = [chat_line(f"r{i}", f"question number {i}", model="o4-mini") for i in range(6)]
    created = client.batches.create(
        input_file_id=upload(client, records), endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert created.model is None  # not known before validation
    emulator.advance(3600)
    raw = client.batches.with_raw_response.retrieve(created.id)
    assert_schema("Batch", raw.http_response.json())
    batch = raw.parse()
    assert batch.model == "o4-mini" and batch.usage is not None
    lines = [line["response"]["body"]["usage"] for line in read_lines(client, batch.output_file_id)]
    assert len(lines) == 6
    assert batch.usage.input_tokens == sum(u["prompt_tokens"] for u in lines)
    assert batch.usage.output_tokens == sum(u["completion_tokens"] for u in lines)
    reasoning = sum(u["completion_tokens_details"]["reasoning_tokens"] for u in lines)
    assert batch.usage.output_tokens_details.reasoning_tokens == reasoning > 0
    assert batch.usage.input_tokens_details.cached_tokens == sum(
        u["prompt_tokens_details"]["cached_tokens"] for u in lines
    )
    assert batch.usage.total_tokens == sum(u["total_tokens"] for u in lines)


@pytest.mark.parametrize("endpoint", ["/v1/videos", "/videos"])
def test_videos_endpoint_is_refused_as_openai_refuses_it_since_the_shutdown(
    client: openai.OpenAI, emulator: EmulatorServer, endpoint: str
) -> None:
    file_id = upload(client, [_line("v", "/v1/videos", model="sora-2", prompt="waves")])
    with pytest.raises(openai.BadRequestError, match="Videos API shut down on September 24, 2026") as caught:
        client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    assert caught.value.param == "endpoint"
    assert emulator.stats()["batches"] == 0


def _embedding_lines(prefix: str, n: int) -> list[dict[str, Any]]:
    return [
        _line(f"{prefix}{i}", "/v1/embeddings", model="text-embedding-3-small", input="x") for i in range(n)
    ]


def test_enqueued_request_limit_fails_the_batch_over_it(
    client: openai.OpenAI, emulator: EmulatorServer
) -> None:
    emulator.configure(rate=1, enqueued_request_limit=5)
    first = client.batches.create(
        input_file_id=upload(client, _embedding_lines("a", 4)),
        endpoint="/v1/embeddings",
        completion_window="24h",
    )
    second = client.batches.create(
        input_file_id=upload(client, _embedding_lines("b", 2)),
        endpoint="/v1/embeddings",
        completion_window="24h",
    )
    emulator.advance(1)
    assert client.batches.retrieve(first.id).status == "in_progress"
    refused = client.batches.retrieve(second.id)
    assert refused.status == "failed" and refused.errors is not None and refused.errors.data
    error = refused.errors.data[0]
    assert error.code == "request_limit_exceeded"
    assert error.message is not None and error.message.startswith("Enqueued request limit reached")
    # Once the first is done, the same input fits.
    emulator.advance(10)
    again = client.batches.create(
        input_file_id=refused.input_file_id, endpoint="/v1/embeddings", completion_window="24h"
    )
    emulator.advance(1)
    assert client.batches.retrieve(again.id).status in ("in_progress", "finalizing", "completed")


def test_enqueued_request_limit_reject_mode_refuses_the_create(
    client: openai.OpenAI, emulator: EmulatorServer
) -> None:
    emulator.configure(rate=1, enqueued_request_limit=3, token_limit_mode="reject")
    client.batches.create(
        input_file_id=upload(client, _embedding_lines("a", 3)),
        endpoint="/v1/embeddings",
        completion_window="24h",
    )
    with pytest.raises(openai.BadRequestError, match="Enqueued request limit reached") as caught:
        client.batches.create(
            input_file_id=upload(client, _embedding_lines("b", 1)),
            endpoint="/v1/embeddings",
            completion_window="24h",
        )
    assert caught.value.code == "request_limit_exceeded"
