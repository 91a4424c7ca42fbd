"""The protos are the API: lint clean, every RPC has its REST path, and gen/ is what `make gen` makes."""

from __future__ import annotations

import filecmp
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.api import annotations_pb2

from services.gateway.bindings import SERVICE_DESCRIPTORS, all_bindings

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
def test_every_rpc_has_an_http_rule(method) -> None:  # type: ignore[no-untyped-def]
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    assert rule.WhichOneof("pattern") in {"get", "post", "put", "patch", "delete"}
    path = getattr(rule, rule.WhichOneof("pattern"))
    assert path.startswith("/api/v1/")
    for variable in re.findall(r"\{(\w+)\}", path):
        assert variable in method.input_type.fields_by_name, f"{path}: {variable} is not a request field"


@pytest.mark.parametrize(("verb", "path"), SPEC_ROWS)
def test_every_documented_path_is_bound(verb: str, path: str) -> None:
    bound = {(b.verb, b.path) for b in all_bindings()}
    assert (verb, path) in bound


def test_no_two_bindings_share_a_route() -> None:
    routes = [(b.verb, re.sub(r"\{\w+\}", "{}", b.path)) for b in all_bindings()]
    assert len(routes) == len(set(routes))
