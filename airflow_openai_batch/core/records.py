"""What a batch's answers hold, and the one place their records are made (no Airflow import).

- :func:`endpoint_kind` sorts an endpoint into a *kind* (``chat``, ``completions``, ``responses``,
  ``embeddings``, ``images``, ``other``).
- Each kind says, once, where its answer lives in a response body: a typed view of the body (a msgspec
  ``Struct`` naming only the fields read, so decoding skips everything else) and a function that turns
  that view into the success record's convenience fields (``content``, ``embedding``...). A new field or
  a new kind is one more ``Struct`` field and a line in its function (see :data:`_KINDS`).
- :class:`RecordBuilder` makes every success and failure record of one batch attempt, whichever path
  the line took through :mod:`airflow_openai_batch.core.reconcile`. For chat and responses it also
  reads the answer (``finish_reason``, ``tool_calls``, and for a request that asked for a format or
  offered tools, ``parsed`` or a failure: ``invalid_output``, ``refusal``, ``truncated``,
  ``content_filter``; see :mod:`airflow_openai_batch.core.schema`). For images it writes each base64
  image to a file (:mod:`airflow_openai_batch.core.media`) and records the files' URIs.

A body's JSON text is kept as it came (``msgspec.Raw``): a sink that only writes records out (see
:attr:`airflow_openai_batch.core.writers.RecordSink.takes_raw_json`) gets it as such and never pays for
parsing and re-serializing it.
"""

from __future__ import annotations

import array
import base64
import contextlib
import operator
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat
from typing import Any, Generic, TypeVar

import msgspec
import orjson

from airflow_openai_batch.core.media import MediaSink, write_images
from airflow_openai_batch.core.schema import (
    AnswerSchema,
    StructuredAnswer,
    classify_answer,
    responses_finish_reason,
)

__all__ = [
    "FailureColumns",
    "RecordBuilder",
    "SuccessColumns",
    "UsageColumns",
    "as_counts",
    "endpoint_kind",
    "error_fields",
    "extract_content",
    "usage_columns",
    "usage_counts",
    "usage_fields",
]

Raw = msgspec.Raw


def endpoint_kind(endpoint: str | None) -> str:
    """Classify a batch endpoint: ``chat``, ``completions``, ``responses``, ``embeddings``, ``images``
    (generations and edits) or ``other``.

    Accepts OpenAI's spelling (``/v1/chat/completions``) and Azure's older one (``/chat/completions``).

    :param endpoint: the endpoint or a request line's ``url``.
    """
    if not endpoint:
        return "other"
    path = endpoint.split("?", 1)[0].rstrip("/")
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/completions"):
        return "completions"
    if path.endswith("/responses"):
        return "responses"
    if path.endswith("/embeddings"):
        return "embeddings"
    if path.endswith(("/images/generations", "/images/edits")):
        return "images"
    return "other"


# -- typed views of response bodies -----------------------------------------------------------------------
# Fields typed ``Any`` take whatever the API sends (a shape it documents loosely); a field of the wrong
# type makes the whole view fail, and the answer's fields are then those of an empty body.
# ``gc=False``: a view holds decoded JSON only, so it can never be part of a reference cycle; left out of
# the collector's bookkeeping, the few views made per result line no longer trigger its collections
# (~10% of a collect's CPU).

_NULL = Raw(b"null")
_T = TypeVar("_T")


class _Body(msgspec.Struct, gc=False):
    """What every kind reads: the model that answered (prices go by it) and the token usage (as JSON
    text: it is written out as it is, and its counts are read by :func:`usage_fields`)."""

    model: Any = None
    usage: Raw = _NULL


class _Function(msgspec.Struct, gc=False):
    name: Any = None
    arguments: Any = None  # JSON text


class _ToolCall(msgspec.Struct, gc=False):
    function: _Function | None = None  # None for a tool call that is not a function's (custom tools)


class _Part(msgspec.Struct, gc=False):
    """A content part: its type and its text, or refusal (annotations, logprobs and the rest skipped: read
    as a dict, a part and its lists would be garbage-collected objects, several per answer)."""

    type: Any = None
    text: Any = None
    refusal: Any = None


#: Message content: a string, null, or a list of content parts (chat: some models; responses: always).
_Content = str | list[_Part] | None


class _Message(msgspec.Struct, gc=False):
    content: _Content = None
    refusal: Any = None
    tool_calls: list[_ToolCall] | None = None


class _ChatChoice(msgspec.Struct, gc=False):
    message: _Message | None = None
    finish_reason: Any = None


class _First(msgspec.Struct, Generic[_T], array_like=True, frozen=True, gc=False):
    """A JSON array read for its first element only: decoding skips the others and makes no list (a list
    per line is also a garbage collector allocation; a struct with ``gc=False`` is not)."""

    item: _T | None = None


class _ChatBody(_Body):
    choices: _First[_ChatChoice] = _First()


class _TextChoice(msgspec.Struct, gc=False):
    text: Any = None


class _CompletionsBody(_Body):
    choices: _First[_TextChoice] = _First()


class _OutputItem(msgspec.Struct, gc=False):
    type: Any = None
    content: _Content = None  # message items: a list of parts; reasoning items, tool calls...: no text
    name: Any = None  # function_call items: the function and its arguments (JSON text)
    arguments: Any = None


class _ResponsesBody(_Body):
    output: list[_OutputItem] = []
    status: Any = None
    incomplete_details: Any = None


class _EmbeddingItem(msgspec.Struct, gc=False):
    index: Any = None
    embedding: list[float] | str | None = None  # a list of floats, or base64 float32s


class _EmbeddingsBody(_Body):
    data: list[_EmbeddingItem] = []


def _parts_text(parts: _Content, part_type: str | None) -> str | None:
    """The text of a list of content parts (only those of ``part_type``, unless ``None``)."""
    if not isinstance(parts, list):
        return None
    texts = [p.text for p in parts if isinstance(p.text, str) and part_type in (None, p.type)]
    return "".join(texts) if texts else None


def _content_or_parts(content: _Content) -> str | None:
    """A message's content as text: a string as it is, parts' texts joined."""
    return content if isinstance(content, str) or content is None else _parts_text(content, None)


def _chat_fields(body: _ChatBody, record: dict[str, Any]) -> bool:
    """``content``: the first choice's message content (text parts joined); ``finish_reason``.

    :return: whether the answer is a tool call.
    """
    choice = body.choices.item
    if choice is None:
        record["content"] = record["finish_reason"] = None
        return False
    message = choice.message
    content = message.content if message is not None else None
    record["content"] = _content_or_parts(content)
    finish = choice.finish_reason
    record["finish_reason"] = finish if type(finish) is str else None
    return message is not None and bool(message.tool_calls)


def _completions_fields(body: _CompletionsBody, record: dict[str, Any]) -> None:
    """``content``: the first choice's text."""
    choice = body.choices.item
    text = choice.text if choice is not None else None
    record["content"] = text if isinstance(text, str) else None


def _output_text(body: _ResponsesBody) -> str | None:
    """The ``output_text`` parts of every message item, joined."""
    texts = [t for item in body.output if (t := _parts_text(item.content, "output_text")) is not None]
    return "".join(texts) if texts else None


def _calls_function(body: _ResponsesBody) -> bool:
    return any(item.type == "function_call" for item in body.output)


def _responses_finish(body: _ResponsesBody, calls: bool) -> str | None:
    """The outcome in chat's ``finish_reason`` vocabulary."""
    finish = responses_finish_reason(body.status, body.incomplete_details, calls)
    return finish if type(finish) is str else None


def _responses_fields(body: _ResponsesBody, record: dict[str, Any]) -> bool:
    """``content``: the ``output_text`` parts of every message item, joined; ``finish_reason`` in chat's
    vocabulary.

    :return: whether the answer is a function call.
    """
    record["content"] = _output_text(body)
    calls = _calls_function(body)
    record["finish_reason"] = _responses_finish(body, calls)
    return calls


def _vector(value: list[float] | str | None) -> list[float] | None:
    if isinstance(value, str):
        # encoding_format="base64": little-endian float32, as the SDK decodes it.
        try:
            vec = array.array("f", base64.b64decode(value))
        except ValueError:
            return None
        if sys.byteorder != "little":
            vec.byteswap()
        return vec.tolist()
    return value


def _embeddings_fields(body: _EmbeddingsBody, record: dict[str, Any]) -> None:
    """``embedding``: the (first) vector; ``embeddings``: all of them, when the request had several inputs."""
    data = body.data
    if len(data) > 1:
        # The API documents ``index`` as the position of the input: follow it, not the list order.
        with contextlib.suppress(TypeError):
            data = sorted(data, key=operator.attrgetter("index"))
    vectors = [_vector(item.embedding) for item in data]
    record["embedding"] = vectors[0] if vectors else None
    if len(vectors) > 1:
        record["embeddings"] = vectors


def _no_fields(body: _Body, record: dict[str, Any]) -> None:
    pass


# -- answers (chat and responses) ----------------------------------------------------------------------------
# Read only for a request that asked for a format or offered tools, or an answer that is a tool call (a
# plain text answer to a plain request is never a failure: its record has content and finish_reason):
# the classified answer (:func:`~airflow_openai_batch.core.schema.classify_answer`), from the record's
# ``content`` and ``finish_reason`` (one by one, or a block's columns) and the body's view.


def _text_or_none(value: Any) -> str | None:
    return value if type(value) is str else None


def _chat_answer(
    body: _ChatBody, content: str | None, finish: str | None, schema: AnswerSchema | None
) -> StructuredAnswer:
    """The first choice's answer: its content, or its function calls' arguments."""
    choice = body.choices.item
    message = choice.message if choice is not None else None
    calls = None
    if message is not None and message.tool_calls:
        calls = [
            (_text_or_none(c.function.name), _text_or_none(c.function.arguments))
            for c in message.tool_calls
            if c.function is not None
        ]
    refusal = _text_or_none(message.refusal) if message is not None else None
    return classify_answer(content, finish, calls, refusal or None, schema)


def _responses_answer(
    body: _ResponsesBody, content: str | None, finish: str | None, schema: AnswerSchema | None
) -> StructuredAnswer:
    """The output text, or the function calls' arguments."""
    calls = [
        (_text_or_none(item.name), _text_or_none(item.arguments))
        for item in body.output
        if item.type == "function_call"
    ] or None
    refusals = [
        p.refusal
        for item in body.output
        if item.type == "message" and isinstance(item.content, list)
        for p in item.content
        if p.type == "refusal" and isinstance(p.refusal, str)
    ]
    refusal = "".join(refusals) if refusals else None
    return classify_answer(content, finish, calls, refusal, schema)


#: How chat and responses answers are read (the other kinds have no such answers).
_ANSWERS: dict[str, Callable[[Any, str | None, str | None, AnswerSchema | None], StructuredAnswer]] = {
    "chat": _chat_answer,
    "responses": _responses_answer,
}


def _parsed_raw(answer: StructuredAnswer) -> Raw | None:
    """A valid answer's JSON text as ``msgspec.Raw``, on one line (a JSONL record is one line)."""
    text = answer.text
    if not answer.valid or text is None:
        return None
    if "\n" in text or "\r" in text:
        return Raw(orjson.dumps(orjson.loads(text)))
    return Raw(text)


# -- blocks of successes -------------------------------------------------------------------------------------
# A block of 2xx result lines whose requests all asked for the same thing (no images to write) is made into
# records a column at a time: one decode of the block's typed views, one of its usage objects, and C-level
# passes (comprehensions, ``map``) per column instead of Python calls per line. Structured answers are
# still classified one by one, by the same function as on their own.


class _ViewResponse(msgspec.Struct, Generic[_T], gc=False):
    body: _T


class _ViewLine(msgspec.Struct, Generic[_T], gc=False):
    """A result line read for its body's typed view only (the join's fields come from the other decode)."""

    response: _ViewResponse[_T]


_NO_MESSAGE = _Message()
_NO_CHOICE = _ChatChoice(message=_NO_MESSAGE)
_TEXT_OR_NONE = frozenset({str, type(None)})


def _text_column(values: list[Any], fix: Callable[[Any], Any]) -> list[Any]:
    """``values`` where each is a string or ``None``; any other value made one by ``fix``."""
    return values if _TEXT_OR_NONE.issuperset(map(type, values)) else list(map(fix, values))


#: A kind's convenience fields of a block of views, as columns, and whether some answer is a tool call.
_Columns = tuple[dict[str, list[Any]], bool]


def _chat_columns(views: list[_ChatBody]) -> _Columns:
    """:func:`_chat_fields` of a block of views as columns."""
    choices = [b.choices.item or _NO_CHOICE for b in views]
    messages = [c.message or _NO_MESSAGE for c in choices]
    columns = {
        "content": _text_column([m.content for m in messages], _content_or_parts),
        "finish_reason": _text_column([c.finish_reason for c in choices], _text_or_none),
    }
    return columns, any([m.tool_calls for m in messages])


def _usual_responses_texts(views: list[_ResponsesBody]) -> list[str] | None:
    """The answers' texts if every answer is the usual one: completed, its one output item a message
    holding one ``output_text`` part (what :func:`_responses_fields` reads as that part's text and finish
    reason ``stop``), checked a column at a time; else ``None``."""
    outputs = [body.output for body in views]
    if set(map(len, outputs)) != {1} or {body.status for body in views} != {"completed"}:
        return None
    items = [output[0] for output in outputs]
    if {item.type for item in items} != {"message"}:
        return None
    contents = [item.content for item in items]
    if set(map(type, contents)) != {list} or set(map(len, contents)) != {1}:
        return None
    parts = [content[0] for content in contents]
    texts = [part.text for part in parts]
    if {part.type for part in parts} != {"output_text"} or set(map(type, texts)) != {str}:
        return None
    return texts


def _responses_columns(views: list[_ResponsesBody]) -> _Columns:
    """:func:`_responses_fields` of a block of views as columns: a column at a time for a block of usual
    answers, else one call per view and field (the rules are many)."""
    texts = _usual_responses_texts(views)
    if texts is not None:
        return {"content": texts, "finish_reason": ["stop"] * len(views)}, False
    calls = list(map(_calls_function, views))
    columns = {
        "content": list(map(_output_text, views)),
        "finish_reason": list(map(_responses_finish, views, calls)),
    }
    return columns, any(calls)


def _completions_columns(views: list[_CompletionsBody]) -> _Columns:
    """:func:`_completions_fields` of a block of views as columns."""
    texts = [b.choices.item.text if b.choices.item is not None else None for b in views]
    return {"content": _text_column(texts, _text_or_none)}, False


def _no_columns(views: list[_Body]) -> _Columns:
    return {}, False


@dataclass(frozen=True)
class _Kind:
    """Where one kind of endpoint puts its answer.

    :param view: the typed view of a response body (with defaults for every field: built empty, it
        stands for a body the view does not fit).
    :param fields: writes the success record's convenience fields, read from the view; returns whether the
        answer is a tool call.
    :param columns: ``fields`` of a block of views, as columns (see :data:`_Columns`); ``None``: the
        kind's records are made one by one.
    """

    view: type[_Body]
    fields: Callable[[Any, dict[str, Any]], bool | None]
    columns: Callable[[list[Any]], _Columns] | None = None


#: Every endpoint kind, by the name :func:`endpoint_kind` gives it.
_KINDS: dict[str, _Kind] = {
    "chat": _Kind(_ChatBody, _chat_fields, _chat_columns),
    "completions": _Kind(_CompletionsBody, _completions_fields, _completions_columns),
    "responses": _Kind(_ResponsesBody, _responses_fields, _responses_columns),
    "embeddings": _Kind(_EmbeddingsBody, _embeddings_fields),
    "images": _Kind(_Body, _no_fields, _no_columns),
    "other": _Kind(_Body, _no_fields, _no_columns),
}
_BODY = msgspec.json.Decoder(_Body)


def extract_content(kind: str, body: Any) -> dict[str, Any]:
    """A success record's convenience fields for a response body.

    :param kind: the endpoint kind (see :func:`endpoint_kind`).
    :param body: the response body (``response.body`` of a result line), parsed.
    :return: ``{"content": str | None}`` for text endpoints, ``{"embedding": [...] | None}`` (plus
        ``"embeddings"`` when the request had several inputs) for embeddings, ``{}`` otherwise.
    """
    build = RecordBuilder("", kind)
    fields: dict[str, Any] = {}
    build.fields(build.view(Raw(orjson.dumps(body))), fields)
    fields.pop("finish_reason", None)
    return fields


# -- usage ---------------------------------------------------------------------------------------------------


class _Details(msgspec.Struct, gc=False):
    """``*_tokens_details``: cached prompt tokens on the input side, reasoning tokens on the output side."""

    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


class _Usage(msgspec.Struct, gc=False):
    """The counts a ``usage`` object may state (chat, completions and embeddings say ``prompt_tokens`` /
    ``completion_tokens``, the Responses API ``input_tokens`` / ``output_tokens``)."""

    input_tokens: int | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    input_tokens_details: _Details | None = None
    prompt_tokens_details: _Details | None = None
    output_tokens_details: _Details | None = None
    completion_tokens_details: _Details | None = None


_COUNT_NAMES = ("input_tokens", "prompt_tokens", "output_tokens", "completion_tokens", "total_tokens")
_DETAILS_NAMES = (
    "input_tokens_details",
    "prompt_tokens_details",
    "output_tokens_details",
    "completion_tokens_details",
)
_decode_usage = msgspec.json.Decoder(_Usage).decode

#: ``(input, output, total, cached_input, reasoning)``
UsageFields = tuple[int | None, int | None, int | None, int | None, int | None]


def _int_or_none(value: Any) -> int | None:
    return value if type(value) is int else None


def usage_fields(usage: Any) -> UsageFields | None:
    """The token counts a body's ``usage`` states: ``(input, output, total, cached_input, reasoning)``.

    ``input_tokens`` / ``output_tokens`` are preferred to ``prompt_tokens`` / ``completion_tokens`` when
    both are there; cached tokens are under ``input_tokens_details`` / ``prompt_tokens_details``,
    reasoning tokens (part of the output) under ``output_tokens_details`` / ``completion_tokens_details``.
    A count that is missing or not an integer is ``None``.

    :param usage: ``body["usage"]``, parsed (any value) or as JSON text (``msgspec.Raw`` or bytes).
    :return: the five counts, or ``None`` when ``usage`` is not an object.
    """
    if usage is _NULL:
        return None
    if type(usage) is _Usage:  # a typed view's (see RecordBuilder's usage_counts)
        return _view_fields(usage)
    if type(usage) is Raw or type(usage) is bytes:
        try:
            view = _decode_usage(usage)
        except msgspec.DecodeError:  # a count that is not an integer, or not an object at all
            usage = msgspec.json.decode(usage)
    if type(usage) is dict:
        # Only the integer counts, as the typed view would read them.
        counts = {name: n for name in _COUNT_NAMES if type(n := usage.get(name)) is int}
        for name in _DETAILS_NAMES:
            details = usage.get(name)
            if type(details) is dict:
                counts[name] = _Details(
                    _int_or_none(details.get("cached_tokens")), _int_or_none(details.get("reasoning_tokens"))
                )
        view = _Usage(**counts)
    elif type(usage) is not Raw and type(usage) is not bytes:
        return None
    return _view_fields(view)


def _view_fields(view: _Usage) -> UsageFields:
    """:func:`usage_fields` of a usage object read by the typed view."""
    inp = view.input_tokens
    if inp is None:
        inp = view.prompt_tokens
    out = view.output_tokens
    if out is None:
        out = view.completion_tokens
    cached = view.input_tokens_details or view.prompt_tokens_details
    reasoning = view.output_tokens_details or view.completion_tokens_details
    return (
        inp,
        out,
        view.total_tokens,
        None if cached is None else cached.cached_tokens,
        None if reasoning is None else reasoning.reasoning_tokens,
    )


def usage_counts(usage: Any) -> tuple[int, int, int, int, int] | None:
    """:func:`usage_fields` as numbers to add up: a missing count is 0, a missing total ``input + output``.

    :param usage: as for :func:`usage_fields`.
    :return: ``(input, output, total, cached_input, reasoning)``, or ``None`` when ``usage`` is not an
        object.
    """
    fields = usage_fields(usage)
    return None if fields is None else as_counts(fields)


def as_counts(fields: UsageFields) -> tuple[int, int, int, int, int]:
    """:func:`usage_fields`' counts as numbers to add up (see :func:`usage_counts`)."""
    inp, out, total, cached, reasoning = fields
    inp = inp or 0
    out = out or 0
    return inp, out, inp + out if total is None else total, cached or 0, reasoning or 0


_decode_usage_lines = msgspec.json.Decoder(_Usage | None).decode_lines

#: Each view with a block path (see :class:`_Kind`), its ``usage`` read by the typed view instead of kept
#: as JSON text: for a sink that reads a block's usage as counts only (``RecordBuilder(usage_counts=)``),
#: one decode of the block's lines instead of a second one of its usage objects.
_USAGE_COUNTED: dict[type[_Body], type[_Body]] = {
    spec.view: msgspec.defstruct(
        f"{spec.view.__name__}Counted", [("usage", _Usage | None, None)], bases=(spec.view,), gc=False
    )
    for spec in _KINDS.values()
    if spec.columns is not None
}


def _either(firsts: list[Any], seconds: Callable[[], list[Any]]) -> list[Any]:
    """Per row, the first value unless it is ``None``, else the second (``seconds`` is read only then:
    most usage objects name their counts one way)."""
    if None not in firsts:
        return firsts
    others = seconds()
    if firsts.count(None) == len(firsts):
        return others
    return [a if a is not None else b for a, b in zip(firsts, others, strict=True)]


@dataclass
class UsageColumns:
    """:func:`usage_fields` of many ``usage`` objects, as columns (see :func:`usage_columns`).

    :param counts: ``(input, output, total, cached_input, reasoning)``, each a list of a count (or
        ``None``) per row.
    :param missing: per row, whether its ``usage`` is not an object (no counts at all); ``None`` when no
        row is.
    """

    counts: tuple[Sequence[int | None], ...]
    missing: list[bool] | None

    def rows(self) -> list[UsageFields | None]:
        """The counts per row, as :func:`usage_fields` returns them."""
        rows = list(zip(*self.counts, strict=True))
        if self.missing is None:
            return rows
        return [None if gone else row for row, gone in zip(rows, self.missing, strict=True)]


_NO_FIELDS = (None, None, None, None, None)


def usage_columns(usages: list[Raw]) -> UsageColumns:
    """:func:`usage_fields` of many ``usage`` objects (as JSON text), a column at a time: one decode of
    them all and C-level passes, instead of a decode and Python branches per object. Any object the
    typed view does not fit (a count that is not an integer, a value that is not an object) sends the
    whole column through :func:`usage_fields`, one by one.

    :param usages: each body's ``usage``, as JSON text (``null`` where the body has none).
    """
    if not usages:
        return UsageColumns(([],) * 5, None)
    try:
        views = _decode_usage_lines(b"\n".join(usages))
    except msgspec.DecodeError:
        views = []
    if len(views) != len(usages):
        return _fields_columns(list(map(usage_fields, usages)))
    return usage_columns_of(views)


def _fields_columns(fields: list[UsageFields | None]) -> UsageColumns:
    missing = [f is None for f in fields]
    counts = tuple(map(list, zip(*[_NO_FIELDS if f is None else f for f in fields], strict=True)))
    return UsageColumns(counts or ([],) * 5, missing if any(missing) else None)


def usage_columns_of(views: list[_Usage | None]) -> UsageColumns:
    """:func:`usage_columns` of usage objects already read by the typed view (``None``: not an object)."""
    if not all(views):
        return _fields_columns([None if view is None else _view_fields(view) for view in views])
    # A pass per field read (a comprehension reads a struct's attribute faster than map(attrgetter)).
    inputs = _either([v.input_tokens for v in views], lambda: [v.prompt_tokens for v in views])
    outputs = _either([v.output_tokens for v in views], lambda: [v.completion_tokens for v in views])
    cached = _either(
        [v.input_tokens_details for v in views], lambda: [v.prompt_tokens_details for v in views]
    )
    reasoning = _either(
        [v.output_tokens_details for v in views], lambda: [v.completion_tokens_details for v in views]
    )
    counts = (
        inputs,
        outputs,
        [v.total_tokens for v in views],
        [None if d is None else d.cached_tokens for d in cached],
        [None if d is None else d.reasoning_tokens for d in reasoning],
    )
    return UsageColumns(counts, None)


# -- failures ------------------------------------------------------------------------------------------------


def error_fields(line: dict[str, Any]) -> tuple[int | None, str, str]:
    """``(status_code, error_code, error_message)`` of a failed result line.

    :param line: the result line, parsed.
    """
    response = line.get("response")
    top_error = line.get("error")
    top_error = top_error if isinstance(top_error, dict) else {}
    if isinstance(response, dict):
        status = response.get("status_code")
        status = status if type(status) is int else None
        body = response.get("body")
        err = body.get("error") if isinstance(body, dict) else None
        # A 2xx response next to a non-null ``error``: the error object is what explains the failure.
        err = err if isinstance(err, dict) else top_error
        code = err.get("code") or (f"http_{status}" if status is not None else "error")
        message = err.get("message") or (
            f"HTTP {status}" if status is not None else "The request failed without a message."
        )
        return status, str(code), str(message)
    code = top_error.get("code") or "error"
    message = top_error.get("message") or "The request failed without a message."
    return None, str(code), str(message)


# -- the records ---------------------------------------------------------------------------------------------


@dataclass
class SuccessColumns:
    """The success records of a block of 2xx answers, a column per record field (see
    :meth:`RecordBuilder.successes`).

    :param columns: record field -> its values, one per record, in the records' field order.
    :param usage: each record's token counts (:func:`usage_fields` of its ``usage``).
    :param models: each response's ``model`` as the body states it (any JSON value).
    :param unusable: the block's answers that are not usable, left out of the columns, in block order:
        ``(custom_id, status_code, view, answer)`` (as :meth:`RecordBuilder.success` returns it: make a
        failure of it; its view's usage was billed too).
    """

    columns: dict[str, list[Any]]
    usage: UsageColumns = field(repr=False)
    models: list[Any] = field(repr=False)
    unusable: list[tuple[str, int, Any, StructuredAnswer]] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.models)

    def records(self) -> list[dict[str, Any]]:
        """The records as dicts, as :meth:`RecordBuilder.success` makes them one by one."""
        return _rows(self.columns)


@dataclass
class FailureColumns:
    """The failure records of many requests, a column per record field (see
    :meth:`RecordBuilder.failures`).

    :param columns: record field -> its values, one per record, in the records' field order.
    :param request_lines: each record's request line, as in the input file (no newline).
    """

    columns: dict[str, list[Any]]
    request_lines: list[bytes] = field(repr=False)

    def __len__(self) -> int:
        return len(self.request_lines)

    def records(self) -> list[dict[str, Any]]:
        """The records as dicts, one per request."""
        return _rows(self.columns)


def _rows(columns: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = tuple(columns)
    return [dict(zip(names, row, strict=True)) for row in zip(*columns.values(), strict=True)]


#: Each line's JSON text, its syntax checked (all of it, though nothing is decoded), in one call per block.
_decode_json_lines = msgspec.json.Decoder(Raw).decode_lines


def _json_texts(lines: list[bytes]) -> bool:
    """Whether every line is one JSON value in valid UTF-8: what a reader can load back. (msgspec checks
    the syntax of what it skips, but not the UTF-8 of the strings in it.)"""
    joined = b"\n".join(lines)
    try:
        if not joined.isascii():
            joined.decode()
        return len(_decode_json_lines(joined)) == len(lines)  # fewer: a blank line
    except (msgspec.DecodeError, UnicodeDecodeError):
        return False


class RecordBuilder:
    """Makes the success and failure records of one batch attempt.

    A success record is ``custom_id``, ``batch_id``, ``status_code``, ``body`` (the response body),
    ``usage`` (the body's), the kind's convenience fields (see :func:`extract_content`) and ``attempts``;
    chat and responses records add ``finish_reason``, and where the request asked for a format or
    offered tools (or the answer is a tool call) ``parsed`` (the validated value) and ``tool_calls``
    (``[{"name", "arguments"}]``, arguments parsed; ``None`` unless the answer is a tool call). Images
    records (with a media sink) hold ``images`` (the files' URIs, or the URLs the API gave) and the body
    without the base64 bytes.

    A failure record is ``custom_id``, ``batch_id``, ``status_code`` (or ``None``), ``error_code``,
    ``error_message``, ``request`` (the request line, or ``None`` where it is not JSON), ``output`` (the
    answer's text for ``invalid_output`` / ``refusal`` / ``truncated`` / ``content_filter``, else
    ``None``) and ``attempts``.

    :param batch_id: the batch the records come from.
    :param kind: the batch's endpoint kind (see :func:`endpoint_kind`).
    :param attempt: which attempt of its chunk the batch is (1 for the first), stamped as ``attempts``.
    :param raw_json: give ``body``, ``usage``, ``parsed`` and ``request`` as ``msgspec.Raw`` (their JSON
        text) instead of parsed objects.
    :param media: where an images batch's base64 images are written (``None``: bodies kept as they are).
    :param usage_counts: the sink reads a block's usage for its counts only (:attr:`SuccessColumns.usage`):
        its ``usage`` column then holds the typed views of the usage objects, not their JSON text.
    """

    def __init__(
        self,
        batch_id: str,
        kind: str,
        *,
        attempt: int = 1,
        raw_json: bool = False,
        media: MediaSink | None = None,
        usage_counts: bool = False,
    ) -> None:
        self.batch_id = batch_id
        self.attempt = attempt
        self.raw_json = raw_json
        self._answer = _ANSWERS.get(kind)
        self._media = media if kind == "images" else None
        spec = _KINDS.get(kind, _KINDS["other"])
        self._view_type = spec.view
        self._decode_view = msgspec.json.Decoder(spec.view).decode
        self._columns = spec.columns if raw_json and self._media is None else None
        self._usage_counts = usage_counts and spec.view in _USAGE_COUNTED
        block_view = _USAGE_COUNTED[spec.view] if self._usage_counts else spec.view
        self._decode_view_lines = msgspec.json.Decoder(_ViewLine[block_view]).decode_lines  # type: ignore[valid-type]
        #: Writes the kind's convenience fields into a record, from a :meth:`view`.
        self.fields = spec.fields

    def view(self, body: Raw) -> Any:
        """The typed view of a response body (its ``model`` and ``usage`` are what totals need).

        :param body: the body's JSON text.
        """
        try:
            return self._decode_view(body)
        except msgspec.DecodeError:
            # Not the documented shape: no convenience fields, but whatever model and usage it states
            # still count.
            try:
                common = _BODY.decode(body)
            except msgspec.DecodeError:  # not an object at all
                return self._view_type()
            return self._view_type(model=common.model, usage=common.usage)

    def successes(
        self,
        block: bytes,
        custom_ids: list[str],
        status_codes: list[int],
        bodies: list[Raw],
        schema: AnswerSchema | None = None,
    ) -> SuccessColumns | None:
        """The success records of a block of 2xx result lines whose requests all asked for ``schema``,
        made a column at a time (each answer classified as :meth:`success` does it); ``None`` when some
        line needs :meth:`success` (a body the typed view does not fit, a tool call answering a plain
        request, an images batch with a media sink, parsed records).

        :param block: the result lines (newline-terminated, nothing but them).
        :param custom_ids: their custom_ids; :param status_codes: their status codes; :param bodies:
            their bodies' JSON text.
        :param schema: what every one of their requests asked its answer to be (``None``: plain text).
        """
        if self._columns is None:
            return None
        try:
            lines = self._decode_view_lines(block)
        except msgspec.DecodeError:
            return None
        if len(lines) != len(bodies):
            return None
        views = [line.response.body for line in lines]
        fields, calls = self._columns(views)
        answered = schema is not None and self._answer is not None
        if calls and not answered:
            return None  # a tool call's record has fields its plain neighbours lack
        unusable = []
        if answered:
            answers = list(
                map(self._answer, views, fields["content"], fields["finish_reason"], repeat(schema))
            )
            codes = [answer.error_code for answer in answers]
            if codes.count(None) != len(codes):
                unusable = [
                    (custom_ids[i], status_codes[i], views[i], answers[i])
                    for i, code in enumerate(codes)
                    if code is not None
                ]
                keep = [code is None for code in codes]
                custom_ids, status_codes, bodies, views, answers = (
                    list(compress(column, keep))
                    for column in (custom_ids, status_codes, bodies, views, answers)
                )
                fields = {name: list(compress(values, keep)) for name, values in fields.items()}
            fields["tool_calls"] = [answer.tool_calls for answer in answers]
            fields["parsed"] = list(map(_parsed_raw, answers))
        usages = [view.usage for view in views]
        count = len(views)
        columns = {
            "custom_id": custom_ids,
            "batch_id": [self.batch_id] * count,
            "status_code": status_codes,
            "body": bodies,
            "usage": usages,
            **fields,
            "attempts": [self.attempt] * count,
        }
        usage = usage_columns_of(usages) if self._usage_counts else usage_columns(usages)
        return SuccessColumns(columns, usage, [view.model for view in views], unusable)

    def success(
        self, custom_id: str, status_code: int, body: Raw, view: Any, schema: AnswerSchema | None = None
    ) -> dict[str, Any] | StructuredAnswer:
        """The success record of a 2xx result, or, for an answer that is not usable, the
        :class:`~airflow_openai_batch.core.schema.StructuredAnswer` saying why (its ``error_code``,
        ``error_message`` and ``text``: make a failure of it, with ``output=answer.text``).

        :param body: the response body's JSON text; :param view: its :meth:`view`.
        :param schema: what the request asked its answer to be (``None``: plain text; chat and responses).
        """
        if self._media is not None:
            try:
                images = write_images(custom_id, msgspec.json.decode(body), self._media)
            except (ValueError, AttributeError) as err:  # not base64, or not an object at all
                return StructuredAnswer(None, None, None, "invalid_output", f"images: {err}")
            body = Raw(orjson.dumps(images.body))
        if self.raw_json:
            record = {
                "custom_id": custom_id,
                "batch_id": self.batch_id,
                "status_code": status_code,
                "body": body,
                "usage": view.usage,
            }
        else:
            record = {
                "custom_id": custom_id,
                "batch_id": self.batch_id,
                "status_code": status_code,
                "body": msgspec.json.decode(body),
                "usage": msgspec.json.decode(view.usage),
            }
        if self.fields(view, record) or (schema is not None and self._answer is not None):
            answer = self._answer(view, record["content"], record["finish_reason"], schema)  # type: ignore[misc]
            if answer.error_code is not None:
                return answer
            record["tool_calls"] = answer.tool_calls
            record["parsed"] = _parsed_raw(answer) if self.raw_json else answer.parsed
        elif self._media is not None:
            record["images"] = images.images
        record["attempts"] = self.attempt
        return record

    def failures(
        self,
        custom_ids: list[str | None],
        status_codes: list[int | None],
        error_codes: list[str],
        error_messages: list[str],
        outputs: list[str | None],
        request_lines: list[bytes],
    ) -> FailureColumns:
        """The failure records of requests, made a column at a time (the only way they are made: a
        request fails with a few thousand others, or alone). The lists hold a value per request.

        :param custom_ids: their custom_ids (``None`` for an input line without a usable one).
        :param status_codes: their HTTP status (``None``: not an HTTP failure).
        :param error_codes: their codes; :param error_messages: their messages.
        :param outputs: an unusable answer's text, else ``None``.
        :param request_lines: the requests as in the input file (no newline).
        """
        if self.raw_json and _json_texts(request_lines):
            requests = list(map(Raw, request_lines))  # all of them JSON: checked at once
        else:
            requests = list(map(self._request, request_lines))
        count = len(request_lines)
        return FailureColumns(
            {
                "custom_id": custom_ids,
                "batch_id": [self.batch_id] * count,
                "status_code": status_codes,
                "error_code": error_codes,
                "error_message": error_messages,
                "request": requests,
                "output": outputs,
                "attempts": [self.attempt] * count,
            },
            request_lines,
        )

    def _request(self, request_line: bytes) -> Any:
        """A failure record's ``request``: the line as JSON text (raw) or parsed, ``None`` when it is not
        JSON a reader can load back."""
        if self.raw_json:
            return Raw(request_line) if _json_texts([request_line]) else None
        try:
            return orjson.loads(request_line)
        except orjson.JSONDecodeError:
            return None
