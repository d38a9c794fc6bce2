"""Deterministic fake response bodies, shaped like the real API, for every Batch endpoint.

Token accounting (documented because client-side estimates are compared against it):

* prompt tokens = ``ceil(n / 4)`` where ``n`` is the number of characters (``len`` of the Python
  str) of all the request's text joined together: chat ``messages[].content`` (strings, or the
  ``text`` of content parts), responses ``instructions`` + ``input`` (string, or the
  ``content``/``text`` of its items), completions ``prompt``, embeddings/moderations ``input``
  (strings; a token-id array counts one token per id). Chat adds OpenAI's message framing: 3 tokens
  per message and 3 to prime the reply (as OpenAI's own token-counting guide does for the gpt-4o
  family). Chat and responses also count what OpenAI puts in front of the model besides the messages:
  the JSON text of the requested format (chat ``response_format`` of type ``json_schema``, responses
  ``text.format``) and of the ``tools``, ``ceil(n / 4)`` of its characters. Names and other fields
  are not counted.
* images (GPT image models): the prompt as above plus :data:`IMAGE_INPUT_TOKENS` per input image of an
  edit; output :data:`IMAGE_OUTPUT_TOKENS` per image by ``quality``, times ``n``. Other image models
  (DALL-E, retired) report no usage.
* output tokens are deterministic, pseudo-random in [8, 40) per (seed, custom_id), capped by
  ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` (then ``finish_reason`` is
  ``length``), times ``n`` choices; reasoning models (``o1``/``o3``/``o4``/``gpt-5``...) add
  reasoning tokens, counted in the output tokens as OpenAI does. Embeddings and moderations have
  no output tokens.
* cached prompt tokens are 0 unless the ``cached_prompt_rate`` knob is set: then that share of the chat,
  responses and completions lines whose prompt has 1,024 tokens or more (OpenAI's threshold) report their
  prompt cached up to its last whole step of 128 tokens, as OpenAI caches prefixes.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from .images import ENCODERS
from .patterns import sample_pattern

ENDPOINT_CHAT = "/v1/chat/completions"
ENDPOINT_RESPONSES = "/v1/responses"
ENDPOINT_COMPLETIONS = "/v1/completions"
ENDPOINT_EMBEDDINGS = "/v1/embeddings"
ENDPOINT_MODERATIONS = "/v1/moderations"
ENDPOINT_IMAGES_GENERATIONS = "/v1/images/generations"
ENDPOINT_IMAGES_EDITS = "/v1/images/edits"
IMAGE_ENDPOINTS = frozenset({ENDPOINT_IMAGES_GENERATIONS, ENDPOINT_IMAGES_EDITS})

#: The endpoints ``batches.create`` accepts (OpenAI's list).
BATCH_ENDPOINTS: tuple[str, ...] = (
    ENDPOINT_RESPONSES,
    ENDPOINT_CHAT,
    ENDPOINT_EMBEDDINGS,
    ENDPOINT_COMPLETIONS,
    ENDPOINT_MODERATIONS,
    ENDPOINT_IMAGES_GENERATIONS,
    ENDPOINT_IMAGES_EDITS,
)

#: Endpoints the Batch API no longer accepts, with the reason it gives.
RETIRED_ENDPOINTS: dict[str, str] = {
    "/v1/videos": "The Videos API shut down on September 24, 2026. Batch creation no longer accepts "
    "'/v1/videos'.",
}

#: Endpoints whose request body must name a model (the others have a server-side default). The image
#: endpoints' old default (dall-e-2) is retired: OpenAI asks for an explicit GPT image model.
MODEL_REQUIRED: frozenset[str] = frozenset(
    {ENDPOINT_CHAT, ENDPOINT_RESPONSES, ENDPOINT_COMPLETIONS, ENDPOINT_EMBEDDINGS, *IMAGE_ENDPOINTS}
)

DEFAULT_MODELS: dict[str, str] = {
    ENDPOINT_MODERATIONS: "omni-moderation-latest",
}

#: Output tokens of one generated image by ``quality`` (OpenAI's figures for a 1024x1024 image).
IMAGE_OUTPUT_TOKENS: dict[str, int] = {"low": 272, "medium": 1056, "high": 4160}
#: Input tokens of one input image of an edit (a flat figure: the emulator never looks at the image).
IMAGE_INPUT_TOKENS = 65
_GPT_IMAGE_MODEL = re.compile(r"^(gpt-image|chatgpt-image)")

_REASONING_MODEL = re.compile(r"^(o\d|gpt-5)")

MODERATION_CATEGORIES: dict[str, list[str]] = {
    "harassment": ["text"],
    "harassment/threatening": ["text"],
    "hate": ["text"],
    "hate/threatening": ["text"],
    "illicit": ["text"],
    "illicit/violent": ["text"],
    "self-harm": ["text"],
    "self-harm/instructions": ["text"],
    "self-harm/intent": ["text"],
    "sexual": ["text"],
    "sexual/minors": ["text"],
    "violence": ["text"],
    "violence/graphic": ["text"],
}


def canonical_endpoint(endpoint: str) -> str:
    """``/chat/completions`` (Azure's older form) -> ``/v1/chat/completions``."""
    return endpoint if endpoint.startswith("/v1/") else "/v1" + endpoint


def _key(parts: tuple[object, ...]) -> bytes:
    return "\x1f".join(map(str, parts)).encode()


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that is the same in every process (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(_key(parts), digest_size=8).digest(), "big")


def stable_hex(length: int, *parts: object) -> str:
    """Deterministic lowercase hex string of ``length`` (<= 128) characters."""
    return hashlib.blake2b(_key(parts), digest_size=(length + 1) // 2).hexdigest()[:length]


def unit_float(*parts: object) -> float:
    """Deterministic float in [0, 1)."""
    return stable_hash(*parts) / 2**64


# --------------------------------------------------------------------------- text and tokens


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    pieces.append(text)
        return "".join(pieces)
    return ""


def _input_items_text(value: Any) -> str:
    """Text of a responses/moderations/embeddings ``input``: a string or a list of items/strings."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        pieces = []
        for item in value:
            if isinstance(item, str):
                pieces.append(item)
            elif isinstance(item, dict):
                if "content" in item:
                    pieces.append(_content_text(item["content"]))
                elif isinstance(item.get("text"), str):
                    pieces.append(item["text"])
        return "".join(pieces)
    return ""


def request_text(endpoint: str, body: dict[str, Any]) -> str:
    """All the text of a request that counts as prompt (see the module docstring)."""
    endpoint = canonical_endpoint(endpoint)
    if endpoint == ENDPOINT_CHAT:
        messages = body.get("messages")
        if isinstance(messages, list):
            return "".join(_content_text(m.get("content")) for m in messages if isinstance(m, dict))
        return ""
    if endpoint == ENDPOINT_RESPONSES:
        instructions = body.get("instructions")
        prefix = instructions if isinstance(instructions, str) else ""
        return prefix + _input_items_text(body.get("input"))
    if endpoint == ENDPOINT_COMPLETIONS:
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            return "".join(p for p in prompt if isinstance(p, str))
        return prompt if isinstance(prompt, str) else ""
    if endpoint in (ENDPOINT_EMBEDDINGS, ENDPOINT_MODERATIONS):
        return _input_items_text(body.get("input"))
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def _definition_tokens(endpoint: str, body: dict[str, Any]) -> int:
    """Prompt tokens of a request's output format (a JSON schema) and tool definitions: OpenAI bills
    them as input, since the model reads them with the prompt."""
    if endpoint == ENDPOINT_CHAT:
        fmt = body.get("response_format")
    else:
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
    parts = [fmt if isinstance(fmt, dict) and fmt.get("type") == "json_schema" else None, body.get("tools")]
    return sum(math.ceil(len(orjson.dumps(part)) / 4) for part in parts if part)


def _token_id_count(value: Any) -> int:
    """Tokens given as ids (embeddings/completions accept int arrays)."""
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return len(value)
        return sum(len(v) for v in value if isinstance(v, list) and all(isinstance(x, int) for x in v))
    return 0


def estimate_prompt_tokens(endpoint: str, body: dict[str, Any]) -> int:
    """``ceil(len(text) / 4)`` of :func:`request_text`, plus one token per given token id, plus the
    chat message framing."""
    endpoint = canonical_endpoint(endpoint)
    tokens = math.ceil(len(request_text(endpoint, body)) / 4)
    if endpoint in (ENDPOINT_CHAT, ENDPOINT_RESPONSES):
        tokens += _definition_tokens(endpoint, body)
    if endpoint == ENDPOINT_CHAT:
        messages = body.get("messages")
        tokens += 3 * (len(messages) if isinstance(messages, list) else 0) + 3
    elif endpoint == ENDPOINT_EMBEDDINGS:
        tokens += _token_id_count(body.get("input"))
    elif endpoint == ENDPOINT_COMPLETIONS:
        tokens += _token_id_count(body.get("prompt"))
    return tokens


def embedding_inputs(body: dict[str, Any]) -> list[Any]:
    """The separate inputs of an embeddings request (one vector each)."""
    value = body.get("input")
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return [value]  # a single input given as token ids
        return value
    return [value]


@dataclass(frozen=True)
class LineUsage:
    """Token usage of one processed request line."""

    input_tokens: int
    output_tokens: int  # includes reasoning tokens
    reasoning_tokens: int
    cached_tokens: int = 0
    truncated: bool = False  # output capped by a max-tokens field

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


#: OpenAI caches prompts of this many tokens or more, in steps of :data:`CACHE_STEP_TOKENS`.
CACHE_MIN_TOKENS = 1024
CACHE_STEP_TOKENS = 128


def line_usage(
    endpoint: str, body: dict[str, Any], custom_id: str, seed: int, cached_prompt_rate: float = 0.0
) -> LineUsage:
    """Deterministic usage of one line (see the module docstring).

    :param cached_prompt_rate: share of the lines with a prompt of :data:`CACHE_MIN_TOKENS` or more whose
        prompt is read from the cache, as far as the last whole step of :data:`CACHE_STEP_TOKENS`.
    """
    endpoint = canonical_endpoint(endpoint)
    prompt = estimate_prompt_tokens(endpoint, body)
    if endpoint in (ENDPOINT_EMBEDDINGS, ENDPOINT_MODERATIONS):
        return LineUsage(prompt, 0, 0)
    if endpoint in IMAGE_ENDPOINTS:
        return _image_usage(body, prompt)
    visible = 8 + stable_hash(seed, custom_id, "out") % 32
    cap = None
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and value > 0:
            cap = value
            break
    truncated = cap is not None and visible > cap
    if truncated:
        visible = cap  # type: ignore[assignment]
    model = body.get("model")
    reasoning = 0
    if isinstance(model, str) and _REASONING_MODEL.match(model):
        reasoning = 16 + stable_hash(seed, custom_id, "reasoning") % 48
    n = body.get("n") if endpoint in (ENDPOINT_CHAT, ENDPOINT_COMPLETIONS) else 1
    n = n if isinstance(n, int) and 1 <= n <= 128 else 1
    cached = 0
    if prompt >= CACHE_MIN_TOKENS and unit_float(seed, custom_id, "cached") < cached_prompt_rate:
        cached = prompt // CACHE_STEP_TOKENS * CACHE_STEP_TOKENS
    return LineUsage(prompt, (visible + reasoning) * n, reasoning * n, cached, truncated=truncated)


# --------------------------------------------------------------------------- JSON schema instances


def instance_for_schema(schema: Any, salt: str, root: Any = None, depth: int = 0) -> Any:
    """A JSON value that fits a (simple) JSON schema, best effort, deterministic in ``salt``.

    Handles ``$ref`` into ``$defs``/``definitions``, ``const``, ``enum``, ``anyOf``/``oneOf``/
    ``allOf`` (first usable branch), objects (every property), arrays (``minItems`` or one item),
    strings (``minLength``/``maxLength``, ``pattern``, strict mode's formats), numbers and integers
    (bounds, ``multipleOf``), booleans and null.
    """
    root = schema if root is None else root
    if depth > 12 or not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        target: Any = root
        for part in str(schema["$ref"]).lstrip("#/").split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return instance_for_schema(target, salt, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        options = schema["enum"]
        return options[stable_hash(salt, "enum") % len(options)]
    for key in ("anyOf", "oneOf", "allOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            usable = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
            return instance_for_schema((usable or branches)[0], salt, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        return {
            name: instance_for_schema(sub, f"{salt}.{name}", root, depth + 1) for name, sub in props.items()
        }
    if kind == "array":
        min_items = schema.get("minItems")
        count = min_items if isinstance(min_items, int) and min_items > 0 else 1
        if schema.get("maxItems") == 0:
            count = 0
        items = schema.get("items", {})
        return [instance_for_schema(items, f"{salt}[{i}]", root, depth + 1) for i in range(count)]
    if kind == "integer":
        low = schema.get("minimum")
        if low is None:
            low = math.floor(schema["exclusiveMinimum"]) + 1 if "exclusiveMinimum" in schema else 0
        high = schema.get("maximum")
        if high is None:
            high = math.ceil(schema["exclusiveMaximum"]) - 1 if "exclusiveMaximum" in schema else low + 100
        low, high = math.ceil(low), math.floor(high)
        step = schema.get("multipleOf")
        if isinstance(step, int) and step > 0:
            first = math.ceil(low / step) * step
            if high < first:
                return first
            return first + step * (stable_hash(salt) % ((high - first) // step + 1))
        return low + stable_hash(salt) % (high - low + 1) if high >= low else low
    if kind == "number":
        return _number_for_schema(schema, salt)
    if kind == "boolean":
        return bool(stable_hash(salt) & 1)
    if kind == "null":
        return None
    fmt = schema.get("format")
    if fmt in _FORMAT_SAMPLES:
        return _FORMAT_SAMPLES[fmt]
    if fmt == "uuid":
        return str(uuid.UUID(stable_hex(32, salt)))
    if isinstance(schema.get("pattern"), str):
        counter = iter(range(1, 1 << 30))
        sampled = sample_pattern(schema["pattern"], lambda n: stable_hash(salt, next(counter)) % n)
        if sampled is not None:
            return sampled
    text = f"value-{stable_hex(8, salt)}"
    min_len = int(schema.get("minLength", 0) or 0)
    if len(text) < min_len:
        text = text + "x" * (min_len - len(text))
    max_len = schema.get("maxLength")
    if isinstance(max_len, int):
        text = text[:max_len]
    return text


#: A value of each string format strict mode supports (and two more), all valid.
_FORMAT_SAMPLES: dict[str, str] = {
    "date-time": "2025-01-01T00:00:00Z",
    "date": "2025-01-01",
    "time": "12:00:00Z",
    "duration": "P1D",
    "email": "user@example.com",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "uri": "https://example.com/",
    "url": "https://example.com/",
}


def _number_for_schema(schema: dict[str, Any], salt: str) -> float:
    """A number within the schema's bounds (inclusive or exclusive), a multiple of ``multipleOf``."""
    low = schema.get("minimum", schema.get("exclusiveMinimum", 0.0))
    high = schema.get("maximum", schema.get("exclusiveMaximum", float(low) + 1.0))
    low, high = float(low), float(high)
    step = schema.get("multipleOf")
    if isinstance(step, (int, float)) and step > 0:
        first = math.floor(low / step) + 1 if "exclusiveMinimum" in schema else math.ceil(low / step)
        last = math.ceil(high / step) - 1 if "exclusiveMaximum" in schema else math.floor(high / step)
        count = max(last - first + 1, 1)
        return (first + stable_hash(salt) % count) * step
    value = round(low + (high - low) * unit_float(salt), 4)
    if value <= low and "exclusiveMinimum" in schema:
        value = (low + high) / 2
    if value >= high and "exclusiveMaximum" in schema:
        value = (low + high) / 2
    return value


# --------------------------------------------------------------------------- bodies


def _snippet(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reply_text(endpoint: str, body: dict[str, Any], custom_id: str, seed: int) -> str:
    text = request_text(endpoint, body)
    digest = stable_hex(8, seed, custom_id, text)
    return f"Emulated reply to {_snippet(text)!r} [{digest}]"


def _json_schema_of_chat(body: dict[str, Any]) -> tuple[bool, Any]:
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema") or {}
            return True, spec.get("schema") if isinstance(spec, dict) else {}
        if fmt.get("type") == "json_object":
            return True, None
    return False, None


def _json_schema_of_responses(body: dict[str, Any]) -> tuple[bool, Any]:
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_schema":
            return True, fmt.get("schema")
        if fmt.get("type") == "json_object":
            return True, None
    return False, None


def _structured_text(schema: Any, salt: str, reply: str) -> str:
    value = instance_for_schema(schema, salt) if isinstance(schema, dict) and schema else {"result": reply}
    return orjson.dumps(value).decode()


def _forced_function(body: dict[str, Any], chat: bool) -> dict[str, Any] | None:
    """The function tool the request forces the model to call, if any (``tool_choice``)."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    if not tools:
        return None
    choice = body.get("tool_choice")
    wanted = None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name") if chat else choice.get("name")
    elif choice != "required":
        return None
    for tool in tools:
        spec = tool.get("function", {}) if chat else tool
        if wanted is None or spec.get("name") == wanted:
            return spec
    return None


def _chat_body(body, custom_id, seed, usage: LineUsage, created: int) -> dict[str, Any]:
    model = body.get("model")
    reply = _reply_text(ENDPOINT_CHAT, body, custom_id, seed)
    structured, schema = _json_schema_of_chat(body)
    function = _forced_function(body, chat=True)
    n = body.get("n") if isinstance(body.get("n"), int) and 1 <= body["n"] <= 128 else 1
    choices = []
    for index in range(n):
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None, "annotations": []}
        finish = "length" if usage.truncated else "stop"
        if function is not None:
            arguments = instance_for_schema(function.get("parameters") or {}, f"{custom_id}:{index}")
            message["tool_calls"] = [
                {
                    "id": "call_" + stable_hex(24, seed, custom_id, index, "call"),
                    "type": "function",
                    "function": {
                        "name": function.get("name", "function"),
                        "arguments": orjson.dumps(arguments).decode(),
                    },
                }
            ]
            finish = "tool_calls"
        elif structured:
            message["content"] = _structured_text(schema, f"{custom_id}:{index}", reply)
        else:
            message["content"] = reply if index == 0 else f"{reply} (choice {index})"
        choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": finish})
    return {
        "id": "chatcmpl-" + stable_hex(29, seed, custom_id, "chat"),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": usage.input_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": usage.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_emulator",
    }


def _responses_body(body, custom_id, seed, usage: LineUsage, created: int) -> dict[str, Any]:
    reply = _reply_text(ENDPOINT_RESPONSES, body, custom_id, seed)
    structured, schema = _json_schema_of_responses(body)
    function = _forced_function(body, chat=False)
    output: list[dict[str, Any]] = []
    if usage.reasoning_tokens:
        output.append(
            {"type": "reasoning", "id": "rs_" + stable_hex(32, seed, custom_id, "rs"), "summary": []}
        )
    if function is not None:
        arguments = instance_for_schema(function.get("parameters") or {}, custom_id)
        output.append(
            {
                "type": "function_call",
                "id": "fc_" + stable_hex(32, seed, custom_id, "fc"),
                "call_id": "call_" + stable_hex(24, seed, custom_id, "call"),
                "name": function.get("name", "function"),
                "arguments": orjson.dumps(arguments).decode(),
                "status": "completed",
            }
        )
    else:
        text = _structured_text(schema, custom_id, reply) if structured else reply
        output.append(
            {
                "type": "message",
                "id": "msg_" + stable_hex(32, seed, custom_id, "msg"),
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
            }
        )
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    return {
        "id": "resp_" + stable_hex(32, seed, custom_id, "resp"),
        "object": "response",
        "created_at": created,
        "status": "incomplete" if usage.truncated else "completed",
        "completed_at": created,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if usage.truncated else None,
        "instructions": body.get("instructions") if isinstance(body.get("instructions"), str) else None,
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body.get("model"),
        "output": output,
        "parallel_tool_calls": bool(body.get("parallel_tool_calls", True)),
        "previous_response_id": None,
        "temperature": 1.0,
        "tool_choice": body.get("tool_choice", "auto") if tools else "auto",
        "tools": tools,
        "top_p": 1.0,
        "truncation": "disabled",
        "metadata": {},
        "usage": {
            "input_tokens": usage.input_tokens,
            # cache_write_tokens: required by the current SDK model of responses usage.
            "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": usage.output_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.total_tokens,
        },
    }


def _completions_body(body, custom_id, seed, usage: LineUsage, created: int) -> dict[str, Any]:
    reply = _reply_text(ENDPOINT_COMPLETIONS, body, custom_id, seed)
    n = body.get("n") if isinstance(body.get("n"), int) and 1 <= body["n"] <= 128 else 1
    return {
        "id": "cmpl-" + stable_hex(29, seed, custom_id, "cmpl"),
        "object": "text_completion",
        "created": created,
        "model": body.get("model"),
        "choices": [
            {
                "text": reply if i == 0 else f"{reply} (choice {i})",
                "index": i,
                "logprobs": None,
                "finish_reason": "length" if usage.truncated else "stop",
            }
            for i in range(n)
        ],
        "usage": {
            "prompt_tokens": usage.input_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
        },
        "system_fingerprint": "fp_emulator",
    }


def embedding_vector(item: Any, dims: int, seed: int) -> list[float]:
    """A deterministic unit vector for one embedding input."""
    key = orjson.dumps(item).decode()
    raw = [unit_float(seed, key, i) * 2.0 - 1.0 for i in range(dims)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def _embeddings_body(body, custom_id, seed, usage: LineUsage, created: int) -> dict[str, Any]:
    dims = body.get("dimensions")
    dims = dims if isinstance(dims, int) and 1 <= dims <= 4096 else 8
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(embedding_inputs(body)):
        vector = embedding_vector(item, dims, seed)
        encoded: Any = vector
        if as_base64:
            encoded = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": body.get("model"),
        "usage": {"prompt_tokens": usage.input_tokens, "total_tokens": usage.input_tokens},
    }


def _moderations_body(body, custom_id, seed, usage: LineUsage, created: int) -> dict[str, Any]:
    value = body.get("input")
    # A list of strings is one result per string; a list of multimodal parts is a single input.
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        inputs: list[Any] = list(value)
    else:
        inputs = [value]
    results = []
    for item in inputs:
        key = orjson.dumps(item).decode()
        scores = {name: round(unit_float(seed, key, name) * 0.01, 6) for name in MODERATION_CATEGORIES}
        results.append(
            {
                "flagged": False,
                "categories": dict.fromkeys(MODERATION_CATEGORIES, False),
                "category_scores": scores,
                "category_applied_input_types": {k: list(v) for k, v in MODERATION_CATEGORIES.items()},
            }
        )
    return {
        "id": "modr-" + stable_hex(32, seed, custom_id, "modr"),
        "model": body.get("model") or DEFAULT_MODELS[ENDPOINT_MODERATIONS],
        "results": results,
    }


def _image_count(body: dict[str, Any]) -> int:
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 10 else 1


def _input_image_count(body: dict[str, Any]) -> int:
    """Input images of an edit (in a batch line they are given by URL or file id, one or a list)."""
    images = body.get("images", body.get("image"))
    if isinstance(images, list):
        return len(images)
    return 1 if images else 0


def _image_usage(body: dict[str, Any], prompt: int) -> LineUsage:
    model = body.get("model")
    if not (isinstance(model, str) and _GPT_IMAGE_MODEL.match(model)):
        return LineUsage(0, 0, 0)  # DALL-E models were priced per image and reported no tokens
    quality = body.get("quality")
    per_image = IMAGE_OUTPUT_TOKENS.get(
        quality if isinstance(quality, str) else "", IMAGE_OUTPUT_TOKENS["medium"]
    )
    image_input = IMAGE_INPUT_TOKENS * _input_image_count(body)  # only edits have input images
    return LineUsage(prompt + image_input, per_image * _image_count(body), 0)


def _image_colour(seed: int, custom_id: str, index: int) -> tuple[int, int, int, int]:
    red, green, blue = stable_hash(seed, custom_id, index, "colour").to_bytes(8, "big")[:3]
    return red, green, blue, 255


def _images_body(body, custom_id, seed, usage: LineUsage, created: int) -> dict[str, Any]:
    """An ImagesResponse: ``n`` tiny images (see :mod:`.images`) as ``b64_json``, or as ``url`` when a
    legacy model was asked for ``response_format: url``; GPT image models add usage and output_format."""
    model = body.get("model")
    gpt_image = isinstance(model, str) and bool(_GPT_IMAGE_MODEL.match(model))
    output_format = body.get("output_format") if gpt_image else "png"
    if output_format not in ENCODERS:
        output_format = "png"
    as_url = body.get("response_format") == "url" and not gpt_image  # GPT image models: always base64
    data: list[dict[str, Any]] = []
    for index in range(_image_count(body)):
        if as_url:
            name = stable_hex(24, seed, custom_id, index, "image")
            item: dict[str, Any] = {"url": f"https://images.emulator.invalid/{name}.png"}
        else:
            image = ENCODERS[output_format](_image_colour(seed, custom_id, index))
            item = {"b64_json": base64.b64encode(image).decode()}
        if model == "dall-e-3":
            item["revised_prompt"] = body.get("prompt")
        data.append(item)
    out: dict[str, Any] = {"created": created, "data": data}
    if gpt_image:
        image_tokens = IMAGE_INPUT_TOKENS * _input_image_count(body)
        out["output_format"] = output_format
        out["usage"] = {
            "input_tokens": usage.input_tokens,
            "input_tokens_details": {
                "text_tokens": usage.input_tokens - image_tokens,
                "image_tokens": image_tokens,
            },
            "output_tokens": usage.output_tokens,
            "output_tokens_details": {"image_tokens": usage.output_tokens, "text_tokens": 0},
            "total_tokens": usage.total_tokens,
        }
    return out


_BUILDERS = {
    ENDPOINT_CHAT: _chat_body,
    ENDPOINT_RESPONSES: _responses_body,
    ENDPOINT_COMPLETIONS: _completions_body,
    ENDPOINT_EMBEDDINGS: _embeddings_body,
    ENDPOINT_MODERATIONS: _moderations_body,
    ENDPOINT_IMAGES_GENERATIONS: _images_body,
    ENDPOINT_IMAGES_EDITS: _images_body,
}


def response_body(
    endpoint: str, body: dict[str, Any], custom_id: str, seed: int, usage: LineUsage, created: int
) -> dict[str, Any]:
    """The successful response body of one request line."""
    return _BUILDERS[canonical_endpoint(endpoint)](body, custom_id, seed, usage, created)


# --------------------------------------------------------------------------- per-line failures

#: Outcome of a line: 0 = success, 1 = HTTP 400, 2 = HTTP 500, 3 = non-HTTP error, 4 = HTTP 429, 5 = 503.
SUCCESS, HTTP_400, HTTP_500, NON_HTTP, HTTP_429, HTTP_503 = 0, 1, 2, 3, 4, 5
#: The outcome of each kind of ``failure_kinds``.
FAILURE_KIND_OUTCOMES = {
    "400": HTTP_400,
    "429": HTTP_429,
    "500": HTTP_500,
    "503": HTTP_503,
    "internal": NON_HTTP,
}
#: The default mix: a quarter 400, a quarter 500, half non-HTTP errors.
_DEFAULT_KINDS = ("400", "500", "internal", "internal")


def line_outcome(
    seed: int, custom_id: str, failure_rate: float, attempt: int = 1, kinds: tuple[str, ...] | None = None
) -> int:
    """Whether (and how) a line fails: a pure function of seed, custom_id and, for a transient kind, the
    attempt.

    The kind is the line's own (picked by custom_id), so a line that fails fails the same way. A 400 is
    about the request: it fails at every attempt. Any other kind is transient: attempt 1 fails as the
    seed says, and each later attempt draws afresh (with the same rate), as real transient faults do.

    :param attempt: the line's attempt (1 for the first time its custom_id is processed).
    :param kinds: the kinds failing lines pick from (``None``: the default mix).
    """
    if failure_rate <= 0:
        return SUCCESS
    if attempt <= 1:
        if unit_float(seed, custom_id, "fail") >= failure_rate:
            return SUCCESS
        return _line_kind(seed, custom_id, kinds)
    outcome = _line_kind(seed, custom_id, kinds)
    draw = ("fail",) if outcome == HTTP_400 else ("fail", attempt)
    return outcome if unit_float(seed, custom_id, *draw) < failure_rate else SUCCESS


def is_transient(outcome: int) -> bool:
    """A failing outcome that a later attempt may not repeat (all but HTTP 400)."""
    return outcome not in (SUCCESS, HTTP_400)


def _line_kind(seed: int, custom_id: str, kinds: tuple[str, ...] | None) -> int:
    kinds = kinds or _DEFAULT_KINDS
    return FAILURE_KIND_OUTCOMES[kinds[stable_hash(seed, custom_id, "kind") % len(kinds)]]


def error_body(outcome: int) -> tuple[int, dict[str, Any]]:
    """Status code and body of an HTTP-error line."""
    if outcome == HTTP_400:
        return 400, {
            "error": {
                "message": "Emulated invalid request (injected by the emulator's failure_rate).",
                "type": "invalid_request_error",
                "param": None,
                "code": "emulated_invalid_request",
            }
        }
    if outcome == HTTP_429:
        return 429, {
            "error": {
                "message": "Rate limit reached for requests. Please try again later.",
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        }
    return 503 if outcome == HTTP_503 else 500, {
        "error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": "server_error",
        }
    }


NON_HTTP_ERROR = {
    "code": "internal_error",
    "message": "Emulated non-HTTP failure (injected by the emulator's failure_rate).",
}

EXPIRED_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
