"""OpenAPI 3.1 document derived from the same descriptors and bindings as the routes.

Every operation lists its success answer and every error the gateway can give, so a client (or a
fuzzer) can check each response against the document. Responses are described as the gateway writes
them (services/gateway/transcode.py): every field present, unset messages and optional fields as null,
64-bit integers as strings. Requests are described as the gateway parses them: no unknown fields.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from services.common.interceptor import Access, method_access
from services.gateway.bindings import Binding
from services.gateway.errors import HTTP_STATUS, STATUS_CODE_NAMES
from services.gateway.http_streams import NDJSON, http_body_field, is_http_stream
from services.gateway.transcode import required_fields

_INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32 = {"type": "integer", "format": "int32", "minimum": 0, "maximum": 2**32 - 1}
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_FIXED64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
}
_WELL_KNOWN = {"google.protobuf.Timestamp": {"type": "string", "format": "date-time"}}
_ERROR = {
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "What went wrong and what to fix."},
        "success": {"const": False},
        "code": {"type": "string", "description": "The gRPC status name, e.g. NOT_FOUND."},
    },
    "required": ["error", "success", "code"],
}
# Every status the gateway answers an operation with when it fails: the services' codes through
# grpc-gateway's table, and the ones the gateway gives itself (a body too large). 405 is not an
# operation's answer: it means the operation does not exist.
ERROR_STATUSES = sorted({*HTTP_STATUS.values(), *(s for s in STATUS_CODE_NAMES if s != 405)})
_ERROR_DESCRIPTIONS = {
    400: "The request is invalid (a field, the JSON body, a query parameter) or the object is not in a state for it.",
    401: "No API key, or one the platform does not know.",
    403: "The key may not make this call.",
    404: "No such object in the caller's organization.",
    409: "The object exists already, or something still uses it.",
    413: "The request body is larger than VERS_HTTP_MAX_BODY_BYTES.",
    429: "A limit was reached; the message names it and how to raise it.",
    499: "The call was cancelled.",
    500: "An internal error; the server log has the details.",
    501: "Not implemented.",
    503: "A service is unavailable.",
    504: "The call took longer than its deadline.",
}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _has_presence(field: FieldDescriptor) -> bool:
    """A proto3 `optional` scalar: unset, it comes out as null."""
    return field.message_type is None and not field.is_repeated and field.has_presence


class _Schemas:
    """Component schemas, one set for requests (as parsed) and one for responses (as written)."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {"Error": _ERROR}
        self._names: dict[tuple[str, bool], str] = {}

    def _name(self, descriptor: Descriptor, output: bool) -> str:
        # A message used both ways gets two schemas: responses require every field, requests none.
        key = (descriptor.full_name, output)
        if key not in self._names:
            taken = (descriptor.full_name, not output) in self._names
            self._names[key] = descriptor.full_name + ((".Response" if output else ".Request") if taken else "")
        return self._names[key]

    def message(self, descriptor: Descriptor, output: bool, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
        if descriptor.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[descriptor.full_name])
        if skip:
            return self._object(descriptor, output, skip)
        name = self._name(descriptor, output)
        if name not in self.components:
            self.components[name] = {}  # recursive messages refer to it before it is complete
            self.components[name] = self._object(descriptor, output, skip)
        return {"$ref": f"#/components/schemas/{name}"}

    def _object(self, descriptor: Descriptor, output: bool, skip: frozenset[str]) -> dict[str, Any]:
        fields = [f for f in descriptor.fields if f.name not in skip]
        schema: dict[str, Any] = {"type": "object", "properties": {f.name: self.field(f, output) for f in fields}}
        if output:
            schema["required"] = [f.name for f in fields]
        else:
            schema["additionalProperties"] = False
            if required := [name for name in required_fields(descriptor) if name not in skip]:
                schema["required"] = required
        return schema

    def field(self, field: FieldDescriptor, output: bool) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            return {"type": "object", "additionalProperties": self.field(field.message_type.fields_by_name["value"], output)}
        if field.message_type is not None:
            single = self.message(field.message_type, output)
        elif field.enum_type is not None:
            single = {"type": "string", "enum": [value.name for value in field.enum_type.values]}
        else:
            single = dict(_SCALARS[field.type])
        if field.is_repeated:
            return {"type": "array", "items": single}
        if output and (field.message_type is not None or _has_presence(field)):
            return _nullable(single)
        return single

    def parameter(self, field: FieldDescriptor) -> dict[str, Any]:
        return self.field(field, output=False)


def _error_responses() -> dict[str, Any]:
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {str(status): {"description": _ERROR_DESCRIPTIONS.get(status, "Error"), "content": content} for status in ERROR_STATUSES}


def _success_response(binding: Binding, schemas: _Schemas) -> dict[str, Any]:
    success: dict[str, Any] = {"description": "Success"}
    if binding.success_code == 204:
        return success
    output = binding.method.output_type
    if binding.method.server_streaming:
        if http_body_field(output, binding.response_body) is not None:
            success["content"] = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
        else:
            event = output.fields_by_name[binding.response_body] if binding.response_body else None
            schema = schemas.field(event, output=True) if event is not None else schemas.message(output, output=True)
            success["description"] = "Success: one JSON object per line, as the events come"
            success["content"] = {NDJSON: {"schema": schema}}
        return success
    if binding.response_body:
        answer = schemas.field(output.fields_by_name[binding.response_body], output=True)
    else:
        answer = schemas.message(output, output=True)
    success["content"] = {"application/json": {"schema": answer}}
    return success


def _taken_by_literals(binding: Binding, bindings: list[Binding]) -> dict[str, list[str]]:
    """For each path variable, the values a route of literal segments answers instead (GET /commits/public
    is not GET /commits/{commit_id} with commit_id "public"): the router tries literal segments first."""
    parts = binding.path.split("/")
    taken: dict[str, list[str]] = {}
    for other in bindings:
        theirs = other.path.split("/")
        if other is binding or other.verb != binding.verb or len(theirs) != len(parts):
            continue
        differ = [i for i, (mine, their) in enumerate(zip(parts, theirs, strict=True)) if mine != their]
        if len(differ) == 1 and parts[differ[0]].startswith("{") and not theirs[differ[0]].startswith("{"):
            taken.setdefault(parts[differ[0]].strip("{}"), []).append(theirs[differ[0]])
    return taken


def _operation(binding: Binding, schemas: _Schemas, bindings: list[Binding]) -> dict[str, Any]:
    request = binding.method.input_type
    path_params = frozenset(binding.path_params)
    taken = _taken_by_literals(binding, bindings)
    parameters = [
        {
            "name": name, "in": "path", "required": True,
            "schema": {
                **schemas.parameter(request.fields_by_name[name]), "minLength": 1,
                **({"not": {"enum": sorted(taken[name])}} if name in taken else {}),
            },
        }
        for name in binding.path_params
    ]  # fmt: skip
    # Scalar fields may come in the query string, also next to a body ("POST /vm/new_root?wait_boot=true").
    parameters += [
        {"name": field.name, "in": "query", "required": False, "schema": schemas.parameter(field)}
        for field in request.fields
        if field.name not in path_params and field.message_type is None and field.name != binding.body
    ]
    operation: dict[str, Any] = {
        "operationId": binding.method.name + (str(binding.alternate) if binding.alternate else ""),
        "tags": [binding.backend],
        "parameters": parameters,
    }
    if binding.body == "*":
        body_schema = schemas.message(request, output=False, skip=path_params)
        operation["requestBody"] = {"required": False, "content": {"application/json": {"schema": body_schema}}}
    elif http_body_field(request, binding.body) is not None:
        operation["requestBody"] = {
            "required": False,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    elif binding.body:
        body_schema = schemas.parameter(request.fields_by_name[binding.body])
        operation["requestBody"] = {"required": False, "content": {"application/json": {"schema": body_schema}}}
    operation["responses"] = {str(binding.success_code): _success_response(binding, schemas), **_error_responses()}
    if method_access(binding.grpc_path) is Access.PUBLIC:
        operation["security"] = []
    return operation


def openapi_document(bindings: list[Binding]) -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for binding in bindings:
        if not binding.streaming or is_http_stream(binding):
            paths.setdefault(binding.path, {})[binding.verb.lower()] = _operation(binding, schemas, bindings)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Vers API", "version": "1.0.0"},
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
