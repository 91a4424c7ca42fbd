"""OpenAPI 3.1 document derived from the same descriptors and bindings as the routes."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from services.common.interceptor import Access, method_access
from services.gateway.bindings import Binding

_SCALARS: dict[int, dict[str, str]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_ENUM: {"type": "string"},
}
_WELL_KNOWN = {"google.protobuf.Timestamp": {"type": "string", "format": "date-time"}}
_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "success": {"type": "boolean"}, "code": {"type": "string"}},
    "required": ["error", "success", "code"],
}


class _Schemas:
    def __init__(self) -> None:
        self.components: dict[str, Any] = {"Error": _ERROR}

    def message(self, descriptor: Descriptor, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
        if descriptor.full_name in _WELL_KNOWN:
            return _WELL_KNOWN[descriptor.full_name]
        if skip:
            return self._object(descriptor, skip)
        if descriptor.full_name not in self.components:
            self.components[descriptor.full_name] = {}
            self.components[descriptor.full_name] = self._object(descriptor, skip)
        return {"$ref": f"#/components/schemas/{descriptor.full_name}"}

    def _object(self, descriptor: Descriptor, skip: frozenset[str]) -> dict[str, Any]:
        properties = {f.name: self.field(f) for f in descriptor.fields if f.name not in skip}
        return {"type": "object", "properties": properties}

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            return {"type": "object", "additionalProperties": self.field(field.message_type.fields_by_name["value"])}
        single = self.message(field.message_type) if field.message_type is not None else _SCALARS[field.type]
        return {"type": "array", "items": single} if field.is_repeated else single


def _operation(binding: Binding, schemas: _Schemas) -> dict[str, Any]:
    request = binding.method.input_type
    path_params = frozenset(binding.path_params)
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": schemas.field(request.fields_by_name[name])}
        for name in binding.path_params
    ]
    operation: dict[str, Any] = {
        "operationId": binding.method.name + (str(binding.alternate) if binding.alternate else ""),
        "tags": [binding.backend],
        "parameters": parameters,
    }
    if binding.body == "*":
        body_schema = schemas.message(request, skip=path_params)
        operation["requestBody"] = {"required": False, "content": {"application/json": {"schema": body_schema}}}
    else:
        for field in request.fields:
            if field.name not in path_params and field.message_type is None:
                parameters.append({"name": field.name, "in": "query", "required": False, "schema": schemas.field(field)})
    output = binding.method.output_type
    if binding.response_body:
        answer = schemas.field(output.fields_by_name[binding.response_body])
    else:
        answer = schemas.message(output)
    code = str(binding.success_code)
    success: dict[str, Any] = {"description": "Success"}
    if binding.success_code != 204:
        success["content"] = {"application/json": {"schema": answer}}
    error = {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    operation["responses"] = {code: success, "default": error}
    if method_access(binding.grpc_path) is Access.PUBLIC:
        operation["security"] = []
    return operation


def openapi_document(bindings: list[Binding]) -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for binding in bindings:
        if not binding.streaming:
            paths.setdefault(binding.path, {})[binding.verb.lower()] = _operation(binding, schemas)
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
