"""JSON <-> protobuf for one binding: path variables, query parameters and body into the request,
the response (or its `response_body` field) into JSON with every declared field present."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from google.api import field_behavior_pb2
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from services.gateway.bindings import Binding

# Deeper JSON is refused before protobuf's recursive parser sees it (no request message nests this far).
MAX_JSON_DEPTH = 64
_TRUE = {"true", "1", "yes", "on", ""}
_FALSE = {"false", "0", "no", "off"}


class BadRequest(ValueError):
    """The HTTP request cannot become the RPC's request message; the message says what to fix."""


def descriptor_of(message: Message | type[Message]) -> Descriptor:
    """A message's descriptor as `google.protobuf.descriptor` types it. The stubs also allow upb's own class,
    whose descriptors pass `isinstance(_, Descriptor)` at run time."""
    descriptor = message.DESCRIPTOR
    assert isinstance(descriptor, Descriptor)
    return descriptor


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _field_names(descriptor: Descriptor) -> str:
    return ", ".join(field.name for field in descriptor.fields)


def _query_value(field: FieldDescriptor, name: str, value: str) -> Any:
    if field.type == FieldDescriptor.TYPE_BOOL:
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise BadRequest(f"query parameter {name!r} must be true or false, not {value!r}")
    return value


def _place_query(target: dict[str, Any], descriptor: Descriptor, name: str, values: Sequence[str], allowed: str) -> None:
    head, _, rest = name.partition(".")
    field = descriptor.fields_by_name.get(head)
    if field is None:
        raise BadRequest(f"unknown query parameter {name!r}; this endpoint takes: {allowed or 'none'}")
    if rest:
        if field.message_type is None or _is_map(field) or field.is_repeated:
            raise BadRequest(f"query parameter {name!r}: {head!r} has no fields")
        _place_query(target.setdefault(head, {}), field.message_type, rest, values, allowed)
    elif field.is_repeated:
        target[head] = [_query_value(field, name, value) for value in values]
    elif field.message_type is not None:
        raise BadRequest(f"query parameter {name!r} is an object: send it in the JSON body")
    else:
        target[head] = _query_value(field, name, values[-1])


def required_fields(descriptor: Descriptor) -> list[str]:
    """Fields marked (google.api.field_behavior) = REQUIRED: a JSON body must name them, even empty
    (`{"labels": {}}` clears labels; a body without `labels` is a mistake, not a request to clear them)."""
    return [
        field.name
        for field in descriptor.fields
        if field_behavior_pb2.REQUIRED in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
    ]


def _require(descriptor: Descriptor, data: Mapping[str, Any], path_params: Sequence[str]) -> None:
    def given(name: str) -> bool:  # by its proto name or its JSON one (isPublic), as the parser takes both
        return data.get(name) is not None or data.get(descriptor.fields_by_name[name].json_name) is not None

    missing = [name for name in required_fields(descriptor) if name not in path_params and not given(name)]
    if missing:
        raise BadRequest(f"request body must give {', '.join(missing)} (required)")


def _deeper_than(data: Any, limit: int) -> bool:
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def load_json(raw: bytes | str, where: str) -> Any:
    """Parse JSON from a client; anything that is not JSON, or nests deeper than MAX_JSON_DEPTH, is a BadRequest."""
    too_deep = BadRequest(f"{where} nests arrays and objects more than {MAX_JSON_DEPTH} levels deep")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise too_deep from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(f"{where} is not valid JSON: {error}") from None
    if isinstance(data, (dict, list)) and _deeper_than(data, MAX_JSON_DEPTH):
        raise too_deep
    return data


def parse_json(data: Any, message: Message, where: str) -> Message:
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as error:
        # protobuf's message spans lines; an error body is one line
        raise BadRequest(f"{where}: {' '.join(str(error).split())}") from None
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError) as error:
        # what json_format lets through for values it cannot place
        raise BadRequest(f"{where}: a value does not fit its field ({type(error).__name__}: {error})") from None
    return message


def build_request(
    binding: Binding,
    message: Message,
    path_params: Mapping[str, str],
    query: Sequence[tuple[str, str]],
    body: bytes,
) -> Message:
    descriptor = descriptor_of(message)
    if binding.body == "*" and not body.strip():
        _require(descriptor, {}, binding.path_params)
    if body.strip():
        if not binding.body:
            raise BadRequest(f"{binding.verb} {binding.path} takes no request body")
        data = load_json(body, "request body")
        if binding.body == "*":
            if not isinstance(data, dict):
                raise BadRequest(f"request body must be a JSON object with fields: {_field_names(descriptor)}")
            path_fields = set(binding.path_params) & set(data)
            if path_fields:
                raise BadRequest(f"{', '.join(sorted(path_fields))} comes from the URL path, not the body")
            _require(descriptor, data, binding.path_params)
            parse_json(data, message, "request body")
        else:
            parse_json({binding.body: data}, message, "request body")
    grouped: dict[str, list[str]] = {}
    for name, value in query:
        grouped.setdefault(name, []).append(value)
    queryable = [f.name for f in descriptor.fields if f.name not in binding.path_params and f.name != binding.body]
    from_query: dict[str, Any] = {}
    for name, values in grouped.items():
        if name.partition(".")[0] in binding.path_params:
            raise BadRequest(f"{name!r} comes from the URL path, not the query string")
        _place_query(from_query, descriptor, name, values, ", ".join(queryable))
    parse_json(from_query, message, "query string")
    parse_json(dict(path_params), message, "URL path")
    return message


def _fill_absent(descriptor: Descriptor, data: dict[str, Any]) -> None:
    """Unset optional and message fields come out as null rather than missing, as clients expect every field."""
    for field in descriptor.fields:
        if field.name not in data:
            data[field.name] = None
        elif field.message_type is not None and not _is_map(field) and not field.message_type.full_name.startswith("google.protobuf."):
            value = data[field.name]
            for item in value if field.is_repeated else [value]:
                _fill_absent(field.message_type, item)


def to_json(message: Message) -> dict[str, Any]:
    data = json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    _fill_absent(descriptor_of(message), data)
    return data


def response_json(binding: Binding, message: Message) -> Any:
    data = to_json(message)
    return data[binding.response_body] if binding.response_body else data
