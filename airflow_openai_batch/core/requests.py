"""What a valid request line is: the one statement of the rules, and the two ways they are applied.

A request line is valid when:

- it is a JSON object, in UTF-8, nested at most
  :data:`~airflow_openai_batch.limits.MAX_JSON_NESTING` levels deep;
- ``custom_id`` is a non-empty string (unique across the input: checked by
  :class:`~airflow_openai_batch.core.duplicates.DuplicateFinder`);
- ``method`` is ``"POST"`` and ``url`` is the batch endpoint;
- ``body`` is an object whose ``model`` is a non-empty string, unless a default applies: the ``model``
  argument fills lines that have none (missing, null or empty), and on endpoints where the API supplies
  a default model (:data:`~airflow_openai_batch.limits.API_DEFAULT_MODELS`) lines without one are
  grouped under that default and sent unchanged;
- ``body.stream`` is absent, null or false;
- the request fits in a batch by itself: its bytes (newline included), its embedding inputs and its
  estimated prompt tokens (when ``max_enqueued_tokens`` is set) are within the per-batch limits.

Beside the rules, the checks read what the cost estimate needs (each line's output cap; its prompt
tokens when every line is counted) and, with a response schema, put the schema's format into each line
that has none of its own (:class:`~airflow_openai_batch.core.schema.SchemaInjector`), before the size
limit is checked.

The field rules are msgspec types (:class:`FieldRule`). The fast path decodes each line of a block with
one :class:`msgspec.json.Decoder` of a ``Struct`` built from them, which skips every body field it does
not name; the diagnosis re-reads a failing line and checks each field against its own rule, so that every
problem is named with its field and reason. Both accept exactly the same lines: a line the decoder refuses
is never valid, whatever the field checks find.
"""

from __future__ import annotations

import itertools
import operator
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
import orjson

from airflow_openai_batch.core.cost import (
    HEURISTIC,
    PromptTokens,
    output_cap_fields,
    output_cap_of_struct,
    output_cap_reader,
)
from airflow_openai_batch.core.schema import SchemaInjector
from airflow_openai_batch.core.tokens import count_inputs
from airflow_openai_batch.exceptions import InputProblem, OpenAIBatchInputError
from airflow_openai_batch.limits import (
    API_DEFAULT_MODELS,
    BATCH_ENDPOINTS,
    EMBEDDINGS_ENDPOINT,
    MAX_JSON_NESTING,
    RETIRED_BATCH_ENDPOINTS,
)

__all__ = [
    "CheckedLine",
    "FieldRule",
    "NotALine",
    "RequestRules",
    "ValidLines",
    "describe",
    "normalize_endpoint",
]

NonEmptyString = Annotated[str, msgspec.Meta(min_length=1)]
#: A field that is not in the line.
_MISSING: Any = msgspec.UNSET
#: What a decoder raises on a line it refuses (RecursionError: nesting deeper than it follows).
_REFUSED = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


def normalize_endpoint(endpoint: str) -> str:
    """Return the Batch API spelling of an endpoint.

    :param endpoint: e.g. ``/v1/chat/completions``, ``/chat/completions``, ``v1/chat/completions``.
    :return: the endpoint with its ``/v1`` prefix, e.g. ``/v1/chat/completions``.
    :raises OpenAIBatchInputError: the endpoint is not one the Batch API accepts.
    """
    text = endpoint.strip() if isinstance(endpoint, str) else ""
    path = "/" + text.strip("/")
    if not path.startswith("/v1/"):
        path = "/v1" + path
    if path in RETIRED_BATCH_ENDPOINTS:
        reason = f"{endpoint!r}: {RETIRED_BATCH_ENDPOINTS[path]}"
        raise OpenAIBatchInputError([InputProblem(None, "endpoint", reason)])
    if path not in BATCH_ENDPOINTS:
        allowed = ", ".join(BATCH_ENDPOINTS)
        reason = f"{endpoint!r} is not a Batch API endpoint (allowed: {allowed})"
        raise OpenAIBatchInputError([InputProblem(None, "endpoint", reason)])
    return path


def describe(value: Any, limit: int = 60) -> str:
    """The value as the user wrote it (JSON), cut to ``limit`` characters."""
    try:
        text = msgspec.json.encode(value).decode()
    except (TypeError, msgspec.EncodeError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    """The JSON type of a decoded value, with its article: ``an object``, ``a string``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


@dataclass(frozen=True)
class FieldRule:
    """One field of a request line and what it must hold.

    :param name: the field as problems name it; ``body.model`` is the ``model`` field of the body.
    :param type: the msgspec type its value must have (``dict`` for the body, whose own fields are rules
        of their own).
    :param reason: what is wrong with a value that does not have the type (given the value, or
        ``msgspec.UNSET`` when the field is missing).
    :param optional: the field may be left out (it then decodes as ``None``).
    """

    name: str
    type: Any
    reason: Callable[[Any], str]
    optional: bool = False

    def accepts(self, value: Any) -> bool:
        if value is _MISSING:
            return self.optional
        try:
            msgspec.convert(value, self.type)
        except msgspec.ValidationError:
            return False
        return True


class NotALine:
    """Stands in for an input item that could not be made into a line (e.g. a record that is not
    JSON-serializable), so that it is reported on its line like any invalid one.

    :param reason: why.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass
class CheckedLine:
    """One line after the diagnosis.

    :param line: the line to write (``body.model`` filled in where the ``model`` argument applied).
    :param custom_id: its custom_id when that is a non-empty string (even on an invalid line, so that its
        duplicates are found too), else ``None``.
    :param model: the model it is grouped under (valid lines).
    :param inputs: its embedding inputs (embeddings endpoint, else 0).
    :param tokens: its prompt tokens (when every line is counted, else 0).
    :param cap: its output-token cap (``None``: it sets none).
    :param own_format: it kept its own format where a response schema was to be put in.
    :param problems: ``(field, reason)`` of each problem; empty for a valid line.
    """

    line: bytes
    custom_id: str | None
    model: str = ""
    inputs: int = 0
    tokens: int = 0
    cap: int | None = None
    own_format: bool = False
    problems: list[tuple[str | None, str]] = field(default_factory=list)


@dataclass
class ValidLines:
    """Valid request lines, in input order, as the splitter takes them.

    :param lines: the lines to write, without their newline.
    :param data: the same lines each ending with a newline, when at hand (then written as they are).
    :param ids: the custom_id of each line.
    :param models: the model of every line, or of each line when they differ.
    :param inputs: embedding inputs of each line (embeddings endpoint only).
    :param tokens: prompt tokens of each line (when every line is counted).
    :param caps: the output-token cap of each line (``None``: it sets none).
    :param positions: each line's 0-based position among the lines checked, when some of those were
        left out (blank); ``None`` when the lines are all of them.
    :param own_formats: lines that kept their own format where a response schema was to be put in.
    :param one_cap: every line has the same cap (``caps[0]``): a chunk sums them with one product.
    """

    lines: list[bytes]
    data: bytes | None
    ids: list[str]
    models: str | list[str]
    inputs: list[int] | None
    tokens: list[int] | None
    caps: list[int | None]
    positions: list[int] | None = None
    own_formats: int = 0
    one_cap: bool = False


class RequestRules:
    """The rules for one submission: its endpoint, ``model`` argument and per-batch limits.

    :param endpoint: the batch endpoint (any spelling :func:`normalize_endpoint` accepts).
    :param model: fills ``body.model`` where a line has none (missing, null or empty).
    :param max_bytes: bytes a batch file may hold; a line (with its newline) must fit.
    :param max_embedding_inputs: embedding inputs a batch may hold (embeddings endpoint only).
    :param max_tokens: estimated prompt tokens a batch may hold, or ``None`` for no limit.
    :param prompt_tokens: the prompt counter of a model (the cost estimator's
        :meth:`~airflow_openai_batch.core.cost.CostEstimator.prompt_tokens`): every line's prompt is
        counted with it. ``None``: lines are counted only for ``max_tokens``, with the free heuristic.
    :param schema: puts a response schema's format into each line without one of its own.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        model: str | None,
        max_bytes: int,
        max_embedding_inputs: int,
        max_tokens: int | None,
        prompt_tokens: Callable[[str], PromptTokens] | None = None,
        schema: SchemaInjector | None = None,
    ) -> None:
        self.endpoint = normalize_endpoint(endpoint)
        self.fill_model = model or None
        self.default_model = self.fill_model or API_DEFAULT_MODELS.get(self.endpoint)
        self.max_bytes = max_bytes
        self.counts_inputs = self.endpoint == EMBEDDINGS_ENDPOINT
        self.max_inputs = max_embedding_inputs
        self.max_tokens = max_tokens
        self.fields = self._field_rules()
        self._decoder = msgspec.json.Decoder(_request_struct(self.fields))
        self._cap_of = output_cap_of_struct(self.endpoint)
        self._cap_rule = output_cap_reader(self.endpoint)
        self._cap_fields = output_cap_fields(self.endpoint)
        #: The cap fields of a decoded body, read in C (a tuple when there are several).
        #: Each cap field of a decoded body, read in C.
        self._cap_readers = [operator.attrgetter(name) for name in self._cap_fields]
        if prompt_tokens is None and max_tokens is not None:
            heuristic = PromptTokens(self.endpoint, HEURISTIC)
            prompt_tokens = lambda model: heuristic  # noqa: E731 - one counter whatever the model
        #: Counts every line's prompt (it needs the whole body, decoded for that alone), or ``None``.
        self.prompt_tokens = prompt_tokens
        self._bodies = msgspec.json.Decoder(msgspec.defstruct("WholeBody", [("body", dict[str, Any])]))
        self.schema = schema
        if schema is not None:
            # The format as the member that goes into a body ('"response_format":{...}' or
            # '"text":{"format":{...}}'), encoded once, and the body keys that say a line has its own.
            member: dict[str, Any] = {}
            schema.inject_body(member)
            self._schema_key = next(iter(member))
            self._schema_member = orjson.dumps(member)[1:-1]
            self._raw_body = msgspec.json.Decoder(msgspec.defstruct("RawBody", [("body", msgspec.Raw)]))
            self._format_keys = msgspec.json.Decoder(
                msgspec.defstruct("FormatKeys", [("response_format", Any, _MISSING), ("text", Any, _MISSING)])
            )

    # -- the rules -------------------------------------------------------------------------------------

    def _field_rules(self) -> list[FieldRule]:
        endpoint = self.endpoint

        def custom_id(value: Any) -> str:
            if value is _MISSING:
                return "missing"
            return "empty" if value == "" else f"must be a non-empty string, got {_json_type(value)}"

        def method(value: Any) -> str:
            return 'missing; must be "POST"' if value is _MISSING else f'{describe(value)}, must be "POST"'

        def url(value: Any) -> str:
            if value is _MISSING:
                return f'missing; must be "{endpoint}"'
            return f'{describe(value)} does not match the endpoint "{endpoint}"'

        def body(value: Any) -> str:
            return "missing" if value is _MISSING else f"must be an object, got {_json_type(value)}"

        def model_type(value: Any) -> str:
            return f"must be a non-empty string, got {describe(value)}"

        def model_required(value: Any) -> str:
            if value is _MISSING or value is None or value == "":
                return "missing or empty, and no model argument was given"
            return f"must be a string, got {_json_type(value)}"

        def stream(value: Any) -> str:
            return f"streaming is not supported in a batch (must be false or left out, got {describe(value)})"

        if self.fill_model is not None:
            model = FieldRule("body.model", str | None, model_type, optional=True)
        elif self.default_model is not None:
            model = FieldRule("body.model", NonEmptyString, model_type, optional=True)
        else:
            model = FieldRule("body.model", NonEmptyString, model_required)
        rules = [
            FieldRule("custom_id", NonEmptyString, custom_id),
            FieldRule("method", Literal["POST"], method),
            FieldRule("url", Literal[endpoint], url),  # type: ignore[valid-type]
            FieldRule("body", dict, body),
            model,
            FieldRule("body.stream", Literal[False] | None, stream, optional=True),
        ]
        if self.counts_inputs:
            # Any value: the API judges it; read to count the inputs.
            rules.append(FieldRule("body.input", Any, _json_type, optional=True))
        # Any value (the API judges it; a cap that is not a positive integer counts as none): read for the
        # cost estimate's output bound.
        rules.extend(
            FieldRule(f"body.{name}", Any, _json_type, optional=True) for name in output_cap_fields(endpoint)
        )
        return rules

    def limit_problem(self, size: int, inputs: int, tokens: int) -> tuple[str | None, str] | None:
        """Whether a request of ``size`` bytes (newline included), ``inputs`` embedding inputs and
        ``tokens`` estimated prompt tokens fits in a batch by itself: ``None``, or its problem."""
        if size > self.max_bytes:
            return (
                None,
                f"the line is {size} bytes with its newline, above max_bytes_per_batch={self.max_bytes}",
            )
        if inputs > self.max_inputs:
            return "body.input", f"{inputs} embedding inputs, above the {self.max_inputs} allowed per batch"
        if self.max_tokens is not None and tokens > self.max_tokens:
            return "body", f"~{tokens} estimated prompt tokens, above max_enqueued_tokens={self.max_tokens}"
        return None

    def model_of(self, request: Any) -> str:
        """The model a decoded request is grouped under."""
        return request.body.model or self.default_model  # type: ignore[no-any-return]

    # -- the fast path: a block of lines ------------------------------------------------------------------

    def check_block(self, lines: list[bytes], data: bytes) -> ValidLines | None:
        """The lines of a block when all are valid and need no change, or ``None``: check them one by one.

        :param lines: the lines, without their newline.
        :param data: the same lines each ending with a newline.
        """
        try:
            requests = list(map(self._decoder.decode, lines))
        except _REFUSED:
            return None
        if not data.isascii() and not all(map(_is_utf8, lines)):
            return None
        if sys.getrecursionlimit() > MAX_JSON_NESTING and any(map(_too_deep, lines)):
            return None
        models: str | list[str]
        bodies = [request.body for request in requests]
        alike = bool(bodies) and bodies.count(bodies[0]) == len(bodies)
        # The usual block: every body decodes alike (one model named on every line, one template's caps),
        # found in one C-level comparison a line (true == 1 there, but the API refuses such a cap anyway).
        distinct = {bodies[0].model} if alike else {body.model for body in bodies}
        if len(distinct) == 1 and all(distinct):
            models = distinct.pop()  # the usual case: one model, named on every line
        elif self.fill_model is not None and not all(distinct):
            return None  # lines to fill in: line by line
        else:
            models = list(map(self.model_of, requests))
            if len(set(models)) == 1:
                models = models[0]
        inputs = [count_inputs(body.input) for body in bodies] if self.counts_inputs else None
        caps, one_cap = ([self._cap_of(bodies[0])] * len(bodies), True) if alike else self._caps(bodies)
        own_formats = 0
        if self.schema is not None:
            try:
                injected = list(map(self._with_schema, lines))
            except _REFUSED:
                return None
            own_formats = injected.count(None)
            lines = [line if new is None else new for line, new in zip(lines, injected, strict=True)]
            data = b"\n".join(lines) + b"\n"
        tokens = None
        if self.prompt_tokens is not None:
            try:
                bodies = [request.body for request in map(self._bodies.decode, lines)]
            except _REFUSED:
                return None
            tokens = self._count_prompts(models, bodies)
        # No line is longer than the whole block.
        longest = max(map(len, lines)) + 1 if len(data) > self.max_bytes else 0
        if self.limit_problem(longest, max(inputs or [0]), max(tokens or [0])):
            return None
        return ValidLines(
            lines,
            data,
            [request.custom_id for request in requests],
            models,
            inputs,
            tokens,
            caps,
            own_formats=own_formats,
            one_cap=one_cap,
        )

    def _caps(self, bodies: list[Any]) -> tuple[list[int | None], bool]:
        """The output cap of each decoded body, and whether it is one cap for all. When every cap field
        holds one value across the block, the rule is applied once (each field read in C into a list of
        plain values: no tuple per line)."""
        if not bodies:
            return [], False
        first = []
        for read in self._cap_readers:
            values = list(map(read, bodies))
            head = values[0]
            # 1 == 1.0 == true: only a plain integer (or nothing) counts as the same value on every line.
            if (head is not None and type(head) is not int) or values.count(head) != len(values):
                return list(map(self._cap_of, bodies)), False
            first.append(head)
        return [self._cap_rule(dict(zip(self._cap_fields, first, strict=True)))] * len(bodies), True

    def _count_prompts(self, models: str | list[str], bodies: list[dict[str, Any]]) -> list[int]:
        """The prompt tokens of each body, counted per model (its encoding), one call per model."""
        assert self.prompt_tokens is not None
        if isinstance(models, str):
            return self.prompt_tokens(models).count_many(bodies)
        by_model: dict[str, list[int]] = {}
        for index, model in enumerate(models):
            by_model.setdefault(model, []).append(index)
        tokens = [0] * len(bodies)
        for model, picked in by_model.items():
            counted = self.prompt_tokens(model).count_many([bodies[i] for i in picked])
            for index, count in zip(picked, counted, strict=True):
                tokens[index] = count
        return tokens

    def _with_schema(self, line: bytes) -> bytes | None:
        """The line with the response schema's format in its body, or ``None`` when it keeps its own.

        The format is spliced into the body's bytes after its opening brace (the body's JSON text occurs
        once in the line: a string cannot hold it, its quotes would be escaped); a body whose text occurs
        twice, or a responses body with a ``text`` object of its own, is re-encoded around the format.
        """
        raw = bytes(self._raw_body.decode(line).body)
        keys = self._format_keys.decode(raw)
        present = {
            name: value
            for name, value in (("response_format", keys.response_format), ("text", keys.text))
            if value is not _MISSING
        }
        if self.schema.has_own_format(present):  # type: ignore[union-attr]
            return None
        at = line.find(raw)
        if self._schema_key not in present and line.find(raw, at + 1) < 0:
            at += 1  # after the body's opening brace
            empty = line[at:].lstrip().startswith(b"}")
            return b"".join((line[:at], self._schema_member, b"" if empty else b",", line[at:]))
        return self.schema.inject_line(line, orjson.loads(line))  # type: ignore[union-attr]

    # -- the diagnosis: one line -----------------------------------------------------------------------------

    def check_lines(self, lines: list[Any]) -> tuple[list[CheckedLine | None], ValidLines]:
        """:meth:`check_line` of each line, and the valid ones as the splitter takes them."""
        checked = list(map(self.check_line, lines))
        positions = [i for i, c in enumerate(checked) if c is not None and not c.problems]
        valid: list[CheckedLine] = [checked[i] for i in positions]  # type: ignore[misc]
        return checked, ValidLines(
            [c.line for c in valid],
            None,
            [c.custom_id for c in valid],  # type: ignore[misc]
            [c.model for c in valid],
            [c.inputs for c in valid] if self.counts_inputs else None,
            [c.tokens for c in valid] if self.prompt_tokens is not None else None,
            [c.cap for c in valid],
            positions if len(positions) != len(checked) else None,
            sum(c.own_format for c in valid),
        )

    def check_line(self, line: Any) -> CheckedLine | None:
        """Check one line and name every problem it has; ``None`` for a blank line.

        :param line: the line without its newline (bytes; a str is taken as UTF-8).
        """
        if type(line) is not bytes:
            if isinstance(line, NotALine):
                return _invalid(None, None, f"not JSON-serializable: {line.reason}")
            if isinstance(line, str):
                line = line.encode("utf-8", "surrogatepass")
            elif isinstance(line, (bytearray, memoryview)):
                line = bytes(line)
            else:
                return _invalid(None, None, f"not a line of text (got {type(line).__name__})")
        if not line.strip():
            return None
        if b"\n" in line:
            return _invalid(None, None, "a line break inside the line: one request per line")
        try:
            request = self._decoder.decode(line)
            if not _is_utf8(line):
                raise msgspec.DecodeError("not UTF-8")
        except _REFUSED as refused:
            return self._diagnose(line, refused)
        if _too_deep(line):
            return _invalid(request.custom_id, None, f"JSON nested more than {MAX_JSON_NESTING} levels deep")
        cid = request.custom_id
        body = request.body
        model = self.model_of(request)
        tokens = 0
        own_format = False
        try:
            if not body.model and self.fill_model is not None:
                line = _with_model(line, self.fill_model)
            if self.schema is not None:
                injected = self._with_schema(line)
                own_format = injected is None
                line = line if injected is None else injected
            if self.prompt_tokens is not None:
                tokens = self.prompt_tokens(model).count_many([self._bodies.decode(line).body])[0]
        except _REFUSED as refused:
            return _invalid(cid, None, f"invalid JSON: {_why(refused)}")
        inputs = count_inputs(body.input) if self.counts_inputs else 0
        problem = self.limit_problem(len(line) + 1, inputs, tokens)
        if problem is not None:
            return _invalid(cid, *problem)
        return CheckedLine(line, cid, model, inputs, tokens, self._cap_of(body), own_format)

    def _diagnose(self, line: bytes, refused: BaseException) -> CheckedLine:
        """Every problem of a line the decoder refused, field by field."""
        try:
            obj = msgspec.json.decode(line)
        except _REFUSED as error:
            return _invalid(None, None, f"invalid JSON: {_why(error)}")
        if type(obj) is not dict:
            return _invalid(None, None, f"not a JSON object (got {_json_type(obj)})")
        cid = obj.get("custom_id")
        checked = CheckedLine(line, cid if type(cid) is str and cid else None)
        body = obj.get("body")
        for rule in self.fields:
            parent, _, name = rule.name.rpartition(".")
            if parent and type(body) is not dict:
                continue  # the body's own problem says it all
            value = (body if parent else obj).get(name, _MISSING)
            if not rule.accepts(value):
                checked.problems.append((rule.name, rule.reason(value)))
        if not checked.problems:
            # The decoder refused what no field rule explains (a key given twice, say): say what it said.
            checked.problems.append((None, f"invalid JSON: {_why(refused)}"))
        return checked


def _request_struct(rules: list[FieldRule]) -> type[msgspec.Struct]:
    """The Struct the fast path decodes lines into, from the field rules (the body's as a Struct of its
    own). Fields it does not name are skipped, not decoded."""

    def struct(name: str, fields: list[tuple[str, Any]]) -> type[msgspec.Struct]:
        # Leaves only strings and None: never part of a reference cycle, so the collector need not
        # track them.
        return msgspec.defstruct(name, sorted(fields, key=len), gc=False)  # required ones first

    def spec(name: str, rule: FieldRule) -> tuple[str, Any] | tuple[str, Any, Any]:
        return (name, rule.type, None) if rule.optional else (name, rule.type)

    body = struct("Body", [spec(r.name[5:], r) for r in rules if r.name.startswith("body.")])
    top = [spec(r.name, r) if r.name != "body" else ("body", body) for r in rules if "." not in r.name]
    return struct("Request", top)


def _with_model(line: bytes, model: str) -> bytes:
    """The line with ``body.model`` set (every other byte of the body re-encoded as it was decoded)."""
    obj = msgspec.json.decode(line)
    obj["body"]["model"] = model
    return msgspec.json.encode(obj)


def _is_utf8(line: bytes) -> bool:
    """Whether a line is UTF-8: the decoder checks the strings it reads, not those it skips."""
    if line.isascii():
        return True
    try:
        line.decode()
    except UnicodeDecodeError:
        return False
    return True


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_LEVEL = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def _too_deep(line: bytes) -> bool:
    """Whether a decoded line nests deeper than :data:`~airflow_openai_batch.limits.MAX_JSON_NESTING` levels.

    The decoder recurses once per level and stops at the interpreter's recursion limit, which at its
    default (1000) refuses such lines already; only where the limit was raised does a line have to be
    measured, and only a line long enough to hold that many levels (two bytes each at least).
    """
    if sys.getrecursionlimit() <= MAX_JSON_NESTING or len(line) <= 2 * MAX_JSON_NESTING:
        return False
    brackets = _JSON_STRING.sub(b"", line).translate(None, _NOT_BRACKETS)  # strings hold text, not levels
    return max(itertools.accumulate(map(_LEVEL.__getitem__, brackets)), default=0) > MAX_JSON_NESTING


def _why(error: BaseException) -> str:
    return "nested too deeply" if isinstance(error, RecursionError) else str(error)


def _invalid(custom_id: str | None, field_name: str | None, reason: str) -> CheckedLine:
    return CheckedLine(b"", custom_id, problems=[(field_name, reason)])
