"""The gateway's route table and JSON transcoding, without a server: bindings read from the protos' HTTP
rules, requests built from path, query string and body, responses and errors turned into JSON."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import status_pb2
from grpc_status import rpc_status

from services.common.errors import AlreadyExists, Conflict, InvalidName, NotFound, PermissionDenied, ResourceExhausted, Unauthenticated
from services.gateway.bindings import Binding, all_bindings, method_bindings
from services.gateway.errors import HTTP_STATUS, rpc_error_response
from services.gateway.transcode import MAX_JSON_DEPTH, BadRequest, build_request, load_json, response_json, to_json
from vers.common.v1 import governance_pb2
from vers.orchestrator.v1 import orchestrator_pb2
from vers.registry.v1 import registry_pb2

ORCHESTRATOR = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"]
REGISTRY = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"]
BINDINGS = all_bindings()


def binding(verb: str, path: str) -> Binding:
    found = [b for b in BINDINGS if (b.verb, b.path) == (verb, path)]
    assert len(found) == 1, f"{verb} {path}: {len(found)} bindings"
    return found[0]


def request_of(
    found: Binding, path: dict[str, str] | None = None, query: list[tuple[str, str]] | None = None, body: object = None
) -> Message:
    raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    message = GetMessageClass(found.method.input_type)()
    return build_request(found, message, path or {}, query or [], raw)


# Bindings


def test_every_binding_is_under_the_api_prefix_once_and_its_path_variables_are_request_fields() -> None:
    seen = set()
    for found in BINDINGS:
        assert found.path.startswith("/api/v1/"), found.path
        assert (found.verb, found.path) not in seen, f"{found.verb} {found.path} bound twice"
        seen.add((found.verb, found.path))
        fields = found.method.input_type.fields_by_name
        assert all(name in fields for name in found.path_params), (found.path, found.method.full_name)
        assert found.body in ("", "*") or found.body in fields, (found.path, found.body)


def test_a_rule_and_its_additional_bindings_are_one_binding_each() -> None:
    listed = method_bindings(ORCHESTRATOR.methods_by_name["ListVms"])
    assert [(b.verb, b.path, b.alternate) for b in listed] == [("GET", "/api/v1/vm", 0), ("GET", "/api/v1/vms", 1)]
    assert {b.response_body for b in listed} == {"vms"}


def test_binding_facts_come_from_the_method() -> None:
    created = binding("POST", "/api/v1/repositories")
    assert (created.backend, created.grpc_path, created.success_code) == (
        "registry",
        "/vers.registry.v1.RegistryService/CreateRepository",
        201,
    )
    assert binding("DELETE", "/api/v1/repositories/{repo_name}").success_code == 204
    assert binding("GET", "/api/v1/repositories/{repo_name}").success_code == 200  # no annotation: 200
    assert binding("GET", "/api/v1/repositories/{repo_name}/tags/{tag_name}").path_params == ("repo_name", "tag_name")
    assert binding("POST", "/api/v1/vm/{vm_id}/exec/stream").streaming
    assert not binding("POST", "/api/v1/vm/{vm_id}/exec").streaming


def test_literal_segments_are_matched_before_variables() -> None:
    order = [(b.verb, b.path) for b in BINDINGS]
    assert order.index(("POST", "/api/v1/repositories/fork")) < order.index(("POST", "/api/v1/repositories/{repo_name}/tags"))
    assert order.index(("GET", "/api/v1/commits/public")) < order.index(("GET", "/api/v1/commits/{commit_id}"))


# Requests: path, body, query string


def test_path_variables_fill_their_fields() -> None:
    request = request_of(binding("GET", "/api/v1/repositories/{repo_name}/tags/{tag_name}"), {"repo_name": "app", "tag_name": "v1"})
    assert (request.repo_name, request.tag_name) == ("app", "v1")  # type: ignore[attr-defined]


def test_a_body_star_is_the_whole_request_by_proto_or_json_names() -> None:
    exec_vm = binding("POST", "/api/v1/vm/{vm_id}/exec")
    by_proto = request_of(exec_vm, {"vm_id": "v"}, body={"command": ["ls", "-l"], "env": {"A": "1"}, "timeout_secs": 5})
    by_json = request_of(exec_vm, {"vm_id": "v"}, body={"command": ["ls", "-l"], "env": {"A": "1"}, "timeoutSecs": 5})
    assert by_proto == by_json
    assert (list(by_json.command), dict(by_json.env), by_json.timeout_secs, by_json.vm_id) == (["ls", "-l"], {"A": "1"}, 5, "v")  # type: ignore[attr-defined]


def test_a_body_star_must_be_an_object_without_path_fields() -> None:
    exec_vm = binding("POST", "/api/v1/vm/{vm_id}/exec")
    with pytest.raises(BadRequest, match=r"request body must be a JSON object with fields: vm_id, command, "):
        request_of(exec_vm, {"vm_id": "v"}, body=["ls"])
    with pytest.raises(BadRequest, match=r"^vm_id comes from the URL path, not the body$"):
        request_of(exec_vm, {"vm_id": "v"}, body={"vm_id": "other", "command": ["ls"]})


def test_a_body_naming_a_field_fills_that_field() -> None:
    policy = REGISTRY.methods_by_name["SetRepositoryPolicy"]
    retention = Binding("PUT", "/api/v1/repositories/{repo_name}/retention", "retention", "", 200, policy)
    request = request_of(retention, {"repo_name": "app"}, body={"keep_last": 3, "keepTags": ["release-*"]})
    assert request.retention.keep_last == 3 and list(request.retention.keep_tags) == ["release-*"]  # type: ignore[attr-defined]
    assert request.repo_name == "app" and not request.HasField("immutable_tags")  # type: ignore[attr-defined]


def test_a_body_where_none_is_taken_is_refused() -> None:
    with pytest.raises(BadRequest, match=r"^GET /api/v1/repositories/\{repo_name\} takes no request body$"):
        request_of(binding("GET", "/api/v1/repositories/{repo_name}"), {"repo_name": "app"}, body={"x": 1})


def test_required_fields_must_be_named_even_when_false_or_empty() -> None:
    update = binding("PATCH", "/api/v1/commits/{commit_id}")
    for body in (None, {}, {"name": "n"}, {"is_public": None}):
        with pytest.raises(BadRequest, match=r"^request body must give is_public \(required\)$"):
            request_of(update, {"commit_id": "c"}, body=body)
    assert request_of(update, {"commit_id": "c"}, body={"is_public": False}).is_public is False  # type: ignore[attr-defined]
    assert request_of(update, {"commit_id": "c"}, body={"isPublic": True}).is_public is True  # type: ignore[attr-defined]
    labels = binding("PUT", "/api/v1/vm/{vm_id}/labels")
    assert dict(request_of(labels, {"vm_id": "v"}, body={"labels": {}}).labels) == {}  # type: ignore[attr-defined]
    with pytest.raises(BadRequest, match=r"give labels \(required\)"):
        request_of(labels, {"vm_id": "v"}, body={})


def test_a_value_that_does_not_fit_its_field_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match=r"^request body: "):
        request_of(binding("POST", "/api/v1/vm/{vm_id}/exec"), {"vm_id": "v"}, body={"timeout_secs": "soon"})
    with pytest.raises(BadRequest, match=r"^request body: "):
        request_of(binding("POST", "/api/v1/repositories"), body={"no_such_field": 1})


def test_query_parameters_fill_scalars_lists_and_bools() -> None:
    listed = request_of(binding("GET", "/api/v1/vm"), query=[("label", "a=1"), ("page_size", "5"), ("label", "b=2")])
    assert (list(listed.label), listed.page_size) == (["a=1", "b=2"], 5)  # type: ignore[attr-defined]
    logs = binding("GET", "/api/v1/vm/{vm_id}/logs")
    assert request_of(logs, {"vm_id": "v"}, query=[("offset", "1"), ("offset", "7")]).offset == 7  # type: ignore[attr-defined]
    delete = binding("DELETE", "/api/v1/vm/{vm_id}")
    for text, value in [
        ("true", True),
        ("YES", True),
        ("1", True),
        ("on", True),
        ("", True),
        ("false", False),
        ("0", False),
        ("Off", False),
    ]:
        assert request_of(delete, {"vm_id": "v"}, query=[("skip_wait_boot", text)]).skip_wait_boot is value, text  # type: ignore[attr-defined]
    with pytest.raises(BadRequest, match=r"^query parameter 'skip_wait_boot' must be true or false, not 'maybe'$"):
        request_of(delete, {"vm_id": "v"}, query=[("skip_wait_boot", "maybe")])


def test_query_parameters_that_cannot_be_placed_are_refused_with_what_is_taken() -> None:
    logs = binding("GET", "/api/v1/vm/{vm_id}/logs")
    with pytest.raises(BadRequest, match=r"^unknown query parameter 'limit'; this endpoint takes: offset, max_entries, stream$"):
        request_of(logs, {"vm_id": "v"}, query=[("limit", "1")])
    with pytest.raises(BadRequest, match=r"^'vm_id' comes from the URL path, not the query string$"):
        request_of(logs, {"vm_id": "v"}, query=[("vm_id", "w")])
    with pytest.raises(BadRequest, match=r"^unknown query parameter 'x'; this endpoint takes: none$"):
        request_of(binding("GET", "/api/v1/whoami"), query=[("x", "1")])
    with pytest.raises(BadRequest, match=r"^query string: "):
        request_of(logs, {"vm_id": "v"}, query=[("offset", "ten")])


def test_dotted_query_parameters_reach_nested_fields_and_objects_go_in_the_body() -> None:
    policy = REGISTRY.methods_by_name["SetRepositoryPolicy"]
    by_query = Binding("GET", "/api/v1/repositories/{repo_name}/policy", "", "", 200, policy)
    request = request_of(by_query, {"repo_name": "app"}, query=[("retention.keep_last", "2"), ("retention.keep_tags", "v*")])
    assert (request.retention.keep_last, list(request.retention.keep_tags)) == (2, ["v*"])  # type: ignore[attr-defined]
    with pytest.raises(BadRequest, match=r"^query parameter 'retention' is an object: send it in the JSON body$"):
        request_of(by_query, {"repo_name": "app"}, query=[("retention", "x")])
    with pytest.raises(BadRequest, match=r"^query parameter 'repo_name.x': 'repo_name' has no fields$"):
        request_of(Binding("GET", "/api/v1/policy", "", "", 200, policy), query=[("repo_name.x", "1")])


def test_json_that_is_malformed_or_too_deep_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match=r"^request body is not valid JSON: "):
        load_json(b"{", "request body")
    with pytest.raises(BadRequest, match=r"^request body is not valid JSON: "):
        load_json(b"\xff", "request body")
    assert load_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, "request body") is not None
    deeper = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    with pytest.raises(BadRequest, match=rf"^request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep$"):
        load_json(deeper, "request body")
    with pytest.raises(BadRequest, match=r"more than \d+ levels deep"):
        load_json("[" * 100_000 + "]" * 100_000, "request body")  # past Python's own recursion limit


# Responses and errors


def test_responses_use_proto_names_and_give_every_field() -> None:
    answer = orchestrator_pb2.UpdateCommitResponse(commit=orchestrator_pb2.Commit(commit_id="c", is_public=True))
    data = to_json(answer)
    assert data["commit"]["commit_id"] == "c" and data["commit"]["is_public"] is True
    assert data["commit"]["created_at"] is None and data["commit"]["description"] == ""
    assert to_json(orchestrator_pb2.UpdateCommitResponse()) == {"commit": None}
    update = binding("PATCH", "/api/v1/commits/{commit_id}")
    assert response_json(update, answer) == data["commit"]  # response_body: "commit"


def call_error(code: grpc.StatusCode, details: str, *detail_messages: Message) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata()
    if detail_messages:
        packed = []
        for detail in detail_messages:
            wrapped = AnyMessage()
            wrapped.Pack(detail)
            packed.append(wrapped)
        status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=details, details=packed))
        trailing = grpc.aio.Metadata(*status.trailing_metadata)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=details)


def body_of(response: object) -> dict[str, object]:
    return dict(json.loads(response.body))  # type: ignore[attr-defined]


def test_domain_errors_become_grpc_gateway_statuses() -> None:
    expected = {
        NotFound: 404,
        AlreadyExists: 409,
        Conflict: 409,
        InvalidName: 400,
        PermissionDenied: 403,
        ResourceExhausted: 429,
        Unauthenticated: 401,
    }
    assert {kind: HTTP_STATUS[kind.code] for kind in expected} == expected
    assert set(HTTP_STATUS) == set(grpc.StatusCode) - {grpc.StatusCode.OK}


def test_an_rpc_error_is_a_json_body_with_its_code_and_message() -> None:
    found = binding("GET", "/api/v1/repositories/{repo_name}")
    response = rpc_error_response(found, call_error(grpc.StatusCode.NOT_FOUND, "no repository app"))
    assert response.status_code == 404
    assert body_of(response) == {"error": "no repository app", "success": False, "code": "NOT_FOUND"}
    unavailable = body_of(rpc_error_response(found, call_error(grpc.StatusCode.UNAVAILABLE, "connection refused")))
    assert unavailable["error"] == "the registry service is unavailable: connection refused"
    late = body_of(rpc_error_response(found, call_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")))
    assert str(late["error"]).startswith("the registry service did not answer in time (Deadline Exceeded)")
    assert "VERS_RPC_TIMEOUT_SECONDS" in str(late["error"])


def test_an_rpc_errors_secret_findings_become_a_field() -> None:
    finding = governance_pb2.SecretFinding(commit_id="c", where="disk", path="/root/.env", offset=12, rule="aws-key", excerpt="AKIA…")
    error = call_error(grpc.StatusCode.FAILED_PRECONDITION, "secrets found", governance_pb2.SecretFindings(findings=[finding]))
    response = rpc_error_response(binding("PATCH", "/api/v1/commits/{commit_id}"), error)
    assert response.status_code == 400
    body = body_of(response)
    assert body["code"] == "FAILED_PRECONDITION" and body["error"] == "secrets found"
    assert body["findings"] == [
        {"commit_id": "c", "where": "disk", "path": "/root/.env", "offset": "12", "rule": "aws-key", "excerpt": "AKIA…"}
    ]
