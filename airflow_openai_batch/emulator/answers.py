"""Structured answers that go wrong: the emulator's knobs for invalid, refused, truncated and filtered
answers, applied to a response body already made.

A request is *structured* when it asks for a ``json_schema`` / ``json_object`` format (chat
``response_format``, responses ``text.format``) or forces a function call (``tool_choice``). Its
answer is valid by default (see :func:`~airflow_openai_batch.emulator.responses.instance_for_schema`);
for a share of them, decided per ``(seed, custom_id)``, :func:`shape_answer` makes it come back as
real models' answers sometimes do:

* ``invalid_json``: text that is not JSON (the object with a sentence before it);
* ``schema_miss``: JSON that does not fit the schema (a required property left out, else an extra one,
  else an array for an object);
* ``refusal``: chat ``message.refusal`` with no content / a responses ``refusal`` content part;
* ``truncated``: the text cut in the middle, chat ``finish_reason: "length"`` / responses ``incomplete``
  for ``max_output_tokens``;
* ``content_filter``: chat ``finish_reason: "content_filter"`` with no content / responses
  ``incomplete`` for ``content_filter``.

A request whose ``max_tokens`` cap cut its answer (see
:func:`~airflow_openai_batch.emulator.responses.line_usage`) is truncated the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .responses import ENDPOINT_CHAT, ENDPOINT_RESPONSES, canonical_endpoint, stable_hash, unit_float

#: The kinds of spoiled answers, in the order their shares are laid out on [0, 1).
ANSWER_FAULTS: tuple[str, ...] = ("invalid_json", "schema_miss", "refusal", "truncated", "content_filter")

REFUSAL_TEXT = "I'm sorry, but I can't help with that request."


@dataclass(frozen=True)
class AnswerFaults:
    """Shares of structured answers that come back spoiled (see the module docstring).

    :param invalid_json: share answered with text that is not JSON.
    :param schema_miss: share answered with JSON that does not fit the schema.
    :param refusal: share refused.
    :param truncated: share cut at the output token limit.
    :param content_filter: share stopped by the content filter.
    """

    invalid_json: float = 0.0
    schema_miss: float = 0.0
    refusal: float = 0.0
    truncated: float = 0.0
    content_filter: float = 0.0

    @classmethod
    def from_config(cls, config: Any) -> AnswerFaults:
        """The shares set by an :class:`~airflow_openai_batch.emulator.config.EmulatorConfig`."""
        return cls(*(getattr(config, f"answer_{name}_rate") for name in ANSWER_FAULTS))

    def pick(self, seed: int, custom_id: str) -> str | None:
        """The fault of one line's answer (``None``: a good answer), a pure function of seed and id."""
        shares = (self.invalid_json, self.schema_miss, self.refusal, self.truncated, self.content_filter)
        if not any(shares):
            return None
        point = unit_float(seed, custom_id, "answer")
        for name, share in zip(ANSWER_FAULTS, shares, strict=True):
            if point < share:
                return name
            point -= share
        return None


def _structured(endpoint: str, request: dict[str, Any]) -> tuple[bool, Any]:
    """Whether the request asks for structured output, and its JSON schema (``None`` for JSON mode)."""
    if endpoint == ENDPOINT_CHAT:
        fmt = request.get("response_format")
        spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
    else:
        text = request.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
        spec = fmt
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_schema", "json_object"):
        return False, None
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return True, schema if isinstance(schema, dict) else None


def shape_answer(
    endpoint: str,
    request: dict[str, Any],
    body: dict[str, Any],
    custom_id: str,
    seed: int,
    faults: AnswerFaults,
) -> dict[str, Any]:
    """Spoil the structured answer in ``body`` (in place) as ``faults`` decide; returns ``body``.

    :param endpoint: the batch endpoint.
    :param request: the request body.
    :param body: the response body made for it (chat completion or response).
    :param custom_id: the line's id (with ``seed``, it decides the fault).
    :param seed: the emulator's seed.
    :param faults: the shares of spoiled answers.
    """
    endpoint = canonical_endpoint(endpoint)
    if endpoint not in (ENDPOINT_CHAT, ENDPOINT_RESPONSES):
        return body
    structured, schema = _structured(endpoint, request)
    calls = _answer_calls(endpoint, body)
    if not structured and not calls:
        return body
    fault = faults.pick(seed, custom_id)
    if fault is None and _capped(endpoint, body):
        fault = "truncated"  # the max-tokens cap cut the answer: cut its text too
    if fault is None:
        return body
    tools = _function_parameters(endpoint, request)
    salt = f"{seed}:{custom_id}"
    if endpoint == ENDPOINT_CHAT:
        _shape_chat(body, fault, schema, tools, salt)
    else:
        _shape_responses(body, fault, schema, tools, salt)
    return body


def _function_parameters(endpoint: str, request: dict[str, Any]) -> dict[str, Any]:
    """Function name -> its ``parameters`` schema, from the request's tools."""
    out = {}
    for tool in request.get("tools") or ():
        if isinstance(tool, dict) and tool.get("type") == "function":
            spec = tool.get("function", {}) if endpoint == ENDPOINT_CHAT else tool
            if isinstance(spec, dict) and isinstance(spec.get("name"), str):
                out[spec["name"]] = spec.get("parameters")
    return out


def _answer_calls(endpoint: str, body: dict[str, Any]) -> bool:
    if endpoint == ENDPOINT_CHAT:
        return any(c["message"].get("tool_calls") for c in body["choices"])
    return any(item.get("type") == "function_call" for item in body["output"])


def _capped(endpoint: str, body: dict[str, Any]) -> bool:
    if endpoint == ENDPOINT_CHAT:
        return any(c["finish_reason"] == "length" for c in body["choices"])
    return body.get("status") == "incomplete"


def _spoiled_text(text: str, fault: str, schema: Any, salt: str) -> str:
    """The answer text for the faults that keep an answer text (invalid JSON, schema miss, truncated)."""
    if fault == "invalid_json":
        return "Here is the JSON you asked for: " + text
    if fault == "truncated":
        return text[: max(1, len(text) // 2)]
    value = orjson.loads(text)
    return orjson.dumps(_miss(value, schema, salt)).decode()


def _miss(value: Any, schema: Any, salt: str) -> Any:
    """A JSON value that ``schema`` (an object schema, or ``None`` for JSON mode) does not accept."""
    if isinstance(value, dict) and value:
        required = [k for k in (schema or {}).get("required") or () if k in value]
        if required:
            dropped = required[stable_hash(salt, "miss") % len(required)]
            return {k: v for k, v in value.items() if k != dropped}
        if isinstance(schema, dict) and schema.get("additionalProperties") is False:
            return {**value, "unexpected_field": True}
    return [value]  # an array where an object is expected


def _shape_chat(body: dict[str, Any], fault: str, schema: Any, tools: dict[str, Any], salt: str) -> None:
    for choice in body["choices"]:
        message = choice["message"]
        calls = message.get("tool_calls")
        if fault == "refusal":
            message.pop("tool_calls", None)
            message["content"], message["refusal"] = None, REFUSAL_TEXT
            choice["finish_reason"] = "stop"
        elif fault == "content_filter":
            message.pop("tool_calls", None)
            message["content"] = None
            choice["finish_reason"] = "content_filter"
        elif calls:
            function = calls[0]["function"]
            parameters = tools.get(function["name"])
            function["arguments"] = _spoiled_text(function["arguments"], fault, parameters, salt)
            choice["finish_reason"] = "length" if fault == "truncated" else "tool_calls"
        elif isinstance(message.get("content"), str):
            message["content"] = _spoiled_text(message["content"], fault, schema, salt)
            choice["finish_reason"] = "length" if fault == "truncated" else "stop"


def _shape_responses(body: dict[str, Any], fault: str, schema: Any, tools: dict[str, Any], salt: str) -> None:
    output = body["output"]
    kept = [item for item in output if item.get("type") == "reasoning"]
    answer = next((item for item in output if item.get("type") in ("message", "function_call")), None)
    if fault == "refusal":
        message_id = answer["id"] if answer is not None and answer["type"] == "message" else "msg_refusal"
        body["output"] = [
            *kept,
            {
                "type": "message",
                "id": message_id,
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "refusal", "refusal": REFUSAL_TEXT}],
            },
        ]
        body["status"], body["incomplete_details"] = "completed", None
        return
    if fault == "content_filter":
        body["output"] = kept
        body["status"], body["incomplete_details"] = "incomplete", {"reason": "content_filter"}
        return
    if answer is None:
        return
    if answer["type"] == "function_call":
        answer["arguments"] = _spoiled_text(answer["arguments"], fault, tools.get(answer["name"]), salt)
        if fault == "truncated":
            answer["status"] = "incomplete"
    else:
        part = answer["content"][0]
        part["text"] = _spoiled_text(part["text"], fault, schema, salt)
        if fault == "truncated":
            answer["status"] = "incomplete"
    if fault == "truncated":
        body["status"], body["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
    else:
        body["status"], body["incomplete_details"] = "completed", None
