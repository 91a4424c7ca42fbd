"""The protos are the API: lint clean, every public RPC has its REST path and no internal one has any, the
REST surface is exactly the documented one, and gen/ is what `make gen` makes."""

from __future__ import annotations

import filecmp
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.api import annotations_pb2
from google.protobuf.descriptor import ServiceDescriptor

import vers
from services.gateway.bindings import SERVICE_DESCRIPTORS, all_bindings
from services.gateway.openapi import openapi_document
from vers.common.v1 import annotations_pb2 as vers_annotations

ROOT = Path(__file__).resolve().parent.parent
SPEC_ROWS = [
    # spec/repositories.md, API Surface
    ("GET", "/api/v1/repositories"),
    ("POST", "/api/v1/repositories"),
    ("GET", "/api/v1/repositories/{repo_name}"),
    ("DELETE", "/api/v1/repositories/{repo_name}"),
    ("PATCH", "/api/v1/repositories/{repo_name}/visibility"),
    ("POST", "/api/v1/repositories/fork"),
    ("GET", "/api/v1/repositories/{repo_name}/tags"),
    ("POST", "/api/v1/repositories/{repo_name}/tags"),
    ("GET", "/api/v1/repositories/{repo_name}/tags/{tag_name}"),
    ("PATCH", "/api/v1/repositories/{repo_name}/tags/{tag_name}"),
    ("DELETE", "/api/v1/repositories/{repo_name}/tags/{tag_name}"),
    ("GET", "/api/v1/public/repositories"),
    ("GET", "/api/v1/public/repositories/{org_name}/{repo_name}"),
    ("GET", "/api/v1/public/repositories/{org_name}/{repo_name}/tags"),
    ("GET", "/api/v1/public/repositories/{org_name}/{repo_name}/tags/{tag_name}"),
    ("POST", "/api/v1/vm/from_commit"),
    ("POST", "/api/v1/vm/branch/by_ref/{repo_name}/{tag_name}"),
    # spec/vm-api.md
    ("GET", "/api/v1/whoami"),
    ("POST", "/api/v1/keys/validate"),
    ("POST", "/api/v1/vm/new_root"),
    ("POST", "/api/v1/vm/{vm_or_commit_id}/branch"),
    ("POST", "/api/v1/vm/branch/by_vm/{vm_id}"),
    ("POST", "/api/v1/vm/branch/by_commit/{commit_id}"),
    ("POST", "/api/v1/vm/branch/by_tag/{tag_name}"),
    ("POST", "/api/v1/vm/{vm_id}/commit"),
    ("PATCH", "/api/v1/vm/{vm_id}/state"),
    ("GET", "/api/v1/vm"),
    ("GET", "/api/v1/vms"),
    ("GET", "/api/v1/vm/{vm_id}/status"),
    ("GET", "/api/v1/vm/{vm_id}/metadata"),
    ("POST", "/api/v1/vm/{vm_id}/exec"),
    ("DELETE", "/api/v1/vm/{vm_id}"),
    ("GET", "/api/v1/commits"),
    ("GET", "/api/v1/commits/{commit_id}"),
    ("GET", "/api/v1/vm/commits/{commit_id}/parents"),
    ("DELETE", "/api/v1/commits/{commit_id}"),
    ("POST", "/api/v1/commit_tags"),
    ("GET", "/api/v1/commit_tags"),
    ("GET", "/api/v1/commit_tags/{tag_name}"),
    ("PATCH", "/api/v1/commit_tags/{tag_name}"),
    ("DELETE", "/api/v1/commit_tags/{tag_name}"),
]


# The whole REST surface, each group with the document that gives it: the gateway serves these and no
# other (an RPC only the services call on each other belongs in an internal service, with no path).
DOCUMENTED_ROWS = [
    *SPEC_ROWS,
    # spec/vm-api-more.md: the official SDK's further methods
    ("GET", "/api/v1/commits/public"),
    ("PATCH", "/api/v1/commits/{commit_id}"),
    ("GET", "/api/v1/domains"),
    ("POST", "/api/v1/domains"),
    ("GET", "/api/v1/domains/{domain_id}"),
    ("DELETE", "/api/v1/domains/{domain_id}"),
    ("GET", "/api/v1/env_vars"),
    ("PUT", "/api/v1/env_vars"),
    ("DELETE", "/api/v1/env_vars/{key}"),
    ("POST", "/api/v1/deploy"),
    ("GET", "/api/v1/system/version"),
    ("GET", "/api/v1/vm/{vm_id}/files"),
    ("PUT", "/api/v1/vm/{vm_id}/files"),
    ("GET", "/api/v1/vm/{vm_id}/logs"),
    ("GET", "/api/v1/vm/{vm_id}/ssh_key"),
    ("PATCH", "/api/v1/vm/{vm_id}/disk"),
    ("PATCH", "/api/v1/vm/{vm_id}/label"),
    ("PUT", "/api/v1/vm/{vm_id}/labels"),
    ("DELETE", "/api/v1/vm/{vm_id}/label/{label_name}"),
    ("POST", "/api/v1/vm/{vm_id}/exec/stream"),
    ("POST", "/api/v1/vm/{vm_id}/exec/stream/attach"),
    ("GET", "/api/v1/images"),
    ("GET", "/api/v1/images/{image_name}/status"),
    ("POST", "/api/v1/images/create"),
    ("POST", "/api/v1/images/upload"),
    ("DELETE", "/api/v1/images/images/{base_image_id}"),
    # README, "A tour of the REST API" and the sections after it: the console and tunnel WebSockets, files as
    # tar, repository policy and tag history, keys, the audit log, retention and gc, the administrator's orgs;
    ("GET", "/api/v1/vm/{vm_id}/console"),
    ("GET", "/api/v1/vm/{vm_id}/tunnel"),
    ("GET", "/api/v1/vm/{vm_id}/files/tar"),
    ("PUT", "/api/v1/vm/{vm_id}/files/tar"),
    ("PATCH", "/api/v1/repositories/{repo_name}/policy"),
    ("GET", "/api/v1/repositories/{repo_name}/tags/{tag_name}/history"),
    ("POST", "/api/v1/keys"),
    ("GET", "/api/v1/keys"),
    ("DELETE", "/api/v1/keys/{key_id}"),
    ("GET", "/api/v1/audit"),
    ("POST", "/api/v1/gc"),
    ("GET", "/api/v1/retention"),
    ("PATCH", "/api/v1/retention"),
    ("POST", "/api/v1/admin/orgs"),
    ("GET", "/api/v1/admin/orgs"),
    ("PATCH", "/api/v1/admin/orgs/{org}/limits"),
    # README, "Several VM hosts": the administrator's list of the host agents
    ("GET", "/api/v1/admin/hosts"),
    ("DELETE", "/api/v1/admin/hosts/{host_id}"),
]
# Routes that are WebSockets on the gateway, not operations of the OpenAPI document.
WEBSOCKETS = {("GET", "/api/v1/vm/{vm_id}/console"), ("GET", "/api/v1/vm/{vm_id}/tunnel")}


def all_services() -> list[ServiceDescriptor]:
    """Every service of every generated proto module under vers/."""
    found: dict[str, ServiceDescriptor] = {}
    for module in pkgutil.walk_packages(vers.__path__, "vers."):
        if module.name.endswith("_pb2"):
            for service in importlib.import_module(module.name).DESCRIPTOR.services_by_name.values():
                found[service.full_name] = service
    return list(found.values())


INTERNAL_SERVICES = [s for s in all_services() if s.name.endswith("InternalService")]


def shape(rows: object) -> set[tuple[str, str]]:
    """Routes with their variables unnamed, so a path template's own syntax (`{name=**}`) compares too."""
    return {(verb, re.sub(r"\{[^}]*\}", "{}", path)) for verb, path in rows}  # type: ignore[attr-defined]


def test_buf_lint_standard_passes() -> None:
    result = subprocess.run([sys.executable, "scripts/lint_protos.py"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ignore" not in (ROOT / "buf.yaml").read_text()


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "scripts/gen_protos.py", str(tmp_path)], cwd=ROOT, check=True, capture_output=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(ROOT / "gen") for p in (ROOT / "gen").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert fresh == committed, "gen/ has other files than `make gen` makes: run `make gen`"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, ROOT / "gen" / p, shallow=False)]
    assert not stale, f"gen/ is stale, run `make gen`: {stale}"


@pytest.mark.parametrize("method", [m for s in SERVICE_DESCRIPTORS for m in s.methods], ids=lambda m: m.full_name)
def test_every_public_rpc_has_an_http_rule(method) -> None:  # type: ignore[no-untyped-def]
    assert not method.GetOptions().Extensions[vers_annotations.internal_method], "an internal method belongs in an internal service"
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    assert rule.WhichOneof("pattern") in {"get", "post", "put", "patch", "delete"}
    path = getattr(rule, rule.WhichOneof("pattern"))
    assert path.startswith("/api/v1/")
    for variable in re.findall(r"\{(\w+)\}", path):
        assert variable in method.input_type.fields_by_name, f"{path}: {variable} is not a request field"


@pytest.mark.parametrize("method", [m for s in INTERNAL_SERVICES for m in s.methods], ids=lambda m: m.full_name)
def test_internal_rpcs_have_no_http_rule_and_take_only_the_service_credential(method) -> None:  # type: ignore[no-untyped-def]
    options = method.GetOptions()
    assert not options.HasExtension(annotations_pb2.http), "a call between services has no REST path"
    assert options.Extensions[vers_annotations.internal_method]


def test_the_gateway_routes_public_services_only() -> None:
    assert len(INTERNAL_SERVICES) >= 2
    assert not {s.full_name for s in SERVICE_DESCRIPTORS} & {s.full_name for s in INTERNAL_SERVICES}
    for service in all_services():
        if service not in SERVICE_DESCRIPTORS:
            assert not any(m.GetOptions().HasExtension(annotations_pb2.http) for m in service.methods), service.full_name


def test_the_rest_surface_is_exactly_the_documented_one() -> None:
    """The route table and /openapi.json: every documented route, and nothing the documentation lacks."""
    assert len(DOCUMENTED_ROWS) == len(set(DOCUMENTED_ROWS))
    bindings = all_bindings()
    assert shape((b.verb, b.path) for b in bindings) == shape(DOCUMENTED_ROWS)
    operations = {(verb.upper(), path) for path, verbs in openapi_document(bindings)["paths"].items() for verb in verbs}
    assert shape(operations) == shape(set(DOCUMENTED_ROWS) - WEBSOCKETS)


@pytest.mark.parametrize(("verb", "path"), SPEC_ROWS)
def test_every_documented_path_is_bound(verb: str, path: str) -> None:
    bound = {(b.verb, b.path) for b in all_bindings()}
    assert (verb, path) in bound


def test_no_two_bindings_share_a_route() -> None:
    routes = [(b.verb, re.sub(r"\{\w+\}", "{}", b.path)) for b in all_bindings()]
    assert len(routes) == len(set(routes))
