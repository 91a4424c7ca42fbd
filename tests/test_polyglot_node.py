"""The protos from another language: a Node.js client (tests/node: @grpc/grpc-js and @grpc/proto-loader, which
build the stubs from protos/ at run time) creates a repository, tags a commit and reads the tag back over gRPC,
and the REST API sees exactly what it was told."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
from pathlib import Path

import google.api
import httpx
import pytest

from tests.conftest import ROOT, Org, Platform

pytestmark = pytest.mark.vm

NODE_CLIENT = ROOT / "tests" / "node"


def proto_include_dirs() -> list[str]:
    """protos/, and the folders holding google/api/*.proto (googleapis-common-protos, as `make gen` uses them)
    and google/protobuf/*.proto (grpcio-tools)."""
    grpc_tools = importlib.util.find_spec("grpc_tools")
    assert grpc_tools is not None and grpc_tools.origin, "grpcio-tools is not installed: run `make install`"
    return [str(ROOT / "protos"), str(Path(google.api.__path__[0]).parents[1]), str(Path(grpc_tools.origin).parent / "_proto")]


def node() -> str:
    found = shutil.which("node")
    assert found, "Node.js is not installed: run `make install` (it installs Debian's nodejs and npm)"
    assert (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        "tests/node has no node_modules: run `make install`, or `npm ci --prefix tests/node`"
    )
    return found


async def run_node_client(request: dict[str, object]) -> dict[str, object]:
    process = await asyncio.create_subprocess_exec(
        node(),
        str(NODE_CLIENT / "client.js"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(json.dumps(request).encode()), timeout=120)
    assert process.returncode == 0, f"the Node.js client failed: {stderr.decode()}"
    answer: dict[str, object] = json.loads(stdout)
    return answer


async def new_commit(http: httpx.AsyncClient) -> str:
    """A commit of a fresh root VM; the VM itself goes once it is committed (the commit stays)."""
    booted = await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {}})
    assert booted.status_code == 201, booted.text
    vm_id = booted.json()["vm_id"]
    committed = await http.post(f"/api/v1/vm/{vm_id}/commit", json={"name": "polyglot"})
    assert committed.status_code == 201, committed.text
    assert (await http.delete(f"/api/v1/vm/{vm_id}")).status_code == 200
    commit_id: str = committed.json()["commit_id"]
    return commit_id


async def test_node_client_creates_tags_and_resolves_over_grpc(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        commit_id = await new_commit(http)
        answer = await run_node_client(
            {
                "include_dirs": proto_include_dirs(),
                "registry": platform.settings.addr("registry"),
                "tagging": platform.settings.addr("tagging"),
                "api_key": org.key,
                "repo_name": "from-node",
                "tag_name": "latest",
                "commit_id": commit_id,
            }
        )
        repository = (await http.get("/api/v1/repositories/from-node")).json()
        tag = (await http.get("/api/v1/repositories/from-node/tags/latest")).json()
        missing = await http.get("/api/v1/repositories/from-node/tags/latest-missing")
    assert answer["repository"] == {"repo_id": repository["repo_id"]}
    assert answer["created"] == {"tag_id": tag["tag_id"], "commit_id": commit_id, "reference": "from-node:latest"}
    assert answer["resolved"] == {"tag_id": tag["tag_id"], "tag_name": "latest", "commit_id": commit_id, "reference": "from-node:latest"}
    assert tag["commit_id"] == commit_id
    # the same error in both languages: NOT_FOUND over gRPC is 404 over REST, with the same message
    assert (missing.status_code, missing.json()["code"]) == (404, "NOT_FOUND")
    assert answer["missing"] == {"code": "NOT_FOUND", "details": missing.json()["error"]}
