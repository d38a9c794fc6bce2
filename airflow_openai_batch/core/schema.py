"""Structured answers: a response schema in, typed answers out (plain Python, no Airflow import).

Four parts, each usable alone:

- **Normalisation** (:func:`response_schema`): a Pydantic model class, a JSON Schema dict
  (``{"name": ..., "schema": ...}``, a ``response_format`` / ``text.format`` object, or a bare schema)
  becomes a :class:`ResponseSchema` whose schema strict mode accepts: every object
  ``additionalProperties: false``, every property required (the ones that were optional made nullable),
  ``oneOf`` as ``anyOf``, ``default`` dropped. What strict mode cannot express is a
  :class:`ResponseSchemaError` naming the JSON path.
- **Injection** (:class:`SchemaInjector`): the schema, encoded once, spliced into each request line of a
  chat completions (``response_format``) or responses (``text.format``) batch; a line with its own format
  keeps it.
- **Reading answers** (:func:`read_answer`): the answer of a success body (content or output text, or a
  tool call's arguments), its ``finish_reason``, and what is wrong with it: ``refusal``, ``truncated``,
  ``content_filter`` or ``invalid_output`` (not JSON, or not valid against the schema). Validation is
  a typed decode (:class:`CompiledSchema`: the JSON Schema compiled once into a msgspec type), with an
  exact JSON Schema validator only for the keywords msgspec cannot express. Which schema an answer is
  held to comes from its request line (:class:`RequestSchemas`).
- **Arrow** (:func:`arrow_type`, :func:`struct_array`, :class:`ParsedColumn`): the typed ``parsed``
  column of a schema, and a list of validated answers as a ``pa.StructArray`` (pyarrow is imported only
  here, lazily).
"""

from __future__ import annotations

import copy
import datetime
import functools
import io
import re
import typing
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Literal, Union

import msgspec
import orjson

from airflow_openai_batch.exceptions import InputProblem, OpenAIBatchInputError

__all__ = [
    "ANSWER_ERROR_CODES",
    "AnswerSchema",
    "CompiledSchema",
    "ParsedColumn",
    "RequestSchemas",
    "ResponseSchema",
    "ResponseSchemaError",
    "SchemaInjector",
    "StructuredAnswer",
    "answer_schema_of_request",
    "arrow_type",
    "classify_answer",
    "compile_schema",
    "read_answer",
    "response_schema",
    "responses_finish_reason",
    "strict_json_schema",
    "struct_array",
    "tool_calls_array",
    "tool_calls_arrow_type",
]

#: The failure codes of answers that came back but are not usable (see :func:`read_answer`).
INVALID_OUTPUT = "invalid_output"
REFUSAL = "refusal"
TRUNCATED = "truncated"
CONTENT_FILTER = "content_filter"
ANSWER_ERROR_CODES: tuple[str, ...] = (INVALID_OUTPUT, REFUSAL, TRUNCATED, CONTENT_FILTER)

_CHAT = "chat"
_RESPONSES = "responses"

# Keywords strict mode rejects (OpenAI's "Supported schemas" list), and the formats it accepts.
_UNSUPPORTED_KEYWORDS: dict[str, str] = {
    "allOf": "allOf (intersections) is not supported in strict mode",
    "not": "not is not supported in strict mode",
    "if": "if/then/else is not supported in strict mode",
    "then": "if/then/else is not supported in strict mode",
    "else": "if/then/else is not supported in strict mode",
    "dependentRequired": "dependentRequired is not supported in strict mode",
    "dependentSchemas": "dependentSchemas is not supported in strict mode",
    "patternProperties": "patternProperties (free-form keys) is not supported in strict mode",
    "unevaluatedProperties": "unevaluatedProperties is not supported in strict mode",
    "propertyNames": "propertyNames is not supported in strict mode",
    "minProperties": "minProperties is not supported in strict mode",
    "maxProperties": "maxProperties is not supported in strict mode",
    "minLength": "minLength is not supported in strict mode (drop it, or say it in the description)",
    "maxLength": "maxLength is not supported in strict mode (drop it, or say it in the description)",
    "uniqueItems": "uniqueItems is not supported in strict mode",
    "contains": "contains is not supported in strict mode",
    "minContains": "minContains is not supported in strict mode",
    "maxContains": "maxContains is not supported in strict mode",
    "prefixItems": "prefixItems (tuples) is not supported in strict mode",
    "additionalItems": "additionalItems is not supported in strict mode",
    "unevaluatedItems": "unevaluatedItems is not supported in strict mode",
}
_STRICT_FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"}
)
# Strict mode's size limits (OpenAI's documentation).
_MAX_NESTING = 10
_MAX_PROPERTIES = 5000
_MAX_ENUM_VALUES = 1000
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ResponseSchemaError(OpenAIBatchInputError):
    """A ``response_schema`` strict mode cannot use, or a schema given for an endpoint without one.

    :param path: where in the schema (``$``, ``$.properties.tags``...), or ``None`` for the schema as a
        whole.
    :param reason: what is wrong, in plain words.
    """

    def __init__(self, path: str | None, reason: str) -> None:
        self.path = path
        self.reason = reason
        where = "response_schema" if path is None else f"response_schema at {path}"
        super().__init__([InputProblem(None, where, reason)])


# ---------------------------------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class ResponseSchema:
    """A structured-output schema ready to send: a name and a strict-mode JSON Schema.

    :param name: the format's name (``[A-Za-z0-9_-]{1,64}``).
    :param schema: the JSON Schema, strict-mode compatible (:func:`strict_json_schema`).
    :param description: what the format is for, shown to the model (optional).
    """

    name: str
    schema: dict[str, Any]
    description: str | None = None

    def chat_format(self) -> dict[str, Any]:
        """The chat completions ``response_format`` object."""
        spec: dict[str, Any] = {"name": self.name, "strict": True, "schema": self.schema}
        if self.description:
            spec["description"] = self.description
        return {"type": "json_schema", "json_schema": spec}

    def responses_format(self) -> dict[str, Any]:
        """The responses ``text.format`` object."""
        spec: dict[str, Any] = {
            "type": "json_schema",
            "name": self.name,
            "strict": True,
            "schema": self.schema,
        }
        if self.description:
            spec["description"] = self.description
        return spec


def _path(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    # JSON Schema's own keywords ($defs, $ref) read as names too.
    return f"{path}.{key}" if key.removeprefix("$").isidentifier() else f"{path}[{key!r}]"


def _safe_name(name: str) -> str:
    """A name derived from a class or a title, made acceptable to the API (``[A-Za-z0-9_-]{1,64}``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "response"


def response_schema(value: Any, *, name: str | None = None) -> ResponseSchema:
    """Normalise what a user gives as ``response_schema`` into a strict-mode :class:`ResponseSchema`.

    :param value: a Pydantic model class (or Pydantic dataclass); a dict ``{"name": ..., "schema": ...,
        "description"?: ...}``; a chat ``response_format`` (``{"type": "json_schema", "json_schema":
        {...}}``) or responses ``text.format`` object; a bare JSON Schema; or a :class:`ResponseSchema`.
    :param name: the format's name, overriding the model's class name / the dict's ``name`` / the
        schema's ``title`` (default ``"response"``).
    :raises ResponseSchemaError: for what strict mode cannot express, naming the JSON path.
    """
    if isinstance(value, ResponseSchema):
        return value if name is None else ResponseSchema(name, value.schema, value.description)
    if isinstance(value, type):
        return _from_model(value, name)
    if not isinstance(value, Mapping):
        raise ResponseSchemaError(
            None, f"expected a Pydantic model class or a JSON Schema dict, got {type(value).__name__}"
        )
    spec: Mapping[str, Any] = value
    if spec.get("type") == "json_schema":
        # A whole response_format (chat) or text.format (responses) object.
        inner = spec.get("json_schema", spec)
        if not isinstance(inner, Mapping):
            raise ResponseSchemaError("$.json_schema", "expected an object with name and schema")
        spec = inner
    if "schema" in spec and isinstance(spec["schema"], Mapping):
        given_name = spec.get("name")
        description = spec.get("description")
        schema = spec["schema"]
        if spec.get("strict") is False:
            raise ResponseSchemaError(
                "$.strict", "response_schema is always sent with strict: true; remove strict: false"
            )
    else:
        given_name, description, schema = None, None, spec
    chosen = name if name is not None else given_name
    if chosen is None:
        title = schema.get("title")
        chosen = _safe_name(title) if isinstance(title, str) and title else "response"
    if not isinstance(chosen, str) or not _NAME.match(chosen):
        raise ResponseSchemaError(
            "$.name", f"the name must be 1-64 letters, digits, '_' or '-', got {chosen!r}"
        )
    if description is not None and not isinstance(description, str):
        raise ResponseSchemaError("$.description", "the description must be a string")
    return ResponseSchema(chosen, strict_json_schema(schema), description)


def _from_model(model: type, name: str | None) -> ResponseSchema:
    # The SDK's own (public) conversion, what client.chat.completions.parse(response_format=Model) sends:
    # pydantic's JSON Schema with every object closed and every property required (fields with a default
    # stay non-nullable: the model gives a value; Optional fields are already nullable). Our pass below
    # then checks it and fixes what the SDK leaves for the API to reject (oneOf, discriminator, defaults).
    from openai.lib import type_to_response_format_param

    try:
        fmt = type_to_response_format_param(model)
    except TypeError as exc:
        raise ResponseSchemaError(None, f"cannot make a JSON Schema of {model!r}: {exc}") from None
    spec = fmt["json_schema"]  # type: ignore[index]
    schema = strict_json_schema(spec["schema"], optional="keep")
    _drop_generated_titles(schema, spec["name"])
    return ResponseSchema(name if name is not None else _safe_name(spec["name"]), schema)


def _drop_generated_titles(schema: dict[str, Any], model_name: str) -> None:
    """Remove the titles Pydantic makes up (a property's name in title case, a model's class name).

    They tell the model nothing its key does not, yet are sent (and billed as input) with every request
    and copied into every line of the batch file. Titles a user wrote are kept.
    """

    def visit(node: Any, generated: str | None) -> None:
        if not isinstance(node, dict):
            if isinstance(node, list):
                for item in node:
                    visit(item, None)
            return
        if generated is not None and node.get("title") == generated:
            del node["title"]
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                for prop, sub in value.items():
                    visit(sub, prop.replace("_", " ").title())
            elif key == "$defs" and isinstance(value, dict):
                for def_name, sub in value.items():
                    visit(sub, def_name)
            else:
                visit(value, None)

    visit(schema, model_name)


def strict_json_schema(schema: Mapping[str, Any], *, optional: str = "nullable") -> dict[str, Any]:
    """A deep copy of ``schema`` made strict-mode compatible.

    Every object gets ``additionalProperties: false`` and every property becomes required; a property
    that was not required is made nullable (``optional="nullable"``, for hand-written schemas) or kept as
    it is (``optional="keep"``, for schemas whose every property is already required). ``oneOf`` becomes
    ``anyOf`` (the discriminated unions Pydantic writes are exclusive either way), ``discriminator`` and
    ``default`` are dropped (strict mode rejects them; the model gives every value), a ``$ref`` beside
    other keywords is inlined, a single-entry ``allOf`` is merged.

    :param schema: a JSON Schema whose root is an object.
    :param optional: ``"nullable"`` or ``"keep"`` (see above).
    :raises ResponseSchemaError: naming the path of the first construct strict mode cannot express.
    """
    if not isinstance(schema, Mapping):
        raise ResponseSchemaError("$", "the schema must be a JSON object")
    root = copy.deepcopy(dict(schema))
    walker = _StrictWalker(root, optional == "nullable")
    for defs_key in ("$defs", "definitions"):
        defs = root.get(defs_key)
        if defs is None:
            continue
        if not isinstance(defs, dict):
            raise ResponseSchemaError(_path("$", defs_key), "must be an object of schemas")
        for def_name, sub in list(defs.items()):
            defs[def_name] = walker.walk(sub, _path(_path("$", defs_key), def_name))
    result = walker.walk(root, "$")
    if result.get("type") != "object" or "anyOf" in result:
        raise ResponseSchemaError("$", "the root of a strict-mode schema must be an object (type: object)")
    walker.check_limits(result)
    return result


def _resolve_ref(root: Any, ref: str) -> Any:
    """What a local ``$ref`` (``#/$defs/Name``) points at in ``root``, or ``None``."""
    if not ref.startswith("#/"):
        return None
    target = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        target = target.get(part) if isinstance(target, dict) else None
    return target


def _deref(root: Any, node: Any) -> Any:
    """``node``, or what its chain of ``$ref`` s points at (``None`` if nothing, or a cycle)."""
    for _ in range(16):
        if not (isinstance(node, dict) and isinstance(node.get("$ref"), str)):
            return node
        node = _resolve_ref(root, node["$ref"])
    return None


class _StrictWalker:
    def __init__(self, root: dict[str, Any], nullable_optional: bool) -> None:
        self.root = root
        self.nullable_optional = nullable_optional

    def walk(self, node: Any, path: str, depth: int = 0) -> dict[str, Any]:
        if depth > 64:
            raise ResponseSchemaError(path, "the schema nests too deeply (a $ref cycle with siblings?)")
        if not isinstance(node, dict):
            raise ResponseSchemaError(path, f"expected a schema object, got {node!r}")
        for key, reason in _UNSUPPORTED_KEYWORDS.items():
            if key in node and not (key == "allOf" and _single_all_of(node)):
                raise ResponseSchemaError(_path(path, key), reason)
        # Meaningless once every property is required, and refused by strict mode.
        node.pop("default", None)
        node.pop("discriminator", None)
        if "oneOf" in node:
            if "anyOf" in node:
                raise ResponseSchemaError(path, "oneOf beside anyOf cannot be expressed in strict mode")
            node["anyOf"] = node.pop("oneOf")
        if "allOf" in node:
            (only,) = node.pop("allOf")
            merged = self.walk(only, _path(path, "allOf") + "[0]", depth + 1)
            node = {**merged, **node}
        ref = node.get("$ref")
        if ref is not None:
            if not isinstance(ref, str) or not ref.startswith("#/"):
                raise ResponseSchemaError(_path(path, "$ref"), f"only local references (#/...) work: {ref!r}")
            target = self._resolve(ref, path)
            if len(node) > 1:
                # A $ref beside other keywords is refused by strict mode: inline the target (the node's own
                # keywords win) and check the result.
                inlined = {**copy.deepcopy(target), **{k: v for k, v in node.items() if k != "$ref"}}
                return self.walk(inlined, path, depth + 1)
            return node
        kind = node.get("type")
        kinds = kind if isinstance(kind, list) else [kind]
        fmt = node.get("format")
        if fmt is not None and "string" in kinds and fmt not in _STRICT_FORMATS:
            raise ResponseSchemaError(
                _path(path, "format"),
                f"format {fmt!r} is not supported in strict mode "
                f"(supported: {', '.join(sorted(_STRICT_FORMATS))})",
            )
        if "object" in kinds or "properties" in node:
            self._object(node, path, depth)
        if "items" in node:
            items = node["items"]
            if not isinstance(items, dict):
                raise ResponseSchemaError(_path(path, "items"), "items must be one schema (no tuples)")
            node["items"] = self.walk(items, _path(path, "items"), depth + 1)
        elif "array" in kinds:
            raise ResponseSchemaError(path, "an array needs an items schema in strict mode")
        if "anyOf" in node:
            branches = node["anyOf"]
            if not isinstance(branches, list) or not branches:
                raise ResponseSchemaError(_path(path, "anyOf"), "must be a non-empty list of schemas")
            node["anyOf"] = [
                self.walk(b, _path(_path(path, "anyOf"), i), depth + 1) for i, b in enumerate(branches)
            ]
        if kind is None and not ({"anyOf", "$ref", "enum", "const"} & node.keys()):
            raise ResponseSchemaError(path, "strict mode needs a type here (a schema that accepts anything)")
        return node

    def _object(self, node: dict[str, Any], path: str, depth: int) -> None:
        additional = node.get("additionalProperties", False)
        if additional is not False:
            raise ResponseSchemaError(
                _path(path, "additionalProperties"),
                "strict mode needs additionalProperties: false (a free-form map cannot be expressed; "
                "list its keys as properties)",
            )
        node["additionalProperties"] = False
        props = node.get("properties", {})
        if not isinstance(props, dict):
            raise ResponseSchemaError(_path(path, "properties"), "must be an object of schemas")
        required = node.get("required", [])
        if not isinstance(required, list):
            raise ResponseSchemaError(_path(path, "required"), "must be a list of property names")
        unknown = [name for name in required if name not in props]
        if unknown:
            raise ResponseSchemaError(
                _path(path, "required"), f"names properties that are not defined: {unknown}"
            )
        walked: dict[str, Any] = {}
        props_path = _path(path, "properties")
        for key, sub in props.items():
            value = self.walk(sub, _path(props_path, key), depth + 1)
            if key not in required and self.nullable_optional:
                value = _nullable(value)
            walked[key] = value
        node["properties"] = walked
        node["required"] = list(walked)

    def _resolve(self, ref: str, path: str) -> dict[str, Any]:
        target = _resolve_ref(self.root, ref)
        if target is None:
            raise ResponseSchemaError(_path(path, "$ref"), f"{ref!r} points at nothing")
        if not isinstance(target, dict):
            raise ResponseSchemaError(_path(path, "$ref"), f"{ref!r} is not a schema object")
        return target

    def check_limits(self, schema: dict[str, Any]) -> None:
        counts = {"properties": 0, "enum": 0}

        def visit(node: Any, path: str, nesting: int, seen: frozenset[str]) -> None:
            if not isinstance(node, dict):
                return
            ref = node.get("$ref")
            if isinstance(ref, str):
                if ref not in seen:  # a recursive schema is allowed; count each definition once per path
                    visit(self._resolve(ref, path), path, nesting, seen | {ref})
                return
            if isinstance(node.get("enum"), list):
                counts["enum"] += len(node["enum"])
            props = node.get("properties")
            if isinstance(props, dict):
                if nesting > _MAX_NESTING:
                    raise ResponseSchemaError(
                        path, f"objects nest more than {_MAX_NESTING} levels deep (strict mode's limit)"
                    )
                counts["properties"] += len(props)
                for key, sub in props.items():
                    visit(sub, _path(_path(path, "properties"), key), nesting + 1, seen)
            if isinstance(node.get("items"), dict):
                visit(node["items"], _path(path, "items"), nesting, seen)
            for i, branch in enumerate(node.get("anyOf") or []):
                visit(branch, _path(_path(path, "anyOf"), i), nesting, seen)

        visit(schema, "$", 1, frozenset())
        if counts["properties"] > _MAX_PROPERTIES:
            raise ResponseSchemaError(
                "$", f"{counts['properties']} properties in all, above strict mode's {_MAX_PROPERTIES}"
            )
        if counts["enum"] > _MAX_ENUM_VALUES:
            raise ResponseSchemaError(
                "$", f"{counts['enum']} enum values in all, above strict mode's {_MAX_ENUM_VALUES}"
            )


def _single_all_of(node: dict[str, Any]) -> bool:
    value = node.get("allOf")
    return isinstance(value, list) and len(value) == 1


def _accepts_null(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    if kind == "null" or (isinstance(kind, list) and "null" in kind):
        return True
    if isinstance(schema.get("enum"), list) and None in schema["enum"]:
        return True
    return any(isinstance(b, dict) and _accepts_null(b) for b in schema.get("anyOf") or ())


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` also accepting ``null``."""
    if _accepts_null(schema):
        return schema
    if "anyOf" in schema:
        return {**schema, "anyOf": [*schema["anyOf"], {"type": "null"}]}
    kind = schema.get("type")
    if kind is not None and "$ref" not in schema and "const" not in schema:
        out = {**schema, "type": [*(kind if isinstance(kind, list) else [kind]), "null"]}
        if isinstance(schema.get("enum"), list):
            out["enum"] = [*schema["enum"], None]
        return out
    # A $ref, a const, a bare enum: a union with null, its description kept outside.
    inner = {k: v for k, v in schema.items() if k not in ("description", "title")}
    outer = {k: v for k, v in schema.items() if k in ("description", "title")}
    return {**outer, "anyOf": [inner, {"type": "null"}]}


# -------------------------------------------------------------------------------------------- injection


def _endpoint_kind(endpoint: str) -> str | None:
    path = endpoint.split("?", 1)[0].rstrip("/")
    if path.endswith("/chat/completions"):
        return _CHAT
    if path.endswith("/responses"):
        return _RESPONSES
    return None


class SchemaInjector:
    """Puts one :class:`ResponseSchema` into request bodies of one endpoint, cheaply per line.

    The format object is encoded once; each line gets it spliced in as bytes (or, for a body that has a
    ``text`` object without ``format``, or whose ``body`` is not the line's last key, by re-encoding the
    line around the pre-encoded fragment).

    :param schema: the schema to inject.
    :param endpoint: the batch endpoint (``/v1/chat/completions`` or ``/v1/responses``, Azure's form too).
    :raises ResponseSchemaError: for any other endpoint.
    """

    def __init__(self, schema: ResponseSchema, endpoint: str) -> None:
        kind = _endpoint_kind(endpoint)
        if kind is None:
            raise ResponseSchemaError(
                None,
                f"a response_schema applies to /v1/chat/completions and /v1/responses only, not {endpoint}",
            )
        self.schema = schema
        self.kind = kind
        if kind == _CHAT:
            self.fragment = orjson.dumps(schema.chat_format())
            self._key = "response_format"
            self._splice = b'"response_format":' + self.fragment
        else:
            self.fragment = orjson.dumps(schema.responses_format())
            self._key = "text"
            self._splice = b'"text":{"format":' + self.fragment + b"}"
        self._after_key = b"," + self._splice
        self._as_value = orjson.Fragment(self.fragment)

    def has_own_format(self, body: dict[str, Any]) -> bool:
        """Whether ``body`` already says its own format (then it is left as it is)."""
        if self.kind == _CHAT:
            return "response_format" in body
        text = body.get("text")
        return isinstance(text, dict) and "format" in text

    def inject_body(self, body: dict[str, Any]) -> bool:
        """Put the format into ``body`` (in place, as a pre-encoded ``orjson.Fragment``: encode the body
        with orjson). Returns ``False`` when the body keeps its own format."""
        if self.kind == _CHAT:
            if "response_format" in body:
                return False
            body["response_format"] = self._as_value
            return True
        text = body.get("text")
        if text is None:
            body["text"] = {"format": self._as_value}
            return True
        if not isinstance(text, dict):
            return False  # not an object: the request validator reports it, the line is left alone
        if "format" in text:
            return False
        body["text"] = {**text, "format": self._as_value}
        return True

    def inject_line(self, raw: bytes, line: dict[str, Any]) -> bytes | None:
        """The request line with the format in its body, or ``None`` when the body keeps its own format.

        :param raw: the line's JSON bytes (no newline).
        :param line: ``raw`` parsed (what the prepare path already has); left unchanged when the bytes
            can be spliced, given the format (as a fragment) otherwise.
        """
        body = line["body"]
        if self.kind == _CHAT:
            if "response_format" in body:
                return None
            splice = True
        else:
            text = body.get("text")
            if isinstance(text, dict) and "format" in text:
                return None
            splice = "text" not in body  # a `"text": null` must be replaced, not given a second key
        if splice and next(reversed(line)) == "body":
            # `body` is the line's last key: its closing brace is the last one but one.
            close = raw.rindex(b"}", 0, raw.rindex(b"}"))
            return b"".join((raw[:close], self._after_key if body else self._splice, raw[close:]))
        if not self.inject_body(body):
            return None
        return orjson.dumps(line)


# ------------------------------------------------------------------------------------ compiled schemas


class CompiledSchema:
    """One JSON Schema, compiled once for fast validation of answers.

    The schema becomes a msgspec type (Structs with the properties as fields, ``Literal`` for enums,
    ``Optional``, lists, tagged unions...) and an answer is validated by one typed decode. Keywords
    msgspec cannot express (``oneOf``, ``allOf``, formats other than date/time/uuid, ``uniqueItems``,
    ``patternProperties``, recursive references...) also run the exact JSON Schema validator
    (``jsonschema``), after the typed decode.

    Deliberate difference from JSON Schema: an ``integer`` must be written as one (``3``, not ``3.0``).

    :param schema: the JSON Schema (not modified).
    """

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.schema = dict(schema)
        compiler = _MsgspecCompiler(self.schema)
        try:
            typ = compiler.compile(self.schema, "$")
            self._decode = msgspec.json.Decoder(typ).decode
        except (TypeError, ValueError):
            # A constraint of an unexpected type (a string minimum...): the exact validator decides.
            typ, compiler.exact = Any, True
            self._decode = msgspec.json.Decoder(Any).decode
        #: Whether the exact validator runs after the typed decode.
        self.exact = compiler.exact
        #: The msgspec type answers are decoded into.
        self.type = typ
        self._exact_validator: Any = None
        if self.exact:
            import jsonschema

            cls = jsonschema.validators.validator_for(self.schema, default=jsonschema.Draft202012Validator)
            try:
                cls.check_schema(self.schema)
            except jsonschema.SchemaError:
                pass  # a schema the API itself would refuse: the typed decode is all the check there is
            else:
                self._exact_validator = cls(self.schema, format_checker=cls.FORMAT_CHECKER)

    def check(self, text: str | bytes) -> str | None:
        """Why ``text`` is not a valid answer (not JSON / not valid against the schema), or ``None``."""
        try:
            self._decode(text)
        except msgspec.ValidationError as exc:
            return f"the answer does not match the schema: {exc}"
        except msgspec.DecodeError as exc:
            return f"the answer is not valid JSON: {exc}"
        if self._exact_validator is not None:
            error = next(iter(self._exact_validator.iter_errors(orjson.loads(text))), None)
            if error is not None:
                where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.path)
                return f"the answer does not match the schema: {error.message} - at `{where}`"
        return None


@functools.lru_cache(maxsize=256)
def _compiled(key: bytes) -> CompiledSchema:
    return CompiledSchema(orjson.loads(key))


def compile_schema(schema: Mapping[str, Any]) -> CompiledSchema:
    """The :class:`CompiledSchema` of ``schema``, cached by its encoded bytes."""
    return _compiled(orjson.dumps(schema))


# Keywords that only annotate (no effect on validation) and those msgspec checks itself.
# fmt: off
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "example", "$comment", "deprecated", "readOnly",
    "writeOnly", "$schema", "$id", "$defs", "definitions", "discriminator", "strict", "contentMediaType",
})
_HANDLED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf", "$ref",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minItems", "maxItems",
    "minLength", "maxLength", "pattern", "format",
})
# fmt: on
_FORMAT_TYPES: dict[str, Any] = {
    "date-time": datetime.datetime,
    "date": datetime.date,
    "time": datetime.time,
    "uuid": uuid.UUID,
}
_LITERAL_TYPES = (str, int, bool, type(None))


class _MsgspecCompiler:
    """JSON Schema -> msgspec type. Anything it cannot express exactly sets ``exact`` (and becomes
    ``Any`` or a looser type): msgspec then only ever rejects what the schema rejects too."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.exact = False
        self._refs: dict[tuple[str, str | None], Any] = {}
        self._active: set[str] = set()
        self._count = 0

    def compile(self, node: Any, path: str, tag: tuple[str, str] | None = None) -> Any:
        if node is True or node == {}:
            return Any
        if not isinstance(node, dict):
            self.exact = True  # `false` and other odd schemas
            return Any
        if not (node.keys() <= _HANDLED | _ANNOTATIONS):
            self.exact = True
        ref = node.get("$ref")
        if isinstance(ref, str):
            if len(node.keys() - _ANNOTATIONS) > 1:
                self.exact = True  # $ref beside constraints (draft 2019+ semantics): checked exactly
            return self._ref(ref, path, tag)
        if "const" in node:
            return self._literal([node["const"]])
        if isinstance(node.get("enum"), list):
            return self._literal(node["enum"])
        if "anyOf" in node:
            return self._union(node, path)
        kind = node.get("type")
        if isinstance(kind, list):
            return self._checked_union([self._typed(node, k, path, tag) for k in kind])
        if kind is None:
            kind = "object" if "properties" in node else None
        if kind is None:
            self.exact = self.exact or bool(node.keys() - _ANNOTATIONS)
            return Any
        return self._typed(node, kind, path, tag)

    def _typed(self, node: dict[str, Any], kind: str, path: str, tag: tuple[str, str] | None) -> Any:
        if kind == "string":
            fmt = node.get("format")
            if fmt is not None:
                if fmt in _FORMAT_TYPES and not node.keys() & {"pattern", "minLength", "maxLength"}:
                    return _FORMAT_TYPES[fmt]
                self.exact = True
            return self._constrained(
                str, node, pattern="pattern", min_length="minLength", max_length="maxLength"
            )
        if kind == "integer":
            return self._number(int, node)
        if kind == "number":
            return self._number(float, node)
        if kind == "boolean":
            return bool
        if kind == "null":
            return None
        if kind == "array":
            items = node.get("items")
            item = self.compile(items, _path(path, "items")) if items is not None else Any
            return self._constrained(list[item], node, min_length="minItems", max_length="maxItems")  # type: ignore[valid-type]
        if kind == "object":
            return self._object(node, path, tag)
        self.exact = True
        return Any

    def _number(self, base: type, node: dict[str, Any]) -> Any:
        low, high = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
        if isinstance(low, bool) or isinstance(high, bool):
            self.exact = True  # draft 4's boolean form
            low = high = None
        return self._constrained(
            base, node, ge="minimum", le="maximum", multiple_of="multipleOf", gt=low, lt=high
        )

    @staticmethod
    def _constrained(base: Any, node: dict[str, Any], gt: Any = None, lt: Any = None, **keys: str) -> Any:
        meta = {name: node[key] for name, key in keys.items() if key in node}
        if gt is not None:
            meta["gt"] = gt
        if lt is not None:
            meta["lt"] = lt
        return typing.Annotated[base, msgspec.Meta(**meta)] if meta else base

    def _object(self, node: dict[str, Any], path: str, tag: tuple[str, str] | None) -> Any:
        props = node.get("properties") or {}
        additional = node.get("additionalProperties", True)
        if not props and tag is None:
            if additional is False:
                return self._struct({}, [], False, tag)
            value = (
                Any if additional is True else self.compile(additional, _path(path, "additionalProperties"))
            )
            return dict[str, value]  # type: ignore[valid-type]
        if additional not in (True, False):
            self.exact = True  # extra keys must match a schema: checked exactly
        required = node.get("required") or []
        if not set(required) <= set(props):
            self.exact = True
        fields = {}
        for key, sub in props.items():
            if tag is not None and key == tag[0]:
                continue  # the tag field is the union's discriminator, checked by msgspec itself
            fields[key] = self.compile(sub, _path(_path(path, "properties"), key))
        return self._struct(fields, required, additional is False, tag)

    def _struct(
        self, fields: dict[str, Any], required: list[str], closed: bool, tag: tuple[str, str] | None
    ) -> Any:
        self._count += 1
        spec: list[Any] = []
        rename: dict[str, str] = {}
        for i, (key, typ) in enumerate(fields.items()):
            attr = f"f{i}"
            rename[attr] = key
            # A property that may be absent gets a default: its value is never used, only checked.
            spec.append((attr, typ) if key in required else (attr, typ, None))
        kwargs: dict[str, Any] = {}
        if tag is not None:
            kwargs = {"tag_field": tag[0], "tag": tag[1]}
        return msgspec.defstruct(
            f"Answer{self._count}",
            spec,
            rename=rename,
            forbid_unknown_fields=closed,
            kw_only=True,
            **kwargs,
        )

    def _ref(self, ref: str, path: str, tag: tuple[str, str] | None) -> Any:
        key = (ref, tag[1] if tag else None)
        if key in self._refs:
            return self._refs[key]
        if ref in self._active or not ref.startswith("#/"):
            self.exact = True  # recursive (or remote): checked exactly, msgspec sees Any below this point
            return Any
        target = _resolve_ref(self.root, ref)
        if target is None:
            self.exact = True
            return Any
        self._active.add(ref)
        try:
            typ = self.compile(target, ref, tag)
        finally:
            self._active.discard(ref)
        self._refs[key] = typ
        return typ

    def _literal(self, values: list[Any]) -> Any:
        if values and all(type(v) in _LITERAL_TYPES for v in values):
            if any(type(v) is bool for v in values) and any(type(v) is int for v in values):
                self.exact = True  # msgspec would not tell True from 1
                return Any
            return Literal[tuple(values)]  # type: ignore[valid-type]
        self.exact = True
        return Any

    def _union(self, node: dict[str, Any], path: str) -> Any:
        branches = node["anyOf"]
        if not isinstance(branches, list) or not branches:
            self.exact = True
            return Any
        anyof_path = _path(path, "anyOf")
        tagged = self._tagged(branches)
        if tagged is not None:
            tag_field, tags, has_null = tagged
            types = [
                self.compile(b, _path(anyof_path, i), (tag_field, tags[i]))
                for i, b in enumerate(branches)
                if tags[i] is not None
            ]
            if has_null:
                types.append(None)
            return self._checked_union(types)
        return self._checked_union([self.compile(b, _path(anyof_path, i)) for i, b in enumerate(branches)])

    def _tagged(self, branches: list[Any]) -> tuple[str, list[Any], bool] | None:
        """A discriminated union of objects (each with one property whose ``const`` tells it apart), as
        ``(tag field, tag per branch (None for a null branch), has a null branch)``."""
        objects: list[dict[str, Any] | None] = []
        for branch in branches:
            target = self._deref(branch)
            if isinstance(target, dict) and target.get("type") == "null":
                objects.append(None)
            elif isinstance(target, dict) and isinstance(target.get("properties"), dict):
                objects.append(target)
            else:
                return None
        present = [o for o in objects if o is not None]
        if len(present) < 2:
            return None
        for name in present[0]["properties"]:
            tags = [_const_string(self._deref(o["properties"].get(name))) for o in present]
            if (
                all(isinstance(t, str) for t in tags)
                and len(set(tags)) == len(tags)
                and all(name in (o.get("required") or []) for o in present)
            ):
                it = iter(tags)
                return name, [None if o is None else next(it) for o in objects], len(present) < len(objects)
        return None

    def _deref(self, node: Any) -> Any:
        return _deref(self.root, node)

    def _checked_union(self, types: list[Any]) -> Any:
        if any(t is Any for t in types):
            return Any
        unique = list(dict.fromkeys(types))
        typ = unique[0] if len(unique) == 1 else Union[tuple(unique)]  # noqa: UP007 - built at runtime
        try:
            msgspec.json.Decoder(typ)
        except TypeError:
            # A union msgspec cannot decode (two untagged objects, two array types...): checked exactly.
            self.exact = True
            return Any
        return typ


def _const_string(node: Any) -> str | None:
    if not isinstance(node, dict):
        return None
    if isinstance(node.get("const"), str):
        return node["const"]
    enum = node.get("enum")
    if isinstance(enum, list) and len(enum) == 1 and isinstance(enum[0], str):
        return enum[0]
    return None


# ----------------------------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class AnswerSchema:
    """What a request asked its answer to be.

    :param output: the ``json_schema`` format's compiled schema, if any.
    :param json_mode: a ``json_object`` format (any JSON object).
    :param tools: function name -> its compiled ``parameters`` schema (``None``: no parameters given).
    :param name: the format's name (``None`` without a ``json_schema`` format).
    """

    output: CompiledSchema | None = None
    json_mode: bool = False
    tools: Mapping[str, CompiledSchema | None] = field(default_factory=dict)
    name: str | None = None

    @property
    def structured(self) -> bool:
        """Whether the request asked for a format or offered tools."""
        return self.output is not None or self.json_mode or bool(self.tools)

    @classmethod
    def of(cls, schema: ResponseSchema) -> AnswerSchema:
        """Answers held to ``schema`` (collect's ``response_schema=``, overriding the requests')."""
        return cls(output=compile_schema(schema.schema), name=schema.name)


class StructuredAnswer(msgspec.Struct, gc=False):
    """The answer of one success body, as :func:`read_answer` made it.

    A ``Struct`` (made in C, several times faster than a class with ``__init__``): one is made per
    answer. ``gc=False``: it holds strings and decoded JSON only, never a reference cycle.

    :param text: the answer text: the content / output text, a tool call's arguments (the first call's),
        or the refusal text.
    :param finish_reason: chat's ``finish_reason``; for responses, the same vocabulary (``stop``,
        ``tool_calls``, ``length``, ``content_filter``).
    :param tool_calls: ``[{"name", "arguments"}]`` with the arguments parsed (kept as the raw string when
        not JSON), or ``None`` when the answer is no tool call.
    :param error_code: ``None`` for a usable answer, else one of :data:`ANSWER_ERROR_CODES`.
    :param error_message: why, in plain words.
    :param valid: ``text`` is JSON valid against the answer's schema (then :attr:`parsed` is its value).
    """

    text: str | None
    finish_reason: str | None
    tool_calls: list[dict[str, Any]] | None = None
    error_code: str | None = None
    error_message: str | None = None
    valid: bool = False

    @property
    def parsed(self) -> Any:
        """The validated value (``None`` unless :attr:`valid`)."""
        return orjson.loads(self.text) if self.valid and self.text is not None else None

    def parsed_json(self) -> orjson.Fragment | None:
        """The validated value as an ``orjson.Fragment``: written into a JSON record as it is, never
        parsed or re-encoded (re-encoded only when the model's text spans lines)."""
        if not self.valid or self.text is None:
            return None
        text = self.text
        if "\n" in text or "\r" in text:
            return orjson.Fragment(orjson.dumps(orjson.loads(text)))
        return orjson.Fragment(text)

    def __repr__(self) -> str:
        return (
            f"StructuredAnswer(error_code={self.error_code!r}, finish_reason={self.finish_reason!r}, "
            f"valid={self.valid}, text={self.text!r})"
        )


def read_answer(kind: str, body: Any, schema: AnswerSchema | None) -> StructuredAnswer:
    """Read, classify and validate the answer of one success body.

    For chat, the first choice: its ``message.content``, or for a tool call its calls' arguments; for
    responses, the output text, or the function call's arguments. Then, for a structured request
    (``schema.structured``), in this order: a refusal (``message.refusal`` / a ``refusal`` content part)
    -> ``refusal``; ``finish_reason == "content_filter"`` / ``incomplete`` for ``content_filter`` ->
    ``content_filter``; ``finish_reason == "length"`` / ``incomplete`` for ``max_output_tokens`` ->
    ``truncated``; text that is not JSON or not valid against the schema -> ``invalid_output``. A tool
    call's arguments are held to the function's ``parameters``; a text answer to a request that offered
    tools but no format is not validated. The answer of a plain text request (no format, no tools) is
    never a failure: its ``finish_reason`` says what happened.

    :param kind: ``"chat"`` or ``"responses"`` (other endpoints have no such answers).
    :param body: the response body of a 2xx result line.
    :param schema: what the request asked for (:class:`RequestSchemas`), or a collect-wide override.
    """
    if kind == _CHAT:
        parts: _Parts = _chat_parts(body)
    elif kind == _RESPONSES:
        parts = _responses_parts(body)
    else:
        return StructuredAnswer(None, None)
    return classify_answer(*parts, schema)


def classify_answer(
    text: str | None,
    finish: str | None,
    calls: list[tuple[str, str]] | None,
    refusal: str | None,
    schema: AnswerSchema | None,
) -> StructuredAnswer:
    """:func:`read_answer` from the parts of a body already read (for a typed view of the body).

    :param text: chat's first message content (text parts joined), or the responses output text.
    :param finish: chat's ``finish_reason``; for responses, :func:`responses_finish_reason`.
    :param calls: ``[(name, arguments JSON text)]`` of the tool / function calls, or ``None`` for none.
    :param refusal: the refusal text (chat ``message.refusal``, responses ``refusal`` parts), or ``None``.
    :param schema: what the request asked for, or a collect-wide override.
    """
    if (schema is None or not schema.structured) and calls is None:
        return StructuredAnswer(text, finish)
    tool_calls = None
    target: CompiledSchema | None = schema.output if schema is not None else None
    if calls is not None:
        tool_calls = [{"name": name, "arguments": _loads_or_raw(args)} for name, args in calls]
        text = calls[0][1] if calls else None
    if refusal is not None:
        return StructuredAnswer(refusal, finish, tool_calls, REFUSAL, "the model refused to answer")
    if finish == CONTENT_FILTER:
        return StructuredAnswer(
            text, finish, tool_calls, CONTENT_FILTER, "the answer was stopped by the content filter"
        )
    if finish == "length":
        return StructuredAnswer(
            text, finish, tool_calls, TRUNCATED, "the answer was cut at the output token limit"
        )
    if text is None:
        return StructuredAnswer(None, finish, tool_calls, INVALID_OUTPUT, "the answer has no text")
    if calls is not None:
        # Each call's arguments against its function's parameters (an override schema wins).
        for name, args in calls:
            check = target if target is not None else _tool_schema(schema, name)
            problem = check.check(args) if check is not None else _json_problem(args, obj=False)
            if problem is not None:
                return StructuredAnswer(
                    text, finish, tool_calls, INVALID_OUTPUT, f"tool call {name!r}: {problem}"
                )
        return StructuredAnswer(text, finish, tool_calls, valid=True)
    if target is not None:
        problem = target.check(text)
    elif schema is not None and schema.json_mode:
        problem = _json_problem(text, obj=True)
    else:
        return StructuredAnswer(text, finish, tool_calls)  # tools offered, a text answer: no schema to hold
    if problem is not None:
        return StructuredAnswer(text, finish, tool_calls, INVALID_OUTPUT, problem)
    return StructuredAnswer(text, finish, tool_calls, valid=True)


def _tool_schema(schema: AnswerSchema | None, name: str) -> CompiledSchema | None:
    return schema.tools.get(name) if schema is not None else None


def _json_problem(text: str, *, obj: bool) -> str | None:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return f"the answer is not valid JSON: {exc}"
    if obj and not isinstance(value, dict):
        return "the answer is not a JSON object"
    return None


def _loads_or_raw(text: Any) -> Any:
    try:
        return orjson.loads(text)
    except (orjson.JSONDecodeError, TypeError):
        return text


_Parts = tuple[str | None, str | None, list[tuple[str, str]] | None, str | None]


def _chat_parts(body: Any) -> _Parts:
    """(text, finish_reason, [(name, arguments)] or None, refusal or None) of a chat completion."""
    try:
        choice = body["choices"][0]
        message = choice["message"]
        finish = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError):
        return None, None, None, None
    content = message.get("content")
    if isinstance(content, list):  # content parts
        pieces = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        content = "".join(pieces) if pieces else None
    elif not isinstance(content, str):
        content = None
    refusal = message.get("refusal")
    calls = None
    raw_calls = message.get("tool_calls")
    if raw_calls:
        calls = []
        for call in raw_calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                calls.append((function.get("name"), function.get("arguments")))
    return content, finish, calls, refusal if isinstance(refusal, str) and refusal else None


def _responses_parts(body: Any) -> _Parts:
    """The same for a responses body; ``finish_reason`` in chat's vocabulary."""
    if not isinstance(body, dict):
        return None, None, None, None
    texts: list[str] = []
    refusals: list[str] = []
    calls: list[tuple[str, str]] | None = None
    for item in body.get("output") or ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            for part in item.get("content") or ():
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                    refusals.append(part["refusal"])
        elif kind == "function_call":
            if calls is None:
                calls = []
            calls.append((item.get("name"), item.get("arguments")))
    finish = responses_finish_reason(body.get("status"), body.get("incomplete_details"), calls is not None)
    text = "".join(texts) if texts else None
    return text, finish, calls, "".join(refusals) if refusals else None


def responses_finish_reason(status: Any, incomplete_details: Any, has_calls: bool) -> str | None:
    """A responses body's outcome in chat's ``finish_reason`` vocabulary.

    ``incomplete`` for ``content_filter`` -> ``content_filter``; another ``incomplete``
    (``max_output_tokens``) -> ``length``; a function call -> ``tool_calls``; ``completed`` -> ``stop``;
    another status as it is.
    """
    if status == "incomplete":
        reason = incomplete_details.get("reason") if isinstance(incomplete_details, dict) else None
        return CONTENT_FILTER if reason == CONTENT_FILTER else "length"
    if has_calls:
        return "tool_calls"
    return "stop" if status == "completed" else status


# ----------------------------------------------------------------------------- schemas of request lines


def answer_schema_of_request(kind: str, body: Any) -> AnswerSchema | None:
    """What one request body asks its answer to be (``None`` for a plain text request).

    :param kind: ``"chat"`` or ``"responses"``.
    :param body: the request body.
    """
    if not isinstance(body, dict):
        return None
    fmt = _format_of(kind, body)
    tools = body.get("tools")
    if fmt is None and not tools:
        return None
    return _answer_schema(
        orjson.dumps(fmt) if fmt is not None else b"", orjson.dumps(tools) if tools else b""
    )


def _format_of(kind: str, body: dict[str, Any]) -> Any:
    if kind == _CHAT:
        fmt = body.get("response_format")
    else:
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object"):
        return fmt
    return None


@functools.lru_cache(maxsize=256)
def _answer_schema(fmt_key: bytes, tools_key: bytes) -> AnswerSchema | None:
    output = None
    json_mode = False
    name = None
    if fmt_key:
        fmt = orjson.loads(fmt_key)
        if fmt.get("type") == "json_object":
            json_mode = True
        else:
            spec = fmt.get("json_schema", fmt)  # chat nests it; responses does not
            schema = spec.get("schema") if isinstance(spec, dict) else None
            name = spec.get("name") if isinstance(spec, dict) else None
            output = compile_schema(schema) if isinstance(schema, dict) else None
            json_mode = output is None
    tools: dict[str, CompiledSchema | None] = {}
    for tool in orjson.loads(tools_key) if tools_key else ():
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        spec = tool.get("function", tool)  # chat nests it; responses does not
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            params = spec.get("parameters")
            tools[spec["name"]] = compile_schema(params) if isinstance(params, dict) and params else None
    result = AnswerSchema(output, json_mode, tools, name)
    return result if result.structured else None


#: What a request's body has not said (a field of :class:`_ChatAsks` / :class:`_ResponsesAsks` left out).
_UNSAID = msgspec.Raw(b"")


class _ChatAsks(msgspec.Struct, gc=False):
    """What a chat request body asks its answer to be, as JSON text (decoding skips the rest)."""

    response_format: msgspec.Raw = _UNSAID
    tools: msgspec.Raw = _UNSAID


class _ResponsesAsks(msgspec.Struct, gc=False):
    """What a responses request body asks its answer to be, as JSON text (``text`` holds the format)."""

    text: msgspec.Raw = _UNSAID
    tools: msgspec.Raw = _UNSAID


_A = typing.TypeVar("_A")


class _RequestAsking(msgspec.Struct, typing.Generic[_A], gc=False):
    """A request line read for its custom_id and what its body asks its answer to be."""

    custom_id: str
    body: _A


_tools_of = attrgetter("tools")

#: Distinct requests remembered per :class:`RequestSchemas` (the formats of one batch are few).
_MAX_REMEMBERED = 1024


class RequestSchemas:
    """Learns each request's :class:`AnswerSchema` from what its body asks, cheaply.

    Request lines are decoded by :attr:`decode_lines` into ``custom_id`` and ``body``, a typed view (of
    :attr:`asks_type`) that keeps the format and tools as JSON text and skips the rest. A block whose
    requests all ask the same, byte for byte, is answered at once (:meth:`of_block`); any request by its
    JSON text, parsed once per distinct text (:meth:`of_asks`).

    :param kind: ``"chat"`` or ``"responses"``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        #: The body view to decode request lines with.
        self.asks_type: type[_ChatAsks | _ResponsesAsks] = _ChatAsks if kind == _CHAT else _ResponsesAsks
        self._field = "response_format" if kind == _CHAT else "text"
        self._format_of = attrgetter(self._field)
        self._remembered: dict[tuple[bytes, bytes], AnswerSchema | None] = {}
        #: Reads newline-separated request lines into ``custom_id`` and ``body`` (what it asks), skipping the
        #: rest; raises ``msgspec.DecodeError`` for a line that does not fit.
        self.decode_lines = msgspec.json.Decoder(_RequestAsking[self.asks_type]).decode_lines  # type: ignore[name-defined]

    def of_asks(self, asks: _ChatAsks | _ResponsesAsks) -> AnswerSchema | None:
        """The answer schema one request asks for (``None``: plain text).

        :param asks: the request body, decoded with :attr:`asks_type`.
        """
        fmt, tools = self._format_of(asks), asks.tools
        if fmt is _UNSAID and tools is _UNSAID:
            return None
        key = (bytes(fmt), bytes(tools))
        if key in self._remembered:
            return self._remembered[key]
        said = zip((self._field, "tools"), key, strict=True)
        body = {name: orjson.loads(text) for name, text in said if text}
        schema = answer_schema_of_request(self.kind, body)
        if len(self._remembered) < _MAX_REMEMBERED:
            self._remembered[key] = schema
        return schema

    def of_block(self, asks: Sequence[_ChatAsks | _ResponsesAsks]) -> tuple[bool, AnswerSchema | None]:
        """Whether a block of requests all ask the same thing, and what: ``(True, schema)``, or
        ``(False, None)`` when they differ (ask :meth:`of_asks` one by one).

        :param asks: the requests' bodies, decoded with :attr:`asks_type` (at least one).
        """
        count = len(asks)
        # Identity first: a body that says nothing of either holds the one _UNSAID object.
        formats = list(map(self._format_of, asks))
        if formats.count(formats[0]) != count:
            return False, None
        tools = list(map(_tools_of, asks))
        if tools.count(tools[0]) != count:
            return False, None
        return True, self.of_asks(asks[0])

    def of_body(self, body: Any) -> AnswerSchema | None:
        """The answer schema of a request body already parsed."""
        return answer_schema_of_request(self.kind, body)


# ------------------------------------------------------------------------------------------------- Arrow


def arrow_type(schema: Mapping[str, Any], *, enums: str = "string") -> Any:
    """The Arrow type of answers valid against ``schema``.

    Strings, integers (int64), numbers (float64), booleans; enums as strings (``enums="string"``) or
    dictionary-encoded strings (``enums="dictionary"``); arrays as lists; objects with properties as
    structs (fields in the schema's order); ``[T, null]`` unions as ``T``; a union of objects as one
    struct of all their fields. Anything else (a free-form map, a union of different types, a recursive
    reference, no type at all) is its JSON text, a string. Every field is nullable.

    :param schema: the JSON Schema.
    :param enums: ``"string"`` or ``"dictionary"``.
    """
    return _ArrowPlan(dict(schema), enums).type


class _ArrowPlan:
    """The Arrow type of a schema and how to turn validated values into it."""

    def __init__(self, root: dict[str, Any], enums: str) -> None:
        if enums not in ("string", "dictionary"):
            raise ValueError(f"enums must be 'string' or 'dictionary', got {enums!r}")
        import pyarrow as pa

        self.pa = pa
        self.root = root
        self.enums = enums
        #: Some value becomes JSON text (then values need converting before pyarrow takes them).
        self.has_json_text = False
        #: Some field is dictionary-encoded.
        self.has_dictionary = False
        self._active: set[str] = set()
        node = self._plan(root)
        self.type = node[0]
        self.convert: Callable[[Any], Any] | None = node[1] if self.has_json_text else None

    def _json_text(self) -> tuple[Any, Callable[[Any], Any]]:
        self.has_json_text = True
        return self.pa.string(), _to_json_text

    def _plan(self, node: Any) -> tuple[Any, Callable[[Any], Any] | None]:
        pa = self.pa
        if not isinstance(node, dict):
            return self._json_text()
        ref = node.get("$ref")
        if isinstance(ref, str):
            if ref in self._active or not ref.startswith("#/"):
                return self._json_text()
            self._active.add(ref)
            try:
                return self._plan(_resolve_ref(self.root, ref))
            finally:
                self._active.discard(ref)
        values = [node["const"]] if "const" in node else node.get("enum")
        if isinstance(values, list) and values:
            present = [v for v in values if v is not None]
            if present and all(isinstance(v, str) for v in present):
                if self.enums == "dictionary":
                    self.has_dictionary = True
                    return pa.dictionary(pa.int32(), pa.string()), None
                return pa.string(), None
            if present and all(type(v) is int for v in present):
                return pa.int64(), None
            if present and all(type(v) is bool for v in present):
                return pa.bool_(), None
            return self._json_text()
        branches = node.get("anyOf") or node.get("oneOf")
        if isinstance(branches, list) and branches:
            return self._union(branches)
        kind = node.get("type")
        if isinstance(kind, list):
            non_null = [k for k in kind if k != "null"]
            if len(non_null) == 1:
                kind = non_null[0]
            elif set(non_null) == {"integer", "number"}:
                return pa.float64(), None
            else:
                return self._json_text()
        if kind is None and "properties" in node:
            kind = "object"
        if kind == "string":
            return pa.string(), None
        if kind == "integer":
            return pa.int64(), None
        if kind == "number":
            return pa.float64(), None
        if kind == "boolean":
            return pa.bool_(), None
        if kind == "null":
            return pa.null(), None
        if kind == "array" and isinstance(node.get("items"), dict):
            item_type, item_convert = self._plan(node["items"])
            convert = None if item_convert is None else _list_converter(item_convert)
            return pa.list_(item_type), convert
        if kind == "object" and isinstance(node.get("properties"), dict) and node["properties"]:
            return self._struct(node["properties"])
        return self._json_text()

    def _struct(self, props: Mapping[str, Any]) -> tuple[Any, Callable[[Any], Any] | None]:
        pa = self.pa
        fields = []
        converters: dict[str, Callable[[Any], Any]] = {}
        for key, sub in props.items():
            typ, convert = self._plan(sub)
            fields.append(pa.field(key, typ))
            if convert is not None:
                converters[key] = convert
        return pa.struct(fields), (_struct_converter(converters) if converters else None)

    def _deref(self, node: Any) -> Any:
        return _deref(self.root, node)

    def _union(self, branches: list[Any]) -> tuple[Any, Callable[[Any], Any] | None]:
        # (the branch as written, for _plan to follow its $ref; the schema it points at, to look at)
        present = []
        for branch in branches:
            target = self._deref(branch)
            if not (isinstance(target, dict) and target.get("type") == "null"):
                present.append((branch, target))
        if len(present) == 1:
            return self._plan(present[0][0])
        targets = [t for _, t in present]
        if targets and all(isinstance(t, dict) and isinstance(t.get("properties"), dict) for t in targets):
            # A union of objects (a discriminated union...): one struct with every branch's fields.
            merged: dict[str, list[Any]] = {}
            for target in targets:
                for key, sub in target["properties"].items():
                    merged.setdefault(key, []).append(sub)
            props = {key: subs[0] if len(subs) == 1 else {"anyOf": subs} for key, subs in merged.items()}
            return self._struct(props)
        plans = [self._plan(branch) for branch, _ in present]
        types = {p[0] for p in plans}
        if types == {self.pa.int64(), self.pa.float64()}:
            return self.pa.float64(), None
        if len(types) == 1 and all(p[1] is None for p in plans):
            return plans[0]
        return self._json_text()


def _to_json_text(value: Any) -> Any:
    return None if value is None else orjson.dumps(value).decode()


def _list_converter(item: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        return None if value is None else [item(v) for v in value]

    return convert


def _struct_converter(converters: dict[str, Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if value is None:
            return None
        out = dict(value)
        for key, fn in converters.items():
            if key in out:
                out[key] = fn(out[key])
        return out

    return convert


def tool_calls_arrow_type() -> Any:
    """The Arrow type of the ``tool_calls`` column: a list of ``{name, arguments}``, arguments as JSON text
    (each function has its own parameters, so no one struct fits them all)."""
    import pyarrow as pa

    return pa.list_(pa.struct([pa.field("name", pa.string()), pa.field("arguments", pa.string())]))


def tool_calls_array(rows: Iterable[list[dict[str, Any]] | None]) -> Any:
    """The ``tool_calls`` of each row (:attr:`StructuredAnswer.tool_calls`, or ``None``) as one Arrow array
    of :func:`tool_calls_arrow_type`."""
    import pyarrow as pa

    values = [
        None
        if calls is None
        else [{"name": c["name"], "arguments": _to_json_text(c["arguments"])} for c in calls]
        for calls in rows
    ]
    return pa.array(values, type=tool_calls_arrow_type())


def struct_array(values: Iterable[Any], schema: Mapping[str, Any] | None, *, enums: str = "string") -> Any:
    """Validated answers (Python values, ``None`` for a row without one) as one Arrow array.

    :param values: the values, in row order.
    :param schema: their schema: the array is typed by :func:`arrow_type` (a ``StructArray`` for an
        object schema); ``None`` when there is no single schema: each value's JSON text, a string array.
    :param enums: as for :func:`arrow_type`.
    """
    import pyarrow as pa

    if schema is None:
        return pa.array([_to_json_text(v) for v in values], type=pa.string())
    plan = _ArrowPlan(dict(schema), enums)
    if plan.convert is not None:
        values = [plan.convert(v) for v in values]
    elif not isinstance(values, list):
        values = list(values)
    return pa.array(values, type=plan.type)


#: The placeholder of a null row in :class:`ParsedColumn`'s buffer (the validity bitmap hides it).
_NULL_OBJECT = b"{}"


class ParsedColumn:
    """Builds the ``parsed`` column of a block of success rows from the answers' validated JSON text.

    The texts are gathered into one buffer and read by Arrow's JSON reader against the column's type, in
    C++: no Python object per answer. (A schema whose type needs per-value conversion, JSON text fields or
    dictionary-encoded enums, or whose root is not an object, takes the slower way through Python values.)

    :param schema: the answers' JSON Schema, or ``None``: no single schema, the column is JSON text.
    :param enums: as for :func:`arrow_type`.
    """

    def __init__(self, schema: Mapping[str, Any] | None, *, enums: str = "string") -> None:
        import pyarrow as pa

        self._pa = pa
        self.schema = None if schema is None else dict(schema)
        self.enums = enums
        self._plan = None if schema is None else _ArrowPlan(self.schema, enums)  # type: ignore[arg-type]
        self.type = pa.string() if self._plan is None else self._plan.type
        self._fast = (
            self._plan is not None
            and pa.types.is_struct(self.type)
            and not self._plan.has_json_text
            and not self._plan.has_dictionary
        )
        self._buffer = bytearray()
        self._longest = 0
        self._texts: list[str | bytes | None] = []
        self._valid: list[bool] = []

    def __len__(self) -> int:
        return len(self._valid)

    def add(self, answer: StructuredAnswer | None) -> None:
        """One row: the answer's validated value, or null (no answer, or not a valid one)."""
        if answer is None or not answer.valid or answer.text is None:
            self.add_null()
        else:
            self.add_text(answer.text)

    def add_text(self, text: str | bytes) -> None:
        """One row from a validated answer's JSON text (an object, for an object schema)."""
        if self._fast:
            data = text.encode() if type(text) is str else text
            if b"\n" in data or b"\r" in data:
                data = orjson.dumps(orjson.loads(data))
            self._longest = max(self._longest, len(data))
            self._buffer += data
            self._buffer += b"\n"
        else:
            self._texts.append(text)
        self._valid.append(True)

    def add_texts(self, texts: Sequence[Any]) -> None:
        """Rows from many validated answers' JSON text (bytes-like, ``None`` for null): as
        :meth:`add_text` / :meth:`add_null` of each, in one pass when each text is one line."""
        data = b"\n".join([_NULL_OBJECT if text is None else text for text in texts])
        if not self._fast or b"\r" in data or data.count(b"\n") != len(texts) - 1:
            for text in texts:
                if text is None:
                    self.add_null()
                else:
                    self.add_text(bytes(text))
            return
        if texts:
            self._longest = max(self._longest, len(_NULL_OBJECT), *map(len, filter(None, texts)))
            self._buffer += data
            self._buffer += b"\n"
        self._valid += [text is not None for text in texts]

    def add_null(self) -> None:
        if self._fast:
            self._buffer += _NULL_OBJECT + b"\n"  # a placeholder the validity bitmap hides
        else:
            self._texts.append(None)
        self._valid.append(False)

    def finish(self) -> Any:
        """The column so far (an Arrow array of :attr:`type`); the builder is emptied."""
        pa = self._pa
        buffer, texts, valid, longest = self._buffer, self._texts, self._valid, self._longest
        self._buffer, self._texts, self._valid, self._longest = bytearray(), [], [], 0
        n = len(valid)
        if not self._fast:
            if self._plan is None:
                return pa.array(texts, type=pa.string())
            return struct_array(
                [None if t is None else orjson.loads(t) for t in texts], self.schema, enums=self.enums
            )
        if not any(valid):
            return pa.nulls(n, type=self.type)
        import pyarrow.json as pa_json

        table = pa_json.read_json(
            io.BytesIO(buffer),
            # Blocks of a megabyte (measured faster than one block of everything); a line must fit in one.
            read_options=pa_json.ReadOptions(use_threads=False, block_size=max(2 * longest + 2, 1 << 20)),
            parse_options=pa_json.ParseOptions(
                explicit_schema=pa.schema(list(self.type)), unexpected_field_behavior="ignore"
            ),
        )
        children = [table.column(f.name).combine_chunks() for f in self.type]
        validity = pa.array(valid, type=pa.bool_()).buffers()[1]
        return pa.Array.from_buffers(self.type, n, [validity], children=children)
