"""The REST API fuzzed from its own /openapi.json: for every operation, bounded examples (derandomized, so
a run repeats) sent as an ordinary organization, and every answer checked against the document: never a
5xx, only documented statuses, bodies and content types as documented. Three kinds of examples: valid
ones ("positive"), invalid ones ("negative"), and valid ones whose path names the org's own objects
("existing": a VM, its commit, a repository and tag, a legacy tag, a domain, an API key), where the
domain logic runs rather than the lookup's 404.

The platform runs in a thread of its own, with its own event loop, because schemathesis calls it
synchronously from the test's thread. Its organizations may run one small VM each, so the fuzz of the
routes that make VMs makes at most one; whatever it made is deleted at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.common.interceptor import Access, method_access
from services.gateway.bindings import all_bindings
from services.gateway.openapi import ERROR_STATUSES, openapi_document
from tests.conftest import Org, Platform, kill_vms_under
from tests.conftest import test_settings as platform_settings

T = TypeVar("T")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MAX_EXAMPLES = 15  # per operation and kind of example, derandomized: bounded so the suite stays within 30 minutes


@dataclass
class Running:
    platform: Platform
    org: Org
    loop: asyncio.AbstractEventLoop

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


@contextlib.contextmanager
def platform_in_a_thread(data_dir: Path) -> Iterator[Running]:
    settings_ = platform_settings(data_dir).model_copy(
        update={
            "org_max_vcpus": 1,
            "org_max_memory_mib": 256,
            # a made-up command with a made-up timeout ends in seconds, not in the hour allowed by default
            "exec_default_timeout_seconds": 5,
            "exec_max_timeout_seconds": 10,
            "rate_limit_per_second": 10_000.0,
            "rate_limit_burst": 100_000,
            "auth_failures_per_minute": 100_000,
        }
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzzed-platform", daemon=True)
    thread.start()
    running = None
    try:
        platform = asyncio.run_coroutine_threadsafe(Platform.start(settings_), loop).result(300)
        assert isinstance(platform, Platform)
        running = Running(platform, Org("", "", ""), loop)
        running.org = running.run(platform.new_org("fuzz"))
        yield running
    finally:
        if running is not None:
            with contextlib.suppress(Exception):
                running.run(delete_vms(running.platform, running.org), timeout=120)
            kill_vms_under(running.platform.settings.vm_run_dir)
            running.run(asyncio.sleep(0.3))
            running.run(running.platform.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


async def delete_vms(platform: Platform, org: Org) -> list[str]:
    async with platform.client(org) as http:
        vms = [vm["vm_id"] for vm in (await http.get("/api/v1/vm")).json()]
        for vm in vms:
            await http.delete(f"/api/v1/vm/{vm}")
        return [vm["vm_id"] for vm in (await http.get("/api/v1/vm")).json()]


@pytest.fixture(scope="module")
def fuzzed(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with platform_in_a_thread(tmp_path_factory.mktemp("vers-fuzz")) as running:
        yield running


async def make_objects(platform: Platform, org: Org) -> dict[str, str]:
    """Objects of the fuzzing org to fuzz the routes on, by path parameter: a VM, its commit, a repository
    whose tag and a legacy tag share one name, a domain, and an API key other than the one it calls with."""
    async with platform.client(org) as http:
        vm = (await http.post("/api/v1/vm/new_root", params={"wait_boot": "true"}, json={})).json()["vm_id"]
        committed = await http.post(f"/api/v1/vm/{vm}/commit", json={})
        commit = committed.json()["commit_id"] if committed.status_code == 201 else str(uuid.uuid4())
        repo, tag = f"repo-{uuid.uuid4().hex[:8]}", f"tag-{uuid.uuid4().hex[:8]}"
        await http.post("/api/v1/repositories", json={"name": repo})
        await http.post(f"/api/v1/repositories/{repo}/tags", json={"tag_name": tag, "commit_id": commit})
        await http.post("/api/v1/commit_tags", json={"tag_name": tag, "commit_id": commit})
        domain = await http.post("/api/v1/domains", json={"domain": f"fuzz-{uuid.uuid4().hex[:8]}", "vm_id": vm})
        key = (await http.post("/api/v1/keys", json={"label": "fuzzed"})).json()["api_key"]["id"]
        await http.put("/api/v1/env_vars", json={"vars": {"FUZZED": "value"}})
        await http.patch(f"/api/v1/vm/{vm}/label", json={"labels": {"fuzzed": "yes"}})
        image = f"img-{uuid.uuid4().hex[:8]}"
        await http.post("/api/v1/images/create", json={"image_name": image, "source": {"type": "recipe", "recipe": "default"}})
        for _ in range(600):  # built in a few seconds
            if (await http.get(f"/api/v1/images/{image}/status")).json()["status"] != "creating":
                break
            await asyncio.sleep(0.1)
        listed = (await http.get("/api/v1/images")).json()["images"]
        image_id = next(made["base_image_id"] for made in listed if made["image_name"] == image)
    return {
        "vm_id": vm,
        "vm_or_commit_id": vm,
        "commit_id": commit,
        "repo_name": repo,
        "tag_name": tag,
        "org_name": org.name,
        "org": org.name,
        "domain_id": domain.json().get("domain_id", str(uuid.uuid4())),
        "key_id": key,
        "key": "FUZZED",
        "label_name": "fuzzed",
        "image_name": image,
        "base_image_id": image_id,
        "host_id": "forgotten-host",  # removing a host no one knows is nothing to do (the one host is up)
    }


@pytest.fixture(scope="module")
def existing(fuzzed: Running) -> dict[str, str]:
    return fuzzed.run(make_objects(fuzzed.platform, fuzzed.org))


@pytest.fixture(scope="module")
def api_schema(fuzzed: Running) -> Any:
    return schemathesis.openapi.from_url(fuzzed.platform.url + "/openapi.json", timeout=30)


# Every operation the gateway serves over plain HTTP, from the same route table as the gateway itself.
# Deletes last, the VM's last of all, so the other operations find the objects they are given.
OPERATIONS = sorted(
    {(b.path, b.verb) for b in all_bindings() if not b.streaming},
    key=lambda op: (op[1] == "DELETE", op == ("/api/v1/vm/{vm_id}", "DELETE"), op),
)
# "existing": valid requests on the fuzzing org's own objects, where the path names one
MODES = {"positive": GenerationMode.POSITIVE, "negative": GenerationMode.NEGATIVE, "existing": GenerationMode.POSITIVE}
# (operation, mode, status) -> how many answers, printed at the end of the module
SEEN: Counter[tuple[str, str, int]] = Counter()


# Operations that fail because of a bug elsewhere, each with the file to fix; strict, so each turns red once fixed.
KNOWN: dict[tuple[str, str, str], str] = {}


def _takes_nothing(path: str, verb: str) -> bool:
    """No parameter, no body, no key: nothing a request could get wrong (the negative mode has nothing to try)."""
    binding = next(b for b in all_bindings() if (b.path, b.verb) == (path, verb))
    return not binding.method.input_type.fields and method_access(binding.grpc_path) is Access.PUBLIC


def cases() -> list[Any]:
    found = []
    for path, verb in OPERATIONS:
        for mode in MODES:
            if mode == "existing" and "{" not in path:
                continue  # no object in the path: the positive mode covers it
            if mode == "negative" and _takes_nothing(path, verb):
                continue
            reason = KNOWN.get((path, verb, mode))
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
            found.append(pytest.param(path, verb, mode, marks=marks, id=f"{verb} {path}-{mode}"))
    return found


def test_commit_of_a_vm_kept_paused_by_a_commit(fuzzed: Running, existing: dict[str, str]) -> None:
    """Commit with keep_paused=true, then commit again (QEMU refuses to save a VM an earlier save left
    stopped until it ran). Runs before the fuzz, on its VM."""

    async def twice() -> list[int]:
        vm = existing["vm_id"]
        async with fuzzed.platform.client(fuzzed.org) as http:
            first = await http.post(f"/api/v1/vm/{vm}/commit", json={"keep_paused": True})
            second = await http.post(f"/api/v1/vm/{vm}/commit", json={})
            await http.patch(f"/api/v1/vm/{vm}/state", json={"state": "Running"})
        return [first.status_code, second.status_code]

    assert fuzzed.run(twice()) == [201, 201]


@pytest.mark.parametrize(("path", "verb", "mode"), cases())
def test_operation_answers_as_documented(
    fuzzed: Running, api_schema: Any, existing: dict[str, str], path: str, verb: str, mode: str
) -> None:
    operation = api_schema[path][verb]
    names = re.findall(r"\{(\w+)\}", path)
    bound = {name: existing[name] for name in names} if mode == "existing" else None
    # A value a literal route answers instead (the document leaves it out): the negative mode sends it anyway.
    document = openapi_document(all_bindings())["paths"][path][verb.lower()]
    taken = {p["name"]: p["schema"]["not"]["enum"] for p in document["parameters"] if "not" in p["schema"]}

    @given(case=operation.as_strategy(generation_mode=MODES[mode], path_parameters=bound))
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )
    def answers_as_documented(case: Any) -> None:
        if any(case.path_parameters.get(name) in values for name, values in taken.items()):
            return  # another route's path ("public" of GET /commits/public): the document says so, not a mistake
        response = case.call_and_validate(base_url=fuzzed.platform.url, headers=fuzzed.org.auth, checks=CHECKS, timeout=240)
        SEEN[(f"{verb} {path}", mode, response.status_code)] += 1

    try:
        answers_as_documented()
    finally:
        if mode == "existing":  # a VM an example paused is running again for the next operation
            fuzzed.run(resume(fuzzed.platform, fuzzed.org, existing["vm_id"]))


async def resume(platform: Platform, org: Org, vm: str) -> None:
    async with platform.client(org) as http:
        await http.patch(f"/api/v1/vm/{vm}/state", json={"state": "Running"})


def test_the_fuzz_leaves_no_vm_running(fuzzed: Running) -> None:
    """Runs after the fuzz (pytest keeps the file's order): what it made is deleted, and nothing is left."""
    for (operation, mode, status), count in sorted(SEEN.items()):
        print(f"{operation:<72} {mode:<8} {status} x{count}")
    print(f"{sum(SEEN.values())} requests, statuses {sorted({status for _, _, status in SEEN})}")
    assert fuzzed.run(delete_vms(fuzzed.platform, fuzzed.org), timeout=180) == []


def test_the_document_describes_every_error_of_every_operation() -> None:
    document = openapi_document(all_bindings())
    for path, operations in document["paths"].items():
        for verb, operation in operations.items():
            responses = operation["responses"]
            documented = {int(status) for status in responses}
            assert set(ERROR_STATUSES) <= documented, (verb, path)
            for status in ERROR_STATUSES:
                schema_ref = responses[str(status)]["content"]["application/json"]["schema"]["$ref"]
                assert schema_ref == "#/components/schemas/Error"
            success = [s for s in documented if 200 <= s < 300]
            assert len(success) == 1, (verb, path)
    assert {400, 401, 403, 404, 409, 413, 429, 500, 503, 504} <= set(ERROR_STATUSES)
